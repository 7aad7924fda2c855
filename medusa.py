"""Medusa-1 heads, the baseline Hidden Transfer must beat (Cai et al. 2024; METHOD.md, "Baselines").

Head i reads the last layer's state of real token p and drafts token p+i+1:
    head_i(h) = lm_head(h + SiLU(U_i h + b_i)),  h = the final-normed hidden state (as in Medusa's
code, which reads hidden states after model.norm), U_i and b_i zero at start, lm_head the model's.
The same Drafter interface as HiddenTransfer (drafter.py), so decode.py and train.py treat both
alike; unlike it, the drafts never pass through the decoder layers. Read next: replies.py.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from drafter import Drafter
from model import Transformer, causal_mask


class Medusa(Drafter):
    kind, title = "medusa", "Medusa-1"

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.dim, self.k = dim, k
        # U_1..U_k and b_1..b_k stacked into one (k*dim, dim) layer, as HiddenTransfer stacks W_i.
        self.proj = nn.Linear(dim, k * dim, bias=True)
        with torch.no_grad():  # zero start: SiLU(0) = 0, so every head begins as the model's own head
            self.proj.weight.zero_()
            self.proj.bias.zero_()

    def config(self) -> dict:
        return {"dim": self.dim, "k": self.k}

    def forward(self, h_normed: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """(..., dim) final-normed states -> (..., depth, dim) inputs of the LM head, heads 1..depth."""
        h = h_normed.to(self.proj.weight.dtype)
        u = self.proj(h).unflatten(-1, (self.k, self.dim))[..., :depth or self.k, :]  # (..., depth, dim)
        return (h.unsqueeze(-2) + F.silu(u)).to(h_normed.dtype)  # residual: h + SiLU(U_i h + b_i)

    def tree_pass(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):
        """Drafter.tree_pass: one plain forward pass over the N tree nodes (no pseudo tokens), then
        heads 1..depth on `nodes`. hidden is the UN-normed last layer state (model.head applies the
        final norm); states (len(nodes), depth, dim) are the heads' LM-head inputs."""
        N, depth = tokens.shape[1], self.k if depth is None else depth
        if not 1 <= depth <= self.k:
            raise ValueError(f"depth {depth} must be from 1 to k={self.k}")
        slots = n + torch.arange(N, device=tokens.device)
        mask = cache.attention_mask(tree_mask, n)                     # (1, N, n + N)
        h = model.run_layers(model.embed(tokens), pos, mask, slots, cache)[0]  # (N, dim)
        nodes = torch.arange(N, device=tokens.device) if nodes is None else nodes
        return h, self(model.norm(h[nodes]), depth)                   # (N, dim), (M, depth, dim)

    def draft_logits(self, model: Transformer, states: torch.Tensor) -> torch.Tensor:
        """Head states (..., depth, dim) -> draft logits (..., depth, V). lm_head only: the norm came
        before the heads."""
        return model.output(states)

    def step_logits(self, model: Transformer, hidden: torch.Tensor, states: torch.Tensor):
        """Drafter.step_logits in one LM-head product: the nodes normed (model.head), the heads' states
        as they are."""
        logits = model.output(torch.cat([model.norm(hidden), states.flatten(0, 1)]))
        return logits[:len(hidden)], logits[len(hidden):].unflatten(0, states.shape[:2])

    def frozen_pass(self, model, ids) -> dict:
        """Drafter.frozen_pass: the frozen model's last-layer states (B, T, d)."""
        T = ids.shape[1]
        with torch.no_grad():
            return {"h_L": model.run_layers(model.embed(ids), torch.arange(T, device=ids.device),
                                            causal_mask(T, device=ids.device))}

    def train_pass(self, model, ids, positions, frozen: dict | None = None):
        """Drafter.train_pass: the frozen model's last-layer states at `positions`, through the heads."""
        h_L = (frozen or self.frozen_pass(model, ids))["h_L"]                       # (B, T, d)
        h_p = model.norm(h_L.gather(1, positions[..., None].expand(-1, -1, h_L.shape[-1])))  # (B, P, d)
        return self(h_p), h_L                                                       # (B, P, k, d)
