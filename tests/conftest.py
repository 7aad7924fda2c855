"""Shared test setup: one CPU thread, the real default model loaded once per session, and the
helpers several test files use (`from conftest import tiny`): tiny(), the small random model most
tests run on, fake_windows(), made-up training windows, and FakeTokenizer, a made-up chat format."""

import pytest
import torch

from model import ModelArgs, Transformer

# Tests are many small ops on tiny models, which a second thread only slows down (and a busy
# machine's thread contention can slow a hundredfold). Timings live in bench.py, never here.
torch.set_num_threads(1)


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


def tiny(seed: int = 0, **overrides) -> Transformer:
    """A tiny random LLaMA (ModelArgs.tiny, with overrides) in eval mode. std 0.15 rather than 0.02
    makes its next-token choices depend on the context, so decoding tests are not trivially passed."""
    return Transformer(ModelArgs.tiny(**overrides)).init_random(seed, std=0.15).eval()


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
