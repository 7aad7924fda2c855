"""Assignment 2: tree.Tree's buffers (order, parents, depths, ranks, children, ancestor mask),
positions versus slots, and node tokens, against brute force over the paths; then decoding."""

import torch

from common import check, expect, is_ancestor_or_self, oracle_drafter, random_paths, random_transfer, tiny_model

DOCSTRING_TREE = [(0,), (1,), (0, 0), (0, 1), (1, 0)]


def trees():
    """(paths as given, Tree) for the docstring's example and random trees of 1..12 nodes."""
    from tree import Tree
    cases = [DOCSTRING_TREE, [], [(0,)], [(0,), (0, 0), (0, 0, 0)], [(2,), (0,), (1,), (1, 0)]]
    cases += [random_paths(seed, 1 + seed % 12) for seed in range(12)]
    return [(paths, Tree(paths, k=3)) for paths in cases]


@check("nodes must be sorted by (depth, path) with the root () first: parents come before children "
       "and a node's index is its slot offset")
def check_node_order():
    for given, tree in trees():
        want = [()] + sorted(given, key=lambda p: (len(p), p))
        expect([tuple(p) for p in tree.paths] == want, f"paths {tree.paths}, expected {want}")
        expect(tree.size == len(want), f"size {tree.size}, expected {len(want)} (the root counts)")
        expect(tree.depth == max(len(p) for p in want), f"depth {tree.depth} for paths {given}")


@check("parents[i] is the index of paths[i][:-1] (-1 for the root); depths[i] = len(paths[i]); "
       "ranks[i] = paths[i][-1] (0 for the root); children[i] lists i's children in rank order")
def check_parents_depths_ranks_children():
    for given, tree in trees():
        paths = [tuple(p) for p in tree.paths]
        index = {p: i for i, p in enumerate(paths)}
        expect(tree.parents.tolist() == [index[p[:-1]] if p else -1 for p in paths], f"parents for {given}")
        expect(tree.depths.tolist() == [len(p) for p in paths], f"depths for {given}")
        expect(tree.ranks.tolist() == [p[-1] if p else 0 for p in paths], f"ranks for {given}")
        want = [sorted((index[c] for c in paths if c[:-1] == p and c), key=lambda c: paths[c][-1])
                for p in paths]
        expect([list(c) for c in tree.children] == want, f"children {tree.children}, expected {want}")


@check("mask[i, j] is True exactly when node j is node i itself or one of its ancestors (rows are "
       "queries): a node sees its own path, never a sibling, cousin or descendant")
def check_ancestor_mask():
    for given, tree in trees():
        paths = [tuple(p) for p in tree.paths]
        want = torch.tensor([[is_ancestor_or_self(b, a) for b in paths] for a in paths])
        expect(tree.mask.dtype == torch.bool, f"mask dtype {tree.mask.dtype}, expected torch.bool")
        expect(torch.equal(tree.mask, want), f"ancestor mask wrong for paths {given}:\n{tree.mask.int()}")


@check("positions(n) = n + depth (siblings share a position); slots(n) = n + node index (every node "
       "has its own slot)")
def check_positions_versus_slots():
    for given, tree in trees():
        for n in (0, 7):
            paths = [tuple(p) for p in tree.paths]
            expect(tree.positions(n).tolist() == [n + len(p) for p in paths], f"positions({n}) for {given}")
            expect(tree.slots(n).tolist() == [n + i for i in range(len(paths))], f"slots({n}) for {given}")


@check("tokens(root, top)[i] is top[depth-1, rank] of node i (the rank-th token of q_depth), the root's "
       "is root; drafts too small for the tree (too few ranks, or fewer rows than its depth) raise ValueError")
def check_node_tokens():
    g = torch.Generator().manual_seed(0)
    for given, tree in trees():
        top = torch.randint(0, 1000, (3, 4), generator=g)
        paths = [tuple(p) for p in tree.paths]
        want = [7] + [int(top[len(p) - 1, p[-1]]) for p in paths[1:]]
        expect(tree.tokens(7, top).tolist() == want, f"tokens for {given}")
    from tree import Tree
    for tree, top, what in [(Tree([(0,), (0, 2)]), torch.zeros(2, 2, dtype=torch.long), "2 ranks for a tree "
                             "that reads rank 2"),
                            (Tree([(0,), (0, 0), (0, 0, 0)]), torch.zeros(2, 4, dtype=torch.long), "drafts for 2 "
                             "offsets for a tree of depth 3")]:
        try:
            tree.tokens(7, top)
        except ValueError:
            continue
        raise AssertionError(f"tokens() accepted {what}")


@check("refuse bad shapes with ValueError: a path without its parent, a path listed twice, a path "
       "deeper than k, a rank of top_r or more, an empty path")
def check_rejects_bad_paths():
    from tree import Tree
    for bad, kw in [([(0, 0)], {}), ([(0,), (1, 0)], {}), ([(0,), (0,)], {}), ([(0,), (0, 0)], {"k": 1}),
                    ([(0,), (2,)], {"top_r": 2}), ([(0,), (0, 1)], {"top_r": 1}), ([()], {})]:
        try:
            Tree(bad, **kw)
        except ValueError:
            continue
        raise AssertionError(f"Tree({bad}, {kw}) was accepted")


@check("end to end: decoding with your tree must equal plain greedy decoding token for token "
       "(decode.py uses your masks, positions, slots and children)")
def check_decoding_with_your_trees_is_lossless():
    from decode import generate_tree
    from generate import Sampler, generate
    from tree import Tree
    model = tiny_model(2)
    prompt = [5, 9, 2, 7, 1]
    ref = generate(model, prompt, 20, Sampler()).tokens
    for i, paths in enumerate([DOCSTRING_TREE, random_paths(3, 8), [(0,), (0, 0), (0, 0, 0)]]):
        for drafter in (random_transfer(model, 2), oracle_drafter(model, prompt + ref, seed=i)):
            out = generate_tree(model, drafter, prompt, Tree(paths, k=3), 20, Sampler())
            expect(out.tokens == ref, f"tree {paths}: decoding differs from plain decoding")
