"""Hidden Transfer with more capacity in the map: the paper's linear W_i h plus a residual MLP branch.

    h~_(p,i) = W_i h^t_p + (W2 SiLU(W1 h^t_p))_i      W1: (hidden, dim), W2: (k*dim, hidden)

W_i start as the identity (transfer.py) and W2 at zero, so an untrained drafter is exactly the
linear one, and training can only add what the linear map cannot express. Only the projection
changes (HiddenTransfer.projection); the pseudo tokens' path through layers t+1..L is transfer.py's.

    python train.py --drafter transfer-mlp                              # hidden width = dim
    python train.py --drafter transfer-mlp --drafter-option hidden=1152
"""

import torch.nn as nn
import torch.nn.functional as F

from model import Transformer
from transfer import HiddenTransfer, default_layer


class LinearPlusMLP(nn.Module):
    """(..., dim) -> (..., k*dim): the linear projection, plus W2 SiLU(W1 h) (zero at start)."""

    def __init__(self, linear: nn.Linear, dim: int, k: int, hidden: int, bias: bool):
        super().__init__()
        self.linear = linear
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, k * dim, bias=bias)
        nn.init.zeros_(self.w2.weight)
        if bias:
            nn.init.zeros_(self.w2.bias)

    def forward(self, h):
        return self.linear(h) + self.w2(F.silu(self.w1(h)))


class TransferMLP(HiddenTransfer):
    kind, title = "transfer-mlp", "Hidden Transfer, linear + MLP"

    def __init__(self, dim: int, k: int, layer: int, bias: bool = True, hidden: int | None = None):
        hidden = dim if hidden is None else hidden
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden={hidden!r}: the MLP's width must be a whole number >= 1")
        self.hidden = hidden  # set first: HiddenTransfer.__init__ calls projection, which reads it
        super().__init__(dim, k, layer, bias)

    def projection(self, dim: int, k: int, bias: bool) -> nn.Module:
        return LinearPlusMLP(super().projection(dim, k, bias), dim, k, self.hidden, bias)

    @classmethod
    def for_model(cls, model: Transformer, k: int, layer: int | None = None,
                  hidden: int | None = None) -> "TransferMLP":
        """hidden: the MLP's width (default: the model's dim)."""
        drafter = cls(model.args.dim, k, layer or default_layer(model.args.n_layers), hidden=hidden)
        drafter.check(model)
        return drafter

    def config(self) -> dict:
        return {**super().config(), "hidden": self.hidden}
