"""Decoding plans: pseudo-token counts per node, where the next drafts come from, the cost model."""

import random

import pytest
import torch

from plan import ROOT_ONLY, Plan, choose_plan, expected_tokens
from tree import Tree, build_tree, chain, expected_tau

ACCEPT = [[0.45, 0.12, 0.06, 0.03], [0.25, 0.08, 0.04, 0.02], [0.15, 0.05, 0.03, 0.01]]


def test_plan_checks_its_counts():
    tree = Tree.parse("0;1;0,0", k=3)
    with pytest.raises(ValueError, match="one pseudo-token count per node"):
        Plan(tree, (1, 1))
    with pytest.raises(ValueError, match="root must carry"):
        Plan(tree, (0, 1, 1, 1))
    with pytest.raises(ValueError, match="k=3"):
        Plan(tree, (4, 0, 0, 0))


def test_cut_keeps_a_prefix_of_the_nodes():
    plan = Plan(Tree.parse("0;1;0,0;1,0;0,0,0", k=3), (3, 2, 0, 1, 0, 1))
    cut = plan.cut(1)
    assert [list(p) for p in cut.tree.paths] == [[], [0], [1]]
    assert cut.counts == (3, 2, 0)
    assert plan.cut(0).tree.size == 1 and plan.cut(0).counts == (3,)
    assert plan.cut(3) is plan


def test_source_prefers_the_deepest_carrier_that_reaches():
    #  [0] r (2) -- [1] rank 0 (0) -- [3] rank 0 (1)
    #            \- [2] rank 1 (1)
    plan = Plan(Tree.parse("0;1;0,0", k=3), (2, 0, 1, 1))
    assert plan.source([0]) == (0, 0, 2)          # the walk ends at the root: its own drafts
    assert plan.source([0, 2]) == (2, 0, 1)       # node 2 carries one: its own q_1
    assert plan.source([0, 1]) == (0, 1, 1)       # node 1 carries none: the root's q_2 stands in
    assert plan.source([0, 1, 3]) == (3, 0, 1)
    plan = Plan(Tree.parse("0;0,0", k=3), (1, 0, 0))
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
    tokens, shift, avail = 0, 0, plan.counts[0]
    for _ in range(passes):
        if avail == 0:  # a root-only step: the root's token, then the root's own drafts
            tokens, shift, avail = tokens + 1, 0, plan.counts[0]
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


@pytest.mark.parametrize("paths,counts", [("0;1;2", (2, 0, 0, 0)), ("0;1;0,0", (1, 1, 0, 0)),
                                          ("0;0,0", (1, 0, 0)), ("0;1;0,0;0,0,0", (3, 1, 0, 0, 1))])
def test_expected_tokens_matches_a_simulation(paths, counts):
    plan = Plan(Tree.parse(paths, k=3), counts)
    tau, _ = expected_tokens(plan, ACCEPT)
    assert _simulate(plan, ACCEPT, 40_000) == pytest.approx(tau, abs=0.02)


def test_root_only_steps_are_counted():
    # the root carries one draft and the chain is 2 deep: after accepting depth 1, no drafts reach
    plan = Plan(chain(2), (1, 0, 0))
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
    assert best.tree.size == 8 and all(c >= 1 for c in best.counts)
    # Pseudo rows are dear: fewer of them win, at a smaller tau than the free choice.
    dear = lambda plan: 1.0 + 0.5 * plan.pseudo_rows
    cheap_best, _ = choose_plan(ACCEPT, [2, 4, 8], 3, dear)
    assert cheap_best.pseudo_rows < best.pseudo_rows
    assert expected_tokens(cheap_best, ACCEPT)[0] < expected_tokens(best, ACCEPT)[0]
    # every candidate's tau and cost are what expected_tokens says
    for plan, tau, seconds in rows[:5]:
        assert (tau, seconds) == pytest.approx(expected_tokens(plan, ACCEPT, free))
