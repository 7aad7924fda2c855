"""The hidden transfer: k trained linear maps from one token's hidden state to the pseudo hidden
states of the next k tokens (arXiv 2404.12022; METHOD.md, "Notation").

After transfer layer t, real token p's state h^t_p becomes pseudo tokens h~_(p,i) = W_i h^t_p
(i = 1..k) at positions p+i. They run through layers t+1..L beside the real tokens, then the LM
head turns them into drafts for positions p+i+1: `tree_pass` in decoding, `train_pass` in
training (tree.py draws the mask). To try another map (a small MLP, say), subclass and override
`projection`; nothing else changes (tests/test_extension.py). Read next: plan.py, which decides
which nodes carry pseudo tokens.
"""

import torch
import torch.nn as nn

from drafter import Drafter
from model import KVCache, Transformer, causal_mask
from tree import pseudo_mask, pseudo_positions, pseudo_rows


def default_layer(n_layers: int) -> int:
    """t = 2L/3 (20 of SmolLM2's 30): the lowest held-out KL at every offset in this project's layer
    sweep (METHOD.md, "This project's choices"), and the pseudo tokens then cost only L - t layers
    per pass. t is 1-based, as in METHOD.md: layers 1..t are model.layers[:t]."""
    return 2 * n_layers // 3


class HiddenTransfer(Drafter):
    kind, title = "transfer", "Hidden Transfer"

    def __init__(self, dim: int, k: int, layer: int, bias: bool = True):
        super().__init__()
        self.dim, self.k, self.layer, self.bias = dim, k, layer, bias  # layer = t: pseudo tokens start after it
        self.proj = self.projection(dim, k, bias)

    def projection(self, dim: int, k: int, bias: bool) -> nn.Module:
        """The trained map: (..., dim) -> (..., k*dim), W_1 h .. W_k h side by side. Here W_1..W_k
        stacked into one (k*dim, dim) linear layer, so one product makes all k pseudo states,
        starting as the identity: every pseudo token begins as a copy of its source."""
        proj = nn.Linear(dim, k * dim, bias=bias)
        with torch.no_grad():
            proj.weight.copy_(torch.eye(dim).repeat(k, 1))
            if bias:
                proj.bias.zero_()
        return proj

    @classmethod
    def for_model(cls, model: Transformer, k: int, layer: int | None = None) -> "HiddenTransfer":
        drafter = cls(model.args.dim, k, layer or default_layer(model.args.n_layers))
        drafter.check(model)
        return drafter

    def config(self) -> dict:
        return {"dim": self.dim, "k": self.k, "layer": self.layer, "bias": self.bias}

    def check(self, model: Transformer):
        L = model.args.n_layers
        if not 1 <= self.layer < L:
            raise ValueError(f"transfer layer {self.layer} must be from 1 to {L - 1} for this {L}-layer model")

    def forward(self, h: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """(..., dim) -> (..., depth, dim): W_1 h .. W_depth h (depth = k by default)."""
        y = self.proj(h.to(self.dtype)).to(h.dtype)           # (..., k*dim), in the drafter's dtype
        return y.unflatten(-1, (self.k, self.dim))[..., :depth or self.k, :]  # (..., depth, dim)

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def tree_pass(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):
        """Drafter.tree_pass: layers 1..t over the nodes, then layers t+1..L over the nodes and
        `depth` pseudo tokens for each of `nodes`, never cached. states: the pseudo tokens' final
        hidden states (len(nodes), depth, dim)."""
        N, t, depth = tokens.shape[1], self.layer, self.k if depth is None else depth
        if not 1 <= depth <= self.k:
            raise ValueError(f"depth {depth} must be from 1 to k={self.k}")
        slots = n + torch.arange(N, device=tokens.device)
        h = model.run_layers(model.embed(tokens), pos, cache.attention_mask(tree_mask, n), slots, cache, 0, t)

        nodes = torch.arange(N) if nodes is None else torch.as_tensor(nodes)
        nodes = nodes.to(tokens.device)
        pseudo = self(h[:, nodes], depth).flatten(1, 2)                  # (1, M*depth, dim)
        h = torch.cat([h, pseudo], dim=1)                                # (1, N + M*depth, dim)
        all_pos = torch.cat([pos, pseudo_positions(pos[nodes], depth)])
        mask = cache.attention_mask(pseudo_mask(tree_mask, depth, nodes), n, cached=N)  # (1, N+P, n+N+P)
        h = model.run_layers(h, all_pos, mask, slots, cache, t, model.args.n_layers)
        return h[0, :N], h[0, N:].unflatten(0, (len(nodes), depth))     # (N, dim), (M, depth, dim)

    def draft_logits(self, model: Transformer, states: torch.Tensor) -> torch.Tensor:
        """Pseudo states (..., depth, dim) -> draft logits (..., depth, V): final norm, LM head."""
        return model.head(states)

    def step_logits(self, model: Transformer, hidden: torch.Tensor, states: torch.Tensor):
        """Drafter.step_logits in one LM-head product: the nodes' and the pseudo tokens' states alike."""
        logits = model.head(torch.cat([hidden, states.flatten(0, 1)]))  # (N + M*depth, V)
        return logits[:len(hidden)], logits[len(hidden):].unflatten(0, states.shape[:2])

    # ------------------------------------------------------------------------- training

    def pseudo_inputs(self, h_t: torch.Tensor, positions: torch.Tensor):
        """The pseudo tokens of `positions` (B, P) in a window whose real tokens sit in the cache:
        inputs W_i h^t_p (B, P*k, dim) in h_t's dtype, positions p + i (B, P*k), and the mask
        (B, P*k, T + P*k): (p, i) sees real tokens 0..p (the causal row of p) and (p, j <= i)."""
        B, T, d = h_t.shape
        src = h_t.gather(1, positions[..., None].expand(-1, -1, d))             # (B, P, d): h^t_p
        x = self(src).flatten(1, 2)                                             # (B, P*k, d)
        sees = torch.arange(T, device=h_t.device) <= positions[..., None]        # (B, P, T) causal rows
        return x, pseudo_positions(positions, self.k), pseudo_rows(sees, self.k)

    def frozen_pass(self, model, ids) -> dict:
        """Drafter.frozen_pass: one pass of the frozen model over windows ids (B, T) keeps h^t, the
        real tokens' K/V in layers t+1..L (what the pseudo tokens attend to) and the last-layer states."""
        (B, T), w, L = ids.shape, model.output.weight, model.args.n_layers
        with torch.no_grad():
            cache = KVCache(model.args, B, T, w.device, w.dtype)
            pos, mask = torch.arange(T, device=w.device), causal_mask(T, device=w.device)
            h_t = model.run_layers(model.embed(ids), pos, mask, pos, cache, 0, self.layer)
            h_L = model.run_layers(h_t, pos, mask, pos, cache, self.layer, L)
        # K/V batch-first, layers t+1..L only: (B, L - t, n_kv, T, hd)
        return {"h_t": h_t, "h_L": h_L, "k": cache.k[self.layer:].transpose(0, 1),
                "v": cache.v[self.layer:].transpose(0, 1)}

    def train_pass(self, model, ids, positions, frozen: dict | None = None):
        """Drafter.train_pass: the frozen pass (or the one given) keeps h^t and every real token's
        K/V; the pseudo tokens then run layers t+1..L in one pass against that cache, as they do in
        decoding."""
        frozen = frozen or self.frozen_pass(model, ids)
        (B, T), w, L = ids.shape, model.output.weight, model.args.n_layers
        cache = KVCache(model.args, B, T, w.device, w.dtype)
        cache.k[self.layer:], cache.v[self.layer:] = frozen["k"].transpose(0, 1), frozen["v"].transpose(0, 1)
        x, x_pos, x_mask = self.pseudo_inputs(frozen["h_t"], positions)
        none = torch.zeros(0, dtype=torch.long, device=w.device)  # no slots: pseudo tokens are never cached
        h = model.run_layers(x, x_pos, x_mask, none, cache, self.layer, L)
        return h.unflatten(1, (positions.shape[1], self.k)), frozen["h_L"]   # (B, P, k, d), (B, T, d)
