"""What one verification pass costs on this machine against a one-token step, per tree size.

A tree of N nodes buys expected tau tokens per pass (tree_choice.expected_tau) but a pass over N nodes,
plus k pseudo tokens per node, is slower than plain decoding's one-token step; the speedup a tree
can give is tau / (pass time / step time) (METHOD.md, "Metrics"). bench.py --latency prints this
curve; plan_search.select_plan (train.py's plan choice) times each candidate pass with tree_step,
in alternation with a one-token step (paired_times), so that a drifting machine cannot favour the
plans timed at its fast moments.
"""

import statistics
import time

import torch

from generate import sync
from model import KVCache
from plan import Plan
from tools.tree_choice import build_tree, expected_tau
from tree import Tree

SIZES = (1, 2, 4, 8, 16, 32, 64)
CONTEXT = 300    # cached tokens during a timed pass: about an MT-Bench prompt plus an answer
REPS = 5


def _median_time(fn, device, reps: int) -> float:
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def paired_times(first, second, device, reps: int) -> tuple:
    """Median seconds of `first` and of `second`, timed in alternation, one call of each in turn: on
    a machine whose speed drifts (a shared CPU) both medians see the same moments, so their ratio holds."""
    times = ([], [])
    for _ in range(reps + 1):  # the first round is a warm-up
        for fn, out in zip((first, second), times):
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0][1:]), statistics.median(times[1][1:])


def tree_step(model, drafter, plan: Plan | Tree, n_ctx: int = CONTEXT, cache=None):
    """A function running one decoding step's model work with `plan` (a bare Tree: plan.Plan.full)
    after n_ctx cached tokens, as in decode.generate_tree: drafter.step, the pass over the tree and
    the plan's pseudo tokens with its verifying and draft logits. The cache holds zeros: its values
    do not change the cost. For compiled.py's stand-ins pass the CompiledModel's cache."""
    plan = plan if isinstance(plan, Plan) else Plan.full(plan, drafter.k)
    w = model.output.weight
    if cache is None:
        cache = KVCache(model.args, 1, n_ctx + plan.tree.size, w.device, w.dtype)
    tokens = torch.randint(model.args.vocab_size, (1, plan.tree.size), device=w.device)
    tree, nodes = plan.tree.to(w.device), torch.tensor(plan.nodes, device=w.device)

    @torch.no_grad()
    def step():
        drafter.step(model, tokens, tree.positions(n_ctx), tree.mask, n_ctx, cache, nodes=nodes, depth=plan.depth)
    return step


def plain_step(model, n_ctx: int = CONTEXT, cache=None):
    """A function running one plain decoding step after n_ctx cached tokens: one token, all layers,
    head. For a compiled.CompiledModel pass its cache."""
    w = model.output.weight
    if cache is None:
        cache = KVCache(model.args, 1, n_ctx + 1, w.device, w.dtype)
    token, at = torch.tensor([[1]], device=w.device), torch.tensor([n_ctx], device=w.device)
    mask = torch.ones(1, 1, n_ctx + 1, dtype=torch.bool, device=w.device)  # (1, 1, n_ctx + 1)

    @torch.no_grad()
    def step():
        model(token, at, mask, at, cache)
    return step


def pass_latency(model, drafter, plan: Plan | Tree, n_ctx: int = CONTEXT, reps: int = REPS) -> float:
    """Median seconds of tree_step(model, drafter, plan, n_ctx)."""
    return _median_time(tree_step(model, drafter, plan, n_ctx), model.output.weight.device, reps)


def step_latency(model, n_ctx: int = CONTEXT, reps: int = REPS) -> float:
    """Median seconds of plain_step(model, n_ctx)."""
    return _median_time(plain_step(model, n_ctx), model.output.weight.device, reps)


def made_up_accept(k: int, top_r: int = 8) -> list:
    """A plausible decreasing acceptance table, only to shape trees when no checkpoint measured one."""
    return [[0.5 * 0.8 ** j * 0.5 ** r for r in range(top_r)] for j in range(k)]


def latency_curve(model, drafter, accept=None, sizes=SIZES, n_ctx: int = CONTEXT, reps: int = REPS,
                  floor=None) -> dict:
    """{"step_ms", "rows": [{"nodes", "ms", "ratio", "tau", "speedup", "paths"}]}: for each size the best
    tree (tree_choice.build_tree) under the measured `accept` rates (k, top_r), timed against a one-token step.
    With no rates the trees come from a made-up table, and tau and speedup stay None: they would be
    made up too. Given floor(rows, upper_rows, layer) -> ms (tools/roofline.floor_ms on this machine's
    rates), each row also has its floor ("floor_ms") and the one-token step's ("step_floor_ms").
    Ctrl-C stops early and returns what was measured, with "interrupted" set."""
    table = accept or made_up_accept(drafter.k)
    layer = getattr(drafter, "layer", model.args.n_layers)  # where pseudo rows join (Medusa: after the last)
    curve = {"n_ctx": n_ctx, "reps": reps, "step_ms": None, "rows": [], "interrupted": False}
    if floor:
        curve["step_floor_ms"] = floor(1, 1, layer)
    try:
        curve["step_ms"] = 1000 * step_latency(model, n_ctx, reps)
        for n in sizes:
            tree = build_tree(table, n)
            ms = 1000 * pass_latency(model, drafter, tree, n_ctx, reps)
            tau, ratio = (expected_tau(tree, accept) if accept else None), ms / curve["step_ms"]
            row = {"nodes": n, "ms": ms, "ratio": ratio, "tau": tau, "speedup": None if tau is None else tau / ratio,
                   "paths": [list(p) for p in tree.paths[1:]]}
            if floor:
                row["floor_ms"] = floor(n, n + Plan.full(tree, drafter.k).pseudo_rows, layer)
            curve["rows"].append(row)
    except KeyboardInterrupt:
        curve["interrupted"] = True
    return curve


def latency_report(name: str, curve: dict) -> str:
    """The curve as a markdown table (with each pass's floor, when the curve has it)."""
    if curve["step_ms"] is None:
        return f"{name}: interrupted before anything was measured"
    floors = "step_floor_ms" in curve
    step = f"{curve['step_ms']:.1f} ms" + (f", {curve['step_ms'] / curve['step_floor_ms']:.2f}x its floor"
                                            if floors else "")
    lines = [f"{name}: one verification pass against a one-token step ({step}), "
             f"{curve['n_ctx']} cached tokens, median of {curve['reps']}", "",
             "| nodes | ms/pass | ratio to one-token step | E[tau] | E[speedup] = tau / ratio |"
             + (" floor ms | pass / floor |" if floors else ""),
             "|---|---|---|---|---|" + ("---|---|" if floors else "")]
    for r in curve["rows"]:
        tau, sp = ("-", "-") if r["tau"] is None else (f"{r['tau']:.2f}", f"{r['speedup']:.2f}x")
        floor = f" {r['floor_ms']:.1f} | {r['ms'] / r['floor_ms']:.2f} |" if floors else ""
        lines.append(f"| {r['nodes']} | {r['ms']:.1f} | {r['ratio']:.2f} | {tau} | {sp} |{floor}")
    return "\n".join(lines + (["(interrupted)"] if curve["interrupted"] else []))
