"""The hidden transfer: k trained linear maps from one token's hidden state to the pseudo hidden
states of the next k tokens (arXiv 2404.12022; METHOD.md, "Notation").

After transfer layer t, real token p's state h^t_p becomes pseudo tokens h~_(p,i) = W_i h^t_p
(i = 1..k) at positions p+i. They run through layers t+1..L beside the real tokens, then the LM
head turns them into drafts for positions p+i+1. `HiddenTransfer.tree_pass` is that one forward
pass; tree.py draws its mask. Read next: decode.py, which turns the drafts into accepted tokens.
"""

import hashlib
import json
import os
from dataclasses import asdict

import torch
import torch.nn as nn

from model import Transformer, linear
from tree import after_cache, pseudo_mask, pseudo_positions


def default_layer(n_layers: int) -> int:
    """t = 2L/3 (20 of SmolLM2's 30): best held-out agreement in our layer sweep (README), and the
    pseudo tokens then cost only L - t layers per pass."""
    return 2 * n_layers // 3


class HiddenTransfer(nn.Module):
    def __init__(self, dim: int, k: int, layer: int, bias: bool = True):
        super().__init__()
        self.dim, self.k, self.layer = dim, k, layer  # layer = t: pseudo tokens start after layer t
        # W_1..W_k stacked into one (k*dim, dim) matrix: one matmul makes all k pseudo states.
        self.proj = nn.Linear(dim, k * dim, bias=bias)
        with torch.no_grad():  # identity start: every pseudo token begins as a copy of its source
            self.proj.weight.copy_(torch.eye(dim).repeat(k, 1))
            if bias:
                self.proj.bias.zero_()

    def config(self) -> dict:  # what a checkpoint needs to rebuild this module
        return {"dim": self.dim, "k": self.k, "layer": self.layer, "bias": self.proj.bias is not None}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = linear(h, self.proj.weight)                       # model.py's fast CPU product
        if self.proj.bias is not None:
            y = y + self.proj.bias
        return y.unflatten(-1, (self.k, self.dim))            # (..., dim) -> (..., k, dim)

    def tree_pass(self, model: Transformer, tokens, pos, tree_mask, n, cache, nodes=None):
        """One forward pass over N tree nodes plus k pseudo tokens for each of `nodes` (default: all).

        tokens (1, N), pos (N,): the nodes and their positions; tree_mask (N, N): ancestor mask;
        n: tokens already in the cache. The nodes are written to cache slots n..n+N-1 in every
        layer; pseudo tokens exist only in layers t+1..L of this pass and are never cached.
        Returns the nodes' final hidden states (N, dim), for the LM head to verify them, and the
        pseudo tokens' final states (len(nodes), k, dim), for `draft_logits`.
        """
        N, t = tokens.shape[1], self.layer
        slots = torch.arange(n, n + N, device=tokens.device)
        h = model.run_layers(model.embed(tokens), pos, after_cache(tree_mask, n), slots, cache, 0, t)

        nodes = torch.arange(N, device=tokens.device) if nodes is None else nodes
        pseudo = self(h[:, nodes]).flatten(1, 2)                       # (1, len(nodes)*k, dim)
        h = torch.cat([h, pseudo], dim=1)                              # (1, N + len(nodes)*k, dim)
        all_pos = torch.cat([pos, pseudo_positions(pos[nodes], self.k)])
        mask = pseudo_mask(tree_mask, n, self.k, nodes)                # (1, N + P, n + N + P)
        h = model.run_layers(h, all_pos, mask, slots, cache, t, model.args.n_layers)
        return h[0, :N], h[0, N:].unflatten(0, (len(nodes), self.k))   # (N, dim), (len(nodes), k, dim)

    def draft_logits(self, model: Transformer, state: torch.Tensor) -> torch.Tensor:
        """One node's pseudo states (k, dim) -> its draft logits (k, V): q_1..q_k."""
        return model.head(state)


# ----------------------------------------------------------------------------- checkpoints

def model_identity(model: Transformer) -> dict:
    """What a drafter checkpoint must match: the base model's shape and a probe of its weights."""
    cfg = json.dumps(asdict(model.args), sort_keys=True, default=str)
    probe = model.tok_embeddings.weight[:4, :8].float().cpu()
    return {"config_sha": hashlib.sha256(cfg.encode()).hexdigest()[:16], "embedding_probe": probe.tolist()}


def check_identity(saved: dict, model: Transformer, path: str):
    now = model_identity(model)
    if saved["config_sha"] != now["config_sha"] or not torch.allclose(
            torch.tensor(saved["embedding_probe"]), torch.tensor(now["embedding_probe"]), atol=1e-2):
        raise ValueError(f"{path} was trained for a different base model (its config or weights differ "
                         "from --model): train one for this model with train.py")


def save_checkpoint(path: str, drafter: nn.Module, model: Transformer, extra: dict):
    """Atomic save (write then rename), so an interrupted save never leaves a broken file."""
    state = {"kind": type(drafter).__name__, "config": drafter.config(),
             "identity": model_identity(model), "state_dict": drafter.state_dict(), **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, model: Transformer):
    """(drafter, checkpoint dict). Refuses a checkpoint made for another model."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no drafter checkpoint at {path}: make one with train.py")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    check_identity(ckpt["identity"], model, path)
    cfg = ckpt["config"]
    if ckpt["kind"] == "HiddenTransfer":
        if not 1 <= cfg["layer"] < model.args.n_layers:
            raise ValueError(f"{path}: transfer layer {cfg['layer']} does not fit a "
                             f"{model.args.n_layers}-layer model")
        drafter = HiddenTransfer(**cfg)
    else:
        from medusa import Medusa
        drafter = Medusa(**cfg)
    drafter.load_state_dict(ckpt["state_dict"])
    w = model.output.weight
    return drafter.to(device=w.device, dtype=w.dtype), ckpt
