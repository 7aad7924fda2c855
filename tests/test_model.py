"""model.py against an independent implementation (transformers) and against itself.

Parity: tiny random LlamaForCausalLM checkpoints, saved with save_pretrained and read back through
weights.py, give the same logits. Self-consistency: cached, chunked and ephemeral-token calls give
what one plain full forward gives.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model import KVCache, ModelArgs, Transformer, causal_mask
from weights import load_model

T = 24  # sequence length: well past the rope-scaling knee of original_max_position_embeddings=8


def random_hf_model(**overrides) -> LlamaForCausalLM:
    """A tiny LlamaForCausalLM with every weight random (norms too, so that they matter)."""
    config = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return hf


def full_forward(model, tokens):
    """The reference path: no cache, positions 0..T-1, causal mask."""
    T, dev = tokens.shape[1], tokens.device
    return model(tokens, torch.arange(T, device=dev), causal_mask(T, device=dev))


LLAMA31 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


@pytest.mark.parametrize("overrides", [
    dict(),                                               # grouped-query attention, untied head
    dict(tie_word_embeddings=True),                       # tied head
    dict(num_key_value_heads=4),                          # plain multi-head attention
    dict(num_key_value_heads=1, rope_parameters=LLAMA31), # multi-query, Llama-3.1 rope scaling
], ids=["gqa", "tied", "mha", "mqa-llama31"])
def test_parity_with_transformers(tmp_path, overrides, device):
    hf = random_hf_model(**overrides)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, device=device)
    assert ours.args.tie_embeddings == hf.config.tie_word_embeddings
    tokens = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        expected = hf.to(device)(tokens).logits
        got = full_forward(ours, tokens)
    assert got.shape == expected.shape == (2, T, 96)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.fixture
def tiny(device):
    return Transformer(ModelArgs.tiny()).init_random(seed=0).eval().to(device)


@pytest.fixture
def tokens(device):
    return torch.randint(0, 96, (1, T), generator=torch.Generator().manual_seed(2)).to(device)


def at(*ends, device):  # torch.arange on the test's device
    return torch.arange(*ends, device=device)


@torch.no_grad()
def test_token_by_token_decoding_matches_full_forward(tiny, tokens, device):
    cache = KVCache(tiny.args, max_len=32, device=device)
    steps = [tiny(tokens[:, i:i + 1], at(i, i + 1, device=device), causal_mask(1, i, device),
                  at(i, i + 1, device=device), cache) for i in range(T)]
    torch.testing.assert_close(torch.cat(steps, 1), full_forward(tiny, tokens), atol=1e-5, rtol=0)


@torch.no_grad()
def test_chunked_prefill_matches_full_forward(tiny, tokens, device):
    cache, cut = KVCache(tiny.args, max_len=32, device=device), 10
    first = tiny(tokens[:, :cut], at(cut, device=device), causal_mask(cut, device=device),
                 at(cut, device=device), cache)
    second = tiny(tokens[:, cut:], at(cut, T, device=device), causal_mask(T - cut, cut, device),
                  at(cut, T, device=device), cache)
    torch.testing.assert_close(torch.cat([first, second], 1), full_forward(tiny, tokens),
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_ephemeral_tokens_match_normal_ones_and_leave_the_cache_alone(tiny, tokens, device):
    """Prefill 12 tokens; then one call with 4 cached tokens and 8 ephemeral ones (unslotted).

        keys ->      cache 0..15          | ephemeral 0..7
        cached q j   1 .. 1 (up to 12+j)  | . . . . . . . .
        ephem. q j   1 .. 1 (all 16)      | 1 .. 1 (up to j)
    """
    n, k, e = 12, 4, 8
    cache = KVCache(tiny.args, max_len=32, device=device)
    tiny(tokens[:, :n], at(n, device=device), causal_mask(n, device=device), at(n, device=device), cache)
    kv_len = n + k
    cache.k[:, :, :, kv_len:] = 3.0  # a sentinel the call must not overwrite
    cache.v[:, :, :, kv_len:] = 3.0
    mask = causal_mask(k + e, n, device)  # (1, k+e, n+k+e): the same columns, cache first then ephemeral
    out = tiny(tokens[:, n:], at(n, T, device=device), mask, at(n, kv_len, device=device), cache)
    torch.testing.assert_close(out, full_forward(tiny, tokens)[:, n:], atol=1e-5, rtol=0)
    assert bool((cache.k[:, :, :, kv_len:] == 3.0).all() and (cache.v[:, :, :, kv_len:] == 3.0).all())


def test_kv_cache_move_copies_slots_in_every_layer(device):
    args = ModelArgs.tiny()
    cache = KVCache(args, max_len=8, device=device)
    cache.k.normal_()
    cache.v.normal_()
    k0, v0 = cache.k.clone(), cache.v.clone()
    cache.move(torch.tensor([5, 6], device=device), torch.tensor([2, 3], device=device))
    for layer in range(args.n_layers):
        assert torch.equal(cache.k[layer, :, :, [2, 3]], k0[layer, :, :, [5, 6]])
        assert torch.equal(cache.v[layer, :, :, [2, 3]], v0[layer, :, :, [5, 6]])
    untouched = [0, 1, 4, 5, 6, 7]
    assert torch.equal(cache.k[:, :, :, untouched], k0[:, :, :, untouched])
    assert torch.equal(cache.v[:, :, :, untouched], v0[:, :, :, untouched])


def test_cache_attention_mask_puts_the_cached_tokens_first(device):
    cache = KVCache(ModelArgs.tiny(), max_len=16, device=device)
    own = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool, device=device)
    assert cache.attention_mask(own, 3).tolist() == [[[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]]
    assert cache.attention_mask(own, 0).tolist() == [own.tolist()]


@pytest.mark.parametrize("device", ["cpu"])  # the checks are the same Python on every device
def test_slot_beyond_cache_raises(tiny):
    cache = KVCache(tiny.args, max_len=8)
    with pytest.raises(ValueError, match="beyond the cache"):
        tiny(torch.tensor([[1]]), torch.tensor([8]), causal_mask(1, 8), torch.tensor([8]), cache)


@pytest.mark.parametrize("device", ["cpu"])
def test_fully_masked_row_raises(tiny):
    mask = causal_mask(3)
    mask[0, 1] = False
    with pytest.raises(ValueError, match="nothing to attend to"):
        tiny(torch.tensor([[1, 2, 3]]), torch.arange(3), mask)
