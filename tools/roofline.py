"""The floor under a pass on this machine, and how far each measured pass is above it.

A pass over R rows must read every weight once from memory and do 2 x (weights multiplied) x R
floating-point operations, so it can take no less than

    floor(R) = max(weight bytes / read bandwidth, 2 x params x R / peak matrix-product rate)

At decoding's few rows the first term is the bound: a one-token step and a pass over a dozen rows
have the same floor. bench.py --latency measures the two machine rates here, then times passes of
R = 1..64 rows (a chain of R new tokens after a cached context, every row through the LM head, as
a verification pass), eager and compiled (compiled.py's StaticCache, one graph per R), and prints
each beside its floor. tools/latency.py puts the floor beside every tree pass too.
"""

import time

import torch
import torch.nn as nn

from compiled import StaticCache, compile_options, static_length
from generate import sync
from model import KVCache, Transformer, causal_mask
from tools.latency import CONTEXT, REPS, _median_time, paired_times

ROWS = (1, 2, 4, 8, 16, 32, 64)


def read_bandwidth(device, nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes per second of reading a buffer far larger than any cache (a sum over it): the best of
    `reps` (another process on a shared machine only ever slows it)."""
    buf = torch.ones(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        buf.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def peak_flops(device, dtype=torch.float32, n: int | None = None, reps: int = 5) -> float:
    """Floating-point operations per second of a large square matrix product, the best of `reps`."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def machine(device, dtype=torch.float32) -> dict:
    """{"read_gb_s", "peak_gflop_s"}: the two rates every floor here is computed from."""
    return {"read_gb_s": read_bandwidth(device) / 1e9, "peak_gflop_s": peak_flops(device, dtype) / 1e9}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter (a tied embedding and LM head counted once: the head reads it)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def layer_params(model: Transformer) -> tuple:
    """(weights multiplied per row in one decoder layer, in the LM head)."""
    per_layer = sum(m.weight.numel() for m in model.layers[0].modules() if isinstance(m, nn.Linear))
    return per_layer, model.output.weight.numel()


def floor_ms(model: Transformer, rates: dict, rows: int, upper_rows: int | None = None, layer: int = 0) -> dict:
    """{"ms", "bound"}: the floor of a pass with `rows` rows in layers 1..layer and `upper_rows`
    (default the same) in layers layer+1..L and the head: a tree pass is N nodes below the transfer
    layer and N plus its pseudo tokens above it. bound: "memory" or "compute"."""
    upper_rows = rows if upper_rows is None else upper_rows
    per_layer, head = layer_params(model)
    L = model.args.n_layers
    flops = 2 * (per_layer * (rows * layer + upper_rows * (L - layer)) + head * upper_rows)
    memory = weight_bytes(model) / (rates["read_gb_s"] * 1e9)
    compute = flops / (rates["peak_gflop_s"] * 1e9)
    return {"ms": 1000 * max(memory, compute), "bound": "memory" if memory >= compute else "compute"}


def rows_pass(model, rows: int, n_ctx: int, compiled=None):
    """A function running a pass of `rows` new tokens after n_ctx cached ones, all through the head:
    eagerly, or with `compiled` (torch.compile'd model.forward) over a StaticCache as wide masks."""
    w = model.output.weight
    length = static_length(n_ctx + rows, model)
    cache = (StaticCache if compiled else KVCache)(model.args, 1, length if compiled else n_ctx + rows,
                                                     w.device, w.dtype)
    tokens = torch.randint(model.args.vocab_size, (1, rows), device=w.device)
    at = torch.arange(n_ctx, n_ctx + rows, device=w.device)
    mask = causal_mask(rows, n_ctx, device=w.device)                         # (1, rows, n_ctx + rows)
    if compiled:
        mask = torch.nn.functional.pad(mask, (0, length - mask.shape[-1]))  # (1, rows, length)
    fn = compiled or model

    @torch.no_grad()
    def run():
        fn(tokens, at, mask, at, cache)
    return run


def rows_curve(model, rates: dict, rows=ROWS, n_ctx: int = CONTEXT, reps: int = REPS, compiled: bool = True,
               backend: str = "inductor") -> dict:
    """Passes of each row count: floor, eager and (if `compiled`) compiled milliseconds, timed in
    alternation, and each one's ratio to the floor. Ctrl-C returns what was measured."""
    dev = model.output.weight.device
    curve = {"n_ctx": n_ctx, "reps": reps, "machine": rates, "weight_mb": weight_bytes(model) / 1e6,
             "rows": [], "compile_s": 0.0, "interrupted": False}
    step = torch.compile(model.forward, **compile_options(dev, backend, None)) if compiled else None
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # a graph per R
    try:
        for r in rows:
            row = {"rows": r, **{f"floor_{k}": v for k, v in floor_ms(model, rates, r).items()}}
            eager = rows_pass(model, r, n_ctx)
            if compiled:
                fast = rows_pass(model, r, n_ctx, step)
                t0 = time.perf_counter()
                with torch.no_grad():
                    fast()  # compile this row count's graph, untimed
                curve["compile_s"] += time.perf_counter() - t0
                e, c = paired_times(eager, fast, dev, reps)
                row.update(compiled_ms=1000 * c, compiled_ratio=1000 * c / row["floor_ms"])
            else:
                e = _median_time(eager, dev, reps)
            row.update(eager_ms=1000 * e, eager_ratio=1000 * e / row["floor_ms"])
            curve["rows"].append(row)
    except KeyboardInterrupt:
        curve["interrupted"] = True
    return curve


def rows_report(curve: dict) -> str:
    """The curve as a markdown table, the machine's rates above it."""
    m = curve["machine"]
    lines = [f"The floor: {curve['weight_mb']:.0f} MB of weights at {m['read_gb_s']:.1f} GB/s read, "
             f"{m['peak_gflop_s']:.0f} GFLOP/s peak matrix product; passes of R new tokens after "
             f"{curve['n_ctx']} cached, every row through the head, median of {curve['reps']}", "",
             "| rows | floor ms (bound) | eager ms | eager / floor | compiled ms | compiled / floor |",
             "|---|---|---|---|---|---|"]
    for r in curve["rows"]:
        c = (f"{r['compiled_ms']:.1f} | {r['compiled_ratio']:.2f}") if "compiled_ms" in r else "- | -"
        lines.append(f"| {r['rows']} | {r['floor_ms']:.1f} ({r['floor_bound']}) | {r['eager_ms']:.1f} | "
                     f"{r['eager_ratio']:.2f} | {c} |")
    return "\n".join(lines + (["(interrupted)"] if curve["interrupted"] else []))
