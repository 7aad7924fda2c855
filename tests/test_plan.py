"""Decoding plans: which nodes carry pseudo tokens and how many, where the next drafts come from, the cost model."""

import random

import pytest

from conftest import Oracle, check_cache, random_transfer, tiny
from decode import generate_tree
from generate import Sampler, generate
from plan import Plan
from tools import latency, plan_search
from tools.plan_search import ROOT_ONLY, choose_plan, expected_tokens
from tools.tree_choice import build_tree, expected_tau
from tree import Tree, chain

ACCEPT = [[0.45, 0.12, 0.06, 0.03], [0.25, 0.08, 0.04, 0.02], [0.15, 0.05, 0.03, 0.01]]


def test_plan_checks_its_nodes_and_depth():
    tree = Tree.parse("0;1;0,0", k=3)
    with pytest.raises(ValueError, match="include the root"):
        Plan(tree, (1, 2), 1)
    with pytest.raises(ValueError, match="ascending"):
        Plan(tree, (0, 2, 1), 1)
    with pytest.raises(ValueError, match="not in a tree"):
        Plan(tree, (0, 4), 1)
    with pytest.raises(ValueError, match="k=3"):
        Plan(tree, (0,), 4)
    assert Plan(tree, (0, 2), 2).counts == (2, 0, 2, 0) and Plan(tree, (0, 2), 2).pseudo_rows == 4


def test_cut_keeps_a_prefix_of_the_nodes():
    plan = Plan(Tree.parse("0;1;0,0;1,0;0,0,0", k=3), (0, 1, 3, 5), 2)
    cut = plan.cut(1)
    assert [list(p) for p in cut.tree.paths] == [[], [0], [1]]
    assert cut.nodes == (0, 1) and cut.depth == 2
    assert plan.cut(0).tree.size == 1 and plan.cut(0).nodes == (0,)
    assert plan.cut(3) is plan


def test_source_prefers_the_deepest_carrier_that_reaches():
    #  [0] r (carries 2) -- [1] rank 0 (none) -- [3] rank 0 (carries 2)
    #                    \- [2] rank 1 (carries 2)
    plan = Plan(Tree.parse("0;1;0,0", k=3), (0, 2, 3), 2)
    assert plan.source([0]) == (0, 0, 2)          # the walk ends at the root: its own drafts
    assert plan.source([0, 2]) == (1, 0, 2)       # node 2 (row 1 of nodes): its own q_1, q_2
    assert plan.source([0, 1]) == (0, 1, 1)       # node 1 carries none: the root's q_2 stands in
    assert plan.source([0, 1, 3]) == (2, 0, 2)
    plan = Plan(Tree.parse("0;0,0", k=3), (0,), 1)
    assert plan.source([0, 1]) == (None, 0, 0)    # the root's one draft is used up: root-only step


def test_full_plan_gives_expected_tau():
    for n in (2, 4, 6, 10):
        tree = build_tree(ACCEPT, n)
        tau, _ = expected_tokens(Plan.full(tree, 3), ACCEPT)
        assert tau == pytest.approx(expected_tau(tree, ACCEPT), abs=1e-9)


def _simulate(plan: Plan, accept, passes: int, seed: int = 0) -> float:
    """Decode under the independence model: node (.., r) at offset j is right with accept[j-1][r],
    one right rank per offset at most. Follows Plan.source exactly as decode.py does."""
    rng = random.Random(seed)
    tokens, shift, avail = 0, 0, plan.depth
    for _ in range(passes):
        if avail == 0:  # a root-only step: the root's token, then the root's own drafts
            tokens, shift, avail = tokens + 1, 0, plan.depth
            continue
        run = plan.cut(min(plan.tree.depth, avail))
        path, v = [0], 0
        while run.tree.children[v]:
            offset = shift + len(path)  # the children's offset in the drafts, 1-based
            u, acc, right = rng.random(), 0.0, None  # which rank (if any) is right there
            for r, p in enumerate(accept[offset - 1]):
                acc += p
                if u < acc:
                    right = r
                    break
            v = next((c for c in run.tree.children[v] if int(run.tree.ranks[c]) == right), None)
            if v is None:
                break
            path.append(v)
        tokens += len(path)  # accepted children + the bonus token
        _, shift, avail = run.source(path)
    return tokens / passes


@pytest.mark.parametrize("paths,nodes,depth", [("0;1;2", (0,), 2), ("0;1;0,0", (0, 1), 1), ("0;0,0", (0,), 1),
                                               ("0;1;0,0;0,0,0", (0, 1, 4), 3), ("0;1;0,0;0,0,0", (0, 3), 2)])
def test_expected_tokens_matches_a_simulation(paths, nodes, depth):
    plan = Plan(Tree.parse(paths, k=3), nodes, depth)
    tau, _ = expected_tokens(plan, ACCEPT)
    assert _simulate(plan, ACCEPT, 40_000) == pytest.approx(tau, abs=0.02)


def test_root_only_steps_are_counted():
    # the root carries one draft and the chain is 2 deep: after accepting depth 1, no drafts reach
    plan = Plan(chain(2), (0,), 1)
    tau, seconds = expected_tokens(plan, ACCEPT, cost=lambda p: 1.0 + p.tree.size)
    a = ACCEPT[0][0]
    share_root_only = a / (1 + a)       # every accepted child is followed by a root-only step
    assert tau == pytest.approx((1 - share_root_only) * (1 + a) + share_root_only * 1.0)
    assert seconds == pytest.approx((1 - share_root_only) * 3.0 + share_root_only * 2.0)
    assert ROOT_ONLY == (0, 0)


def test_choose_plan_follows_the_cost():
    # Pseudo rows cost nothing: every node carries pseudo tokens for its own next tree.
    free = lambda plan: 1.0
    best, rows = choose_plan(ACCEPT, [2, 4, 8], 3, free)
    assert best.tree.size == 8 and len(best.nodes) == 8 and best.depth >= best.tree.depth
    # Pseudo rows are dear: fewer of them win, at a smaller tau than the free choice.
    dear = lambda plan: 1.0 + 0.5 * plan.pseudo_rows
    cheap_best, _ = choose_plan(ACCEPT, [2, 4, 8], 3, dear)
    assert cheap_best.pseudo_rows < best.pseudo_rows
    assert expected_tokens(cheap_best, ACCEPT)[0] < expected_tokens(best, ACCEPT)[0]
    # every candidate's tau and cost are what expected_tokens says
    for plan, tau, seconds in rows[:5]:
        assert (tau, seconds) == pytest.approx(expected_tokens(plan, ACCEPT, free))


def test_the_compiled_plan_is_chosen_among_the_eager_finalists_by_compiled_timing(monkeypatch):
    """select_compiled_plan compiles the best eager candidates (distinct pass shapes only) and
    ranks them by their compiled pass time against a compiled one-token step."""
    model = tiny()
    drafter = random_transfer(model, 2)
    candidates = choose_plan(ACCEPT, [2, 4, 8], 3, lambda plan: 1.0 + 0.1 * plan.tree.size)[1]
    timed = []
    real = plan_search.paired_times

    def paired(first, second, device, reps):  # made up: a pass costs what its rows say, a step 1
        rows = first.plan.tree.size + first.plan.pseudo_rows
        timed.append(first.plan)
        real(first, second, device, 1)  # the real calls run too, compiled
        return 1.0 + 0.5 * rows, 1.0
    monkeypatch.setattr(plan_search, "paired_times", paired)
    monkeypatch.setattr(plan_search, "tree_step", lambda m, d, plan, n_ctx, cache: _Step(
        latency.tree_step(m, d, plan, n_ctx, cache), plan))
    plan, table = plan_search.select_compiled_plan(model, drafter, ACCEPT, candidates, 3, n_ctx=8, reps=1,
                                                   backend="aot_eager")
    shapes = [(p.tree.size, p.pseudo_rows) for p in timed]
    assert len(timed) == 3 and len(set(shapes)) == 3
    ranked = sorted(candidates, key=lambda r: -r[1] / r[2])
    assert timed[0].text() == ranked[0][0].text()  # the eager winner is always among them
    best = max(table["rows"], key=lambda r: r["speedup"])
    assert plan.text() == best["plan"] and best["speedup"] == pytest.approx(best["tau"] / best["ratio"])


class _Step:  # a timed function that says which plan it runs
    def __init__(self, fn, plan):
        self.fn, self.plan = fn, plan

    def __call__(self):
        self.fn()


# ----------------------------------------------------------------------------- decoding with a plan

PLANS = {  # (tree, nodes carrying pseudo tokens, how many): placements that force every fallback
    "root only carries, shifted": ("0;1;2;0,0", (0,), 3),       # children draft with the root's q_2, q_3
    "root and a child": ("0;1;0,0;1,0", (0, 1), 2),             # node 2 ends: the root's q_2 stands in
    "drafts run out": ("0;0,0;0,0,0", (0,), 1),                 # depth 1+ accepted: root-only steps follow
    "every node": ("0;1;0,0;1,0;0,0,0", (0, 1, 2, 3, 4, 5), 3),
}


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("max_new", [2, 17, 31])
def test_plans_are_lossless_greedy_and_keep_the_cache_exact(name, max_new, monkeypatch, device):
    paths, nodes, depth = PLANS[name]
    plan = Plan(Tree.parse(paths, k=3), nodes, depth)
    model, prompt = tiny(3, device), [4, 8, 15, 16, 23, 42]
    ref = generate(model, prompt, max_new, Sampler())
    sources = []  # every (row, shift, available) a step's next drafts came from
    monkeypatch.setattr(Plan, "source", lambda self, path, f=Plan.source: sources.append(f(self, path)) or sources[-1])
    emitted = []
    out = generate_tree(model, Oracle(model, prompt + ref.tokens), prompt, plan, max_new, Sampler(),
                        on_token=emitted.extend, on_step=check_cache(model, prompt, emitted))
    assert out.tokens == ref.tokens
    if max_new > 20:  # the oracle is right often enough for each fallback to happen
        assert out.tau > 1.3
        if name != "every node":
            assert any(shift > 0 for _, shift, a in sources if a) or any(a == 0 for _, _, a in sources)
        if name == "drafts run out":
            assert any(a == 0 for _, _, a in sources) and 0 in out.accepted  # root-only steps ran


@pytest.mark.parametrize("name", list(PLANS))
def test_plans_are_lossless_in_seeded_sampling(name, device):
    paths, nodes, depth = PLANS[name]
    plan = Plan(Tree.parse(paths, k=3), nodes, depth)
    model, prompt = tiny(5, device, vocab_size=16), [3, 1, 4, 1, 5]
    for seed in range(3):
        ref = generate(model, prompt, 25, Sampler(0.8, 0.9, seed))
        out = generate_tree(model, random_transfer(model, 2, seed=seed), prompt, plan, 25, Sampler(0.8, 0.9, seed))
        assert out.tokens == ref.tokens, f"seed {seed}"


def test_fewer_pseudo_tokens_draft_the_same_tokens(device):
    """Pseudo tokens sized to the step: a plan whose nodes carry only the tree's depth drafts what
    all k would have drafted there (the same accepted counts, pass for pass)."""
    model, prompt = tiny(6, device, vocab_size=24), [5, 9, 2, 7]
    drafter, tree = random_transfer(model, 2, seed=1), Tree.parse("0;1;2", k=3)
    every = range(tree.size)
    full = generate_tree(model, drafter, prompt, Plan(tree, tuple(every), 3), 30, Sampler())
    sized = generate_tree(model, drafter, prompt, Plan(tree, tuple(every), 1), 30, Sampler())
    assert sized.tokens == full.tokens and sized.accepted == full.accepted
