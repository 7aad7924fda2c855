"""No drafter value can change a real token: a drafter whose weights are NaN, +inf or 1e30 (inf
once cast to float16) still decodes exactly what plain decoding emits, in every dtype, eager and
compiled. Drafts only choose what gets verified; model.Attention keeps the pseudo tokens' K/V out
of the real rows' product, where a masked 0 x NaN would otherwise still be NaN.
"""

import pytest
import torch

from conftest import perturb, tiny
from decode import generate_tree
from generate import Sampler, generate
from medusa import Medusa
from plan import Plan
from compiled import CompiledDrafter, CompiledModel, no_recompiles, static_length
from transfer import HiddenTransfer
from tree import Tree

PLAN = Plan(Tree.parse("0;1;0,0;1,0;0,0,0", k=3), (0, 1), 3)  # cut steps and shifted drafts happen
PROMPT = [4, 8, 15, 16, 23, 42]
VALUES = (float("nan"), float("inf"), 1e30)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def poisoned(drafter, value, dtype):
    """The drafter with every weight set to `value` (in float32, then cast: 1e30 is inf in fp16)."""
    with torch.no_grad():
        for p in drafter.float().parameters():
            p.fill_(value)
    return drafter.to(dtype)


def drafts_are_poisoned(model, drafter):
    """The poison reaches the draft states (so the test tests something): non-finite, or beyond 1e20."""
    with torch.no_grad():
        states = drafter(model.embed(torch.tensor([PROMPT])))
    return bool((~torch.isfinite(states)).any() or states.abs().max() > 1e20)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_a_nan_inf_or_huge_drafter_decodes_what_plain_decoding_emits(dtype):
    model = tiny(0).to(dtype)
    ref = generate(model, PROMPT, 20, Sampler()).tokens
    # seeded sampling in float32: in bf16 a batched pass and a one-token pass round the logits
    # differently enough to move a draw, whatever the drafter (a clean one too)
    sampled = generate(model, PROMPT, 20, Sampler(0.9, seed=2)).tokens if dtype == torch.float32 else None
    for make in (lambda: HiddenTransfer(model.args.dim, 3, 2), lambda: Medusa(model.args.dim, 3)):
        for value in VALUES:
            drafter = poisoned(perturb(make()), value, dtype)
            assert drafts_are_poisoned(model, drafter)
            out = generate_tree(model, drafter, PROMPT, PLAN, 20, Sampler())
            assert out.tokens == ref, (type(drafter).__name__, value)
            if sampled:
                out = generate_tree(model, drafter, PROMPT, PLAN, 20, Sampler(0.9, seed=2))
                assert out.tokens == sampled, (type(drafter).__name__, value, "sampling")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_a_nan_inf_or_huge_drafter_decodes_what_plain_decoding_emits_compiled(dtype):
    """The compiled step (compiled.py: a StaticCache, masks as wide as the cache) too.
    (Seed 1: in bf16 seed 0's compiled plain decoding already differs from eager's, drafter or not.)"""
    model = tiny(1, n_layers=3).to(dtype)
    drafter = perturb(HiddenTransfer(model.args.dim, 3, 1)).to(dtype)
    cm = CompiledModel(model, static_length(len(PROMPT) + 20 + PLAN.tree.size, model, quantum=64),
                       backend="aot_eager")
    cd = CompiledDrafter(drafter, cm, PLAN)
    cm.warm_up(), cd.warm_up()
    ref = generate(model, PROMPT, 20, Sampler()).tokens
    for value in VALUES:
        poisoned(drafter, value, dtype)  # in place: the compiled graphs read these same parameters
        with no_recompiles():
            out = generate_tree(cm, cd, PROMPT, PLAN, 20, Sampler(), cache=cm.cache)
        assert out.tokens == ref, value
