"""A self-contained LLaMA in plain PyTorch, built for tree verification and pseudo tokens.

RMSNorm, rotary position embeddings (with Llama-3.1-style scaling), grouped-query attention,
SwiGLU, and a preallocated KV cache, each readable top to bottom. Unlike a textbook LLaMA, every
call is explicit: the caller passes position ids, cache slots and a boolean attention mask, and may
run any range of layers. That is all Hidden Transfer needs from the model (METHOD.md, "Positions
are not cache slots"). Read next: tree.py, the token trees one decoding step verifies.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 576                    # width of the residual stream
    n_layers: int = 30                # number of decoder blocks
    n_heads: int = 9                  # query heads
    n_kv_heads: Optional[int] = 3     # key/value heads (grouped-query attention); None = n_heads
    ffn_dim: int = 1536               # hidden width of the SwiGLU feed-forward
    vocab_size: int = 49152
    rope_theta: float = 100000.0
    rope_scaling: Optional[dict] = None  # Llama-3.1 style: factor, low_freq_factor, high_freq_factor,
                                         # original_max_position_embeddings
    norm_eps: float = 1e-5
    tie_embeddings: bool = True       # the LM head reuses the token embedding matrix
    max_seq_len: int = 8192           # longest context (bounds the KV cache)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads "
                             f"{self.n_kv_heads} must divide evenly")
        self.head_dim = self.dim // self.n_heads

    @classmethod
    def tiny(cls, **overrides):
        """A small random model for tests: every feature of the real one, at toy size."""
        base = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=96,
                    rope_theta=10000.0, max_seq_len=256)
        return cls(**{**base, **overrides})


# ----------------------------------------------------------------------------- rotary embeddings

def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3.1's long-context rescaling if configured."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).double() / args.head_dim))
    s = args.rope_scaling
    if s:  # keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq.float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, heads, T, head_dim); cos, sin: (B or 1, 1, T, head_dim). Hugging Face's "rotate_half"
    # layout: dimension i pairs with i + head_dim/2 (weights.py converts Meta/GGUF layouts to it).
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- the KV cache

class KVCache:
    """Preallocated keys and values for every layer, addressed by cache slot.

    A token's cache slot and its RoPE position are separate things: in a token tree two siblings
    share a position (same depth) but need two slots. Slots 0..kv_len-1 are what a call may read;
    anything written beyond is invisible until a later call widens kv_len.
    """

    def __init__(self, args: ModelArgs, batch: int = 1, max_len: Optional[int] = None,
                 device=None, dtype=torch.float32):
        self.max_len = max_len or args.max_seq_len
        shape = (args.n_layers, batch, args.n_kv_heads, self.max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, n, hd) of `layer` at `slots` (n,); return the layer's whole cache,
        keys and values (B, n_kv, max_len, hd)."""
        self.k[layer][:, :, slots] = k
        self.v[layer][:, :, slots] = v
        return self.k[layer], self.v[layer]

    def move(self, src: torch.Tensor, dst: torch.Tensor):
        """Copy the K/V at slots `src` to slots `dst` in every layer (compaction after a step)."""
        self.k[:, :, :, dst] = self.k[:, :, :, src]
        self.v[:, :, :, dst] = self.v[:, :, :, src]

    def attention_mask(self, mask: torch.Tensor, n, cached: Optional[int] = None) -> torch.Tensor:
        """(R, C) bool mask over a call's own tokens -> (1, R, n + C), the columns Attention reads:
        the n tokens already in the cache first, every row seeing them all.

            keys ->   0 .. n-1 | this call's tokens
            row r     1 ... 1  | mask[r]

        `cached`, how many of the C columns are tokens this call stores, matters only to a cache
        that lays its columns out otherwise (tools/compiled.py's, as wide as the whole cache).
        """
        return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1).unsqueeze(0)

    def check(self, slots: torch.Tensor, mask: torch.Tensor):
        """A user's mistake, before it turns into an index error or NaN: slots beyond the cache,
        or a mask row with nothing to attend to."""
        if slots.numel() and int(slots.max()) >= self.max_len:
            raise ValueError(f"cache slot {int(slots.max())} is beyond the cache ({self.max_len} "
                             "slots): raise max_seq_len or shorten the prompt")
        check_mask(mask)


def check_mask(mask: torch.Tensor):
    if not bool(mask.any(-1).all()):  # softmax over no key at all is NaN
        raise ValueError("attention mask has a row with nothing to attend to")


# ----------------------------------------------------------------------------- the blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(args.n_heads * self.hd, args.dim, bias=False)

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(hd), masked) v: q (B, nh, R, hd), k, v (B, n_kv, S, hd), mask (B|1, R, S)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1),
                                              enable_gqa=self.n_kv != self.n_heads)

    def forward(self, x, cos, sin, mask, slots=None, cache=None):
        """x: (B, T, dim). The first len(slots) tokens are written to the cache at `slots`; the
        remaining T - len(slots) tokens are ephemeral (pseudo tokens): their K/V serve this call only.

        Keys seen by the queries, in this order, and so the columns of `mask` (B or 1, T, S):
            [ cache slots 0 .. kv_len-1 | the ephemeral tokens of this call ]
        With no cache every token is ephemeral and this is an ordinary full forward.
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # (B, n_kv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            return self.wo(self.attend(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))
        n = slots.numel()                                      # tokens to store; the rest are ephemeral
        kv_len = mask.shape[-1] - (T - n)                      # the cache columns of the mask
        ck, cv = cache.update(self.layer, slots, k[:, :, :n], v[:, :, :n])  # (B, n_kv, max_len, hd)
        ck, cv = ck[:, :, :kv_len], cv[:, :, :kv_len]          # a view: the cache read in place
        # The stored (real) rows read the cache columns only: a masked column still enters the product
        # as 0 x value, and 0 x NaN is NaN, so no drafter value may even be in the real rows' product.
        rows = [self.attend(q[:, :, :n], ck, cv, mask[:, :n, :kv_len])] if n else []
        if n < T:  # the ephemeral rows read the cache and the ephemeral tokens
            k = torch.cat([ck, k[:, :, n:]], dim=2)            # (B, n_kv, kv_len + T - n, hd)
            v = torch.cat([cv, v[:, :, n:]], dim=2)
            rows.append(self.attend(q[:, :, n:], k, v, mask[:, n:]))
        y = torch.cat(rows, dim=2) if len(rows) > 1 else rows[0]  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))    # (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, slots, cache):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, slots, cache)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    """LLaMA, callable as a whole (`model(tokens, pos, mask, ...)` -> logits) or in pieces:
    `embed` -> `run_layers(start, stop)` -> ... -> `head`. Hidden Transfer stops after layer t,
    appends pseudo tokens, and continues with layers t+1..L.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList([Block(args, i) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)

    def init_random(self, seed: int = 0, std: float = 0.02):
        """Random weights for tests and for speed runs at real shapes."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=g))
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)  # (B, T) -> (B, T, dim)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))  # (B, T, dim) -> (B, T, vocab)

    def rope(self, pos: torch.Tensor, dtype):
        """cos, sin (B or 1, 1, T, head_dim) of RoPE at position ids pos, (T,) or (B, T)."""
        freqs = pos.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq  # (.., T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)                             # (.., T, hd)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return cos.view(-1, 1, *cos.shape[-2:]), sin.view(-1, 1, *sin.shape[-2:])

    def run_layers(self, h, pos, mask, slots=None, cache=None, start=0, stop=None):
        """Run decoder layers [start, stop) (0-based; layer l of METHOD.md is index l-1).

        h: (B, T, dim) hidden states. pos: (T,) or (B, T) RoPE position ids.
        mask: (B or 1, T, S) bool, True = may attend; columns as in Attention.forward.
        slots: (n,) cache slots of the first n tokens (n <= T); None with no cache.
        """
        if cache is None:
            check_mask(mask)
        elif slots is None:
            raise ValueError("a cached call needs the cache slots of its tokens")
        else:
            cache.check(slots, mask)
        cos, sin = self.rope(pos, h.dtype)
        for layer in self.layers[start:stop]:
            h = layer(h, cos, sin, mask, slots, cache)
        return h

    def forward(self, tokens, pos, mask, slots=None, cache=None):
        """All layers: token ids (B, T) -> logits (B, T, vocab)."""
        return self.head(self.run_layers(self.embed(tokens), pos, mask, slots, cache))


def causal_mask(T: int, past: int = 0, device=None) -> torch.Tensor:
    """(1, T, past + T) bool: T new tokens after `past` cached ones, each seeing the past and itself.

        keys ->   past | new
        query 0   1..1 | 1 . .
        query 1   1..1 | 1 1 .
        query 2   1..1 | 1 1 1
    """
    new = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(T, past, dtype=torch.bool, device=device), new], 1).unsqueeze(0)
