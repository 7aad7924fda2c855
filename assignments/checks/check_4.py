"""Assignment 4: decode.accept (the acceptance walk), plan.Plan.source and decode.next_drafts (where
the next drafts come from) and decode.generate_tree (the step loop, cache compaction, plans), against
a brute-force walk, a brute-force search over the accepted path, and plain decoding, greedy and
seeded; the tree of every pass is observed too."""

import random

from common import cache_equals_prefill, check, expect, oracle_drafter, random_paths, random_transfer, tiny_model

TREES = [[(0,), (0, 0), (0, 0, 0)], [(0,), (1,), (2,), (0, 0), (1, 0)],
         [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0), (0, 0, 1)]]


def brute_force_walk(paths, node_tokens, choice, budget, stop_ids):
    """The accepted path is the deepest node whose every edge carries the target's choice at its
    parent; emitted = those choices plus the choice at that node; then cut at a stop or budget."""
    index = {p: i for i, p in enumerate(paths)}
    def agrees(p):  # every edge root..p carries the choice made at its upper end
        return all(node_tokens[index[p[:j + 1]]] == choice[index[p[:j]]] for j in range(len(p)))
    last = max((p for p in paths if agrees(p)), key=len)
    path = [index[last[:j]] for j in range(len(last) + 1)]
    emitted = [choice[v] for v in path]
    for j, y in enumerate(emitted):
        if y in stop_ids or j + 1 == budget:
            return path[:j + 1], emitted[:j + 1]
    return path, emitted


def random_walk_cases():
    from tree import Tree
    rng = random.Random(0)
    for seed in range(40):
        tree = Tree(random_paths(seed, 1 + seed % 9), k=3)
        paths = [tuple(p) for p in tree.paths]
        tokens = [None] + [rng.randrange(6) for _ in paths[1:]]
        for v in range(1, len(paths)):  # siblings carry distinct tokens, as top-k drafts do
            while any(tokens[c] == tokens[v] for c in tree.children[int(tree.parents[v])] if c < v):
                tokens[v] = rng.randrange(6)
        choice = [rng.choice([tokens[c] for c in tree.children[v]] + [rng.randrange(6)])
                  if tree.children[v] and rng.random() < 0.8 else rng.randrange(6) for v in range(len(paths))]
        budget, stops = rng.choice([1, 2, 3, 10]), rng.choice([(), (0,), (5,)])
        yield tree, paths, tokens, choice, budget, stops


@check("accept: from the root, while a child of v carries choose(v), move to it; the first choice that "
       "no child carries is emitted too (the bonus token). Stop at a stop token or the budget-th token")
def check_accept_walk():
    from decode import accept
    for tree, paths, tokens, choice, budget, stops in random_walk_cases():
        got = accept([list(c) for c in tree.children], tokens, choice.__getitem__, budget, stops)
        want = brute_force_walk(paths, tokens, choice, budget, stops)
        expect(tuple(map(list, got)) == want, f"accept on {paths[1:]} with node tokens {tokens[1:]}, "
               f"choices {choice}, budget {budget}, stops {stops}: got {got}, expected {want}")


@check("choose(v) must be called exactly once per emitted token, in walk order (each call may consume "
       "one random draw): never for nodes off the accepted path")
def check_accept_calls_choose_once_per_emitted_token():
    from decode import accept
    for tree, paths, tokens, choice, budget, stops in random_walk_cases():
        calls = []
        path, emitted = accept([list(c) for c in tree.children], tokens,
                               lambda v: calls.append(v) or choice[v], budget, stops)
        expect(calls == list(path) and len(calls) == len(emitted),
               f"choose was called for nodes {calls}; the walk emitted {len(emitted)} tokens along {path}")


@check("greedy decoding with any tree must emit exactly plain decoding's tokens, max_new_tokens of them")
def check_greedy_lossless():
    from decode import generate_tree
    from generate import Sampler, generate
    from tree import Tree
    model, prompt = tiny_model(3), [4, 8, 15, 16, 23, 42]
    for i, paths in enumerate(TREES):
        for max_new in (1, 2, 17):
            ref = generate(model, prompt, max_new, Sampler()).tokens
            for drafter in (oracle_drafter(model, prompt + ref, seed=i), random_transfer(model, 2, seed=i)):
                out = generate_tree(model, drafter, prompt, Tree(paths, k=3), max_new, Sampler())
                expect(out.tokens == ref, f"tree {paths}, max_new_tokens {max_new}: {out.tokens} != plain {ref}")


@check("after every step the cache's first n slots must equal a fresh prefill of the n accepted tokens: "
       "move the accepted path's K/V from slots n+path to n, n+1, ... and call on_step(cache, n)")
def check_cache_compaction():
    from decode import generate_tree
    from generate import Sampler, generate
    from tree import Tree
    model, prompt = tiny_model(3), [4, 8, 15, 16, 23, 42]
    ref = generate(model, prompt, 24, Sampler()).tokens
    for i, paths in enumerate(TREES):
        emitted, steps = [], []
        hook = cache_equals_prefill(model, lambda: prompt + emitted)
        generate_tree(model, oracle_drafter(model, prompt + ref, seed=i), prompt, Tree(paths, k=3), 24, Sampler(),
                      on_token=emitted.extend, on_step=lambda c, n: steps.append(n) or hook(c, n))
        expect(len(steps) > 3, f"on_step was called {len(steps)} times; call it after every step")


@check("each pass records how many drafts it accepted (Generation.accepted), and the next drafts come "
       "from the LAST accepted node's pseudo tokens: with perfect drafts a 3-deep chain accepts 3 per pass")
def check_accepted_counts_with_perfect_drafts():
    from decode import generate_tree
    from generate import Sampler, generate
    from tree import Tree
    model, prompt = tiny_model(3), [4, 8, 15, 16, 23, 42]
    ref = generate(model, prompt, 41, Sampler()).tokens
    out = generate_tree(model, oracle_drafter(model, prompt + ref, perfect=True), prompt, Tree(TREES[0], k=3),
                        41, Sampler())
    expect(out.tokens == ref, "output differs from plain decoding")
    expect(out.accepted == [3] * 10, f"accepted per pass {out.accepted}; with drafts that are always right, "
           "every pass of a 3-deep chain accepts 3 (40 tokens after the prefill's one = 10 passes)")


@check("seeded sampling: ONE draw per emitted token, in emission order, from the sampler's generator; "
       "a draw per tree node (or per pass) changes the tokens")
def check_seeded_sampling_lossless():
    from decode import generate_tree
    from generate import Sampler, generate
    from tree import Tree
    model, prompt = tiny_model(5, vocab_size=16), [3, 1, 4, 1, 5]
    for temp, top_p in [(0.7, 0.9), (1.0, 1.0)]:
        for seed in range(3):
            ref = generate(model, prompt, 20, Sampler(temp, top_p, seed)).tokens
            for paths in TREES[1:]:
                out = generate_tree(model, oracle_drafter(model, prompt + ref, seed=seed), prompt,
                                    Tree(paths, k=3), 20, Sampler(temp, top_p, seed))
                expect(out.tokens == ref, f"temperature {temp}, top_p {top_p}, seed {seed}, tree {paths}: "
                       f"{out.tokens} != seeded plain {ref}")


@check("a stop token ends generation right after it, even in the middle of an accepted path")
def check_stops_inside_a_step():
    from decode import generate_tree
    from generate import Sampler, generate
    from tree import Tree
    model, prompt = tiny_model(4), [1, 2, 3]
    full = generate(model, prompt, 30, Sampler()).tokens
    tried = 0
    for cut in (3, 7, 12, 18):
        stop = {full[cut]} - set(full[:cut])
        if stop:
            tried += 1
            out = generate_tree(model, oracle_drafter(model, prompt + full), prompt, Tree(TREES[0], k=3), 30,
                                Sampler(), stop_ids=stop)
            expect(out.tokens == full[:cut + 1], f"stop token {stop}: got {len(out.tokens)} tokens, "
                   f"expected {cut + 1}")
    expect(tried > 0, "internal: no usable stop token")


# ----------------------------------------------------------------------------- plans

def random_plans(seed: int):
    """Random plans: a random tree (k = 3), random nodes carrying pseudo tokens (the root always),
    1..3 of them each."""
    from plan import Plan
    from tree import Tree
    rng = random.Random(seed)
    tree = Tree(random_paths(seed, 1 + seed % 10), k=3)
    nodes = (0,) + tuple(v for v in range(1, tree.size) if rng.random() < 0.4)
    return Plan(tree, nodes, rng.randint(1, 3))


def reach_source(plan, path):
    """Brute force: the drafts that reach furthest past v = path[-1]. A carrier u on the path with c
    pseudo tokens drafts positions pos(u)+2..pos(u)+c+1, so it has c - (depth(v) - depth(u)) drafts
    for the tokens after v. The best (row, shift, drafts), or (None, 0, 0) when none has any."""
    best = (None, 0, 0)
    for depth_u, u in enumerate(path):
        if u in plan.nodes:
            shift = len(path) - 1 - depth_u
            if plan.depth - shift > best[2]:
                best = (plan.nodes.index(u), shift, plan.depth - shift)
    return best


@check("Plan.source(path): the next drafts come from the DEEPEST accepted node u that carries pseudo "
       "tokens reaching past v = path[-1]: (u's row in nodes, shift depth(v) - depth(u), depth - shift); "
       "(None, 0, 0) when no accepted node reaches")
def check_plan_source_brute_force():
    for seed in range(30):
        plan = random_plans(seed)
        for v in range(plan.tree.size):
            path = plan.tree.path_to(v)
            got, want = tuple(plan.source(path)), reach_source(plan, path)
            expect(got == want, f"source({path}) for {plan.text()}: got {got}, expected {want} "
                   "(row in nodes, shift, drafts available)")


def perfect_run(plan, max_new: int) -> tuple:
    """(accepted drafts per pass, nodes verified per pass) when every draft is right: the walk follows
    the rank-0 path of the tree cut to the drafts available (no drafts: the root alone); the next
    drafts are those that reach furthest past its end."""
    zero = [0] + [plan.tree.paths.index((0,) * d) for d in range(1, plan.tree.depth + 1)
                  if (0,) * d in plan.tree.paths]                 # the rank-0 chain's node indices
    out, sizes, left, avail = [], [], max_new - 1, plan.depth     # the prefill emits one token
    while left > 0:
        sizes.append(sum(len(p) <= avail for p in plan.tree.paths))  # the tree cut to `avail` offsets
        acc = min(len(zero) - 1, avail, left - 1)
        out.append(acc)
        left -= acc + 1
        avail = reach_source(plan, zero[:acc + 1])[2]
    return out, sizes


def perfect_accepted(plan, max_new: int) -> list:
    return perfect_run(plan, max_new)[0]


@check("with a plan, step 5 takes the next drafts from Plan.source (next_drafts: node_drafts[row, shift:"
       "shift + available]), cuts the next tree to the drafts there are, and runs a root-only step when there "
       "are none; every plan stays lossless")
def check_plans_fallback_and_lossless():
    from decode import generate_tree
    from generate import Sampler, generate
    from plan import Plan
    from tree import Tree
    model, prompt = tiny_model(3), [4, 8, 15, 16, 23, 42]
    ref = generate(model, prompt, 30, Sampler()).tokens
    chain3, two = Tree(TREES[0], k=3), Tree([(0,), (0, 0)], k=3)
    plans = [Plan(chain3, (0,), 3), Plan(chain3, (0, 1), 3), Plan(chain3, (0, 2), 2), Plan(two, (0, 1), 3),
             Plan(Tree(TREES[2], k=3), (0, 1, 3), 3), Plan(Tree(TREES[2], k=3), (0, 2), 2)]
    for plan in plans:
        out = generate_tree(model, oracle_drafter(model, prompt + ref, perfect=True), prompt, plan, 30, Sampler())
        expect(out.tokens == ref, f"plan {plan.text()}: differs from plain decoding")
        want = perfect_accepted(plan, 30)
        expect(out.accepted == want, f"plan {plan.text()}, drafts always right: accepted per pass "
               f"{out.accepted}, expected {want}")
    for seed in range(4):
        plan = random_plans(seed + 3)
        for temp in (0.0, 0.8):
            ref = generate(model, prompt, 16, Sampler(temp, 1.0, seed)).tokens
            for drafter in (oracle_drafter(model, prompt + ref, seed=seed), random_transfer(model, 2, seed=seed)):
                out = generate_tree(model, drafter, prompt, plan, 16, Sampler(temp, 1.0, seed))
                expect(out.tokens == ref, f"plan {plan.text()}, temperature {temp}: {out.tokens} != plain {ref}")


@check("every pass verifies the tree cut to the drafts there are, and a pass with no drafts verifies the "
       "root ALONE (one node): never a full tree of stale or borrowed drafts, which is lossless but pays "
       "for a whole tree")
def check_each_pass_verifies_the_cut_tree():
    from decode import generate_tree
    from generate import Sampler, generate
    from plan import Plan
    from tree import Tree
    model, prompt = tiny_model(3), [4, 8, 15, 16, 23, 42]
    ref = generate(model, prompt, 30, Sampler()).tokens
    chain3 = Tree(TREES[0], k=3)
    for plan in (Plan(chain3, (0,), 3), Plan(chain3, (0, 2), 2), Plan(Tree(TREES[2], k=3), (0, 1, 3), 3)):
        drafter, sizes = oracle_drafter(model, prompt + ref, perfect=True), []
        real = drafter.tree_pass

        def watched(model, tokens, *args, **kwargs):
            sizes.append(tokens.shape[1])
            return real(model, tokens, *args, **kwargs)
        drafter.tree_pass = watched
        out = generate_tree(model, drafter, prompt, plan, 30, Sampler())
        want = perfect_run(plan, 30)[1]
        expect(out.tokens == ref, f"plan {plan.text()}: differs from plain decoding")
        expect(sizes == [len(prompt)] + want, f"plan {plan.text()}, drafts always right: nodes per pass "
               f"{sizes[1:]} (after a prefill of {sizes[0]}), expected {want}")


@check("next_drafts(run, path, node_drafts) = node_drafts[row, shift:shift + available] for run.source(path); "
       "an empty (0, V) tensor when there is no source")
def check_next_drafts_brute_force():
    import torch
    from decode import next_drafts
    g = torch.Generator().manual_seed(0)
    for seed in range(20):
        plan = random_plans(seed)
        node_drafts = torch.randn(len(plan.nodes), plan.depth, 11, generator=g)
        for v in range(plan.tree.size):
            path = plan.tree.path_to(v)
            row, shift, avail = reach_source(plan, path)
            want = node_drafts[row, shift:shift + avail] if avail else torch.zeros(0, 11)
            got = next_drafts(plan, path, node_drafts)
            expect(tuple(got.shape) == tuple(want.shape) and torch.equal(got, want),
                   f"next_drafts({path}) for {plan.text()}: shape {tuple(got.shape)}, expected {tuple(want.shape)} "
                   f"(rows {row}, shift {shift}, {avail} available)")


def counting_cache(args, length):
    """A KVCache that counts the K/V writes into it."""
    from model import KVCache

    class Counting(KVCache):
        writes = 0

        def update(self, *a):
            self.writes += 1
            return super().update(*a)
    return Counting(args, 1, length)


@check("generate_tree(..., cache=c) decodes into c (compiled decoding passes its static cache so), and "
       "every step after the prefill runs through drafter.step (compiled decoding's stand-in replaces it)")
def check_the_given_cache_and_drafter_step_are_used():
    from decode import generate_tree
    from generate import Sampler, generate
    from tree import Tree
    model, prompt = tiny_model(3), [4, 8, 15, 16, 23, 42]
    ref = generate(model, prompt, 20, Sampler()).tokens
    drafter, steps, seen = random_transfer(model, 2), [], []
    real = drafter.step
    drafter.step = lambda *a, **kw: steps.append(1) or real(*a, **kw)
    cache = counting_cache(model.args, len(prompt) + 20 + 6)
    out = generate_tree(model, drafter, prompt, Tree(TREES[1], k=3), 20, Sampler(), cache=cache,
                        on_step=lambda c, n: seen.append(c))
    expect(out.tokens == ref, "with cache=: differs from plain decoding")
    expect(cache.writes > 0 and all(c is cache for c in seen), "generate_tree did not decode into the cache "
           "it was given (cache=)")
    expect(len(steps) == out.passes, f"{len(steps)} of the {out.passes} steps ran through drafter.step; every "
           "step after the prefill must")
