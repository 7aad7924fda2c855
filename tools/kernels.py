"""The faster form of x @ W.T on this CPU, measured, and applied to a model from outside it.

x @ W.T has two forms, F.linear and (W @ x.T).T, and which is faster depends on the CPU, its BLAS,
the dtype and the number of rows: on one 2-core AMD EPYC the transposed form is up to 3x
faster in fp32 for the 1-4 rows of decoding and slower from 16 rows on; on a 2-core Intel Xeon (MKL)
F.linear wins. So the first product of a new weight shape times both forms at every row bucket,
on a ring of weight copies larger than the last-level cache (in a pass the weights come from memory;
a weight timed hot in cache gives the wrong answer), and keeps the faster one; a product of fewer
rows than the cheapest bucket that holds them gets zero rows up to it (LinearKernels.choice).

`apply(model)` makes every nn.Linear of a model (or a drafter) use the measured form: it swaps the
module's class for MeasuredLinear, whose parameters and state_dict are nn.Linear's. The model
itself knows nothing of this, and neither do generate.py and decode.py: the commands that measure
(bench.py, train.py, the tools) apply it at their call site, `kernels.use(args.matmul, model)`,
with the `--matmul` flag of `add_arg`. On a GPU nothing changes: F.linear.
"""

import itertools
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _linear_form(x, weight):       # x: (M, in) -> (M, out)
    return F.linear(x, weight)


def _transposed_form(x, weight):   # (W @ x.T).T, made row-major again; one row padded to two
    if x.shape[0] == 1:            # (a one-column product would take the matrix-vector path)
        return (weight @ torch.cat([x, torch.zeros_like(x)]).T)[:, :1].T.contiguous()
    return (weight @ x.T).T.contiguous()


FORMS = {"linear": _linear_form, "transposed": _transposed_form}
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # decoding, trees of 2-64 nodes, 64+: prefill and training
RING_BYTES, RING_MAX = 48 << 20, 128  # more than the 32 MB last-level cache of a large CPU


def weight_ring(weight: torch.Tensor):
    """Copies of `weight`, RING_BYTES in all, handed out in turn forever: each timed product finds
    its copy in memory, not in cache, as a decoding pass finds its weights."""
    n = min(RING_MAX, -(-RING_BYTES // (weight.numel() * weight.element_size())))
    return itertools.cycle(weight.detach().expand(n, *weight.shape).clone())  # of (out, in)


def time_form(form: str, ring, rows: int, budget: float = 2e-3) -> float:
    """Seconds of one product in `form` on `rows` random rows and the ring's next weight: the fastest
    of the products that fit in `budget` s, timed one by one (at least one; another process on a
    shared CPU only ever adds time)."""
    w = next(ring)
    x, times = torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device), []
    with torch.no_grad():
        while sum(times) < budget:
            t0 = time.perf_counter()
            FORMS[form](x, w)
            times.append(time.perf_counter() - t0)
            w = next(ring)
    return min(times)


class LinearKernels:
    """The faster form per (weight shape, dtype, row bucket), timed once, and the rows to run it on:
    a product over more rows can cost less than over fewer (on one 2-core AMD EPYC a 4-row product
    took half the time of a 1-row one, for every weight of SmolLM2), so a product may take zero rows
    up to the cheapest bucket that holds its rows. `timer` is injectable (tests drive the choice with
    made-up timings); `force` ("linear" or "transposed") skips it: that form, no padding."""

    def __init__(self, timer=time_form, force: Optional[str] = None):
        self.timer, self.force, self.table = timer, force, {}  # table: key -> (form name, rows to run)

    def key(self, weight: torch.Tensor, rows: int) -> tuple:
        bucket = next((b for b in ROW_BUCKETS if b >= rows), ROW_BUCKETS[-1])
        return tuple(weight.shape), weight.dtype, bucket

    def choice(self, weight: torch.Tensor, rows: int, measure: bool = True) -> tuple:
        """(form, rows to run the product on, >= rows)."""
        if self.force:
            return self.force, rows
        key = self.key(weight, rows)
        if key not in self.table and not measure:  # not timed, and no timing now: F.linear's form
            return "linear", rows
        if key not in self.table:  # a new shape or dtype: time every form and bucket now, on one ring
            ring = weight_ring(weight)
            times = {(f, b): self.timer(f, ring, b) for b in ROW_BUCKETS for f in FORMS}
            for b in ROW_BUCKETS:  # the cheapest (form, bucket) that holds b rows
                self.table[self.key(weight, b)] = min((fb for fb in times if fb[1] >= b), key=times.get)
        form, padded = self.table[key]
        return form, max(rows, padded)

    def form(self, weight: torch.Tensor, rows: int, measure: bool = True) -> str:
        return self.choice(weight, rows, measure)[0]


KERNELS = LinearKernels()  # the one every MeasuredLinear consults; tests swap in their own


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T (+ bias): F.linear on a GPU; on the CPU the form KERNELS measured fastest."""
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])                     # (M, in)
    M = rows.shape[0]
    # inside a compiled region (compiled.py) only look the choice up: apply() timed it before
    form, run = KERNELS.choice(weight, M, measure=not torch.compiler.is_compiling())
    if run > M:  # zero rows up to the cheaper bucket; each output row depends on its own input row only
        rows = F.pad(rows, (0, 0, 0, run - M))           # (run, in)
    y = FORMS[form](rows, weight)[:M].view(*x.shape[:-1], weight.shape[0])  # (..., out)
    return y if bias is None else y + bias


class MeasuredLinear(nn.Linear):
    """nn.Linear whose product takes the measured form (same parameters, same state_dict)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def add_arg(parser):
    """The --matmul flag of the commands that apply the measured forms."""
    parser.add_argument("--matmul", default="auto", choices=["auto", *FORMS],
                        help="CPU form of x @ W.T: the faster one per weight shape and row count, timed at "
                             "load (auto), or one forced (tools/kernels.py)")


def use(matmul: str, *modules: nn.Module):
    """--matmul for `modules`: the forms forced, or measured now (auto)."""
    KERNELS.force = None if matmul == "auto" else matmul
    for m in modules:
        apply(m)


def apply(module: nn.Module) -> float:
    """Make every nn.Linear of `module` a MeasuredLinear and time the forms of its weight shapes now,
    rather than in the first (timed) pass. Returns the seconds the timing took."""
    t0 = time.perf_counter()
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = MeasuredLinear
        if isinstance(m, nn.Linear) and m.weight.device.type == "cpu":
            KERNELS.form(m.weight, 1)
    return time.perf_counter() - t0
