"""The hidden transfer: k trained linear maps from one token's hidden state to the pseudo hidden
states of the next k tokens (arXiv 2404.12022; METHOD.md, "Notation").

After transfer layer t, real token p's state h^t_p becomes pseudo tokens h~_(p,i) = W_i h^t_p
(i = 1..k) at positions p+i. They run through layers t+1..L beside the real tokens, then the LM
head turns them into drafts for positions p+i+1: `tree_pass` in decoding, `train_pass` in
training (tree.py draws the mask). Read next: plan.py, which decides which nodes carry them.
"""

import torch
import torch.nn as nn

from drafter import Drafter
from model import KVCache, Transformer, causal_mask, linear
from tree import after_cache, pseudo_mask, pseudo_positions, pseudo_rows


def default_layer(n_layers: int) -> int:
    """t = 2L/3 (20 of SmolLM2's 30): best held-out agreement in our layer sweep (README), and the
    pseudo tokens then cost only L - t layers per pass."""
    return 2 * n_layers // 3


class HiddenTransfer(Drafter):
    kind, title = "transfer", "Hidden Transfer"

    def __init__(self, dim: int, k: int, layer: int, bias: bool = True):
        super().__init__()
        self.dim, self.k, self.layer = dim, k, layer  # layer = t: pseudo tokens start after layer t
        # W_1..W_k stacked into one (k*dim, dim) matrix: one matmul makes all k pseudo states.
        self.proj = nn.Linear(dim, k * dim, bias=bias)
        with torch.no_grad():  # identity start: every pseudo token begins as a copy of its source
            self.proj.weight.copy_(torch.eye(dim).repeat(k, 1))
            if bias:
                self.proj.bias.zero_()

    @classmethod
    def for_model(cls, model: Transformer, k: int, layer: int | None = None) -> "HiddenTransfer":
        drafter = cls(model.args.dim, k, layer or default_layer(model.args.n_layers))
        drafter.check(model)
        return drafter

    def config(self) -> dict:
        return {"dim": self.dim, "k": self.k, "layer": self.layer, "bias": self.proj.bias is not None}

    def check(self, model: Transformer):
        L = model.args.n_layers
        if not 1 <= self.layer < L:
            raise ValueError(f"transfer layer {self.layer} must be from 1 to {L - 1} for this {L}-layer model")

    def forward(self, h: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """(..., dim) -> (..., depth, dim): W_1 h .. W_depth h (depth = k by default)."""
        rows = (depth or self.k) * self.dim                   # only the maps asked for are run
        y = linear(h, self.proj.weight[:rows])                # model.py's fast CPU product
        if self.proj.bias is not None:
            y = y + self.proj.bias[:rows]
        return y.unflatten(-1, (-1, self.dim))                # (..., depth*dim) -> (..., depth, dim)

    def tree_pass(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):
        """Drafter.tree_pass: layers 1..t over the nodes, then layers t+1..L over the nodes and
        `depth` pseudo tokens for each of `nodes`, never cached. states: the pseudo tokens' final
        hidden states (len(nodes), depth, dim)."""
        N, t, depth = tokens.shape[1], self.layer, depth or self.k
        if not 1 <= depth <= self.k:
            raise ValueError(f"depth {depth} must be from 1 to k={self.k}")
        slots = n + torch.arange(N, device=tokens.device)               # n: an int, or a 0-d tensor
        h = model.run_layers(model.embed(tokens), pos, after_cache(tree_mask, n, cache), slots, cache, 0, t)

        nodes = torch.arange(N) if nodes is None else torch.as_tensor(nodes)
        nodes = nodes.to(tokens.device)
        pseudo = self(h[:, nodes], depth).flatten(1, 2)                  # (1, M*depth, dim)
        h = torch.cat([h, pseudo], dim=1)                                # (1, N + M*depth, dim)
        all_pos = torch.cat([pos, pseudo_positions(pos[nodes], depth)])
        mask = pseudo_mask(tree_mask, n, depth, nodes, cache)            # (1, N + P, n + N + P)
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
        inputs W_i h^t_p (B, P*k, dim) in the drafter's dtype, positions p + i (B, P*k), and the mask
        (B, P*k, T + P*k): (p, i) sees real tokens 0..p (the causal row of p) and (p, j <= i)."""
        B, T, d = h_t.shape
        src = h_t.gather(1, positions[..., None].expand(-1, -1, d))             # (B, P, d): h^t_p
        x = self(src.to(self.proj.weight.dtype)).flatten(1, 2)                  # (B, P*k, d)
        sees = torch.arange(T, device=h_t.device) <= positions[..., None]        # (B, P, T) causal rows
        return x, pseudo_positions(positions, self.k), pseudo_rows(sees, self.k)

    def train_pass(self, model, ids, positions):
        """Drafter.train_pass: one frozen pass keeps h^t and every real token's K/V; the pseudo tokens
        then run layers t+1..L in one pass against that cache, as they do in decoding."""
        (B, T), w, L = ids.shape, model.output.weight, model.args.n_layers
        with torch.no_grad():
            cache = KVCache(model.args, B, T, w.device, w.dtype)
            pos, mask = torch.arange(T, device=w.device), causal_mask(T, device=w.device)
            h_t = model.run_layers(model.embed(ids), pos, mask, pos, cache, 0, self.layer)
            h_L = model.run_layers(h_t, pos, mask, pos, cache, self.layer, L)
        x, x_pos, x_mask = self.pseudo_inputs(h_t, positions)
        none = torch.zeros(0, dtype=torch.long, device=w.device)  # no slots: pseudo tokens are never cached
        h = model.run_layers(x.to(w.dtype), x_pos, x_mask, none, cache, self.layer, L)
        return h.unflatten(1, (positions.shape[1], self.k)), h_L             # (B, P, k, d), (B, T, d)
