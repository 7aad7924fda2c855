"""Compiled decoding, gpt-fast style (`--compile`): the plain one-token step and the tree step run
under torch.compile (mode "reduce-overhead": CUDA graphs, on a GPU). An option; eager decoding in
generate.py and decode.py stays the reading path and emits the same tokens.

Nothing here knows a drafter's insides: the tree step IS `drafter.tree_pass` (drafter.py), called
with a StaticCache and the cache offset n as a 0-d tensor. Everything compile needs lives in that
cache: its masks span the whole cache whatever n is (so the shapes never depend on n), its K/V
writes are one in-place indexed assignment into the whole cache tensor (a write into the view of
one layer reached the graph as a copy of that layer's cache every step), and it skips the eager
cache's data-dependent checks (a graph cannot branch on tensor values; fit_context sized the cache,
and the masks come from this class).
What stays fixed from step to step: the cache (one per length bucket, reused), the tree and the
plan's nodes and depth. Each cut of the plan (plan.py: a tree cut to the drafts available, a
root-only step) has other shapes and gets its own graph, all compiled by warm_up before anything
is timed. kernels.py keeps its timed CPU product form inside the graph. docs/GPU.md says more.
"""

import torch
import torch.nn.functional as F

from model import KVCache, Transformer
from plan import Plan
from tools import kernels


class StaticCache(KVCache):
    """A KVCache whose every call sees all max_len slots: columns not filled yet are masked off.

        keys ->   0 .. n-1 | n .. n+N-1     | n+N .. L-1 | ephemeral         (N = cached)
        row r     1 ... 1  | mask[r, :N]    |  . ... .   | mask[r, N:]       -> (1, R, L + C - N)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_ids = torch.arange(self.k.shape[0], device=self.k.device)  # index tensors, not ints

    def update(self, layer, slots, k, v):
        at = self.layer_ids[layer:layer + 1]                    # (1,): the write is one index_put
        self.k[at, :, :, slots] = k.permute(2, 0, 1, 3)         # (n, B, n_kv, hd): indexed axes first
        self.v[at, :, :, slots] = v.permute(2, 0, 1, 3)
        return self.k[layer], self.v[layer]

    def attention_mask(self, mask, n, cached=None):
        N = mask.shape[1] if cached is None else cached
        n = torch.as_tensor(n, device=mask.device)
        rel = torch.arange(self.max_len, device=mask.device) - n             # (L,) column - n
        inside = (rel >= 0) & (rel < N)                                        # this call's cached tokens
        cols = (mask[:, rel.clamp(0, N - 1)] & inside) | (rel < 0)             # (R, L)
        return torch.cat([cols, mask[:, N:]], dim=1).unsqueeze(0)             # (1, R, L + C - N)

    def check(self, slots, mask):
        pass  # data-dependent, so not in a graph; the decoders sized the cache and built the masks


BUCKET = 256  # cache lengths are rounded up to a multiple: one compiled graph per bucket, not per prompt


class Compiled:
    """A model (and optionally a drafter) whose decoding steps run compiled.

    generate.generate(..., compiled=c) calls `c(...)` where it would call the model, and
    decode.generate_tree(..., compiled=c) calls `c.tree_pass(...)` where it would call the
    drafter's; both take their cache from `c.cache(length)`. Prompts (prefills) stay eager: their
    length varies. backend "aot_eager" captures the same graphs without inductor's code generation
    (the fast tests use it).
    """

    def __init__(self, model: Transformer, drafter=None, backend: str = "inductor", mode: str | None = None):
        self.model, self.drafter = model, drafter
        self.device = model.output.weight.device
        # kernels.py times its CPU product forms at a new shape: do it now, never while compiling or
        # timing (inside a compiled region it only looks the form up)
        kernels.apply(model)
        if drafter is not None:
            kernels.apply(drafter)
        self.mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        # fullgraph: a graph break (a Python check on tensor values) is an error, not a silent fallback
        opts = dict(dynamic=False, fullgraph=True, backend=backend,
                    mode=self.mode if backend == "inductor" else None)
        self._step = torch.compile(model.forward, **opts)
        # dynamo skips modules named like the third-party package `tree` (dm-tree): trace ours anyway
        self._tree = torch.compile(torch._dynamo.dont_skip_tracing(self._tree_pass), **opts)
        # one graph per (cache bucket, plan cut, drafter): more than dynamo's default of 8 per function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._caches, self._warm = {}, set()

    def cache(self, length: int) -> StaticCache:
        """The cache of at least `length` slots, one per bucket, reused by every generation: its
        tensors keep their addresses, which CUDA graphs need. Stale slots are masked, never read."""
        L = -(-length // BUCKET) * BUCKET
        if L > self.model.args.max_seq_len:  # the bucket may not go past the model's context
            L = max(length, self.model.args.max_seq_len)
        if L not in self._caches:
            w = self.model.output.weight
            self._caches[L] = cache = StaticCache(self.model.args, 1, L, w.device, w.dtype)
            if self.device.type == "cuda":  # graph inputs that CUDA graphs then never copy
                for t in (cache.k, cache.v, cache.layer_ids):
                    torch._dynamo.mark_static_address(t)
        return self._caches[L]

    @torch.no_grad()
    def warm_up(self, length: int, plan=None):
        """Compile (on a GPU also capture) before anything is timed: the plain step for a cache of
        `length` slots and, given a plan.Plan (or a Tree), the tree step of every cut of it for `length` + the
        tree's size, the caches generate and generate_tree ask for (once per bucket and plan: bench.py
        calls it before every generation). What it writes to the cache is overwritten by the prefill."""
        if plan is not None and not isinstance(plan, Plan):  # a bare Tree, as generate_tree takes it
            plan = Plan.full(plan, self.drafter.k)
        key = (self.cache(length).max_len, plan and self.cache(length + plan.tree.size).max_len, plan)
        if key in self._warm:
            return
        self._warm.add(key)
        dev, zero = self.device, torch.zeros(1, dtype=torch.long, device=self.device)
        one = torch.ones(1, 1, 1, dtype=torch.bool, device=dev)                # (1, 1, 1) mask
        for _ in range(3 if dev.type == "cuda" else 1):  # CUDA graph trees: warm-up calls, then a recording
            self(zero[None], zero, one, zero, self.cache(length))
            if plan is None or self.drafter is None:
                continue
            for depth in range(min(plan.tree.depth, plan.depth) + 1):  # every cut generate_tree runs
                run = plan.cut(depth)
                tree, nodes = run.tree.to(dev), torch.tensor(run.nodes, device=dev)
                tokens = torch.zeros(1, tree.size, dtype=torch.long, device=dev)
                self.tree_pass(self.model, tokens, tree.positions(0), tree.mask, 0,
                               self.cache(length + plan.tree.size), nodes, run.depth)

    def _out(self, x):  # CUDA graphs reuse their output buffers at the next replay: keep a copy
        return x.clone() if self.mode == "reduce-overhead" else x

    def __call__(self, tokens, pos, mask, slots, cache):
        """The model's forward: a one-token step runs compiled with its mask widened to the whole
        cache (the columns not filled yet are False); a longer call (a prompt) runs eagerly, and reads
        only the columns its mask has (the eager form of the masks)."""
        if tokens.shape[1] != 1:
            return self.model(tokens, pos, mask, slots, cache)
        wide = F.pad(mask, (0, cache.max_len - mask.shape[-1]))            # (1, 1, p+1) -> (1, 1, L)
        return self._out(self._step(tokens, pos, wide, slots, cache))

    def tree_pass(self, model, tokens, pos, tree_mask, n: int, cache, nodes=None, depth=None):
        """self.drafter.tree_pass (drafter.py), compiled: the same arguments, the same results."""
        if model is not self.model:
            raise ValueError("this Compiled was built for another model")
        n = torch.tensor(n, device=tokens.device)  # a tensor: the masks span the whole cache
        hidden, states = self._tree(tokens, pos, tree_mask, n, cache, nodes, depth)
        return self._out(hidden), self._out(states)

    def _tree_pass(self, tokens, pos, tree_mask, n, cache, nodes, depth):
        return self.drafter.tree_pass(self.model, tokens, pos, tree_mask, n, cache, nodes, depth)


def compiled_for(args, model, drafter=None, length: int = 0, plan=None):
    """With --compile: a Compiled of model (and drafter), warmed up (compiled) for a cache
    of `length` slots and the plan's tree steps, before any clock starts. Without: None (eager)."""
    if not getattr(args, "compile", False):
        return None
    compiled = Compiled(model, drafter)
    compiled.warm_up(length, plan)
    return compiled
