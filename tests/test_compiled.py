"""Compiled decoding (compiled.py) emits exactly what eager plain decoding emits, with one graph per
plan and mode and no recompilation while decoding.

The compiled tree step is drafter.step with a StaticCache, the cache offset as a tensor and every
cut of the plan padded to its whole tree: first those forms are checked eagerly against the
ordinary ones, then compiled. The fast tests compile with the "aot_eager" backend: the same
full-graph capture and static shapes, without inductor's code generation (a CPU inductor compile of
the real model takes about a minute). One slow test runs inductor itself (CUDA graphs on a GPU).
"""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from checkpoint import DRAFTERS
from compiled import CompiledDrafter, CompiledModel, StaticCache, no_recompiles, static_length
from conftest import perturb, random_transfer, tiny
from decode import generate_tree
from generate import Sampler, generate
from medusa import Medusa
from model import KVCache, causal_mask
from plan import Plan
from transfer import HiddenTransfer
from tree import Tree, chain, pseudo_mask

TREE = Tree([(0,), (1,), (0, 0), (0, 1), (1, 0)], k=3)
PLAN = Plan(Tree.parse("0;1;0,0;1,0;0,0,0", k=3), (0, 1), 3)  # cut steps and shifted drafts happen
PROMPTS = ([4, 8, 15, 16, 23, 42], [1, 2, 3], [7] * 11 + [3, 9])


def random_medusa(model):
    return perturb(Medusa(model.args.dim, 3), seed=1).to(model.output.weight.device)


def random_kind(kind):  # the drafters with more capacity (tests/test_capacity.py)
    return lambda m: perturb(DRAFTERS[kind].for_model(m, 3, 2), 0.2, seed=1).to(m.output.weight.device)


MAKERS = {"transfer": lambda m: random_transfer(m, 1), "medusa": random_medusa,
          **{kind: random_kind(kind) for kind in ("transfer-mlp", "transfer-lora", "transfer-layers")}}


def test_whole_cache_masks_are_the_eager_masks_spread_over_the_cache():
    n, L, k = 5, 16, 2
    eager_cache, static = KVCache(tiny().args, 1, L), StaticCache(tiny().args, 1, L)
    N = TREE.size
    for own in (TREE.mask, pseudo_mask(TREE.mask, k)):
        wide, eager = static.attention_mask(own, torch.tensor(n), cached=N), eager_cache.attention_mask(own, n)
        E = eager.shape[-1] - n - N                                          # ephemeral columns
        assert wide.shape == (1, eager.shape[1], L + E)
        assert torch.equal(wide[..., :n + N], eager[..., :n + N])           # cache, then the nodes
        assert not wide[..., n + N:L].any()                                  # slots not filled yet
        assert torch.equal(wide[..., L:], eager[..., n + N:])               # the ephemeral tokens


def prefilled(model, Cache, n, device):
    cache = Cache(model.args, 1, 32, device)
    cache.k.normal_(), cache.v.normal_()  # stale slots beyond n + N must not be read
    at = torch.arange(n, device=device)
    model(torch.tensor([PROMPTS[0][:n]], device=device), at, causal_mask(n, device=device), at, cache)
    return cache


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_tree_pass_with_a_static_cache_equals_the_eager_one(make, device):
    """The compiled step's form, run eagerly: a StaticCache and n as a tensor read the whole (partly
    stale) cache."""
    model = tiny(2, device)
    drafter, tree, n = make(model), TREE.to(device), 6
    tokens = torch.randint(96, (1, tree.size), generator=torch.Generator().manual_seed(0)).to(device)
    outs = []
    for offset, Cache in ((n, KVCache), (torch.tensor(n, device=device), StaticCache)):
        with torch.no_grad():
            outs.append(drafter.tree_pass(model, tokens, tree.positions(n), tree.mask, offset,
                                          prefilled(model, Cache, n, device),
                                          nodes=torch.tensor([0, 2], device=device), depth=2))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_the_padded_step_of_every_cut_equals_the_unpadded_cut(make):
    """Every cut of a plan runs as the plan's whole tree with pad tokens: the cut's rows of the
    result are the unpadded cut pass's, whatever the pad nodes hold."""
    model, n = tiny(3), 5
    drafter = make(model)
    with torch.compiler.set_stance("force_eager"):  # the padding alone, no compiler
        padded = CompiledDrafter(drafter, CompiledModel(model, 32), PLAN)
        for depth in range(PLAN.tree.depth + 1):
            run = PLAN.cut(depth)
            tokens = torch.randint(96, (1, run.tree.size), generator=torch.Generator().manual_seed(depth))
            args = (tokens, run.tree.positions(n), run.tree.mask)
            with torch.no_grad():
                want = drafter.step(model, *args, n, prefilled(model, KVCache, n, "cpu"),
                                    torch.tensor(run.nodes), PLAN.depth)
                padded.model.cache = prefilled(model, StaticCache, n, "cpu")
                got = padded.step(padded.model, *args, n, padded.model.cache, torch.tensor(run.nodes), PLAN.depth)
            for a, b in zip(want, got):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_compiled_drafter_refuses_a_tree_that_is_not_a_cut_of_its_plan():
    model = tiny(0)
    with torch.compiler.set_stance("force_eager"):
        padded = CompiledDrafter(random_transfer(model, 1), CompiledModel(model, 32), PLAN)
        other = Tree.parse("0;0,0", k=3)  # a chain: not the shape of PLAN's first three nodes
        with pytest.raises(ValueError, match="cuts of its own plan"):
            padded.step(padded.model, torch.zeros(1, 3, dtype=torch.long), other.positions(4), other.mask, 4,
                        padded.model.cache, torch.tensor([0, 1]), PLAN.depth)


def test_compiled_greedy_and_sampling_equal_eager_plain_without_recompiling():
    """One graph for plain decoding and one per drafter and plan, compiled by warm_up; then prompts of
    several lengths, every cut of a plan and every accepted-path length, with no recompilation."""
    torch._dynamo.reset()  # graphs an earlier test compiled for the same code would be reused, not counted
    model = tiny(1, n_layers=3)
    chain_plan = Plan(chain(3), (0,), 3)  # walks of every length; the longest leaves no drafts (root only)
    length = static_length(max(map(len, PROMPTS)) + 25 + PLAN.tree.size, model, quantum=64)
    cm = CompiledModel(model, length, backend="aot_eager")
    graphs = counters["stats"]["unique_graphs"]
    cm.warm_up()
    stand_ins, cuts, accepted = [], {}, {}
    for drafter in (HiddenTransfer(model.args.dim, 3, 1), random_medusa(model)):  # HT: identity maps
        for plan in (PLAN, chain_plan):
            cd = CompiledDrafter(drafter, cm, plan)
            cd.warm_up()
            stand_ins.append((cd, plan))
    assert counters["stats"]["unique_graphs"] == graphs + 1 + len(stand_ins), "one graph each"
    with no_recompiles():  # after the warm-up a recompilation raises
        for prompt in PROMPTS:
            for sampler in (lambda: Sampler(), lambda: Sampler(0.8, 0.9, seed=3)):
                ref = generate(model, prompt, 25, sampler())
                assert generate(cm, prompt, 25, sampler(), cache=cm.cache).tokens == ref.tokens
                for cd, plan in stand_ins:
                    ran = cuts.setdefault(plan, set())
                    step = cd.step
                    cd.step = lambda m, tokens, *a, **kw: ran.add(tokens.shape[1]) or step(m, tokens, *a, **kw)
                    out = generate_tree(cm, cd, prompt, plan, 25, sampler(), cache=cm.cache)
                    del cd.step
                    assert out.tokens == ref.tokens, type(cd.drafter).__name__
                    accepted.setdefault(plan, set()).update(out.accepted)
    assert counters["stats"]["unique_graphs"] == graphs + 1 + len(stand_ins)
    assert cuts[chain_plan] == {1, 2, 3, 4} and accepted[chain_plan] == {0, 1, 2, 3}
    assert cuts[PLAN] == {3, 5, 6}  # PLAN's walks always leave drafts: it never verifies the root alone


def graph_ops(fn, *args):
    """The aten ops of fn's compiled forward graph (after functionalization, as inductor gets it)."""
    ops = []

    def forward_compiler(gm, inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm
    fn = torch._dynamo.dont_skip_tracing(fn)  # as compiled.py: trace tree.py, named like dm-tree
    with torch.no_grad():
        torch.compile(fn, backend=aot_autograd(fw_compiler=forward_compiler), fullgraph=True, dynamic=False)(*args)
    return ops


def test_compiled_steps_write_the_cache_in_place():
    """StaticCache writes K/V at (layer, slots) of the whole cache: a write into the view
    cache.k[layer] (what the eager KVCache does) would reach the compiled graph as a copy of that
    layer's cache (select_scatter) at every step, and on a CPU cost more than the step's own arithmetic."""
    model, n = tiny(0, n_layers=2), 6
    drafter, tree, cache = random_transfer(model, 1), TREE, StaticCache(model.args, 1, 32)
    one, at = torch.ones(1, 1, dtype=torch.long), torch.tensor([n])
    plain = graph_ops(model.forward, one, at, torch.ones(1, 1, 32, dtype=torch.bool), at, cache)
    tree_step = graph_ops(lambda *a: drafter.step(model, *a), torch.ones(1, tree.size, dtype=torch.long),
                          tree.positions(n), tree.mask, torch.tensor(n), cache)
    for ops in (plain, tree_step):
        assert ops.count("aten.index_put.default") == 2 * model.args.n_layers  # K and V, each layer
        copies = [op for op in ops if op.startswith(("aten.select_scatter", "aten.slice_scatter",
                                                     "aten.as_strided_scatter", "aten.copy", "aten.index_copy"))]
        assert not copies


@pytest.mark.slow
def test_inductor_compiled_greedy_equals_eager_plain(device):
    """The real thing: inductor (on a GPU, mode reduce-overhead: CUDA graphs), about a minute on a CPU."""
    model = tiny(0, device, n_layers=2)
    ht = random_transfer(model, 1)
    cm = CompiledModel(model, 64)
    cd = CompiledDrafter(ht, cm, PLAN)
    cm.warm_up(), cd.warm_up()
    with no_recompiles():
        for prompt in PROMPTS:
            ref = generate(model, prompt, 20, Sampler())
            assert generate(cm, prompt, 20, Sampler(), cache=cm.cache).tokens == ref.tokens
            assert generate_tree(cm, cd, prompt, PLAN, 20, Sampler(), cache=cm.cache).tokens == ref.tokens
