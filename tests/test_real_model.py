"""The real default model, SmolLM2-135M-Instruct: the known answer, and Hidden Transfer's output
equal to plain decoding's on real prompts with a random (untrained) projection and real trees."""

import pytest
import torch

from decode import generate_tree
from generate import Sampler, generate, main as generate_main
from transfer import HiddenTransfer
from tree import Tree, chain

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a Python function that reverses a string.",
           "List three colours of the rainbow."]


def test_known_answer(smollm):
    model, tok = smollm
    ids, _ = tok.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    out = generate(model, ids, 24, Sampler(), tok.stop_ids)
    assert tok.decode(out.tokens).strip() == "The capital of France is Paris."
    assert out.tokens[-1] == tok.eos_id


def test_generate_cli_answers_paris(capsys):
    generate_main(["--prompt", PROMPTS[0], "--max-new-tokens", "24", "--device", "cpu"])
    assert "The capital of France is Paris." in capsys.readouterr().out


@pytest.mark.parametrize("layer,tree", [(15, chain(3)), (24, Tree([(0,), (1,), (0, 0), (1, 0), (0, 0, 0)], k=3))])
def test_hidden_transfer_is_lossless_on_the_real_model(smollm, layer, tree):
    model, tok = smollm
    drafter = HiddenTransfer(model.args.dim, 3, layer)
    g = torch.Generator().manual_seed(layer)
    with torch.no_grad():  # untrained but not the identity: a random perturbation
        drafter.proj.weight.add_(0.02 * torch.randn(drafter.proj.weight.shape, generator=g))
    for prompt in PROMPTS:
        ids, _ = tok.encode_chat([{"role": "user", "content": prompt}])
        for sampler in (lambda: Sampler(), lambda: Sampler(0.7, 0.9, seed=1)):
            ref = generate(model, ids, 40, sampler(), tok.stop_ids)
            out = generate_tree(model, drafter, ids, tree, 40, sampler(), tok.stop_ids)
            assert out.tokens == ref.tokens, prompt
