"""Near-ties: is a mismatch with plain decoding the rounding of a batched pass, or a real divergence?

A tree pass multiplies many rows at once, plain decoding one; the two round differently, so when
plain decoding's top two logits are closer than that rounding, a lossless decoder may still pick
the other token. bench.py replays plain decoding up to the first differing token, measures the
gap between its top two logits there, and calls the mismatch a near-tie when the gap is within
NEAR_TIE for the dtype. Sampling picks the argmax of log p + g (generate.Sampler: g is the draw's
Gumbel noise), so the same rule applies to those scores: their top-2 gap against NEAR_TIE /
temperature, the rounding of a logit as it reaches log p. Read bench.py first.
"""

import torch

from generate import Sampler, generate

# Largest |logit difference| between one batched pass over 80 tokens and the same tokens one at a
# time, SmolLM2-135M on a CPU (random tokens, 16 positions): fp32 6.1e-5, bf16 0.44 (logits ~25).
# A near-tie is a gap within about three times that; fp16 keeps 3 more mantissa bits than bf16.
NEAR_TIE = {torch.float32: 2e-4, torch.bfloat16: 1.0, torch.float16: 0.125}


class RecordingSampler(Sampler):
    """A Sampler that keeps what it last chose from: the logits (greedy) or log p + g (sampling)."""

    def __call__(self, logits):
        self.last = logits.detach().double() if self.greedy else self.scores(logits)
        return int(self.last.argmax())


def top2_gap(model, prompt: list, at: int, temperature=0.0, top_p=1.0, seed=0, stop_ids=()) -> float:
    """Plain decoding's gap between its two largest logits (sampling: scores log p + g) at emitted
    token `at` (0-based), found by replaying it, with the same seeded sampler, for at + 1 tokens."""
    sampler = RecordingSampler(temperature, top_p, seed)
    if len(generate(model, prompt, at + 1, sampler, stop_ids).tokens) <= at:
        return float("inf")  # plain decoding had stopped: the other decoder went on, no tie explains it
    top = sampler.last.topk(2).values
    return float(top[0] - top[1])


def threshold(dtype, temperature: float = 0.0) -> float:
    """The largest gap a batched pass's rounding can flip: NEAR_TIE for logits, divided by the
    temperature for sampling's scores (a logit reaches log p as logit / temperature)."""
    return NEAR_TIE[dtype] / (temperature or 1.0)


def classify(gap: float, dtype, temperature: float = 0.0) -> str:
    """"near-tie" when the gap is within the dtype's rounding (threshold), else "divergence"."""
    return "near-tie" if gap <= threshold(dtype, temperature) else "divergence"


def explain(model, prompt: list, at: int, temperature=0.0, top_p=1.0, seed=0, stop_ids=()) -> dict:
    """{"gap", "class", "threshold", "sampled"} for a mismatch first at token `at`: greedy, the gap
    of plain decoding's top two logits there; sampling, of its top two scores log p + g."""
    dtype = model.output.weight.dtype
    gap = top2_gap(model, prompt, at, temperature, top_p, seed, stop_ids)
    return {"gap": gap, "class": classify(gap, dtype, temperature), "threshold": threshold(dtype, temperature),
            "sampled": temperature > 0}


def describe(tie: dict) -> str:
    """How bench.py's progress line and report end a mismatch: its class and the gap behind it."""
    what = "sampled scores' (log p + Gumbel noise)" if tie.get("sampled") else "logit"
    return (f"{tie.get('class', '?')}, plain decoding's top-2 {what} gap {tie.get('gap', float('nan')):.2g} "
            f"(near-tie: <= {tie.get('threshold', float('nan')):.2g})")


def divergences(mismatches: list) -> list:
    """The mismatches that are not near-ties: in float32 these, and only these, fail bench.py."""
    return [x for x in mismatches if x.get("class") != "near-tie"]
