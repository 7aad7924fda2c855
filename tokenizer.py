"""Tokenizers for LLaMA-family models: text <-> ids, chat prompts with an assistant mask, streaming.

Two backends behind one `Tokenizer`: byte-level BPE through the `tokenizers` package (the vocabulary
inside a GGUF file such as the default SmolLM2 model, or any tokenizer.json), and SentencePiece
(LLaMA-1/2, Vicuna, Mistral tokenizer.model). Chat formatting lives in chat.py; `encode_chat` here
turns its assistant character spans into the per-token mask. Read chat.py next, then generate.py.
"""

import json
import re
from pathlib import Path

import gguf
import sentencepiece
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from chat import DEFAULT_SYSTEM, TEMPLATES, chatml_default_system, detect_template, render

# Generation also stops at these when the vocabulary has them, e.g. a ChatML model's <|endoftext|>.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>")
# llama.cpp's token kinds (tokenizer.ggml.token_type): CONTROL tokens are special, never split.
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4
# LLaMA-3's split regex, which llama.cpp calls "llama-bpe"; ByteLevel then runs without its own regex.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex=True):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _digits_then_byte_level():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


# GGUF `tokenizer.ggml.pre` -> how text is cut before BPE merges; it must be the cut the merges were
# learned on. "smollm" (and StarCoder, whose vocabulary SmolLM reuses) isolates every digit first,
# exactly as SmolLM2's own tokenizer.json does: Sequence[Digits(individual), ByteLevel].
PRE_TOKENIZERS = {
    "default": lambda: _byte_level(),
    "gpt2": lambda: _byte_level(),
    "smollm": _digits_then_byte_level,
    "starcoder": _digits_then_byte_level,
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), _byte_level(use_regex=False)]),
}


class _TokenizersBackend:
    """A `tokenizers.Tokenizer`: built from a GGUF's vocabulary, or loaded from a tokenizer.json."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        """(ids, character span of each token); special tokens written in the text become their id."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special):
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def id_to_token(self, i):
        return self.tok.id_to_token(i)


class _SentencePieceBackend:
    """A SentencePiece tokenizer.model. Control pieces ("<s>", "</s>") written in the text become
    their ids, as in Hugging Face's LlamaTokenizer; SentencePiece alone would spell them out."""

    def __init__(self, path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.sp.vocab_size()
        self.special = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)}
        pattern = "|".join(map(re.escape, sorted(self.special, key=len, reverse=True)))  # longest first
        self.splitter = re.compile(f"({pattern})") if self.special else None

    def encode(self, text):
        # Each stretch between special tokens is encoded on its own, so each gets SentencePiece's
        # leading "▁" -- which is what Meta's Llama-2 code does by encoding turn by turn.
        ids, spans, start = [], [], 0
        for chunk in self.splitter.split(text) if self.splitter else [text]:
            if chunk in self.special:
                ids.append(self.special[chunk])
                spans.append((start, start + len(chunk)))
            elif chunk:
                out = self.sp.encode(chunk, return_type="offset_mapping")
                ids += out["ids"]
                spans += [(start + a, start + b) for a, b in out["offsets"]]
            start += len(chunk)
        return ids, spans

    def decode(self, ids, skip_special):
        if skip_special:
            return self.sp.decode(ids)  # SentencePiece drops control pieces by itself
        text, run = "", []
        for i in ids:
            if self.sp.is_control(i):
                text, run = text + self.sp.decode(run) + self.sp.id_to_piece(i), []
            else:
                run.append(i)
        return text + self.sp.decode(run)

    def token_to_id(self, token):
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i):
        return self.sp.id_to_piece(i)


def _overlaps(span, assistant_spans):
    s, e = span
    # A zero-width span (a token whose offsets were trimmed away) counts where it starts.
    return any((max(s, a) < min(e, b)) if e > s else (a <= s < b) for a, b in assistant_spans)


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template (see the module docstring)."""

    def __init__(self, backend, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 chat_template: str | None = None, template: str | None = None):
        self.backend = backend
        self.vocab_size = backend.vocab_size
        self.bos_id = bos_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.template = template or detect_template(chat_template)
        if self.template not in TEMPLATES:
            raise ValueError(f"Unknown chat template {self.template!r}: pick one of {TEMPLATES}.")
        # A ChatML reply ends with <|im_end|> even where the file's eos is <|endoftext|> (Qwen base).
        im_end = backend.token_to_id("<|im_end|>")
        self.eos_id = im_end if self.template == "chatml" and im_end is not None else eos_id
        if self.eos_id is None:
            raise ValueError("This tokenizer names no end-of-sequence token: "
                             "add eos_token to its tokenizer_config.json.")
        ends = {backend.token_to_id(t) for t in END_TOKENS} | {eos_id, self.eos_id}
        self.stop_ids = {i for i in ends if i is not None}
        self.default_system = (chatml_default_system(chat_template) if self.template == "chatml"
                               else DEFAULT_SYSTEM[self.template])

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`; with bos (None -> self.add_bos) the bos id goes first."""
        ids, _ = self.backend.encode(text)
        if not (self.add_bos if bos is None else bos):
            return ids
        if self.bos_id is None:
            raise ValueError("This tokenizer has no bos token: call encode(text, bos=False).")
        return [self.bos_id] + ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens (bos, <|im_end|>, ...) are left out unless skip_special=False."""
        return self.backend.decode(list(ids), skip_special)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    system: str | None = None) -> tuple[list[int], list[bool]]:
        """(ids, mask) of a conversation in this model's chat template; mask is True on the tokens of
        assistant replies, their end marker included, and False on system/user turns and headers.

        The prompt is rendered to one string and tokenized once, exactly as Hugging Face's
        apply_chat_template does, so a token is marked when its characters overlap a reply.
        """
        bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else ""
        text, spans = render(self.template, messages, add_generation_prompt, system, self.default_system,
                             bos=bos, eos=self.backend.id_to_token(self.eos_id))
        ids, offsets = self.backend.encode(text)
        mask = [_overlaps(span, spans) for span in offsets]
        if self.add_bos and self.template != "llama2":  # llama2 writes its own <s> before every turn
            ids, mask = [self.bos_id] + ids, [False] + mask
        return ids, mask

    def stream(self) -> "TextStream":
        """A fresh incremental detokeniser for printing tokens as they are generated."""
        return TextStream(self)


class TextStream:
    """Incremental detokenisation: push ids as they are generated, get back the new printable text.

    Decoding token by token is wrong twice over: one character may be split over several byte
    tokens, and SentencePiece drops the "▁" space of whichever token comes first. So each push
    decodes a short window of recent tokens with and without the new ones and returns the
    difference, holding text back while it ends in an unfinished UTF-8 character ("\ufffd").
    The concatenated pushes (then flush()) equal tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: decoded for context only, its text was returned already
        self.read = 0    # everything before this has been returned

    def push(self, ids: list[int]) -> str:
        self.ids += list(ids)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


def _load_gguf(path: Path, template: str | None) -> Tokenizer:
    """The byte-level BPE vocabulary stored in a GGUF file, as a `tokenizers.Tokenizer`."""
    fields = gguf.GGUFReader(path).fields

    def field(key, default=None):
        return fields[key].contents() if key in fields else default

    kind = field("tokenizer.ggml.model")
    if kind == "llama":
        raise NotImplementedError(f"{path} holds a SentencePiece vocabulary, which is not read from GGUF "
                                  "here: pass the model's tokenizer.model (or its Hugging Face directory).")
    if kind != "gpt2":
        raise ValueError(f"{path} has tokenizer.ggml.model = {kind!r}; "
                         "only 'gpt2' (byte-level BPE) is supported.")
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is unknown: "
                         "add its split rule to PRE_TOKENIZERS in tokenizer.py.")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    # Without this "<|im_start|>" in a prompt would be cut into "<", "|", "im", ... like plain text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == GGUF_CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == GGUF_USER_DEFINED])
    return Tokenizer(_TokenizersBackend(tok), bos_id=field("tokenizer.ggml.bos_token_id"),
                     eos_id=field("tokenizer.ggml.eos_token_id"),
                     add_bos=field("tokenizer.ggml.add_bos_token", False),
                     chat_template=field("tokenizer.chat_template"), template=template)


def _read_hf_config(folder: Path) -> tuple[dict, str | None]:
    """tokenizer_config.json (or {}) and the chat template string, wherever this checkpoint keeps it."""
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text()) if file.exists() else {}
    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # several named templates: take the default one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    if chat_template is None and (folder / "chat_template.jinja").exists():
        chat_template = (folder / "chat_template.jinja").read_text()
    return config, chat_template


def _token_id(backend, config, key):
    """The id of config[key] (a string, or {"content": ...}), or None if absent."""
    token = config.get(key)
    token = token.get("content") if isinstance(token, dict) else token
    return backend.token_to_id(token) if token else None


def _sp_id(i):
    return i if i >= 0 else None  # SentencePiece says -1 for "this model has no such token"


def load_tokenizer(path: str, template: str | None = None) -> Tokenizer:
    """A Tokenizer from a .gguf file, a tokenizer.json or tokenizer.model file, or a directory with one
    (or whose parent has one).

    template: "chatml" | "llama2" | "vicuna" | "raw", or None to detect it from the model's own chat
    template string (GGUF tokenizer.chat_template, or tokenizer_config.json's chat_template).
    """
    file = Path(path)
    if file.is_dir():  # its own tokenizer, else the parent's: Meta's downloads keep tokenizer.model there
        found = [d / n for d in (file, file.parent) for n in ("tokenizer.json", "tokenizer.model")]
        file = next((f for f in found if f.exists()), file)
    if not file.is_file():
        raise FileNotFoundError(f"No tokenizer at {path}: pass a .gguf file, a tokenizer.json or "
                                "tokenizer.model file, or a directory holding one of them.")
    if file.suffix == ".gguf":
        return _load_gguf(file, template)
    config, chat_template = _read_hf_config(file.parent)
    if file.suffix == ".json":
        backend = _TokenizersBackend(tokenizers.Tokenizer.from_file(str(file)))
        bos_id = _token_id(backend, config, "bos_token")
        eos_id = _token_id(backend, config, "eos_token")
        if eos_id is None:  # no config beside it: take the first end token the vocabulary has
            eos_id = next((i for i in map(backend.token_to_id, END_TOKENS) if i is not None), None)
        # Without a flag, ask the file's own post-processor whether it puts bos first (LLaMA-3 does).
        bos_by_default = bos_id is not None and backend.tok.encode("a").ids[:1] == [bos_id]
        add_bos = config.get("add_bos_token", bos_by_default)
    elif ".model" in file.suffixes:  # also Mistral's tokenizer.model.v1, .v3
        backend = _SentencePieceBackend(str(file))
        bos_id = _token_id(backend, config, "bos_token")
        bos_id = bos_id if bos_id is not None else _sp_id(backend.sp.bos_id())
        eos_id = _token_id(backend, config, "eos_token")
        eos_id = eos_id if eos_id is not None else _sp_id(backend.sp.eos_id())
        add_bos = config.get("add_bos_token", True)  # LLaMA's rule: every prompt starts with <s>
    else:
        raise ValueError(f"Cannot tell what kind of tokenizer {file} is: expected .gguf, .json or .model.")
    return Tokenizer(backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                     chat_template=chat_template, template=template)
