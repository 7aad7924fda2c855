"""Near-ties: is a mismatch with plain decoding the rounding of a batched pass, or a real divergence?

A tree pass multiplies many rows at once, plain decoding one; the two round differently, so when
plain decoding's top two logits are closer than that rounding, a lossless decoder may still pick
the other token. bench.py replays plain decoding up to the first differing token, measures the
gap between its top two logits there, and calls the mismatch a near-tie when the gap is within
NEAR_TIE for the dtype. Read bench.py first.
"""

import torch

from generate import Sampler, generate

# Largest |logit difference| between one batched pass over 80 tokens and the same tokens one at a
# time, SmolLM2-135M on a CPU (random tokens, 16 positions): fp32 6.1e-5, bf16 0.44 (logits ~25).
# A near-tie is a gap within about three times that; fp16 keeps 3 more mantissa bits than bf16.
NEAR_TIE = {torch.float32: 2e-4, torch.bfloat16: 1.0, torch.float16: 0.125}


class RecordingSampler(Sampler):
    """A Sampler that keeps the last logits it chose from (the replay reads them at the end)."""

    def __call__(self, logits):
        self.last = logits.detach().float()
        return super().__call__(logits)


def top2_gap(model, prompt: list, at: int, temperature=0.0, top_p=1.0, seed=0, stop_ids=()) -> float:
    """Plain decoding's gap between its two largest logits at emitted token `at` (0-based), found by
    replaying it, with the same seeded sampler, for at + 1 tokens."""
    sampler = RecordingSampler(temperature, top_p, seed)
    if len(generate(model, prompt, at + 1, sampler, stop_ids).tokens) <= at:
        return float("inf")  # plain decoding had stopped: the other decoder went on, no tie explains it
    top = sampler.last.topk(2).values
    return float(top[0] - top[1])


def classify(gap: float, dtype) -> str:
    """"near-tie" when the gap is within the dtype's rounding (NEAR_TIE), else "divergence"."""
    return "near-tie" if gap <= NEAR_TIE[dtype] else "divergence"


def explain(model, prompt: list, at: int, temperature=0.0, top_p=1.0, seed=0, stop_ids=()) -> dict:
    """{"gap", "class", "threshold"} for a mismatch first at token `at`. A sampled mismatch can also
    come from a draw near the edge of the cumulative distribution, which this gap does not see:
    it is then called a divergence (the cautious side) unless its logits nearly tie."""
    dtype = model.output.weight.dtype
    gap = top2_gap(model, prompt, at, temperature, top_p, seed, stop_ids)
    return {"gap": gap, "class": classify(gap, dtype), "threshold": NEAR_TIE[dtype]}


def describe(tie: dict) -> str:
    """How bench.py's progress line and report end a mismatch: its class and the gap behind it."""
    return (f"{tie.get('class', '?')}, plain decoding's top-2 logit gap {tie.get('gap', float('nan')):.2g} "
            f"(near-tie: <= {tie.get('threshold', float('nan')):g})")


def divergences(mismatches: list) -> list:
    """The mismatches that are not near-ties: in float32 these, and only these, fail bench.py."""
    return [x for x in mismatches if x.get("class") != "near-tie"]
