"""Assignment 6: tools/tree_choice.py's node_accept_probs, expected_tau and build_tree, against an exact
enumeration of outcomes and a search over every tree; then decoding with a built tree stays lossless
(whatever drafter you use)."""

import itertools

import torch

from common import all_paths, check, close, expect, random_paths, random_transfer, tiny_model


def random_rates(seed: int, k: int, top_r: int) -> torch.Tensor:
    """(k, top_r) acceptance rates; each row sums to at most 1 (one right token per offset)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(k, top_r + 1, generator=g, dtype=torch.float64)
    return (raw / raw.sum(-1, keepdim=True))[:, :top_r]  # the last column: "no rank is right"


def enumerated_tau(paths, rates) -> float:
    """E[tokens per step] by enumerating which rank (or none) is right at every offset: the walk goes
    down while the node with the right rank exists; +1 for the bonus token."""
    k, top_r = rates.shape
    present, total = set(map(tuple, paths)), 0.0
    for outcome in itertools.product(range(top_r + 1), repeat=k):  # top_r means: no rank right
        prob, path = 1.0, ()
        for j, r in enumerate(outcome):
            prob *= float(rates[j, r]) if r < top_r else 1.0 - float(rates[j].sum())
        for r in outcome:
            if r == top_r or path + (r,) not in present:
                break
            path += (r,)
        total += prob * (len(path) + 1)
    return total


def enumerated_node_probs(paths, rates) -> list:
    """P(node accepted) for () and every path, by enumerating which rank (or none) is right at every
    offset: a node is accepted when every step of its path names the right rank."""
    k, top_r = rates.shape
    probs = {(): 1.0, **{tuple(p): 0.0 for p in paths}}
    for outcome in itertools.product(range(top_r + 1), repeat=k):
        prob = 1.0
        for j, r in enumerate(outcome):
            prob *= float(rates[j, r]) if r < top_r else 1.0 - float(rates[j].sum())
        for p in paths:
            if tuple(outcome[:len(p)]) == tuple(p):
                probs[tuple(p)] += prob
    return probs


@check("node_accept_probs(tree, accept)[v] = P(node v accepted) = the product of accept[depth-1][rank] "
       "over the nodes of v's path below the root (the root is decided: 1), one value per node (N,)")
def check_node_accept_probs_exact():
    from tools.tree_choice import node_accept_probs
    from tree import Tree
    for seed in range(8):
        rates = random_rates(20 + seed, 3, 3)
        tree = Tree(random_paths(seed, 1 + seed), k=3)
        want = enumerated_node_probs(tree.paths[1:], rates)
        got = node_accept_probs(tree, rates.tolist())
        close(got, torch.tensor([want[tuple(p)] for p in tree.paths], dtype=torch.float64),
              f"node_accept_probs of {tree.paths[1:]}", 1e-9)


@check("expected tau = 1 (the bonus token, always emitted) + sum over non-root nodes of the product of "
       "accept[depth-1][rank] along the node's path (the root is decided: its factor is 1)")
def check_expected_tau_exact():
    from tools.tree_choice import expected_tau
    from tree import Tree
    for seed in range(10):
        rates = random_rates(seed, 3, 3)
        paths = random_paths(seed, 1 + seed)
        close(torch.tensor(expected_tau(Tree(paths, k=3), rates.tolist())),
              torch.tensor(enumerated_tau(paths, rates)), f"expected_tau of {paths}", 1e-9)
    close(torch.tensor(expected_tau(Tree([]), [[0.5]])), torch.tensor(1.0), "expected_tau of the root alone", 0)


@check("build_tree(accept, n) returns the n-node tree (root included) with the highest expected tau: "
       "grow from the root, always adding the most probable node (product along its path)")
def check_build_tree_is_optimal():
    from tools.tree_choice import build_tree
    for seed, (k, top_r) in enumerate([(2, 3), (3, 2), (3, 3)]):
        rates = random_rates(10 + seed, k, top_r)
        candidates = all_paths(k, top_r)
        for n in range(1, 6):
            tree = build_tree(rates.tolist(), n)
            expect(tree.size == n, f"build_tree(n={n}) has {tree.size} nodes")
            best = max(enumerated_tau(s, rates) for s in itertools.combinations(candidates, n - 1)
                       if all(p[:-1] in s or len(p) == 1 for p in s))
            close(torch.tensor(enumerated_tau([tuple(p) for p in tree.paths[1:]], rates)), torch.tensor(best),
                  f"tau of build_tree(n={n}) for k={k}, top_r={top_r} against the best tree", 1e-9)


@check("a full tree: a (k, top_r) tree holds 1 + top_r + top_r^2 + .. + top_r^k nodes; build_tree builds "
       "exactly that many, and refuses n < 1 and one node more with ValueError")
def check_build_tree_full_and_refuses_bad_sizes():
    from tools.tree_choice import build_tree
    for seed, (k, top_r) in enumerate([(2, 2), (2, 10), (3, 3), (1, 4)]):
        rates = random_rates(seed, k, top_r).tolist()
        capacity = sum(top_r ** d for d in range(k + 1))
        tree = build_tree(rates, capacity)
        expect(tree.size == capacity and len(set(tree.paths)) == capacity,
               f"build_tree(n={capacity}) for k={k}, top_r={top_r} has {tree.size} nodes")
        for n in (0, capacity + 1):
            try:
                build_tree(rates, n)
            except ValueError:
                continue
            raise AssertionError(f"build_tree(n={n}) was accepted for k={k}, top_r={top_r} (at most {capacity})")


@check("node_accept_probs refuses (ValueError) rates that do not cover the tree: fewer offsets than its "
       "depth, or fewer ranks than it reads")
def check_node_accept_probs_refuses_small_rates():
    from tools.tree_choice import node_accept_probs
    from tree import Tree
    tree = Tree([(0,), (1,), (0, 0)], k=3)
    for rates in ([[0.5, 0.2]], [[0.5], [0.3]]):  # one offset for depth 2; one rank where rank 1 is read
        try:
            node_accept_probs(tree, rates)
        except ValueError:
            continue
        raise AssertionError(f"node_accept_probs accepted rates {rates} for a tree of depth 2 reading rank 1")


@check("whatever drafter you use (a new projection included), decoding with a built tree must still "
       "equal plain decoding, greedy and seeded")
def check_decoding_with_a_built_tree_is_lossless():
    from decode import generate_tree
    from generate import Sampler, generate
    from tools.tree_choice import build_tree
    model, prompt = tiny_model(8, vocab_size=16), [2, 7, 1, 8]
    tree = build_tree(random_rates(3, 3, 3).tolist(), 6)
    for temp, seed in [(0.0, 0), (0.9, 2)]:
        ref = generate(model, prompt, 16, Sampler(temp, 1.0, seed)).tokens
        out = generate_tree(model, random_transfer(model, 2), prompt, tree, 16, Sampler(temp, 1.0, seed))
        expect(out.tokens == ref, f"temperature {temp}: differs from plain decoding")
