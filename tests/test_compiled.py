"""Compiled decoding (tools/compiled.py) emits exactly what eager plain decoding emits.

The compiled tree step is drafter.tree_pass with a StaticCache and the cache offset as a tensor, so
the masks span the whole cache: first that form is checked eagerly against the ordinary one, then
compiled. The fast
tests compile with the "aot_eager" backend: the same full-graph capture and static shapes, without
inductor's code generation (a CPU inductor compile takes a minute). One slow test runs inductor
itself (CUDA graphs on a GPU).
"""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from conftest import perturb, random_transfer, tiny
from decode import generate_tree
from generate import Sampler, generate
from medusa import Medusa
from model import KVCache, causal_mask
from plan import Plan
from tools.compiled import Compiled, StaticCache
from tree import Tree, chain, pseudo_mask

TREE = Tree([(0,), (1,), (0, 0), (0, 1), (1, 0)], k=3)
PLAN = Plan(Tree.parse("0;1;0,0;1,0;0,0,0", k=3), (0, 1), 3)  # cut steps and shifted drafts happen
PROMPTS = ([4, 8, 15, 16, 23, 42], [1, 2, 3])


def random_medusa(model):
    return perturb(Medusa(model.args.dim, 3), seed=1).to(model.output.weight.device)


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


@pytest.mark.parametrize("make", [lambda m: random_transfer(m, 1), random_medusa], ids=["transfer", "medusa"])
def test_tree_pass_with_a_static_cache_equals_the_eager_one(make, device):
    """The compiled step's form, run eagerly: a StaticCache and n as a tensor read the whole (partly
    stale) cache."""
    model = tiny(2, device)
    drafter, tree, n = make(model), TREE.to(device), 6
    tokens = torch.randint(96, (1, tree.size), generator=torch.Generator().manual_seed(0)).to(device)
    outs = []
    for offset, Cache in ((n, KVCache), (torch.tensor(n, device=device), StaticCache)):
        cache = Cache(model.args, 1, 32, device)
        cache.k.normal_(), cache.v.normal_()  # stale slots beyond n + N must not be read
        at = torch.arange(n, device=device)
        model(torch.tensor([PROMPTS[0]], device=device), at, causal_mask(n, device=device), at, cache)
        with torch.no_grad():
            outs.append(drafter.tree_pass(model, tokens, tree.positions(n), tree.mask, offset, cache,
                                          nodes=torch.tensor([0, 2], device=device), depth=2))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_greedy_and_sampling_equal_eager_plain_without_recompiling():
    model = tiny(0, n_layers=3)
    for drafter in (random_transfer(model, 1), random_medusa(model)):
        compiled = Compiled(model, drafter, backend="aot_eager")
        graphs = counters["stats"]["unique_graphs"]
        compiled.warm_up(len(PROMPTS[0]) + 25, PLAN)
        assert counters["stats"]["unique_graphs"] >= graphs + 4, "the plain step and 3 plan cuts compile"
        for i, prompt in enumerate(PROMPTS):
            # after the warm-up nothing may recompile: the shapes depend on neither prompt nor step
            with torch._dynamo.config.patch(error_on_recompile=True):
                for sampler in (lambda: Sampler(), lambda: Sampler(0.8, 0.9, seed=3)):
                    ref = generate(model, prompt, 25, sampler())
                    assert generate(model, prompt, 25, sampler(), compiled=compiled).tokens == ref.tokens
                    out = generate_tree(model, drafter, prompt, PLAN, 25, sampler(), compiled=compiled)
                    assert out.tokens == ref.tokens, type(drafter).__name__
        for tree in (TREE, chain(3)):  # other plans: compiled on first use, the same tokens
            ref = generate(model, PROMPTS[1], 20, Sampler())
            assert generate_tree(model, drafter, PROMPTS[1], tree, 20, Sampler(), compiled=compiled).tokens == ref.tokens


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
    tree_step = graph_ops(lambda *a: drafter.tree_pass(model, *a), torch.ones(1, tree.size, dtype=torch.long),
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
    compiled = Compiled(model, ht)
    compiled.warm_up(len(PROMPTS[0]) + 20, PLAN)
    for prompt in PROMPTS:
        ref = generate(model, prompt, 20, Sampler())
        assert generate(model, prompt, 20, Sampler(), compiled=compiled).tokens == ref.tokens
        assert generate_tree(model, ht, prompt, PLAN, 20, Sampler(), compiled=compiled).tokens == ref.tokens
