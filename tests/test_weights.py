"""weights.py: every format round-trips a tiny checkpoint written here; every bad input fails clearly.

The reference is a tiny random LlamaForCausalLM. Each test writes it in one format (converting the
rotary layout the way Meta and llama.cpp do), loads it back, and compares weights and logits.
(The real default model against transformers reading the same GGUF: tests/test_real_model.py.)
"""

import json
import math
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from model import causal_mask
from weights import WeightsError, load_args, load_model, load_state_dict
from test_model import random_hf_model as tiny_hf_model  # tests/ is on the path under pytest

N_HEADS, N_KV = 4, 2  # as test_model.random_hf_model


def random_hf_model(**overrides) -> LlamaForCausalLM:
    """test_model.py's tiny random LlamaForCausalLM, two layers deep."""
    return tiny_hf_model(**{"num_hidden_layers": 2, **overrides})


def to_pairs(w, n_heads):
    """Hugging Face rotary layout -> Meta/llama.cpp's (the inverse of what weights.py does)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]), causal_mask(tokens.shape[1]))


TOKENS = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(hf model, its folder, our model loaded from that folder, hf logits on TOKENS)."""
    hf = random_hf_model()
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    with torch.no_grad():
        expected = hf(TOKENS).logits
    return hf, folder, load_model(folder), expected


def assert_same_model(model, reference):
    ref = reference.state_dict()
    assert model.state_dict().keys() == ref.keys()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


# ----------------------------------------------------------------------------- round trips

def test_safetensors_single_file(source):
    hf, folder, ours, expected = source
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert ours.args.n_kv_heads == N_KV and not ours.args.tie_embeddings
    torch.testing.assert_close(logits(ours, TOKENS), expected, atol=1e-4, rtol=0)


def test_sharded_safetensors(source, tmp_path):
    hf, _, ours, _ = source
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_model(load_model(tmp_path), ours)


def test_pytorch_bin_single_and_sharded(source, tmp_path):
    hf, folder, ours, _ = source
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old files carry these
    shutil.copy(folder / "config.json", tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert_same_model(load_model(tmp_path), ours)

    (tmp_path / "pytorch_model.bin").unlink()
    names = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    for file, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same_model(load_model(tmp_path), ours)


def write_meta(folder, hf):
    """consolidated.00.pth + params.json, as Meta ships LLaMA 2 7B: rotary pairs, vocab_size -1."""
    c = hf.config
    params = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=N_HEADS, n_kv_heads=N_KV,
                  vocab_size=-1, multiple_of=32, ffn_dim_multiplier=0.75, norm_eps=c.rms_norm_eps,
                  rope_theta=10000.0)  # Meta's sizing: int(0.75 * int(2 * 4 * 64 / 3)) = 127 -> 128
    (folder / "params.json").write_text(json.dumps(params))
    sd = {"tok_embeddings.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight,
          "output.weight": hf.lm_head.weight, "rope.freqs": torch.ones(8)}
    for i, layer in enumerate(hf.model.layers):
        a, m = layer.self_attn, layer.mlp
        sd |= {f"layers.{i}.attention.wq.weight": to_pairs(a.q_proj.weight, N_HEADS),
               f"layers.{i}.attention.wk.weight": to_pairs(a.k_proj.weight, N_KV),
               f"layers.{i}.attention.wv.weight": a.v_proj.weight,
               f"layers.{i}.attention.wo.weight": a.o_proj.weight,
               f"layers.{i}.feed_forward.w1.weight": m.gate_proj.weight,
               f"layers.{i}.feed_forward.w2.weight": m.down_proj.weight,
               f"layers.{i}.feed_forward.w3.weight": m.up_proj.weight,
               f"layers.{i}.attention_norm.weight": layer.input_layernorm.weight,
               f"layers.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight}
    torch.save({k: v.detach().clone() for k, v in sd.items()}, folder / "consolidated.00.pth")


def test_meta_consolidated(source, tmp_path):
    hf, _, ours, expected = source
    write_meta(tmp_path, hf)
    meta = load_model(tmp_path)
    assert meta.args.ffn_dim == 128 and meta.args.vocab_size == 96
    assert_same_model(meta, ours)
    torch.testing.assert_close(logits(meta, TOKENS), expected, atol=1e-4, rtol=0)
    shutil.copy(tmp_path / "consolidated.00.pth", tmp_path / "consolidated.01.pth")
    with pytest.raises(WeightsError, match=r"2 consolidated.\*.pth files; only single-file"):
        load_model(tmp_path)


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "down_proj": "ffn_down", "up_proj": "ffn_up",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(path, hf, quant=None, arch="llama", rope_freqs=None):
    """A GGUF as llama.cpp's converter writes one: (in, out) dims, Q/K in rotary pairs; `quant`
    (e.g. Q8_0) applies to every matrix."""
    c = hf.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tensors = {"token_embd.weight": hf.model.embed_tokens.weight, "output_norm.weight": hf.model.norm.weight}
    if not c.tie_word_embeddings:
        tensors["output.weight"] = hf.lm_head.weight
    for name, t in hf.model.layers.named_parameters():
        i, *parts = name.split(".")  # "0.self_attn.q_proj.weight"
        t = to_pairs(t, N_HEADS) if parts[1] == "q_proj" else to_pairs(t, N_KV) if parts[1] == "k_proj" else t
        tensors[f"blk.{i}.{GGUF_NAMES[parts[-2]]}.weight"] = t
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = rope_freqs
    for name, t in tensors.items():
        a = t.detach().float().numpy()
        if quant is not None and a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_f32_is_exact(source, tmp_path):
    hf, _, ours, _ = source
    write_gguf(tmp_path / "m.gguf", hf)
    assert_same_model(load_model(tmp_path / "m.gguf"), ours)


def test_gguf_q8_0_tied(tmp_path):
    q8 = gguf.GGMLQuantizationType.Q8_0
    hf = random_hf_model(tie_word_embeddings=True)
    write_gguf(tmp_path / "m.gguf", hf, quant=q8)
    model = load_model(tmp_path / "m.gguf")
    assert model.args.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        expected = hf(TOKENS).logits
        got = logits(model, TOKENS)
        # Q8_0 rounds each weight to 8 bits of its 32-weight block's scale: on logits of std ~0.85
        # that moves them by ~0.01 on average, ~0.06 at most (seen)
        assert (got - expected).abs().mean() < 0.02
        torch.testing.assert_close(got, expected, atol=0.1, rtol=0)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        # and exactly, against the source with the same rounding applied (rows quantise
        # independently, so the rotary row permutation commutes with it)
        for p in hf.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)))
        torch.testing.assert_close(got, hf(TOKENS).logits, atol=1e-4, rtol=0)


def test_gguf_llama31_rope_scaling_from_rope_freqs(tmp_path):
    """llama.cpp keeps Llama-3.1 scaling only as per-frequency divisors; they must come back."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = random_hf_model(rope_parameters={"rope_theta": 10000.0, **scaling})
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    divisors = []
    for f in inv_freq.tolist():  # llama.cpp's convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            divisors.append(1.0)
        elif wavelen > 8192 / 1.0:
            divisors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            divisors.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert 1.0 < sorted(divisors)[-2] < 8.0  # one frequency on the ramp, so the ramp is tested
    write_gguf(tmp_path / "m.gguf", hf, rope_freqs=torch.tensor(divisors))
    model = load_model(tmp_path / "m.gguf")
    assert model.args.rope_scaling == scaling
    torch.testing.assert_close(model.inv_freq, hf.model.rotary_emb.inv_freq)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, TOKENS), hf(TOKENS).logits, atol=1e-4, rtol=0)


def test_load_args_and_state_dict(source):
    _, folder, ours, _ = source
    assert load_args(folder) == ours.args
    args, sd = load_state_dict(folder, torch.bfloat16)
    assert args == ours.args and all(t.dtype == torch.bfloat16 for t in sd.values())
    assert load_model(folder, dtype=torch.bfloat16, max_seq_len=64).args.max_seq_len == 64


def test_tied_checkpoint_that_still_ships_its_head(source, tmp_path):
    def tie(sd):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    write_hf(tmp_path, source, edit_sd=tie, edit_config=lambda c: c.update(tie_word_embeddings=True))
    model = load_model(tmp_path)
    assert model.args.tie_embeddings and model.output.weight is model.tok_embeddings.weight

    write_hf(tmp_path, source, edit_config=lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(WeightsError, match=r"ties the LM head to the embeddings but the checkpoint's head differs"):
        load_model(tmp_path)


def test_llama31_config_in_the_older_style(source, tmp_path):
    """Llama-3.1's own config.json (transformers 4.x): rope_theta beside rope_scaling."""
    def old_style(c):
        del c["rope_parameters"]
        c.update(rope_theta=500000.0, max_position_embeddings=131072, rope_scaling={
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    write_hf(tmp_path, source, edit_config=old_style)
    args = load_args(tmp_path)
    assert args.rope_theta == 500000.0 and args.max_seq_len == 131072
    assert args.rope_scaling["factor"] == 8.0 and args.rope_scaling["original_max_position_embeddings"] == 8192


# ----------------------------------------------------------------------------- bad inputs

def write_hf(folder, source, edit_sd=None, edit_config=None):
    hf, src, _, _ = source
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    config = json.loads((src / "config.json").read_text())
    edit_sd and edit_sd(sd)
    edit_config and edit_config(config)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(sd, folder / "model.safetensors")
    return folder


def test_missing_tensor(source, tmp_path):
    write_hf(tmp_path, source, edit_sd=lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=rf"{tmp_path}.*missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(tmp_path)


def test_extra_tensor(source, tmp_path):
    write_hf(tmp_path, source, edit_sd=lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(WeightsError, match=r"model.safetensors: unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_model(tmp_path)


def test_wrong_shape(source, tmp_path):
    write_hf(tmp_path, source, edit_sd=lambda sd: sd.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \(63,\)"):
        load_model(tmp_path)


def test_config_contradicting_weights(source, tmp_path):
    write_hf(tmp_path, source, edit_config=lambda c: c.update(hidden_size=32, head_dim=8))
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor '.*' has shape .* config does not match"):
        load_model(tmp_path)


def test_truncated_safetensors(source, tmp_path):
    write_hf(tmp_path, source)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(tmp_path)


def test_random_bytes_as_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=r"junk.gguf: not a readable GGUF file"):
        load_model(tmp_path / "junk.gguf")


def test_truncated_gguf(source, tmp_path):
    write_gguf(tmp_path / "m.gguf", source[0])
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match=r"m.gguf: not a readable GGUF file"):
        load_model(tmp_path / "m.gguf")


def test_gguf_of_another_architecture(source, tmp_path):
    write_gguf(tmp_path / "m.gguf", source[0], arch="gpt2")
    with pytest.raises(WeightsError, match=r"m.gguf: GGUF architecture 'gpt2' is not supported"):
        load_model(tmp_path / "m.gguf")


PWNED = []


def pwn():
    PWNED.append(True)


class Evil:
    def __reduce__(self):
        return pwn, ()


def test_pickle_that_runs_code_is_refused(source, tmp_path):
    shutil.copy(source[1] / "config.json", tmp_path)
    torch.save({"model.norm.weight": torch.ones(64), "boom": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"pytorch_model.bin: refused: the pickle .* could run code"):
        load_model(tmp_path)
    assert PWNED == []
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)  # the test's own check:
    assert PWNED == [True]                                        # the file really runs code
