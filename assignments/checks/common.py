"""What the assignment checks share: the @check registry, tiny random models, random trees, and
slow references that do not use the code under test. Read by assignments/grade.py.

Every reference here is written differently from the code it checks (brute force, loops, a plain
causal forward), so a check compares behaviour, never source text.
"""

import itertools
import random

import torch

CHECKS = []  # (module name, function, hint), in definition order


def check(hint: str):
    """Register a check; `hint` is printed when it fails."""
    def register(fn):
        CHECKS.append((fn.__module__, fn, hint))
        return fn
    return register


def expect(cond, message: str):
    if not cond:
        raise AssertionError(message)


def close(a, b, what: str, atol: float = 1e-4):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    expect(a.shape == b.shape, f"{what}: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
    err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    expect(err <= atol, f"{what}: differs from the reference by {err:.2e} (tolerance {atol:.0e})")


# ----------------------------------------------------------------------------- tiny models

def tiny_model(seed: int = 0, **overrides):
    """A random LLaMA small enough for seconds-long checks (fp32, CPU)."""
    from model import ModelArgs, Transformer
    return Transformer(ModelArgs.tiny(**overrides)).init_random(seed, std=0.15).eval().requires_grad_(False)


def random_transfer(model, layer: int, k: int = 3, seed: int = 0):
    """A HiddenTransfer with random (not identity) projections, so pseudo tokens differ from copies:
    every parameter moved by noise (matrices by 0.3, vectors by 0.1)."""
    from transfer import HiddenTransfer
    ht = HiddenTransfer(model.args.dim, k, layer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ht.parameters():
            p.add_((0.3 if p.dim() > 1 else 0.1) * torch.randn(p.shape, generator=g))
    return ht.requires_grad_(False)


def causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)


@torch.no_grad()
def final_states(model, tokens: list, start: int = 0, stop=None, h=None, pos=None) -> torch.Tensor:
    """A plain causal forward without a cache: layers [start, stop) over `tokens` (or hidden `h`,
    (T, dim)) at positions 0..T-1 (or `pos`). Returns (T, dim)."""
    h = model.embed(torch.tensor([tokens]))[0] if h is None else h
    T = h.shape[0]
    pos = torch.arange(T) if pos is None else pos
    return model.run_layers(h[None], pos, causal(T)[None], start=start, stop=stop)[0]


# ----------------------------------------------------------------------------- training entry points
# The checks reach training through these two functions only, so a refactor of the training code
# changes this block (and make.py's table), not the checks.

def training_inputs(drafter, h_t: torch.Tensor, positions: torch.Tensor):
    """What training feeds layers t+1..L for the pseudo tokens of `positions` (B, P) in windows whose
    layer-t states are h_t (B, T, dim): (inputs (B, P*k, dim), positions (B, P*k),
    mask (B, P*k, T + P*k) bool over [T real tokens | pseudo tokens])."""
    return drafter.pseudo_inputs(h_t, positions)


def training_pseudo_states(model, drafter, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, P, k, dim): the final states of the pseudo tokens of `positions` (B, P) in windows ids."""
    return drafter.train_pass(model, ids, positions)[0]


# ----------------------------------------------------------------------------- random trees

def random_paths(seed: int, size: int, k: int = 3, top_r: int = 3) -> list:
    """A random prefix-closed set of `size` paths (the root excluded), in random order."""
    rng = random.Random(seed)
    paths = set()
    while len(paths) < size:
        parent = rng.choice([()] + sorted(p for p in paths if len(p) < k))
        paths.add(parent + (rng.randrange(top_r),))
    out = sorted(paths)
    rng.shuffle(out)
    return out


def all_paths(k: int, top_r: int) -> list:
    """Every path of depth 1..k with ranks below top_r."""
    return [p for d in range(1, k + 1) for p in itertools.product(range(top_r), repeat=d)]


def is_ancestor_or_self(a: tuple, b: tuple) -> bool:
    """Is node a (a path) on the root path of node b?"""
    return b[:len(a)] == a


# ----------------------------------------------------------------------------- a drafter that knows

def oracle_drafter(model, reference: list, layer: int = 2, k: int = 3, seed: int = 0, perfect: bool = False):
    """A real HiddenTransfer pass whose drafts are replaced by the known right tokens: at rank 0
    (60%), rank 1 (25%) or far down (15%); always at rank 0 if `perfect`. Tests decoding logic
    with deep acceptance."""
    from transfer import HiddenTransfer

    class Oracle(HiddenTransfer):
        def tree_pass(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):
            hidden, states = super().tree_pass(model, tokens, pos, tree_mask, n, cache, nodes, depth)
            nodes = torch.arange(tokens.shape[1]) if nodes is None else torch.as_tensor(nodes)
            # a pseudo token's "state" is the position it drafts: (a, i) drafts pos(a) + i + 1
            offsets = torch.arange(2, states.shape[1] + 2)
            return hidden, pos[nodes].cpu()[:, None] + offsets                # (M, depth)

        def step_logits(self, model, hidden, states):  # made-up drafts: not one LM-head product
            return model.head(hidden), self.draft_logits(model, states)

        def draft_logits(self, model, targets):  # targets (..., depth) -> (..., depth, V)
            shape, targets = targets.shape, targets.reshape(-1)
            logits = torch.randn(len(targets), model.args.vocab_size, generator=self.g)
            for i, target in enumerate(targets.tolist()):
                if target < len(reference):
                    u, right = 0.0 if perfect else self.rng.random(), reference[target]
                    top = [int(t) for t in logits[i].topk(2).indices if int(t) != right][0]
                    if u < 0.6:
                        logits[i, right] = 100.0
                    elif u < 0.85:
                        logits[i, right], logits[i, top] = 50.0, 100.0
                    else:
                        logits[i, right] = -100.0
            return logits.view(*shape, -1)

    o = Oracle(model.args.dim, k, layer)
    o.rng, o.g = random.Random(seed), torch.Generator().manual_seed(seed)
    return o.requires_grad_(False)


def cache_equals_prefill(model, tokens_so_far):
    """An on_step hook: after every step the cache's first n slots equal a fresh prefill of the
    first n tokens of prompt + emitted (`tokens_so_far()` returns that list)."""
    from model import KVCache

    def hook(cache, n):
        seq = tokens_so_far()[:n]
        fresh = KVCache(model.args, 1, n)
        with torch.no_grad():
            model(torch.tensor([seq]), torch.arange(n), causal(n)[None], torch.arange(n), fresh)
        close(cache.k[:, :, :, :n], fresh.k, f"cache keys after a step (n={n})", 1e-4)
        close(cache.v[:, :, :, :n], fresh.v, f"cache values after a step (n={n})", 1e-4)
    return hook
