"""Compiled decoding, gpt-fast style: static shapes, one compilation per plan and mode, none while
decoding. generate.py calls `model(...)` and decode.py calls `drafter.step(...)`; the stand-ins here
are called the same way and run the same steps under torch.compile (mode "reduce-overhead", CUDA
graphs, on a GPU), so the decoders need no compiled branch:

    model = CompiledModel(model, length)                    # the one-token step, compiled
    generate(model, prompt, ..., cache=model.cache)
    drafter = CompiledDrafter(drafter, model, plan)         # every step of the plan, one graph
    generate_tree(model, drafter, prompt, plan, ..., cache=model.cache)

What keeps every shape fixed from step to step and prompt to prompt:
- one StaticCache of `length` slots, allocated once and reused: its masks span all its slots
  whatever n is (slots not filled yet are masked off), n is a 0-d tensor, and its K/V writes are one
  in-place indexed assignment into the whole cache tensor (a write into the view of one layer
  reached the graph as a copy of that layer's cache every step);
- every step of a plan runs the plan's whole tree: a step whose drafts ran short (plan.Plan.cut)
  fills the nodes it lacks with pad tokens. The cut tree's nodes are the first ones of the whole
  tree (ordered by depth), with the same positions and mask rows, so they compute what the cut pass
  would; the pad nodes' logits and drafts are dropped, and the cut tree's walk never reaches them;
- prompts (prefills) run eagerly: their length varies.
`warm_up()` compiles before anything is timed, and under `no_recompiles()` a recompilation raises.
"""

import contextlib
import os
import shutil
import time

import torch
import torch.nn.functional as F

from model import KVCache, Transformer
from plan import Plan


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


def static_length(need: int, model: Transformer, quantum: int = 256) -> int:
    """The cache length for `need` slots: a multiple of `quantum` (so that runs asking for about as
    much share one shape, and torch's compile cache), never past the model's context."""
    return min(-(-need // quantum) * quantum, max(need, model.args.max_seq_len))


def compile_options(device, backend: str, mode: str | None) -> dict:
    mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
    # fullgraph: a graph break (a Python check on tensor values) is an error, not a silent fallback
    return dict(dynamic=False, fullgraph=True, backend=backend, mode=mode if backend == "inductor" else None)


def compiler_works(device) -> bool:
    """Whether torch.compile can compile here: inductor needs a C++ compiler for a CPU."""
    return torch.device(device).type != "cpu" or shutil.which(os.environ.get("CXX", "g++")) is not None


@contextlib.contextmanager
def no_recompiles():
    """Within it, a compiled step that would need a new graph raises instead (timed runs use it)."""
    with torch.compiler.set_stance("fail_on_recompile"):
        yield


class CompiledModel:
    """The model, with its one-token step compiled; called like the model, and read like it (its
    attributes are the model's). Calls of several tokens (prompts) run eagerly. `cache` is the one
    StaticCache of `length` slots every generation decodes into."""

    def __init__(self, model: Transformer, length: int, backend: str = "inductor", mode: str | None = None):
        self.model, w = model, model.output.weight
        self.cache = StaticCache(model.args, 1, length, w.device, w.dtype)
        self.options = compile_options(w.device, backend, mode)
        if w.device.type == "cuda":  # graph inputs that CUDA graphs then never copy
            for t in (self.cache.k, self.cache.v, self.cache.layer_ids):
                torch._dynamo.mark_static_address(t)
        self._step = torch.compile(model.forward, **self.options)
        # one graph per compiled stand-in, all on the same few functions: more than dynamo's default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.compile_s = None  # seconds warm_up took

    def __getattr__(self, name):  # args, output, head, run_layers, ...: the model's own
        return getattr(self.model, name)

    def __call__(self, tokens, pos, mask, slots, cache):
        if tokens.shape[1] != 1:
            return self.model(tokens, pos, mask, slots, cache)
        if cache is not self.cache:
            raise ValueError("a compiled step decodes into CompiledModel.cache")
        wide = F.pad(mask, (0, cache.max_len - mask.shape[-1]))            # (1, 1, p+1) -> (1, 1, L)
        return _out(self._step(tokens, pos, wide, slots, cache), self.options)

    @torch.no_grad()
    def warm_up(self) -> float:
        """Compile (on a GPU also capture) now, before anything is timed; returns the seconds it took.
        What it writes to the cache is overwritten by the next prompt."""
        t0, dev = time.perf_counter(), self.model.output.weight.device
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        for _ in range(3 if dev.type == "cuda" else 1):  # CUDA graph trees: warm-up calls, then a recording
            self(zero[None], zero, torch.ones(1, 1, 1, dtype=torch.bool, device=dev), zero, self.cache)
        self.compile_s = time.perf_counter() - t0
        return self.compile_s


class CompiledDrafter:
    """A drafter whose decoding step (Drafter.step: one pass and its logits) runs compiled, padded to
    the plan's whole tree; everything else (the prompt's pass, draft_logits, k, ...) is the drafter's."""

    def __init__(self, drafter, model: CompiledModel, plan: Plan):
        self.drafter, self.model = drafter, model
        self.plan = plan if isinstance(plan, Plan) else Plan.full(plan, drafter.k)
        dev = model.output.weight.device
        tree = self.plan.tree.to(dev)
        self.size, self.positions, self.mask = tree.size, tree.positions(0), tree.mask  # the whole tree's
        self.nodes = torch.tensor(self.plan.nodes, device=dev)
        self._cuts = set()  # the cut sizes checked to be a prefix of the whole tree
        self._step = torch.compile(torch._dynamo.dont_skip_tracing(self._whole_step), **model.options)
        self.compile_s = None

    def __getattr__(self, name):
        return getattr(self.drafter, name)

    def _whole_step(self, tokens, pos, n, cache):
        # dynamo skips modules named like the third-party package `tree` (dm-tree): traced all the same
        return self.drafter.step(self.model.model, tokens, pos, self.mask, n, cache, self.nodes, self.plan.depth)

    def step(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):
        """Drafter.step for a cut of the plan (decode.generate_tree's call): the whole tree's pass,
        the cut's rows of its results."""
        N, M = tokens.shape[1], self.nodes.numel() if nodes is None else len(nodes)
        if cache is not self.model.cache:
            raise ValueError("a compiled drafter decodes into CompiledModel.cache")
        if N not in self._cuts:  # once per cut: its tree must be the first N nodes of the plan's
            nodes = self.nodes[:M] if nodes is None else torch.as_tensor(nodes, device=self.nodes.device)
            if not (depth == self.plan.depth and N <= self.size
                    and torch.equal(tree_mask, self.mask[:N, :N]) and torch.equal(nodes, self.nodes[:M])
                    and torch.equal(pos - pos[0], self.positions[:N])):
                raise ValueError("a compiled drafter steps only through cuts of its own plan")
            self._cuts.add(N)
        tokens = F.pad(tokens, (0, self.size - N))                           # (1, N) -> (1, size)
        n = torch.tensor(n, device=tokens.device)  # a tensor: the masks span the whole cache
        logits, drafts = self._step(tokens, self.positions + n, n, cache)
        logits, drafts = _out(logits, self.model.options), _out(drafts, self.model.options)
        return logits[:N], drafts[:M]

    @torch.no_grad()
    def warm_up(self) -> float:
        """Compile (on a GPU also capture) the plan's step now; returns the seconds it took."""
        t0, dev = time.perf_counter(), self.nodes.device
        tokens = torch.zeros(1, self.size, dtype=torch.long, device=dev)
        for _ in range(3 if dev.type == "cuda" else 1):
            self.step(self.model, tokens, self.positions, self.mask, 0, self.model.cache,
                      self.nodes, self.plan.depth)
        self.compile_s = time.perf_counter() - t0
        return self.compile_s


def _out(x, options):  # CUDA graphs reuse their output buffers at the next replay: keep a copy
    return x.clone() if options["mode"] == "reduce-overhead" else x
