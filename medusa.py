"""Medusa-1 heads, the baseline Hidden Transfer must beat (Cai et al. 2024; METHOD.md, "Baselines").

Head i reads the last layer's state of real token p and drafts token p+i+1:
    head_i(h) = lm_head(h + SiLU(U_i h + b_i)),  h = the final-normed hidden state (as in Medusa's
code, which reads hidden states after model.norm), U_i and b_i zero at start, lm_head the model's.
Same interface as transfer.py's HiddenTransfer, so decode.py and train.py treat both alike; unlike it,
the drafts never pass through the decoder layers. Read next: train.py, which trains both.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Transformer, linear
from tree import after_cache


class Medusa(nn.Module):
    def __init__(self, dim: int, k: int):
        super().__init__()
        self.dim, self.k = dim, k
        # U_1..U_k and b_1..b_k stacked into one (k*dim, dim) layer, as HiddenTransfer stacks W_i.
        self.proj = nn.Linear(dim, k * dim, bias=True)
        with torch.no_grad():  # zero start: SiLU(0) = 0, so every head begins as the model's own head
            self.proj.weight.zero_()
            self.proj.bias.zero_()

    def config(self) -> dict:  # what a checkpoint needs to rebuild this module
        return {"dim": self.dim, "k": self.k}

    def forward(self, h_normed: torch.Tensor) -> torch.Tensor:
        """(..., dim) final-normed states -> (..., k, dim) inputs of the LM head, one per head."""
        u = (linear(h_normed, self.proj.weight) + self.proj.bias).unflatten(-1, (self.k, self.dim))  # (..., k, dim)
        return h_normed.unsqueeze(-2) + F.silu(u)                   # residual: h + SiLU(U_i h + b_i)

    def tree_pass(self, model: Transformer, tokens, pos, tree_mask, n, cache, nodes=None):
        """One plain forward pass over the N tree nodes (no pseudo tokens), then the k heads.

        Arguments and results as HiddenTransfer.tree_pass: hidden (N, dim) is the UN-normed last
        layer state (decode.py verifies with model.head, which applies the final norm), states
        (len(nodes), k, dim) are the heads' LM-head inputs, for `draft_logits`.
        """
        N = tokens.shape[1]
        slots = torch.arange(n, n + N, device=tokens.device)
        mask = after_cache(tree_mask, n)                              # (1, N, n + N)
        h = model.run_layers(model.embed(tokens), pos, mask, slots, cache)[0]  # (N, dim)
        nodes = torch.arange(N, device=tokens.device) if nodes is None else nodes
        return h, self(model.norm(h[nodes]))                          # (N, dim), (len(nodes), k, dim)

    def draft_logits(self, model: Transformer, state: torch.Tensor) -> torch.Tensor:
        """Head states (k, dim) -> draft logits (k, V). lm_head only: the norm came before the heads."""
        return linear(state, model.output.weight)  # model.py's fast CPU product, as model.head uses
