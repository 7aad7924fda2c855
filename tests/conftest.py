"""Shared fixtures: the real default model is loaded once per test session."""

import pytest
import torch


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) for the real default model, SmolLM2-135M-Instruct, in fp32 on the CPU."""
    from tokenizer import load_tokenizer
    from weights import default_model_path, load_model

    path = default_model_path()
    torch.manual_seed(0)
    return load_model(path, device="cpu", dtype=torch.float32), load_tokenizer(path)
