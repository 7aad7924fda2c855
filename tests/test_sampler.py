"""generate.Sampler: seeded draws that a batched pass's rounding cannot move, exact, finite at any
temperature, and how bench.py classifies a sampled mismatch. (Seeded Hidden Transfer against seeded
plain sampling is tests/test_decode.py's.)"""

import math

import pytest
import torch

import bench
from conftest import FakeTokenizer, tiny
from generate import Sampler
from model import ModelArgs, Transformer
from test_bench import PROMPTS
from tools.ties import RecordingSampler, threshold
from transfer import HiddenTransfer
from tree import chain


def two_passes(V=1000, seed=0, delta=2e-5):
    """The logits of one position as two passes round them: tokens 5 and 9 nearly tie for the top
    (probability about 0.4 each) and the rounding (delta, within fp32's batched-pass error) flips
    which of the two is larger."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(seed))
    logits[5] = logits[9] = logits.max() + 6.0
    one, batched = logits.clone(), logits.clone()
    one[5] += delta
    batched[9] += delta
    return one, batched


def test_a_near_tie_whose_order_flips_between_passes_samples_the_same_token():
    """A sampler that walks the tokens sorted by probability against one uniform number picks 5 in
    one pass and 9 in the other whenever the number falls in the first 0.4 of the mass: 40% of the
    seeds. Gumbel-max moves only when the two scores nearly tie."""
    one, batched = two_passes()
    picked = []
    for seed in range(200):
        a, b = Sampler(1.5, seed=seed)(one), Sampler(1.5, seed=seed)(batched)
        assert a == b, seed
        picked.append(a)
    assert {5, 9} <= set(picked)  # both tokens are sampled: the test is about their tie


def test_seeded_draws_follow_the_distribution():
    """Exact sampling: the share of each token over many draws is its probability (and top-p
    keeps only the nucleus)."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    sampler = Sampler(0.8, seed=1)
    counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(4000)]), minlength=5).double()
    p = torch.softmax(logits.double() / 0.8, -1)
    assert torch.allclose(counts / 4000, p, atol=0.025)
    nucleus = Sampler(0.8, top_p=0.7, seed=2)
    assert {nucleus(logits) for _ in range(300)} == {0, 1}  # p = .64, .18, ...: 0 alone is short of 0.7


def test_a_tiny_temperature_acts_greedy_and_stays_finite():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = 10 * torch.randn(96, generator=g)
        for t in (1e-40, 1e-300, 5e-324):
            sampler = Sampler(t, seed=0)
            logp = sampler.log_probs(logits)
            assert not torch.isnan(logp).any() and math.isclose(float(logp.exp().sum()), 1.0)
            assert sampler(logits) == int(logits.argmax())


def test_the_recorded_gap_is_the_gap_that_decides_the_sampled_token():
    """tools/ties.py reads the scores log p + g the sampler chose from; a rounding as large as the
    dtype's near-tie threshold can flip the token only when that gap is within the threshold."""
    one, batched = two_passes(delta=0.0)
    for seed in range(50):
        rec = RecordingSampler(1.5, seed=seed)
        y = rec(one)
        top = rec.last.topk(2)
        gap = float(top.values[0] - top.values[1])
        assert y == int(top.indices[0]) and gap > 0
        nudged = one.clone()
        nudged[top.indices[1]] += 1.5 * gap * 0.99  # just under the gap (in logits: x temperature)
        assert Sampler(1.5, seed=seed)(nudged) == y
    assert threshold(torch.float32, 1.5) == 2e-4 / 1.5


class TiedScores(Transformer):
    """Sampling at temperature T: every token's logit is -T x the Gumbel noise of the third draw
    (generate.Sampler), so at token 2 every score log p + g ties: any rounding could pick another."""

    def head(self, h):
        sampler = Sampler(SAMPLED_T, seed=4)
        for _ in range(3):
            g = sampler.draw(self.args.vocab_size)
        return super().head(h) * 0 + (-SAMPLED_T * g).float()


SAMPLED_T = 1.5


@pytest.mark.parametrize("model, expected", [(TiedScores(ModelArgs.tiny()).eval(), "near-tie"),
                                             (tiny(), "divergence")], ids=["tie", "divergence"])
def test_sampled_mismatches_are_classified_by_the_top2_gap_of_the_sampled_scores(monkeypatch, model, expected):
    """A sampled token is the argmax of log p + g: a near-tie of those scores is rounding, whatever
    the logits' own top-2 gap (here every logit differs from the next by about T x 1)."""
    real_one = bench._one

    def forced(model, method, prompt, *args):
        out = real_one(model, None, prompt, *args)
        if method is not None:
            out.tokens[2] = (out.tokens[2] + 1) % 90
        return out
    monkeypatch.setattr(bench, "_one", forced)
    results = bench.run_bench(model, FakeTokenizer(), {"plain": None, "transfer": (HiddenTransfer(64, 3, 2), chain(3))},
                              PROMPTS[1:2], 8, SAMPLED_T, 1.0, 4)
    [x] = results["mismatches"]
    assert x["position"] == 2 and x["class"] == expected and x["threshold"] == pytest.approx(2e-4 / SAMPLED_T)
    assert (x["gap"] < 1e-5) if expected == "near-tie" else x["gap"] > 2e-4 / SAMPLED_T
    assert f"{expected}, plain decoding's top-2 sampled scores' (log p + Gumbel noise) gap" in bench.report(results)
