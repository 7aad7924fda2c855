"""The plan choice: which tree, which nodes carry pseudo tokens and how many, by expected tokens per
second on this machine (METHOD.md, "The plan"; plan.py defines a plan).

`expected_tokens` turns measured acceptance rates into tokens per pass for a plan (a small Markov
chain over where the drafts come from); `choose_plan` weighs that against pass times, and
`select_plan` measures those times here (latency.py), as train.py does at its end and
`python tools/analysis.py --select-tree` does for a checkpoint moved to another machine.
"""

import time

import torch

from compiled import CompiledDrafter, CompiledModel, static_length
from plan import Plan
from tools.latency import CONTEXT, REPS, _median_time, paired_times, plain_step, tree_step
from tools.tree_choice import build_tree, node_accept_probs

ROOT_ONLY = (0, 0)  # drafts state: no drafts at all, the next step verifies the root alone


# ----------------------------------------------------------------------------- expected tokens

def _state_step(plan: Plan, rates: torch.Tensor, state: tuple):
    """For drafts state (shift s, available a): the plan actually run (cut to a), its expected tokens
    per pass, and the probability of each next state."""
    shift, avail = state
    run = plan.cut(min(plan.tree.depth, avail))
    p = node_accept_probs(run.tree, rates[shift:shift + max(avail, 1)])  # (N,) P(node accepted)
    nxt = {}
    for v in range(run.tree.size):  # P(walk ends at v) = P(v accepted) - P(a child of v accepted)
        end = float(p[v]) - sum(float(p[c]) for c in run.tree.children[v])
        _, s, a = run.source(run.tree.path_to(v))
        nxt[(s, a)] = nxt.get((s, a), 0.0) + end
    return run, 1.0 + float(p[1:].sum()), nxt


def expected_tokens(plan: Plan, accept, cost=None, iters: int = 200):
    """Long-run tokens per pass of `plan` under measured acceptance rates accept[i-1][r] (offset i,
    rank r), and, if cost(plan) -> seconds is given, the long-run seconds per pass.

    The drafts of a step come from some node's pseudo tokens, shifted by s (state (s, a)); which
    state follows depends on where the walk ends. The share of passes in each state is the
    stationary distribution of that chain. Same independence assumption as tree_choice.expected_tau.
    """
    rates = torch.as_tensor(accept, dtype=torch.float64)
    if rates.shape[0] < plan.depth:
        raise ValueError(f"accept covers {rates.shape[0]} offsets, the plan reads {plan.depth}")
    start = (0, plan.depth)
    chain, todo = {}, [start]
    while todo:  # every state reachable from the first step (the prefill drafts from the root)
        state = todo.pop()
        if state not in chain:
            chain[state] = _state_step(plan, rates, state) if state != ROOT_ONLY else (
                plan.cut(0), 1.0, {start: 1.0})
            todo += list(chain[state][2])
    share = {s: float(s == start) for s in chain}
    for _ in range(iters):  # power iteration: a few states, converges fast
        new = dict.fromkeys(chain, 0.0)
        for s, (_, _, nxt) in chain.items():
            for t, p in nxt.items():
                new[t] += share[s] * p
        share = new
    tau = sum(share[s] * chain[s][1] for s in chain)
    if cost is None:
        return tau, None
    return tau, sum(share[s] * cost(chain[s][0]) for s in chain)


# ----------------------------------------------------------------------------- the choice

def candidate_plans(accept, sizes, k: int):
    """For each tree size, the best tree (tree_choice.build_tree) with pseudo tokens for the m nodes most
    likely to end the walk (m = 1, 2, 4, ..., all; the root always among them), c each (from the
    tree's depth to k: with fewer, every step would cut the tree, which is a smaller tree's plan)."""
    rates = torch.as_tensor(accept, dtype=torch.float64)
    for n in sizes:
        tree = build_tree(rates[:k], n)
        p = node_accept_probs(tree, rates)
        end = [float(p[v]) - sum(float(p[c]) for c in tree.children[v]) for v in range(tree.size)]
        order = [0] + sorted(range(1, tree.size), key=lambda v: -end[v])
        for m in sorted({min(m, tree.size) for m in (1, 2, 4, 8, 16, 32, 64)} | {tree.size}):
            for c in range(max(1, tree.depth), k + 1):  # fewer than the tree reads: always cut
                yield Plan(tree, tuple(sorted(order[:m])), c)


def choose_plan(accept, sizes, k: int, cost):
    """The plan with the most expected tokens per second. cost(plan) -> seconds of one pass (measured
    by latency.py; tests pass a made-up one). Returns (plan, rows): rows has (plan, tau, seconds)."""
    rows, cached = [], {}

    def timed(plan):  # the cost depends on the pass's shape: nodes and pseudo rows
        key = (plan.tree.size, plan.pseudo_rows)
        if key not in cached:
            cached[key] = cost(plan)
        return cached[key]

    for plan in candidate_plans(accept, sizes, k):
        tau, seconds = expected_tokens(plan, accept, timed)
        rows.append((plan, tau, seconds))
    best = max(rows, key=lambda r: r[1] / r[2])
    return best[0], rows


def select_plan(model, drafter, accept, sizes, n_ctx: int = CONTEXT, reps: int = REPS):
    """The decoding plan (tree shape, which nodes carry pseudo tokens, how many) with the most
    expected tokens per second on this machine: plan.choose_plan under the measured `accept` rates,
    every pass shape timed here in alternation with a one-token step. Prints the best plan of each
    size; returns (plan, table, candidates): table {"step_ms", "rows": [{"nodes", "plan", "tau", "ms",
    "ratio", "speedup"}]}, best per size; candidates [(plan, tau, seconds)], every plan weighed."""
    dev, step = model.output.weight.device, plain_step(model, n_ctx)
    step_s = _median_time(step, dev, reps)

    def cost(plan):  # timed in alternation with a one-token step, then put at step_s's speed: plans
        # timed minutes apart on a machine whose speed drifts are then ranked by their ratio to a step
        pass_s, step_now_s = paired_times(tree_step(model, drafter, plan, n_ctx), step, dev, reps)
        return pass_s / step_now_s * step_s
    best, rows = choose_plan(accept, sizes, drafter.k, cost)
    step_ms = 1000 * step_s
    table = {"n_ctx": n_ctx, "reps": reps, "step_ms": step_ms, "rows": []}
    for n in dict.fromkeys(p.tree.size for p, _, _ in rows):
        p, tau, s = max((r for r in rows if r[0].tree.size == n), key=lambda r: r[1] / r[2])
        table["rows"].append({"nodes": n, "plan": p.text(), "tau": tau, "ms": 1000 * s,
                              "ratio": 1000 * s / step_ms, "speedup": tau * step_ms / (1000 * s)})
    print(f"\nplan choice for {drafter.kind}: {len(rows)} plans, {n_ctx} cached tokens, median of {reps}; "
          f"one-token step {step_ms:.1f} ms")
    print(plan_report(table))
    print(f"chosen: {best.text()}")
    return best, table, rows


def select_compiled_plan(model, drafter, accept, rows: list, finalists: int = 3, n_ctx: int = CONTEXT,
                         reps: int = REPS, backend: str = "inductor"):
    """The plan for compiled decoding (compiled.py): the `finalists` best plans of select_plan's
    eager search (rows: its (plan, tau, seconds)), each compiled and timed as compiled decoding runs
    it, in alternation with a compiled one-token step. A compiled step always runs the plan's whole
    tree (its cuts padded), so every step of a plan costs its full pass. Compiling takes tens of
    seconds a graph on a CPU, hence finalists rather than every candidate. Returns (plan, table)."""
    dev, t0 = model.output.weight.device, time.perf_counter()
    best = sorted(rows, key=lambda r: -r[1] / r[2])
    picked, shapes = [], set()
    for plan, tau, _ in best:  # distinct pass shapes: the same shape costs the same
        if (plan.tree.size, plan.pseudo_rows) not in shapes and len(picked) < finalists:
            shapes.add((plan.tree.size, plan.pseudo_rows))
            picked.append((plan, tau))
    cm = CompiledModel(model, static_length(n_ctx + max(p.tree.size for p, _ in picked), model), backend)
    cm.warm_up()
    step = plain_step(cm, n_ctx, cm.cache)
    step_s = _median_time(step, dev, reps)
    table = {"n_ctx": n_ctx, "reps": reps, "step_ms": 1000 * step_s, "rows": [], "mode": "compiled"}
    for plan, tau in picked:
        cd = CompiledDrafter(drafter, cm, plan)
        cd.warm_up()
        pass_s, step_now_s = paired_times(tree_step(cm, cd, plan, n_ctx, cm.cache), step, dev, reps)
        ms = 1000 * pass_s / step_now_s * step_s
        table["rows"].append({"nodes": plan.tree.size, "plan": plan.text(), "tau": tau, "ms": ms,
                              "ratio": ms / table["step_ms"], "speedup": tau * table["step_ms"] / ms})
    table["compile_s"] = time.perf_counter() - t0
    chosen = max(range(len(picked)), key=lambda i: table["rows"][i]["speedup"])
    print(f"\nplan choice for {drafter.kind}, compiled: the {len(picked)} best eager plans, compiled; "
          f"compiled one-token step {table['step_ms']:.1f} ms")
    print(plan_report(table))
    print(f"chosen for compiled decoding: {picked[chosen][0].text()}")
    return picked[chosen][0], table


def plan_report(table: dict) -> str:
    """The best plan of each tree size as a markdown table (E[...]: expected from the acceptance rates)."""
    lines = ["| nodes | plan: tree [nodes with pseudo tokens x how many] | E[tau] | ms/pass (long-run mean) "
             "| ratio to one-token step | E[speedup] |", "|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['nodes']} | `{r['plan']}` | {r['tau']:.2f} | {r['ms']:.1f} | {r['ratio']:.2f} "
                     f"| {r['speedup']:.2f}x |")
    return "\n".join(lines)
