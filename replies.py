"""The model's own replies: the text the drafter will draft at decoding time, made into training data.

A drafter trained on another model's replies (ShareGPT's) learns contexts that decoding never
shows it; trained on the base model's own answers it learns the text it will be asked to draft
(Medusa's "self-distillation"; METHOD.md, "Training the projection"). The base model answers the
first user turn of each conversation, many conversations at once (`generate_batch`: one pass serves
B rows, and on a CPU a pass over 16 rows costs a few one-row steps). The replies are cached on disk
under a key of everything that made them, written as they come (a Ctrl-C loses one batch at most,
the next run resumes, and asking for more replies makes only the new ones), then turned into token
windows like ShareGPT's (data.pack_windows).
Read next: distill.py, what the drafter learns from them.
"""

import hashlib
import json
import os
import random
import time

import torch
from tqdm import tqdm

from checkpoint import model_identity
from data import encode_conversations, pack_windows, read_sharegpt, sharegpt_path
from generate import Sampler
from model import KVCache


# ----------------------------------------------------------------------------- batched plain decoding

@torch.no_grad()
def generate_batch(model, prompts: list, max_new_tokens: int, samplers: list, stop_ids=()) -> list:
    """Plain decoding of several prompts at once: row b emits what generate.generate(model,
    prompts[b], max_new_tokens, samplers[b], stop_ids) would (its own seeded sampler, one draw per
    emitted token), up to the rounding of a batched product. Returns the emitted token lists.

    Prompts of different lengths are right-aligned: row b has pad_b masked slots before its prompt.
    All rows share cache slots; each has its own positions (slot - pad_b) and mask row:

        slot      0   1   2   3   4 | 5 ...      (prompt lengths 3 and 5: pad 2 and 0)
        row 0     .   .   a   b   c | new tokens at positions 3, 4, ...
        row 1     v   w   x   y   z | new tokens at positions 5, 6, ...

    A row that emits a stop token or its last token leaves the batch (its cache rows are dropped),
    so long replies do not make short ones pay.
    """
    B, dev = len(prompts), model.output.weight.device
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    P = int(lens.max())
    pad = P - lens                                                             # (B,)
    tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p, device=dev)
    slots = torch.arange(P + max_new_tokens, device=dev)
    visible = slots[None, :] >= pad[:, None]                                   # (B, S): not a pad slot
    causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
    # a pad row sees itself only: it is never read, but a row with no key would give NaN
    mask = (causal[None] & visible[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)  # (B, P, P)
    pos = (slots[None, :P] - pad[:, None]).clamp(min=0)                       # (B, P)
    cache = KVCache(model.args, B, P + max_new_tokens, dev, model.output.weight.dtype)
    logits = model(tokens, pos, mask, slots[:P], cache)[:, -1]                # (B, V)

    rows, out = list(range(B)), [[] for _ in prompts]                          # rows: live prompts
    for step in range(max_new_tokens):
        keep, nxt = [], []
        for i, b in enumerate(rows):
            y = samplers[b](logits[i])
            out[b].append(y)
            if y not in stop_ids and step + 1 < max_new_tokens:
                keep.append(i)
                nxt.append(y)
        if not keep:
            break
        if len(keep) < len(rows):  # finished rows leave: keep only the live rows of the cache
            idx = torch.tensor(keep, device=dev)
            cache.k, cache.v = cache.k[:, idx], cache.v[:, idx]
            visible, pad = visible[idx], pad[idx]
            rows = [rows[i] for i in keep]
        slot = P + step                                                        # the new tokens' slot
        logits = model(torch.tensor(nxt, device=dev)[:, None], (slot - pad)[:, None],
                       visible[:, None, :slot + 1], slots[slot:slot + 1], cache)[:, -1]
    return out


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


def make_replies(model, tok, conversations: list, path: str, max_new_tokens: int, batch_size: int = 16,
                 temperature: float = 0.7, top_p: float = 0.9, sampled: float = 0.0, seed: int = 0,
                 max_prompt: int = 192, desc: str = "own replies") -> list:
    """The base model's reply to the first user turn (after any system turn) of each conversation,
    as records {"index", "prompt", "reply", "sampled"} (token ids), cached in `path` (JSON lines).

    A share `sampled` of the replies (chosen per conversation by the seed) is drawn at `temperature`
    and `top_p`, the rest greedy; each with its own seeded sampler, so a reply does not depend on the
    batch it was made in. Prompts over `max_prompt` tokens are skipped. Records are appended to
    `path` batch by batch, each line whole and flushed to disk: a line an interrupt cut is dropped
    and made again, so an interrupted run resumes where it stopped, and a later run asking for more
    conversations makes only the new ones.
    """
    done = read_done(path)
    if os.path.exists(path):  # drop a line an interrupt cut, so that appending starts on a new line
        with open(path, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)
    todo = []
    for i, conv in enumerate(conversations):
        turns = conv[:2] if conv[0]["role"] == "system" else conv[:1]
        prompt, _ = tok.encode_chat(turns, add_generation_prompt=True)
        if i not in done and len(prompt) <= max_prompt:
            todo.append((i, prompt, random.Random(seed * 1_000_003 + i).random() < sampled))
    if todo:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        asked = sum(i < len(conversations) for i in done)
        bar = tqdm(total=len(todo) + asked, initial=asked, unit="reply", desc=desc)
        with open(path, "a", encoding="utf-8") as f:
            for j in range(0, len(todo), batch_size):
                batch = todo[j:j + batch_size]
                samplers = [Sampler(temperature, top_p, seed * 1_000_003 + i) if s else Sampler()
                            for i, _, s in batch]
                outs = generate_batch(model, [p for _, p, _ in batch], max_new_tokens, samplers, tok.stop_ids)
                for (i, prompt, s), reply in zip(batch, outs):
                    done[i] = {"index": i, "prompt": prompt, "reply": reply, "sampled": s}
                    f.write(json.dumps(done[i]) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
        bar.close()
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
    info: {"note", "generation_min"}.
    """
    path = args.sharegpt or sharegpt_path()
    source = [os.path.abspath(path), os.path.getsize(path), tok.template]
    conversations = list(read_sharegpt(path, limit=args.conversations))
    if len(conversations) <= args.holdout:
        raise ValueError(f"{len(conversations)} conversations read, {args.holdout} held out: nothing left "
                         "to train on; read more --conversations or lower --holdout")
    held_c, train_c = conversations[:args.holdout], conversations[args.holdout:]
    identity, t0 = model_identity(model), time.perf_counter()

    def replies(convs, name, tokens, **sampling):  # a file per setting; more conversations extend it
        settings = {"holdout": args.holdout, "tokens": tokens, "set": name, **sampling}
        key = reply_key(identity, json.dumps(source), settings)
        return make_replies(model, tok, convs, os.path.join(args.cache_dir, f"replies-{name}-{key}.jsonl"),
                            tokens, args.reply_batch, desc=f"{name} replies", **sampling)

    eval_len = min(EVAL_SEQ_LEN, model.args.max_seq_len)
    held = {"own": pack_windows(reply_pairs(replies(held_c, "held-out", HELD_REPLY_TOKENS), tok), eval_len,
                                max_windows=args.eval_windows),
            "sharegpt": encode_conversations(tok, held_c, eval_len, max_windows=args.eval_windows)}
    if args.data == "replies":
        own = replies(train_c[:args.replies], "train", args.reply_tokens, temperature=args.reply_temperature,
                      top_p=args.reply_top_p, sampled=args.sampled, seed=args.seed)
        train = pack_windows(reply_pairs(own, tok), args.seq_len)
        what = f"the base model's replies to {len(own)} of {min(args.replies, len(train_c))} training prompts"
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
    return train, held, {"note": note, "generation_min": generation_min}
