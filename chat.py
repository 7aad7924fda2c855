"""Chat templates: how a conversation becomes one prompt string, and which characters the assistant wrote.

Four families, written out by hand rather than run through Jinja, so each fits on a screen: ChatML
(SmolLM2, Qwen), Meta's Llama-2-chat `[INST]` format, Vicuna v1.1 (FastChat) and `raw` for base
models. `render` returns the text plus the character spans of assistant replies; tokenizer.py turns
those spans into the per-token loss mask that draft-head training reads. Read next: generate.py.
"""

import re

TEMPLATES = ("chatml", "llama2", "vicuna", "raw")

# FastChat's `vicuna_v1.1` system prompt, which Vicuna was fine-tuned with.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Llama-2-chat has no default: Meta's reference code and Hugging Face both dropped the long default
# system prompt in 2023, so `system=None` means no <<SYS>> block. A ChatML model's default comes from
# its own template string (`chatml_default_system`): SmolLM2's is "You are a helpful AI assistant
# named SmolLM, trained by Hugging Face".
DEFAULT_SYSTEM = {"chatml": None, "llama2": None, "vicuna": VICUNA_SYSTEM, "raw": None}


def detect_template(chat_template: str | None) -> str:
    """The template family from a model's own Jinja chat template string (None -> raw)."""
    text = chat_template or ""
    if "<|im_start|>" in text:
        return "chatml"
    if "[INST]" in text:
        return "llama2"
    if "USER:" in text or "ASSISTANT:" in text:
        return "vicuna"
    return "raw"


def chatml_default_system(chat_template: str | None) -> str | None:
    """The system prompt a ChatML Jinja template writes when none is given, or None if it writes none."""
    # The literal sits in a Jinja string, e.g. '<|im_start|>system\nYou are ...<|im_end|>\n'; the
    # newline may be a real one or the two characters backslash-n, depending on how it was stored.
    found = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]+?)<\|im_end\|>", chat_template or "")
    return found.group(1) if found else None


def _join(parts: list[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]]]:
    """Concatenate (text, is_assistant) parts; return the text and the assistant character spans."""
    text, spans = "", []
    for piece, mine in parts:
        if mine:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def _chatml(system, turns, add_generation_prompt, bos, eos):
    # <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{u}<|im_end|>\n
    # <|im_start|>assistant\n[{a}<|im_end|>]\n ...     brackets mark the assistant span
    parts = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)] if system else []
    for role, content in turns:
        if role == "assistant":
            parts += [("<|im_start|>assistant\n", False), (content + "<|im_end|>", True), ("\n", False)]
        else:
            parts.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
    if add_generation_prompt:
        parts.append(("<|im_start|>assistant\n", False))
    return parts


def _llama2(system, turns, add_generation_prompt, bos, eos):
    # <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{u} [/INST][ {a} </s>]<s>[INST] {u2} [/INST]
    # As Meta's `chat_completion`: every user/assistant pair is its own <s>...</s> sequence, and
    # "[/INST]" is the assistant header, so the prompt always ends with it (add_generation_prompt
    # changes nothing).
    roles = [role for role, _ in turns]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise ValueError(f"The llama2 template needs turns alternating user, assistant, user, ...; "
                         f"got {roles}.")
    parts = []
    for i, (role, content) in enumerate(turns):
        content = content.strip()
        if role == "user":
            if i == 0 and system:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            parts.append((f"{bos}[INST] {content} [/INST]", False))
        else:
            parts.append((f" {content} {eos}", True))
    return parts


def _vicuna(system, turns, add_generation_prompt, bos, eos):
    # {system} USER: {u} ASSISTANT:[ {a}</s>]USER: {u2} ASSISTANT:
    # FastChat's vicuna_v1.1 separators: " " after a user turn, "</s>" after an assistant turn.
    parts = [(system + " ", False)] if system else []
    for role, content in turns:
        if role == "assistant":
            parts += [("ASSISTANT:", False), (f" {content}{eos}", True)]
        else:
            parts.append((f"USER: {content} ", False))
    if add_generation_prompt:
        parts.append(("ASSISTANT:", False))
    return parts


def _raw(system, turns, add_generation_prompt, bos, eos):
    # Base models: the contents back to back, no markup, nothing to end a reply.
    parts = [(system, False)] if system else []
    return parts + [(content, role == "assistant") for role, content in turns]


_RENDER = {"chatml": _chatml, "llama2": _llama2, "vicuna": _vicuna, "raw": _raw}


def render(template: str, messages: list[dict], add_generation_prompt: bool, system: str | None,
           default_system: str | None, bos: str, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """Format `messages` with `template`; return the prompt text and the assistant character spans.

    A leading {"role": "system"} message is the system prompt. Otherwise `system` is: None -> the
    template's default (`default_system`), "" -> none. `bos` / `eos` are the tokenizer's own
    spellings of those tokens ("<s>", "</s>"), which the llama2 and vicuna templates write as text.
    """
    if template not in _RENDER:
        raise ValueError(f"Unknown chat template {template!r}: pick one of {TEMPLATES}.")
    turns = [(m["role"], m["content"]) for m in messages]
    if turns and turns[0][0] == "system":
        if system:
            raise ValueError("Give the system prompt either as system= or as the first message, not both.")
        system, turns = turns[0][1], turns[1:]
    elif system is None:
        system = default_system
    for role, _ in turns:
        if role not in ("user", "assistant"):
            raise ValueError(f"Message role {role!r} is not allowed here: use 'user' or 'assistant' "
                             "(and 'system' only as the first message).")
    return _join(_RENDER[template](system, turns, add_generation_prompt, bos, eos))
