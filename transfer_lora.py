"""Hidden Transfer with low-rank adapters on the pseudo tokens' own path through layers t+1..L.

The paper's linear map makes the pseudo tokens (transfer.py); then, in layers t+1..L only, every
linear layer of the model (wq, wk, wv, wo, w1, w2, w3) gets a rank-r adapter on the PSEUDO ROWS:

    y = W x                       every row, exactly the product the frozen model computes
    y[pseudo rows] += B A x       A (r, in), B (out, r): B zero at start

Real rows keep the frozen weights untouched, so verification, the cache and losslessness are those
of Hidden Transfer; with B = 0 the drafter is exactly the linear one. Which rows are pseudo:
tree_pass's hidden states are [N tree nodes | pseudo tokens], train_pass's are all pseudo (the real
tokens' K/V come from the frozen pass's cache).

How, without touching model.py: the drafter runs its passes through a "twin" of the model, a
shallow copy whose layers t+1..L are shallow copies of the model's blocks with each linear layer
replaced by PseudoRowsAdapted(that linear layer, its adapter). A twin shares every parameter,
buffer and hook of the model (nothing is copied but a few module dicts), and the model itself is
never changed, not even for the length of a pass, so no hook or swapped module can be left behind
by an exception. Forward hooks would need registering and removing at every pass, which
torch.compile cannot trace (compiled.py compiles drafter.step whole); the twin, built once per
model outside any compiled region (check and the first eager pass build it), compiles like the
model does.

    python train.py --drafter transfer-lora                             # rank 8
    python train.py --drafter transfer-lora --drafter-option rank=16
"""

import copy

import torch
import torch.nn as nn

from model import Transformer
from transfer import HiddenTransfer, default_layer

# the linear layers that get adapters: the module that holds them, and their names in it
LINEARS = {"attention": ("wq", "wk", "wv", "wo"), "feed_forward": ("w1", "w2", "w3")}


class Adapter(nn.Module):
    """x -> B A x, rank r: A starts as nn.Linear does (random), B at zero."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        return self.B(self.A(x))


class PseudoRowsAdapted(nn.Module):
    """Stands in for one frozen linear layer of the model in the drafter's twin: base(x) on every
    row, then the adapter's B A x added to rows rows["real"].. (the pseudo tokens) only."""

    def __init__(self, base: nn.Linear, adapter: Adapter, rows: dict):
        super().__init__()
        self.base, self.adapter, self.rows = base, adapter, rows  # rows: the drafter's, set by each pass

    def forward(self, x):                                    # x: (B, T, in)
        y, n = self.base(x), self.rows["real"]
        dtype = self.adapter.B.weight.dtype                  # the drafter's (fp32 beside a bf16 model)
        delta = self.adapter(x[:, n:].to(dtype)).to(y.dtype)  # (B, T - n, out)
        return torch.cat([y[:, :n], y[:, n:] + delta], dim=1)


def twin(module: nn.Module, **children) -> nn.Module:
    """A shallow copy of `module` with some children replaced: the same parameters, buffers, hooks
    and code (shared, not copied), so it computes what `module` does with those children instead."""
    out = copy.copy(module)
    out._modules = {**module._modules, **children}  # a dict of its own: `module` keeps its children
    return out


class TransferLoRA(HiddenTransfer):
    kind, title = "transfer-lora", "Hidden Transfer + LoRA on the pseudo tokens"

    def __init__(self, dim: int, k: int, layer: int, bias: bool = True, rank: int = 8, *, n_layers: int,
                 ffn_dim: int, kv_dim: int):
        """n_layers, ffn_dim, kv_dim (n_kv_heads * head_dim): the model's shapes, which the adapters take."""
        super().__init__(dim, k, layer, bias)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r}: the adapters' rank must be a whole number >= 1")
        if not 1 <= layer < n_layers:
            raise ValueError(f"transfer layer {layer} must be from 1 to {n_layers - 1} for this {n_layers}-layer model")
        self.rank, self.n_layers, self.ffn_dim, self.kv_dim = rank, n_layers, ffn_dim, kv_dim
        shapes = {"wq": (dim, dim), "wk": (dim, kv_dim), "wv": (dim, kv_dim), "wo": (dim, dim),
                  "w1": (dim, ffn_dim), "w3": (dim, ffn_dim), "w2": (ffn_dim, dim)}  # (in, out)
        # adapters[j]: those of model.layers[layer + j], i.e. of layer t+1+j in METHOD.md's numbering
        self.adapters = nn.ModuleList(nn.ModuleDict({name: Adapter(*shapes[name], rank) for name in shapes})
                                      for _ in range(layer, n_layers))
        # rows 0..real-1 of the running pass are real, set by each pass: a dict, so that a shallow copy
        # of the drafter (tools/distributed.wrap) and the twin it built share it
        self.rows = {"real": 0}
        self._twin = None, None  # (model, its twin): built for the last model passed

    @classmethod
    def for_model(cls, model: Transformer, k: int, layer: int | None = None, rank: int = 8) -> "TransferLoRA":
        """rank: the adapters' rank r."""
        a = model.args
        drafter = cls(a.dim, k, layer or default_layer(a.n_layers), rank=rank, n_layers=a.n_layers,
                      ffn_dim=a.ffn_dim, kv_dim=a.n_kv_heads * a.head_dim)
        drafter.check(model)
        return drafter

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank, "n_layers": self.n_layers, "ffn_dim": self.ffn_dim,
                "kv_dim": self.kv_dim}

    def check(self, model: Transformer):
        super().check(model)
        a = model.args
        if (a.n_layers, a.ffn_dim, a.n_kv_heads * a.head_dim) != (self.n_layers, self.ffn_dim, self.kv_dim):
            raise ValueError(f"adapters made for {self.n_layers} layers, ffn_dim {self.ffn_dim} and key/value width "
                             f"{self.kv_dim}, not this model's {a.n_layers}, {a.ffn_dim}, {a.n_kv_heads * a.head_dim}")
        self.adapted(model)

    def adapted(self, model: Transformer) -> Transformer:
        """The model's twin: layers 1..t the model's own blocks, layers t+1..L twins of its blocks whose
        linear layers are PseudoRowsAdapted. Built once per model (in eager code: a compiled step finds it)."""
        model = model if isinstance(model, nn.Module) else model.model  # compiled.CompiledModel: its model
        if self._twin[0] is not model:
            blocks = list(model.layers[:self.layer])
            for block, adapters in zip(model.layers[self.layer:], self.adapters):
                parts = {part: twin(getattr(block, part), **{name: PseudoRowsAdapted(
                    getattr(getattr(block, part), name), adapters[name], self.rows) for name in names})
                    for part, names in LINEARS.items()}
                blocks.append(twin(block, **parts))
            self._twin = model, twin(model, layers=nn.ModuleList(blocks))
        return self._twin[1]

    def tree_pass(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):
        """HiddenTransfer.tree_pass through the twin: its first N rows (the nodes) are real."""
        self.rows["real"] = tokens.shape[1]
        return super().tree_pass(self.adapted(model), tokens, pos, tree_mask, n, cache, nodes, depth)

    def train_pass(self, model, ids, positions, frozen: dict | None = None):
        """HiddenTransfer.train_pass through the twin, every row pseudo; the frozen pass is the model's own."""
        frozen = frozen or self.frozen_pass(model, ids)
        self.rows["real"] = 0
        return super().train_pass(self.adapted(model), ids, positions, frozen)
