"""Shared test setup: one CPU thread, the `device` fixture (cpu always, cuda when a GPU is present:
the losslessness, cache, mask and parity tests take it, so they are the specification on every
device), the real default model loaded once per session, and the
helpers several test files use (`from conftest import tiny`): tiny(), the small random model most
tests run on, fake_windows(), made-up training windows, FakeTokenizer, a made-up chat format,
perturb(), which moves any drafter off its start, and the drafters and hooks of the decoding tests
(random_transfer, Oracle, check_cache)."""

import random

import pytest
import torch

from model import KVCache, ModelArgs, Transformer, causal_mask
from transfer import HiddenTransfer

# Tests are many small ops on tiny models, which a second thread only slows down (and a busy
# machine's thread contention can slow a hundredfold). Timings live in bench.py, never here.
torch.set_num_threads(1)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=needs_cuda)])
def device(request):
    """"cpu", then "cuda" when a GPU is present (skipped, not failed, without one)."""
    return request.param


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) for the real default model, SmolLM2-135M-Instruct, in fp32 on the CPU."""
    from tokenizer import load_tokenizer
    from weights import default_model_path, load_model

    path = default_model_path()
    model = load_model(path, device="cpu", dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, load_tokenizer(path)


def tiny(seed: int = 0, device="cpu", **overrides) -> Transformer:
    """A tiny random LLaMA (ModelArgs.tiny, with overrides) in eval mode on `device`. std 0.15 rather
    than 0.02 makes its next-token choices depend on the context, so decoding tests are not trivially
    passed. The weights are drawn on the CPU: the same model on every device."""
    return Transformer(ModelArgs.tiny(**overrides)).init_random(seed, std=0.15).eval().to(device)


def fake_windows(n, seed=0, vocab=96, T=24):
    """n windows of T tokens: a user turn of 4-8 tokens, then an assistant reply, repeated."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(vocab, (T,), generator=g)
        mask = torch.zeros(T, dtype=torch.bool)
        p = 0
        while p < T:
            user = int(torch.randint(4, 9, (), generator=g))
            mask[p + user:p + user + 10] = True
            p += user + 10
        out.append((ids, mask))
    return out


class FakeTokenizer:
    """Characters <-> ids, a made-up chat format; just enough for bench.run_bench."""
    stop_ids = {95}

    def encode_chat(self, messages):
        text = "".join(f"<{m['role'][0]}>{m['content']}" for m in messages) + "<a>"
        ids = [ord(c) % 90 + 1 for c in text][-48:]  # keep the tiny model's context small
        return ids, [False] * len(ids)

    def decode(self, ids):
        return "".join(chr(32 + i % 90) for i in ids)


# ----------------------------------------------------------------------------- drafters for decoding tests

def perturb(drafter, scale: float = 0.3, seed: int = 0):
    """Any drafter, moved away from its start (identity maps, zero heads) by random noise: `scale`
    on every matrix, a third of it on every vector (biases), so every path through it matters.
    Drawn on the CPU: the same drafter on every device. Returns the drafter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_((scale if p.dim() > 1 else scale / 3) * torch.randn(p.shape, generator=g).to(p.device))
    return drafter


def random_transfer(model, layer, k=3, seed=0):
    """A HiddenTransfer with random projections, on the model's device."""
    return perturb(HiddenTransfer(model.args.dim, k, layer), seed=seed).to(model.output.weight.device)


class Oracle(HiddenTransfer):
    """A real pseudo-token pass whose drafts are then replaced by the known right answer, placed at
    rank 0 (60%), rank 1 (25%) or nowhere near the top (15%). Only decoding logic is under test."""

    def __init__(self, model, reference, layer=2, k=3, seed=0):
        super().__init__(model.args.dim, k, layer)
        self.ref, self.rng, self.V = reference, random.Random(seed), model.args.vocab_size

    def tree_pass(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):
        hidden, _ = super().tree_pass(model, tokens, pos, tree_mask, n, cache, nodes, depth)
        dev = tokens.device
        nodes, depth = torch.arange(tokens.shape[1], device=dev) if nodes is None else nodes, depth or self.k
        # the "state" of pseudo (a, i) is the position it predicts: pos(a) + i + 1, (M, depth)
        return hidden, pos[nodes][:, None] + torch.arange(2, depth + 2, device=dev)

    def step_logits(self, model, hidden, states):  # made-up drafts: not one LM-head product
        return model.head(hidden), self.draft_logits(model, states)

    def draft_logits(self, model, targets):  # targets (..., depth) -> (..., depth, V)
        shape, targets = targets.shape, targets.reshape(-1)
        logits = torch.randn(len(targets), self.V)  # drawn on the CPU: the same drafts on every device
        for i, target in enumerate(targets.tolist()):
            if target < len(self.ref):
                u, top = self.rng.random(), logits[i].topk(3).indices
                if u < 0.6:
                    logits[i, self.ref[target]] = 100.0
                elif u < 0.85:
                    logits[i, self.ref[target]] = 50.0
                    logits[i, top[0] if top[0] != self.ref[target] else top[1]] = 100.0
                else:
                    logits[i, self.ref[target]] = -100.0
        return logits.view(*shape, self.V).to(targets.device)


def check_cache(model, prompt, emitted):
    """on_step hook: the cache's accepted prefix equals a fresh prefill of what was emitted."""
    def hook(cache, n):
        seq, dev = (prompt + emitted)[:n], model.output.weight.device
        fresh, at = KVCache(model.args, 1, n, dev), torch.arange(n, device=dev)
        model(torch.tensor([seq], device=dev), at, causal_mask(n, device=dev), at, fresh)
        torch.testing.assert_close(cache.k[:, :, :, :n], fresh.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v[:, :, :, :n], fresh.v, rtol=1e-5, atol=1e-5)
    return hook


def mapped(p, name) -> bool:
    """Has process p a file whose path holds `name` mapped now (a model file while the loader reads
    it, libtorch while Python imports torch)? Needs /proc."""
    try:
        with open(f"/proc/{p.pid}/maps") as f:
            return name in f.read()
    except OSError:
        return False
