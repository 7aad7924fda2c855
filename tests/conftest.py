"""Shared test setup: one CPU thread, the real default model loaded once per session, and tiny(),
the small random model most tests run on (`from conftest import tiny`)."""

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
