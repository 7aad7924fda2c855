"""tree.py: golden buffers for hand-drawn trees, the pseudo-token mask, validation, the builder.

Every expected tensor here is written out by hand from the picture beside it, never computed by
the code under test. The last tests run the masks through model.py's tiny model to check that
their columns line up with the model's [cache slots | ephemeral tokens] layout.
"""

import random
import re
from argparse import Namespace

import pytest
import torch

from tools.tree_choice import build_tree, expected_tau
from tree import Tree, chain, main, pseudo_mask, pseudo_positions, pseudo_rows


def bools(rows):
    return torch.tensor([[c == "1" for c in r.split()] for r in rows])


# ----------------------------------------------------------------------------- golden trees

def test_chain_of_three():
    # r -> 1 -> 2 -> 3, every node the top-1 token of its draft
    t = chain(3)
    assert t.paths == [(), (0,), (0, 0), (0, 0, 0)]
    assert (t.size, t.depth) == (4, 3)
    assert t.parents.tolist() == [-1, 0, 1, 2]
    assert t.depths.tolist() == [0, 1, 2, 3]
    assert t.ranks.tolist() == [0, 0, 0, 0]
    assert t.children == [[1], [2], [3], []]
    assert torch.equal(t.mask, bools(["1 . . .",
                                      "1 1 . .",
                                      "1 1 1 .",
                                      "1 1 1 1"]))
    assert t.positions(5).tolist() == [5, 6, 7, 8]
    assert t.slots(5).tolist() == [5, 6, 7, 8]
    assert t.path_to(3) == [0, 1, 2, 3]
    assert torch.equal(t.attention_mask(2), bools(["1 1 1 . . .",
                                                   "1 1 1 1 . .",
                                                   "1 1 1 1 1 .",
                                                   "1 1 1 1 1 1"]).unsqueeze(0))


def test_two_by_two_tree():
    #   [0] r
    #    +- [1] rank 0
    #    |   +- [3] rank 0
    #    |   +- [4] rank 1
    #    +- [2] rank 1
    #        +- [5] rank 0
    t = Tree([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    assert t.paths == [(), (0,), (1,), (0, 0), (0, 1), (1, 0)]
    assert (t.size, t.depth) == (6, 2)
    assert t.parents.tolist() == [-1, 0, 0, 1, 1, 2]
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 2]
    assert t.ranks.tolist() == [0, 0, 1, 0, 1, 0]
    assert t.children == [[1, 2], [3, 4], [5], [], [], []]
    assert torch.equal(t.mask, bools(["1 . . . . .",
                                      "1 1 . . . .",
                                      "1 . 1 . . .",
                                      "1 1 . 1 . .",
                                      "1 1 . . 1 .",
                                      "1 . 1 . . 1"]))
    assert t.positions(7).tolist() == [7, 8, 8, 9, 9, 9]   # one depth, one position
    assert t.slots(7).tolist() == [7, 8, 9, 10, 11, 12]    # one node, one slot
    assert t.path_to(5) == [0, 2, 5]
    assert t.attention_mask(1).shape == (1, 6, 7)


def test_unsorted_sparse_ranks():
    # given out of order, with gaps in the ranks (rank 2 without rank 1 is still prefix-closed):
    #   [0] r
    #    +- [1] rank 0
    #    |   +- [3] rank 0
    #    |       +- [4] rank 1
    #    +- [2] rank 2
    t = Tree([(0, 0, 1), (2,), (0,), (0, 0)])
    assert t.paths == [(), (0,), (2,), (0, 0), (0, 0, 1)]
    assert t.parents.tolist() == [-1, 0, 0, 1, 3]
    assert t.depths.tolist() == [0, 1, 1, 2, 3]
    assert t.ranks.tolist() == [0, 0, 2, 0, 1]
    assert t.children == [[1, 2], [3], [], [4], []]
    assert torch.equal(t.mask, bools(["1 . . . .",
                                      "1 1 . . .",
                                      "1 . 1 . .",
                                      "1 1 . 1 .",
                                      "1 1 . 1 1"]))
    assert t.positions(0).tolist() == [0, 1, 1, 2, 3]
    assert t.slots(0).tolist() == [0, 1, 2, 3, 4]


def test_root_only():
    t = Tree([])
    assert (t.size, t.depth) == (1, 0)
    assert t.tokens(5, torch.zeros(1, 1, dtype=torch.long)).tolist() == [5]


def test_tokens_map_ranks_to_draft_tokens():
    t = Tree([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    drafts = torch.tensor([[10, 11, 12],   # ranked top tokens of q_1
                           [20, 21, 22]])  # ranked top tokens of q_2
    assert t.tokens(7, drafts).tolist() == [7, 10, 11, 20, 21, 20]
    with pytest.raises(ValueError, match="too small"):
        t.tokens(7, drafts[:1])
    with pytest.raises(ValueError, match="too small"):
        t.tokens(7, drafts[:, :1])


def test_parse_and_top_r():
    t = Tree.parse("0;0,0;1", k=2)
    assert t.paths == [(), (0,), (1,), (0, 0)]
    assert (t.k, t.top_r) == (2, 2)          # top_r defaults to the fewest ranks the tree reads
    assert Tree([(0,)], top_r=5).top_r == 5  # ... or is kept as given
    assert Tree([]).top_r == 1
    assert Tree.parse("chain", k=3).paths == chain(3).paths
    with pytest.raises(ValueError, match="neither a name .* nor paths like"):
        Tree.parse("0;a")


def follows_the_naming_rule(name, paths):
    """tree.py's rule for SHAPES: a letter in the name, not "chain"; treeN has N nodes; the paths
    are prefix-closed and Tree.parse(name) gives them."""
    t = Tree.parse(name, k=max(len(p) for p in paths))
    assert t.paths[1:] == sorted(paths, key=lambda p: (len(p), p)), name
    assert name != "chain" and re.search("[a-zA-Z]", name), name
    if re.fullmatch(r"tree\d+", name):
        assert t.size == int(name.removeprefix("tree")), f"{name} has {t.size} nodes"


def test_named_shapes(monkeypatch):
    """SHAPES: a few trees by name, the built-in ones valid for any k >= 2; a learner's one-line
    shape of another name or depth is welcome, and a treeN of the wrong size is not."""
    from tree import SHAPES
    for name, paths in SHAPES.items():
        follows_the_naming_rule(name, paths)
        assert Tree.parse(name, k=2).depth <= 2
    assert Tree.parse("pair", k=2).paths == [(), (0,)] and Tree.parse(" tree4 ", k=3).size == 4
    with pytest.raises(ValueError, match="depth 2 but the drafts reach only k=1"):
        Tree.parse("tree4", k=1)
    monkeypatch.setitem(SHAPES, "deep", [(0,), (0, 0), (0, 0, 0)])  # one line in tree.py
    follows_the_naming_rule("deep", SHAPES["deep"])
    assert Tree.parse("deep", k=3).depth == 3
    monkeypatch.setitem(SHAPES, "tree5", [(0,), (1,), (0, 0)])  # 4 nodes
    with pytest.raises(AssertionError, match="tree5 has 4 nodes"):
        follows_the_naming_rule("tree5", SHAPES["tree5"])


def test_to_moves_a_copy():
    t = Tree([(0,), (1,)])
    moved = t.to("meta")
    assert moved.mask.device.type == "meta" and moved.depths.device.type == "meta"
    assert t.mask.device.type == "cpu" and moved.paths == t.paths


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("paths, kwargs, names", [
    ([(0, 0)], {}, r"\(0, 0\).*prefix-closed"),
    ([(0,), (1,), (1, 0, 0)], {}, r"\(1, 0, 0\).*prefix-closed"),
    ([(0,), (0,)], {}, r"\(0,\) appears twice"),
    ([(0,), (0, 0)], {"k": 1}, r"\(0, 0\).*k=1"),
    ([(0,), (2,)], {"top_r": 2}, r"\(2,\).*top_r=2"),
    ([(-1,)], {}, r"\(-1,\).*non-negative"),
    ([()], {}, r"root"),
    ([0], {}, r"bare int"),
])
def test_invalid_trees_raise(paths, kwargs, names):
    with pytest.raises(ValueError, match=names):
        Tree(paths, **kwargs)


# ----------------------------------------------------------------------------- pseudo tokens

def test_pseudo_mask_golden():
    # chain r -> a, k = 2; the cache columns (all 1) come from model.KVCache.attention_mask
    m = pseudo_mask(chain(1).mask, k=2)
    #                      r a | (r,1) (r,2) (a,1) (a,2)
    assert torch.equal(m, bools(["1 .  . . . .",     # r
                                 "1 1  . . . .",     # a
                                 "1 .  1 . . .",     # (r,1)
                                 "1 .  1 1 . .",     # (r,2)
                                 "1 1  . . 1 .",     # (a,1)
                                 "1 1  . . 1 1"]))   # (a,2)
    assert pseudo_positions(torch.tensor([3, 4]), 2).tolist() == [4, 5, 5, 6]


def test_pseudo_rows_for_training_golden():
    # training: a window of T = 4 real tokens in the cache, pseudo tokens for p = 1 and 2, k = 2;
    # the owner rows are causal rows (p sees 0..p), the same rule as decoding's tree rows
    sees = torch.arange(4) <= torch.tensor([[1, 2]])[..., None]    # (1, 2, 4)
    golden = bools([
        # x0 x1 x2 x3 (1,1) (1,2) (2,1) (2,2)
        "1 1 . .  1 . . .",   # (1,1)
        "1 1 . .  1 1 . .",   # (1,2)
        "1 1 1 .  . . 1 .",   # (2,1)
        "1 1 1 .  . . 1 1",   # (2,2)
    ])
    m = pseudo_rows(sees, k=2)
    assert m.shape == (1, 4, 8) and torch.equal(m[0], golden)
    assert pseudo_positions(torch.tensor([[1, 2]]), 2).tolist() == [[2, 3, 3, 4]]


def test_pseudo_mask_for_some_nodes():
    # the cheaper variant: only a gets pseudo tokens
    m = pseudo_mask(chain(1).mask, k=2, nodes=[1])
    assert torch.equal(m, bools(["1 .  . .",      # r
                                 "1 1  . .",      # a
                                 "1 1  1 .",      # (a,1)
                                 "1 1  1 1"]))    # (a,2)


def random_tree(rng, n_nodes, k, top_r):
    """A random prefix-closed tree, grown by adding a random unused child of a random node."""
    paths = [()]
    while len(paths) < n_nodes:
        parent = rng.choice([p for p in paths if len(p) < k])
        free = [r for r in range(top_r) if parent + (r,) not in paths]
        if free:
            paths.append(parent + (rng.choice(free),))
    return Tree(paths[1:], k=k, top_r=top_r)


def test_pseudo_mask_properties_on_random_trees():
    rng = random.Random(0)
    for trial in range(5):
        t = random_tree(rng, n_nodes=9, k=3, top_r=3)
        n, k, N = 4, 3, t.size
        nodes = list(range(N)) if trial % 2 == 0 else rng.sample(range(N), 4)
        m = torch.cat([torch.ones(N + len(nodes) * k, n, dtype=torch.bool), pseudo_mask(t.mask, k, nodes=nodes)], 1)
        P = len(nodes) * k
        assert m.shape == (N + P, n + N + P)
        assert not m[:N, n + N:].any(), "a real token must never see a pseudo token"
        assert torch.equal(m[:N, n:n + N], t.mask)
        for s, a in enumerate(nodes):
            # ancestors of a, from its path alone: every prefix of it, a included
            prefixes = {t.paths[a][:d] for d in range(len(t.paths[a]) + 1)}
            tree_cols = [j for j, p in enumerate(t.paths) if p in prefixes]
            for i in range(k):
                row = m[N + s * k + i]
                expect = set(range(n)) | {n + j for j in tree_cols} | {n + N + s * k + j for j in range(i + 1)}
                assert set(row.nonzero().flatten().tolist()) == expect
        pos = pseudo_positions(t.positions(n)[nodes], k)
        assert pos.tolist() == [n + len(t.paths[a]) + i for a in nodes for i in range(1, k + 1)]


# ----------------------------------------------------------------------------- builder and tau

def test_expected_tau_by_hand():
    chain_rates = [[0.8, 0.1], [0.5, 0.1], [0.25, 0.1]]
    assert expected_tau(chain(3), chain_rates) == pytest.approx(1 + 0.8 + 0.8 * 0.5 + 0.8 * 0.5 * 0.25)
    # (0,) .5, (1,) .25, (0,0) .25, (0,1) .125, (1,0) .125
    t = Tree([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    assert expected_tau(t, [[0.5, 0.25], [0.5, 0.25]]) == pytest.approx(2.25)
    assert expected_tau(Tree([]), [[0.5]]) == 1.0
    with pytest.raises(ValueError, match="does not cover"):
        expected_tau(t, [[0.5, 0.25]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_tau(t, [[1.5, 0.25], [0.5, 0.25]])


def test_build_tree_by_hand():
    rank0 = [[0.9, 0.05, 0.01], [0.8, 0.05, 0.01], [0.7, 0.05, 0.01]]
    assert build_tree(rank0, 4).paths == chain(3).paths
    # (0,) .6, (1,) .3, (0,0) .24, (1,0) .12, (0,1) .12
    rates = [[0.6, 0.3], [0.4, 0.2]]
    assert build_tree(rates, 3).paths == [(), (0,), (1,)]
    assert build_tree(rates, 4).paths == [(), (0,), (1,), (0, 0)]
    assert build_tree(rates, 1).paths == [()]
    # a better rank 1 is taken without rank 0: the tree need not fill ranks in order
    assert build_tree([[0.1, 0.9]], 2).paths == [(), (1,)]
    with pytest.raises(ValueError, match="exceeds"):
        build_tree([[0.5, 0.5]], 4)


def test_build_tree_beats_chain_and_random_trees():
    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    k, top_r = 4, 4
    for trial, n_nodes in enumerate((3, 5, 10, 20, 10)):
        accept = torch.rand(k, top_r, generator=g) / top_r  # each row sums to <= 1, like real rates
        if trial < 4:  # measured rates fall with rank; the last trial checks that nothing relies on it
            accept = accept.sort(dim=1, descending=True).values
        best = build_tree(accept, n_nodes)
        assert best.size == n_nodes and best.depth <= k and int(best.ranks.max()) < top_r
        tau = expected_tau(best, accept)
        if n_nodes - 1 <= k:
            assert tau >= expected_tau(chain(n_nodes - 1), accept) - 1e-12
        for _ in range(20):
            assert tau >= expected_tau(random_tree(rng, n_nodes, k, top_r), accept) - 1e-12


# ----------------------------------------------------------------------------- with the model

def test_masks_line_up_with_the_model(device):
    """Tree rows give the logits of a causal forward over their path, with or without pseudo tokens."""
    from model import KVCache, ModelArgs, Transformer, causal_mask

    args = ModelArgs.tiny()
    model = Transformer(args).init_random(0).eval().to(device)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(args.vocab_size, (1, 5), generator=g).to(device)
    t = Tree([(0,), (1,), (0, 0), (0, 1), (1, 0)]).to(device)
    nodes = torch.randint(args.vocab_size, (1, t.size), generator=g).to(device)  # (1, N) token ids
    arange = lambda *ends: torch.arange(*ends, device=device)
    n, k, split = prompt.shape[1], 2, 2  # the transfer layer: run layers [0, 2), then [2, 4)

    with torch.no_grad():
        cache = KVCache(args, max_len=32, device=device)
        model(prompt, arange(n), causal_mask(n, device=device), slots=arange(n), cache=cache)
        plain = model(nodes, t.positions(n), t.attention_mask(n), slots=t.slots(n), cache=cache)

        cache = KVCache(args, max_len=32, device=device)
        model(prompt, arange(n), causal_mask(n, device=device), slots=arange(n), cache=cache)
        h = model.run_layers(model.embed(nodes), t.positions(n), t.attention_mask(n),
                             t.slots(n), cache, stop=split)                  # (1, N, dim)
        pseudo = h.repeat_interleave(k, 1)                                   # (1, N*k, dim)
        pos = torch.cat([t.positions(n), pseudo_positions(t.positions(n), k)])
        h = model.run_layers(torch.cat([h, pseudo], 1), pos, cache.attention_mask(pseudo_mask(t.mask, k), n),
                             t.slots(n), cache, start=split)
        with_pseudo = model.head(h)[:, :t.size]

        for leaf in (i for i in range(t.size) if not t.children[i]):
            path = t.path_to(leaf)
            seq = torch.cat([prompt, nodes[:, path]], 1)
            ref = model(seq, arange(seq.shape[1]), causal_mask(seq.shape[1], device=device))[:, n:]
            torch.testing.assert_close(plain[:, path], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_pseudo, plain, rtol=1e-5, atol=1e-5)


def test_cli_prints_tree_and_mask(capsys):
    main(Namespace(paths="0;0,0;1", k=2, n=3, pseudo=True))
    out = capsys.readouterr().out
    assert " +- [1] rank 0" in out and " +- [2] rank 1" in out
    assert "3   1 1 . 1" in out  # node (0,0) sees root, (0,) and itself
    assert "pseudo mask" in out
