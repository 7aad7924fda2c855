"""The model's own replies (replies.py): batched generation emits what plain decoding emits, the
reply cache is keyed, whole and resumable, and the held-out prompts never feed training."""

import json
import os

import pytest
import torch

import replies
import train
from conftest import tiny
from generate import Sampler, generate

STOP = 7


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, 96, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.9, 1.0), (0.8, 0.9)])
def test_batched_generation_equals_one_at_a_time(temperature, top_p, device):
    """Prompts of different lengths in one batch, each with its own seeded sampler; rows stop at the
    stop token or the budget, and leave the batch, at different steps."""
    model = tiny(0, device)
    prompts = prompts_of((3, 11, 5, 12, 1))
    seeds = range(5, 10)  # seeds with which some rows stop early, in every setting
    outs = replies.generate_batch(model, prompts, 24, [Sampler(temperature, top_p, s) for s in seeds], {STOP})
    refs = [generate(model, p, 24, Sampler(temperature, top_p, s), {STOP}).tokens for s, p in zip(seeds, prompts)]
    assert outs == refs
    assert len({len(o) for o in outs}) > 1, "rows should finish at different steps"


class Tok:
    """Token ids 1..95 from characters, 0 the stop token; a prompt is its characters plus a 1."""
    template, stop_ids = "fake", {0}

    def encode_chat(self, messages, add_generation_prompt=True, system=None):
        ids, mask = [], []
        for m in messages:
            ids += [2 + ord(c) % 90 for c in m["content"]]
            mask += [m["role"] == "assistant"] * len(m["content"])
        return ids + [1] * add_generation_prompt, mask + [False] * add_generation_prompt

    def encode(self, text, bos=None):
        return [2 + ord(c) % 90 for c in text]

    def decode(self, ids):
        return "".join(chr(31 + i) for i in ids if i)


def conversations(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = lambda k: "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (k,), generator=g))
    return [[{"role": "user", "content": text(4 + i % 5)}, {"role": "assistant", "content": text(30)}]
            for i in range(n)]


def test_reply_cache_resumes_after_an_interrupt_and_grows(tmp_path, monkeypatch):
    model, convs, path = tiny(), conversations(7), str(tmp_path / "r.jsonl")
    made = replies.make_replies(model, Tok(), convs, path, 10, batch_size=3, sampled=0.5, seed=4)
    assert [r["index"] for r in made] == list(range(7)) and len(replies.read_done(path)) == 7
    assert any(r["sampled"] for r in made) and not all(r["sampled"] for r in made)
    for r in made:  # every reply is what plain decoding of its prompt gives, with its own sampler
        sampler = Sampler(0.0) if not r["sampled"] else Sampler(0.7, 0.9, 4 * 1_000_003 + r["index"])
        assert r["reply"] == generate(model, r["prompt"], 10, sampler, {0}).tokens

    # interrupted in the second batch, with a line half written: the rerun drops that line, makes
    # only what is missing, and ends with the same replies
    path2, calls, real = str(tmp_path / "r2.jsonl"), [], replies.generate_batch

    def interrupted(model, prompts, *a, **kw):
        calls.append(len(prompts))
        if calls == [3, 3]:  # the first run's second batch
            with open(path2, "a") as f:
                f.write('{"index": 5, "prom')  # a line the interrupt cut
            raise KeyboardInterrupt
        return real(model, prompts, *a, **kw)
    monkeypatch.setattr(replies, "generate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replies.make_replies(model, Tok(), convs, path2, 10, batch_size=3, sampled=0.5, seed=4)
    assert len(replies.read_done(path2)) == 3
    calls.clear()
    assert replies.make_replies(model, Tok(), convs, path2, 10, batch_size=3, sampled=0.5, seed=4) == made
    assert calls == [3, 1]

    # asking for fewer gives the first ones; asking for more makes only the new ones
    path3 = str(tmp_path / "r3.jsonl")
    assert replies.make_replies(model, Tok(), convs[:4], path3, 10, batch_size=3, sampled=0.5, seed=4) == made[:4]
    calls.clear()
    assert replies.make_replies(model, Tok(), convs, path3, 10, batch_size=3, sampled=0.5, seed=4) == made
    assert calls == [3]
    monkeypatch.setattr(replies, "generate_batch", None)  # all there: nothing generated
    assert replies.make_replies(model, Tok(), convs[:5], path3, 10) == made[:5]


def test_reply_key_names_everything_that_made_the_replies():
    base = dict(holdout=100, tokens=128, temperature=0.7, top_p=0.9, sampled=0.0, seed=0)
    key = replies.reply_key({"m": 1}, "data", base)
    assert key == replies.reply_key({"m": 1}, "data", dict(base))
    for change in ({"holdout": 50}, {"tokens": 64}, {"sampled": 0.5}, {"seed": 1}, {"top_p": 1.0}):
        assert replies.reply_key({"m": 1}, "data", {**base, **change}) != key
    assert replies.reply_key({"m": 2}, "data", base) != key and replies.reply_key({"m": 1}, "other", base) != key


def test_reply_pairs_mark_the_reply_and_its_end_marker():
    pairs = replies.reply_pairs([{"prompt": [5, 6], "reply": [8, 9, 0]}, {"prompt": [5], "reply": [8, 9]}], Tok())
    assert pairs[0] == ([5, 6, 8, 9, 0] + Tok().encode("\n"), [False, False, True, True, True, False])
    assert pairs[1] == ([5, 8, 9], [False, True, True])  # cut by the budget: no end marker, no newline


def test_held_out_prompts_never_feed_training(tmp_path, monkeypatch):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"question {i} " + "xy" * (i % 4)},
                                                 {"from": "gpt", "value": "answer " * 12}]} for i in range(30)]
    (tmp_path / "sharegpt.json").write_text(json.dumps(records))
    args = train.parse_args(["--sharegpt", str(tmp_path / "sharegpt.json"), "--conversations", "30",
                             "--holdout", "6", "--replies", "20", "--reply-tokens", "24", "--seq-len", "32",
                             "--eval-windows", "3", "--cache-dir", str(tmp_path / "cache")])
    monkeypatch.setattr(replies, "EVAL_SEQ_LEN", 32)  # what 6 short held-out conversations can fill
    model = tiny()
    train_w, held, info = replies.load_windows(args, model, Tok())
    assert set(held) == {"own", "sharegpt"} and all(len(w) >= 1 for w in held.values()) and train_w
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 2 and all(f.endswith(".jsonl") for f in files)
    made = {f: replies.read_done(str(tmp_path / "cache" / f)) for f in files}
    held_file = next(f for f in files if "held-out" in f)
    train_file = next(f for f in files if "train" in f)
    held_prompts = {tuple(r["prompt"]) for r in made[held_file].values()}
    train_prompts = {tuple(r["prompt"]) for r in made[train_file].values()}
    assert len(held_prompts) == 6 and len(train_prompts) == 20 and not held_prompts & train_prompts
    again = replies.load_windows(args, model, Tok())  # cached: the same windows again
    assert all(torch.equal(a[0], b[0]) for a, b in zip(train_w, again[0]))
