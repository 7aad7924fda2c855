"""generate.Sampler: seeded draws that a batched pass's rounding cannot move, exact, finite at any
temperature. (Seeded Hidden Transfer against seeded plain sampling is tests/test_decode.py's.)"""

import math

import torch

from generate import Sampler
from tools.ties import RecordingSampler, threshold


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
