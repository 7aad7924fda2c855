"""The frozen model's share of a training step, made cheaper twice: each window's frozen pass is
computed once and reused every epoch (FrozenPasses), and it runs in bfloat16 where that is faster on
this machine (frozen_copy). Neither changes what is learned beyond bf16's rounding; the drafter,
its evaluation and the plan choice stay in fp32. Read train.py first.
"""

import copy
import hashlib
import json
import os
import time

import torch

from model import causal_mask


class FrozenPasses:
    """Each window's frozen pass (drafter.frozen_pass), computed once and reused every epoch: the
    frozen pass is most of a training step. Up to `budget` bytes of them stay in memory; with a
    `spill` folder, the rest go to disk there, up to `disk_budget` bytes, and the rest after that
    are computed each time. So memory never holds more than `budget` bytes of them, however many
    windows there are.

    On disk a pass is a file named by a digest of the window's tokens, in a folder named by `key`
    (a digest of the model, the drafter's configuration and the frozen model's dtype: whatever
    changes a frozen pass): a later run with the same key reads the passes an earlier one made, an
    interrupted one included, since each file is written whole or not at all."""

    def __init__(self, budget: float, spill: str | None = None, key: str = "", disk_budget: float = 0.0):
        self.budget, self.used, self.kept = budget, 0, {}
        self.folder = os.path.join(spill, f"frozen-{key}") if spill and disk_budget > 0 else None
        self.disk_budget = disk_budget
        if self.folder and os.path.isdir(self.folder):
            self.disk_used = sum(os.path.getsize(os.path.join(self.folder, f)) for f in os.listdir(self.folder))
        else:
            self.disk_used = 0

    def __call__(self, drafter, model, indices, ids):
        parts = [self.lookup(i, ids[b]) for b, i in enumerate(indices.tolist())]
        if all(p is not None for p in parts):
            return {name: torch.cat([p[name] for p in parts]).to(ids.device) for name in parts[0]}
        frozen = drafter.frozen_pass(model, ids)
        if frozen is not None:
            for b, i in enumerate(indices.tolist()):
                if parts[b] is None:
                    self.keep(i, ids[b], {name: t[b:b + 1].clone() for name, t in frozen.items()})
        return frozen

    def file(self, ids) -> str:
        return os.path.join(self.folder, hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:24] + ".pt")

    def lookup(self, i: int, ids):
        if i in self.kept:
            return self.kept[i]
        if self.folder and os.path.exists(self.file(ids)):
            return torch.load(self.file(ids), weights_only=True)
        return None

    def keep(self, i: int, ids, row: dict):
        size = sum(t.numel() * t.element_size() for t in row.values())
        if self.used + size <= self.budget:
            self.kept[i], self.used = row, self.used + size
        elif self.folder and self.disk_used + size <= self.disk_budget:
            os.makedirs(self.folder, exist_ok=True)
            path = self.file(ids)
            tmp = f"{path}.{os.getpid()}.tmp"
            torch.save({name: t.cpu() for name, t in row.items()}, tmp)
            os.replace(tmp, path)  # whole or not at all: an interrupt leaves at most a .tmp file
            self.disk_used += os.path.getsize(path)


def frozen_key(model_identity: dict, drafter, dtype) -> str:
    """The digest that names a folder of frozen passes: what changes them."""
    text = json.dumps({"model": model_identity, "kind": drafter.kind, "config": drafter.config(),
                       "dtype": str(dtype)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


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
