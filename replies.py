"""The model's own replies: the text the drafter will draft at decoding time, made into training data.

A drafter trained on another model's replies (ShareGPT's) learns contexts that decoding never
shows it; trained on the base model's own answers it learns the text it will be asked to draft
(Medusa's "self-distillation"; METHOD.md, "Training the projection"). The base model answers the
first (and, if asked, the second) user turn of each conversation, many conversations at once
(batching.py: continuous batching, one pass serving B rows). The replies are cached on disk under
a key of everything that made them, each written as it ends (a Ctrl-C loses the replies under way
only, the next run resumes, and asking for more replies makes only the new ones), then turned into
token windows like ShareGPT's (data.pack_windows).
Read next: distill.py, what the drafter learns from them.
"""

import hashlib
import json
import os
import random
import time

from tqdm import tqdm

import batching
from checkpoint import model_identity
from data import encode_conversations, pack_windows, read_sharegpt, sharegpt_path
from generate import Sampler


# ----------------------------------------------------------------------------- the reply cache

def reply_key(model_identity: dict, data: str, settings: dict) -> str:
    """The cache file's name part: a digest of the model, the data file and every setting."""
    text = json.dumps({"model": model_identity, "data": data, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _record_problem(record) -> str | None:
    """Why a parsed line is not a reply record {"index", "prompt", "reply", "sampled"}, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    missing = [k for k in ("index", "prompt", "reply", "sampled") if k not in record]
    if missing:
        return f"no {', '.join(missing)}"
    if type(record["index"]) is not int or record["index"] < 0:
        return f"index {record['index']!r} is not a non-negative integer"
    for k in ("prompt", "reply"):
        if not isinstance(record[k], list) or not all(type(t) is int and t >= 0 for t in record[k]):
            return f"{k} is not a list of token ids"
    return None


def read_done(path: str) -> dict:
    """{conversation index: record} of the complete lines in a (possibly interrupted) replies file.
    A complete line that is not a record is a ValueError naming the file and the line."""
    done = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith("\n"):  # a line cut by an interrupt is dropped and made again
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = line.strip()[:40]
                why = _record_problem(record)
                if why:
                    raise ValueError(f"{path}, line {n}: not a reply record ({why}); delete the file "
                                     "and its replies are made again")
                done[record["index"]] = record
    return done


def prompt_of(conv: list, turn: int, tok) -> list | None:
    """The prompt of a conversation's `turn`-th user turn (1 or 2), after any system turn, with
    ShareGPT's own earlier exchange as its context; None if the conversation has no such turn."""
    users = [j for j, m in enumerate(conv) if m["role"] == "user"]
    if len(users) < turn:
        return None
    return tok.encode_chat(conv[:users[turn - 1] + 1], add_generation_prompt=True)[0]


def make_replies(model, tok, conversations: list, path: str, max_new_tokens: int, batch_size: int = 0,
                 temperature: float = 0.7, top_p: float = 0.9, sampled: float = 0.0, seed: int = 0,
                 max_prompt: int = 192, turn: int = 1, desc: str = "own replies", stats: dict | None = None) -> list:
    """The base model's reply to the first (turn=1) or second (turn=2) user turn of each
    conversation, as records {"index", "prompt", "reply", "sampled"} (token ids), cached in `path`
    (JSON lines), made by continuous batching (batching.py) over batch_size rows (0: the size the
    measured pass-cost curve picks, batching.pick_batch_size).

    A share `sampled` of the replies (chosen per conversation by the seed) is drawn at `temperature`
    and `top_p`, the rest greedy; each with its own seeded sampler, so a reply does not depend on the
    batch it was made in. Prompts over `max_prompt` tokens are skipped. Each record is appended to
    `path` as its reply ends, the line whole and flushed to disk: a line an interrupt cut is dropped
    and made again, so an interrupted run resumes where it stopped, and a later run asking for more
    conversations makes only the new ones. stats, if given, gets the generation's numbers.
    """
    done = read_done(path)
    if os.path.exists(path):  # drop a line an interrupt cut, so that appending starts on a new line
        with open(path, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)
    todo = []
    for i, conv in enumerate(conversations):
        prompt = None if i in done else prompt_of(conv, turn, tok)
        if prompt is not None and len(prompt) <= max_prompt:
            todo.append((i, prompt, random.Random(seed * 1_000_003 + i).random() < sampled))
    if todo:
        predicted = None  # decoding tokens/s the pass-cost curve predicts, when it picks the batch
        if not batch_size:
            costs = batching.pass_costs(model, max_prompt + max_new_tokens)
            batch_size = batching.pick_batch_size(costs)
            predicted = batch_size / costs[batch_size]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        asked = sum(i < len(conversations) for i in done)
        bar = tqdm(total=len(todo) + asked, initial=asked, unit="reply", desc=desc)
        samplers = [Sampler(temperature, top_p, seed * 1_000_003 + i) if s else Sampler() for i, _, s in todo]
        new_tokens, t0 = 0, time.perf_counter()
        with open(path, "a", encoding="utf-8") as f:
            for j, reply in batching.generate_stream(model, [p for _, p, _ in todo], max_new_tokens, samplers,
                                                     tok.stop_ids, batch_size):
                i, prompt, s = todo[j]
                done[i] = {"index": i, "prompt": prompt, "reply": reply, "sampled": s}
                f.write(json.dumps(done[i]) + "\n")
                f.flush()
                os.fsync(f.fileno())
                new_tokens += len(reply)
                bar.update()
                bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}", rows=batch_size)
        bar.close()
        seconds = time.perf_counter() - t0
        line = f"{desc}: {len(todo)} replies, {new_tokens} new tokens in {seconds / 60:.1f} min, " \
               f"{new_tokens / seconds:.0f} tokens/s over {batch_size} rows"
        print(line + (f" (the pass-cost curve predicts {predicted:.0f} for decoding alone)" if predicted else ""))
        if stats is not None:
            stats.setdefault("generation", []).append(
                {"set": desc, "replies": len(todo), "new_tokens": new_tokens, "seconds": seconds,
                 "rows": batch_size, "predicted_tokens_s": predicted})
    return [done[i] for i in sorted(done) if i < len(conversations)]


def reply_pairs(records: list, tok) -> list:
    """(ids, assistant mask) of each prompt + reply, as tok.encode_chat would mark a conversation:
    the reply's tokens (its end marker included) are the assistant's. A reply cut by the token
    budget gets no end marker: the model did not end it there."""
    newline = tok.encode("\n", bos=False)  # what the chat template writes after the end marker
    pairs = []
    for r in records:
        tail = newline if r["reply"] and r["reply"][-1] in tok.stop_ids else []
        pairs.append((r["prompt"] + r["reply"] + tail,
                      [False] * len(r["prompt"]) + [True] * len(r["reply"]) + [False] * len(tail)))
    return pairs


# ----------------------------------------------------------------------------- the windows train.py reads

EVAL_SEQ_LEN = 256        # held-out window length: fixed, so no training flag moves the held-out sets
HELD_REPLY_TOKENS = 128   # the held-out prompts' own replies: greedy, as long as bench.py's answers


def load_windows(args, model, tok):
    """(training windows, held-out sets {"own": ..., "sharegpt": ...}, info) for train.py.

    The first --holdout conversations read are held out; training uses the ones after them (never
    the held-out ones, for generation either). --data replies: the training windows are the base
    model's own replies to the first --replies training prompts; --data sharegpt: ShareGPT's own
    conversations. Held out, always both: the base model's greedy replies to the held-out prompts
    ("own", where decoding happens) and the held-out ShareGPT conversations, in EVAL_SEQ_LEN-token
    windows, at most --eval-windows of each. Replies and windows are cached in --cache-dir.
    --second-turns: also the replies to the second user turn of the first N training conversations
    that have one, after ShareGPT's own first exchange. info: {"note", "generation_min", and the
    "generation" numbers of make_replies}.
    """
    path = args.sharegpt or sharegpt_path()
    source = [os.path.abspath(path), os.path.getsize(path), tok.template]
    conversations = list(read_sharegpt(path, limit=args.conversations))
    if len(conversations) <= args.holdout:
        raise ValueError(f"{len(conversations)} conversations read, {args.holdout} held out: nothing left "
                         "to train on; read more --conversations or lower --holdout")
    held_c, train_c = conversations[:args.holdout], conversations[args.holdout:]
    identity, t0 = model_identity(model), time.perf_counter()

    stats = {}

    def replies(convs, name, tokens, turn=1, **sampling):  # a file per setting; more conversations extend it
        max_prompt = args.max_prompt * turn  # a second turn's prompt holds a whole exchange before it
        settings = {"holdout": args.holdout, "tokens": tokens, "set": name, **sampling,
                    **({"turn": turn, "max_prompt": max_prompt} if turn > 1 or max_prompt != 192 else {})}
        key = reply_key(identity, json.dumps(source), settings)
        return make_replies(model, tok, convs, os.path.join(args.cache_dir, f"replies-{name}-{key}.jsonl"),
                            tokens, args.reply_batch, desc=f"{name} replies", max_prompt=max_prompt, turn=turn,
                            stats=stats, **sampling)

    eval_len = min(EVAL_SEQ_LEN, model.args.max_seq_len)
    held = {"own": pack_windows(reply_pairs(replies(held_c, "held-out", HELD_REPLY_TOKENS), tok), eval_len,
                                max_windows=args.eval_windows),
            "sharegpt": encode_conversations(tok, held_c, eval_len, max_windows=args.eval_windows)}
    if args.data == "replies":
        sampling = dict(temperature=args.reply_temperature, top_p=args.reply_top_p, sampled=args.sampled, seed=args.seed)
        own = replies(train_c[:args.replies], "train", args.reply_tokens, **sampling)
        what = f"the base model's replies to {len(own)} of {min(args.replies, len(train_c))} training prompts"
        if args.second_turns:
            second = replies(train_c[:args.second_turns], "train", args.reply_tokens, turn=2, **sampling)
            own += second
            what += f" and to {len(second)} second turns"
        train = pack_windows(reply_pairs(own, tok), args.seq_len)
    else:
        train = encode_conversations(tok, train_c, args.seq_len)
        what = f"{len(train_c)} ShareGPT conversations"
    generation_min = (time.perf_counter() - t0) / 60
    if not train or not any(held.values()):
        raise ValueError(f"{len(train)} training windows of {args.seq_len} tokens and "
                         f"{', '.join(f'{len(w)} {n}' for n, w in held.items())} held-out windows of {eval_len}: "
                         "read more --conversations, hold out more (--holdout), answer more --replies, or lower "
                         "--seq-len")
    for name in [n for n, w in held.items() if not w]:
        print(f"note: the {args.holdout} held-out conversations fill no {eval_len}-token window of the {name} "
              "held-out set: it is left out (hold out more with --holdout)")
        del held[name]
    note = (f"training: {len(train)} windows of {args.seq_len} tokens from {what}; held out: "
            + ", ".join(f"{len(w)} {n} windows" for n, w in held.items())
            + f" from {args.holdout} conversations of {path}")
    return train, held, {"note": note, "generation_min": generation_min, **stats}
