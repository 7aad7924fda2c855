"""Assignment 3: tree.pseudo_rows, tree.pseudo_positions, tree.pseudo_mask and
transfer.HiddenTransfer.tree_pass, against brute-force masks and a plain causal forward over
[real path | pseudo tokens]."""

import torch

from common import (causal, check, close, expect, final_states, is_ancestor_or_self, random_paths,
                    random_transfer, tiny_model)


def setup(seed=0, paths=None, n=4, layer=2):
    """A tiny model, a tree, n context tokens prefilled into a cache, random node tokens."""
    from model import KVCache
    from tree import Tree
    model = tiny_model(seed)
    tree = Tree(paths if paths is not None else random_paths(seed, 7), k=3)
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist()
    tokens = torch.randint(0, model.args.vocab_size, (1, tree.size), generator=g)
    cache = KVCache(model.args, 1, 40)
    with torch.no_grad():
        model(torch.tensor([ctx]), torch.arange(n), causal(n)[None], torch.arange(n), cache)
    return model, tree, ctx, tokens, cache, random_transfer(model, layer, seed=seed)


@check("pseudo (a, i) sits at position pos(a) + i, i = 1..k, owner-major: (a,1)..(a,k), (b,1)..; "
       "leading (batch) dimensions are kept")
def check_pseudo_positions():
    from tree import pseudo_positions
    pos = torch.tensor([5, 6, 6, 7])
    for k in (1, 3):
        want = [p + i for p in pos.tolist() for i in range(1, k + 1)]
        expect(pseudo_positions(pos, k).tolist() == want, f"pseudo_positions({pos.tolist()}, {k})")
    batch = torch.tensor([[0, 3], [2, 9]])  # (B, M), as training passes it
    want = [[p + i for p in row for i in (1, 2)] for row in batch.tolist()]
    expect(pseudo_positions(batch, 2).tolist() == want, f"pseudo_positions({batch.tolist()}, 2)")


@check("pseudo_rows(sees, k): owner a's k pseudo rows, owner-major, each see sees[a] and then, among "
       "the M*k pseudo columns, only (a, j <= i); leading (batch) dimensions are kept")
def check_pseudo_rows_brute_force():
    from tree import pseudo_rows
    g = torch.Generator().manual_seed(0)
    for shape, k in [((3, 5), 1), ((4, 6), 3), ((2, 3, 7), 2)]:
        sees = torch.rand(shape, generator=g) < 0.5                      # (..., M, C)
        *lead, M, C = shape
        got = pseudo_rows(sees, k)
        expect(tuple(got.shape) == (*lead, M * k, C + M * k), f"pseudo_rows shape {tuple(got.shape)} for "
               f"sees {shape}, k={k}; expected {(*lead, M * k, C + M * k)}")
        flat = sees.reshape(-1, M, C)
        for b in range(flat.shape[0]):
            want = torch.zeros(M * k, C + M * k, dtype=torch.bool)
            for a in range(M):
                for i in range(k):
                    want[a * k + i, :C] = flat[b, a]
                    for j in range(i + 1):
                        want[a * k + i, C + a * k + j] = True
            expect(torch.equal(got.reshape(-1, M * k, C + M * k)[b], want),
                   f"pseudo_rows wrong for sees {shape}, k={k}:\n{got.reshape(-1, M * k, C + M * k)[b].int()}")


@check("rows and columns are [N nodes | pseudo tokens node-major] (cache columns come from "
       "KVCache.attention_mask); a real row sees its ancestors and itself and NO pseudo token; pseudo (a,i) "
       "sees what a sees, a, and (a,j<=i)")
def check_pseudo_mask_brute_force():
    from tree import Tree, pseudo_mask
    for seed in range(8):
        tree = Tree(random_paths(seed, 1 + seed), k=3)
        paths = [tuple(p) for p in tree.paths]
        N = tree.size
        for k, nodes in [(1, None), (2, None), (3, list(range(N))[::-2])]:
            owners = list(range(N)) if nodes is None else nodes
            rows = [("real", a, 0) for a in range(N)] + [("pseudo", a, i) for a in owners for i in range(1, k + 1)]
            want = torch.zeros(len(rows), len(rows), dtype=torch.bool)
            for r, (kind, a, i) in enumerate(rows):
                for c, (kind2, b, j) in enumerate(rows):
                    if kind2 == "real":
                        want[r, c] = is_ancestor_or_self(paths[b], paths[a])
                    else:
                        want[r, c] = kind == "pseudo" and b == a and j <= i
            got = pseudo_mask(tree.mask, k, None if nodes is None else torch.tensor(nodes))
            expect(got.shape == (len(rows), len(rows)), f"mask shape {tuple(got.shape)}, expected "
                   f"{(len(rows), len(rows))} (tree {tree.paths[1:]}, k={k})")
            expect(torch.equal(got, want), f"pseudo mask wrong for tree {tree.paths[1:]}, k={k}, nodes={nodes}")


@check("tree_pass runs layers 1..t over the nodes (ancestor mask, cache slots n..n+N-1); each node's "
       "final state must equal a plain forward over context + its own root-to-node path")
def check_tree_pass_real_states():
    for seed in range(3):
        model, tree, ctx, tokens, cache, ht = setup(seed, layer=1 + seed % 3)
        with torch.no_grad():
            hidden, _ = ht.tree_pass(model, tokens, len(ctx) + tree.depths, tree.mask, len(ctx), cache)
        for i in range(tree.size):
            seq = ctx + tokens[0, tree.path_to(i)].tolist()
            close(hidden[i], final_states(model, seq)[-1], f"final state of node {i}, transfer layer {ht.layer}")


@check("pseudo (a,i) = W_i h^t_a at position pos(a)+i, then layers t+1..L; its final state must equal "
       "a causal forward from layer t over [context + path to a | (a,1)..(a,depth)], for the given "
       "nodes (default all) and depth (default k)")
def check_tree_pass_pseudo_states():
    for seed, nodes, depth in [(0, None, None), (1, [4, 0, 2], None), (2, None, None), (3, [0, 3], 2)]:
        model, tree, ctx, tokens, cache, ht = setup(seed, layer=1 + seed % 3)
        t, L, d = ht.layer, model.args.n_layers, depth or ht.k
        with torch.no_grad():
            _, states = ht.tree_pass(model, tokens, len(ctx) + tree.depths, tree.mask, len(ctx), cache,
                                     None if nodes is None else torch.tensor(nodes), depth)
            owners = list(range(tree.size)) if nodes is None else nodes
            expect(tuple(states.shape) == (len(owners), d, model.args.dim),
                   f"states shape {tuple(states.shape)}, expected {(len(owners), d, model.args.dim)} "
                   f"(nodes {nodes}, depth {depth})")
            for m, a in enumerate(owners):
                seq = ctx + tokens[0, tree.path_to(a)].tolist()
                h_t = final_states(model, seq, 0, t)                          # (len, dim) after layer t
                h = torch.cat([h_t, ht(h_t[-1], d)])                          # (len + d, dim)
                ref = final_states(model, None, t, L, h=h)[len(seq):]         # (d, dim)
                close(states[m], ref, f"pseudo states of node {a} (transfer layer {t}, depth {d})")


@check("tree_pass refuses a depth outside 1..k with ValueError (there are only k maps W_i)")
def check_tree_pass_refuses_a_bad_depth():
    model, tree, ctx, tokens, cache, ht = setup(6)
    for depth in (0, ht.k + 1):
        try:
            with torch.no_grad():
                ht.tree_pass(model, tokens, len(ctx) + tree.depths, tree.mask, len(ctx), cache, None, depth)
        except ValueError:
            continue
        raise AssertionError(f"tree_pass accepted depth={depth} for k={ht.k}")


@check("only the N nodes are written to the cache (slots n..n+N-1, the same K/V as a plain pass with "
       "the ancestor mask); pseudo tokens are ephemeral, never cached")
def check_cache_holds_the_nodes_only():
    from model import KVCache
    model, tree, ctx, tokens, cache, ht = setup(4, n=5)
    n, N = len(ctx), tree.size
    ref = KVCache(model.args, 1, 40)
    with torch.no_grad():
        model(torch.tensor([ctx]), torch.arange(n), causal(n)[None], torch.arange(n), ref)
        model(tokens, n + tree.depths, torch.cat([torch.ones(N, n, dtype=torch.bool), tree.mask], 1)[None],
              torch.arange(n, n + N), ref)
        ht.tree_pass(model, tokens, n + tree.depths, tree.mask, n, cache)
    close(cache.k[:, :, :, :n + N], ref.k[:, :, :, :n + N], "cached keys of context and nodes")
    close(cache.v[:, :, :, :n + N], ref.v[:, :, :, :n + N], "cached values of context and nodes")
    expect(bool((cache.k[:, :, :, n + N:] == 0).all()), "something was written beyond the nodes' slots "
           "(pseudo tokens must never be cached)")


@check("tree_pass takes every mask's cache columns from cache.attention_mask: compiled decoding "
       "(compiled.py) passes a StaticCache and n as a 0-d tensor, and compiles the pass in one graph "
       "(fullgraph), which a mask built by hand from n cannot be")
def check_tree_pass_in_the_compiled_form():
    import torch._dynamo
    from compiled import StaticCache
    model, tree, ctx, tokens, cache, ht = setup(7, n=5)
    n, nodes, pos = len(ctx), torch.tensor([0, 2]), len(ctx) + tree.depths
    static = StaticCache(model.args, 1, 40)

    def step(tokens, pos, n, cache):
        return ht.tree_pass(model, tokens, pos, tree.mask, n, cache, nodes, 2)
    compiled = torch.compile(torch._dynamo.dont_skip_tracing(step), backend="aot_eager", fullgraph=True,
                             dynamic=False)
    with torch.no_grad():
        want = step(tokens, pos, n, cache)
        model(torch.tensor([ctx]), torch.arange(n), causal(n)[None], torch.arange(n), static)
        try:
            got = compiled(tokens, pos, torch.tensor(n), static)
        except torch._dynamo.exc.TorchDynamoException as e:
            raise AssertionError(f"tree_pass does not compile with n a tensor: {str(e).splitlines()[0]}")
    close(got[0], want[0], "compiled nodes' states")
    close(got[1], want[1], "compiled pseudo states")


@check("real tokens never see pseudo tokens, so their states cannot depend on the projection W")
def check_real_states_ignore_the_projection():
    outs = []
    for seed in (0, 1):
        model, tree, ctx, tokens, cache, _ = setup(5)
        with torch.no_grad():
            hidden, _ = random_transfer(model, 2, seed=seed).tree_pass(
                model, tokens, len(ctx) + tree.depths, tree.mask, len(ctx), cache)
        outs.append(hidden)
    expect(torch.equal(outs[0], outs[1]), "the nodes' states changed when only the projection changed")


@check("end to end: Hidden Transfer decoding must equal plain decoding (greedy and seeded sampling)")
def check_decoding_is_lossless():
    from decode import generate_tree
    from generate import Sampler, generate
    from tree import Tree
    model = tiny_model(6, vocab_size=16)
    prompt = [3, 1, 4, 1, 5]
    tree = Tree([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)], k=3)
    for layer in (1, 3):
        for temp, seed in [(0.0, 0), (0.8, 1)]:
            ref = generate(model, prompt, 20, Sampler(temp, 1.0, seed)).tokens
            out = generate_tree(model, random_transfer(model, layer), prompt, tree, 20, Sampler(temp, 1.0, seed))
            expect(out.tokens == ref, f"transfer layer {layer}, temperature {temp}: differs from plain decoding")
