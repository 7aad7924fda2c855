"""The frozen model's share of a training step, made cheaper twice: each window's frozen pass is
computed once and reused every epoch (FrozenPasses), and it runs in bfloat16 where that is faster on
this machine (frozen_copy). Neither changes what is learned beyond bf16's rounding; the drafter,
its evaluation and the plan choice stay in fp32. Read train.py first.
"""

import copy
import time

import torch

from model import causal_mask


class FrozenPasses:
    """Each window's frozen pass (drafter.frozen_pass), computed once and reused every epoch, up to
    `budget` bytes of them (the rest are computed each time): the frozen pass is most of a step."""

    def __init__(self, budget: float):
        self.budget, self.used, self.kept = budget, 0, {}

    def __call__(self, drafter, model, indices, ids):
        keys = indices.tolist()
        if all(i in self.kept for i in keys):
            parts = [self.kept[i] for i in keys]
            return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        frozen = drafter.frozen_pass(model, ids)
        for b, i in enumerate(keys):
            if frozen is None or i in self.kept:
                continue
            row = {name: t[b:b + 1].clone() for name, t in frozen.items()}
            size = sum(t.numel() * t.element_size() for t in row.values())
            if self.used + size <= self.budget:
                self.kept[i], self.used = row, self.used + size
        return frozen


def frozen_copy(args, model, ids, prepare=None):
    """The frozen model the training passes run through: `model`, or a bfloat16 copy of it when
    --frozen-dtype bfloat16, or, with auto, when a frozen pass over the window `ids` (1, T) is faster
    in bfloat16 on this machine (CPUs with bf16 arithmetic; on others bf16 is emulated, and slower).
    prepare(copy), if given, runs on the copy before it is timed (train.py: the measured product forms)."""
    if args.frozen_dtype == "float32" or model.output.weight.dtype != torch.float32:
        return model
    half = copy.deepcopy(model).to(torch.bfloat16)
    if prepare:
        prepare(half)
    if args.frozen_dtype == "auto":
        seconds = {}
        for m in (model, half, model, half):  # the first round warms up
            t0 = time.perf_counter()
            with torch.no_grad():
                m(ids, torch.arange(ids.shape[1], device=ids.device), causal_mask(ids.shape[1], device=ids.device))
            seconds[m.output.weight.dtype] = time.perf_counter() - t0
        print(f"frozen pass over {ids.shape[1]} tokens: float32 {seconds[torch.float32]:.2f} s, bfloat16 "
              f"{seconds[torch.bfloat16]:.2f} s: training runs the frozen model in "
              + ("bfloat16" if seconds[torch.bfloat16] < seconds[torch.float32] else "float32"))
        if seconds[torch.bfloat16] >= seconds[torch.float32]:
            return model
    return half
