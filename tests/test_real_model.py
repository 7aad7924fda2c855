"""The real default model, SmolLM2-135M-Instruct: its logits beside transformers' reading the same
GGUF, the known answer, and Hidden Transfer's output equal to plain decoding's on real prompts with
a random (untrained) projection and real trees."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import perturb
from decode import generate_tree
from generate import Sampler, generate, main as generate_main
from model import causal_mask
from transfer import HiddenTransfer
from tree import Tree, chain
from weights import default_model_path, load_model

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


@pytest.mark.parametrize("layer,tree,prompts", [(15, chain(3), PROMPTS[:2]),
                                                (24, Tree([(0,), (1,), (0, 0), (1, 0), (0, 0, 0)], k=3), PROMPTS[1:])])
def test_hidden_transfer_is_lossless_on_the_real_model(smollm, layer, tree, prompts):
    model, tok = smollm
    drafter = perturb(HiddenTransfer(model.args.dim, 3, layer), 0.02, seed=layer)  # untrained, not the identity
    for prompt in prompts:
        ids, _ = tok.encode_chat([{"role": "user", "content": prompt}])
        for sampler in (lambda: Sampler(), lambda: Sampler(0.7, 0.9, seed=1)):
            ref = generate(model, ids, 32, sampler(), tok.stop_ids)
            out = generate_tree(model, drafter, ids, tree, 32, sampler(), tok.stop_ids)
            assert out.tokens == ref.tokens, prompt


# ----------------------------------------------------------------------------- the real default model

# Token ids from SmolLM2's tokenizer: a ChatML question, some code, a story opening.
REAL_PROMPTS = [[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
                [1604, 3987, 46477, 24, 94, 727, 472, 1003],
                [6403, 1980, 253, 655, 28, 665, 436, 253, 1838]]


@pytest.fixture(scope="module")
def real_pair():
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    return load_model(path), hf


@pytest.mark.parametrize("prompt", range(len(REAL_PROMPTS)))
def test_real_model_matches_transformers(real_pair, prompt):
    ours, hf = real_pair
    assert ours.args.n_heads == 9 and ours.args.n_kv_heads == 3 and ours.args.tie_embeddings
    tokens = torch.tensor([REAL_PROMPTS[prompt]])
    with torch.no_grad():
        expected = hf(tokens).logits
    with torch.no_grad():
        got = ours(tokens, torch.arange(tokens.shape[1]), causal_mask(tokens.shape[1]))
    # both dequantise the same blocks to fp32; seen: at most 5e-5 apart on logits of std ~7
    torch.testing.assert_close(got, expected, atol=5e-4, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
