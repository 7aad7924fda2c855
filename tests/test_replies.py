"""The model's own replies (replies.py): batched generation emits what plain decoding emits, the
reply cache is keyed, whole and resumable, and the held-out prompts never feed training."""

import json
import os

import pytest
import torch

import batching
import replies
import train
from conftest import tiny
from generate import Sampler, generate

STOP = 7


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, 96, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.9, 1.0), (0.8, 0.9)])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_continuous_batching_equals_one_at_a_time(temperature, top_p, rows, device):
    """Prompts of different lengths, each with its own seeded sampler; rows stop at the stop token or
    the budget at different steps, and the next prompts join in their place (rows < prompts) or the
    batch shrinks (rows >= prompts)."""
    model = tiny(0, device)
    prompts = prompts_of((3, 11, 5, 12, 1, 7, 2, 9, 4))
    seeds = range(5, 14)  # seeds with which some rows stop early, in every setting
    samplers = [Sampler(temperature, top_p, s) for s in seeds]
    ended = [i for i, _ in batching.generate_stream(model, prompts, 24, samplers, {STOP}, rows)]
    assert sorted(ended) == list(range(9))
    if rows == 3 and temperature:  # sampled replies end at different lengths
        assert ended != sorted(ended), "replies should end out of order, so that prompts join mid-batch"
    samplers = [Sampler(temperature, top_p, s) for s in seeds]
    outs = batching.generate_batch(model, prompts, 24, samplers, {STOP}, rows)
    refs = [generate(model, p, 24, Sampler(temperature, top_p, s), {STOP}).tokens for s, p in zip(seeds, prompts)]
    assert outs == refs
    assert len({len(o) for o in outs}) > 1, "rows should finish at different steps"


def test_batch_size_comes_from_the_pass_cost_curve():
    assert batching.pick_batch_size({1: 1.0, 2: 1.0, 4: 1.2, 8: 2.4}) == 4     # 8 rows buy nothing more
    assert batching.pick_batch_size({1: 1.0, 2: 1.9, 4: 3.9}) == 1             # no gain from batching
    costs = batching.pass_costs(tiny(), 20, sizes=(1, 2), reps=1)
    assert set(costs) == {1, 2} and all(s > 0 for s in costs.values())


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

    # interrupted after three replies, with a line half written: the rerun drops that line, makes
    # only what is missing, and ends with the same replies
    path2, calls, real = str(tmp_path / "r2.jsonl"), [], batching.generate_stream

    def interrupted(model, prompts, *a, **kw):
        calls.append(len(prompts))
        for n, reply in enumerate(real(model, prompts, *a, **kw)):
            if calls == [7] and n == 3:  # the first run, after three replies were written
                with open(path2, "a") as f:
                    f.write('{"index": 5, "prom')  # a line the interrupt cut
                raise KeyboardInterrupt
            yield reply
    monkeypatch.setattr(batching, "generate_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replies.make_replies(model, Tok(), convs, path2, 10, batch_size=3, sampled=0.5, seed=4)
    assert len(replies.read_done(path2)) == 3
    calls.clear()
    assert replies.make_replies(model, Tok(), convs, path2, 10, batch_size=3, sampled=0.5, seed=4) == made
    assert calls == [4]

    # asking for fewer gives the first ones; asking for more makes only the new ones
    path3 = str(tmp_path / "r3.jsonl")
    assert replies.make_replies(model, Tok(), convs[:4], path3, 10, batch_size=3, sampled=0.5, seed=4) == made[:4]
    calls.clear()
    assert replies.make_replies(model, Tok(), convs, path3, 10, batch_size=3, sampled=0.5, seed=4) == made
    assert calls == [3]
    monkeypatch.setattr(batching, "generate_stream", None)  # all there: nothing generated
    assert replies.make_replies(model, Tok(), convs[:5], path3, 10) == made[:5]


def test_second_turns_follow_the_first_exchange(tmp_path):
    tok = Tok()
    conv = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"},
            {"role": "user", "content": "ef"}, {"role": "assistant", "content": "gh"}]
    assert replies.prompt_of(conv, 1, tok) == tok.encode_chat(conv[:1])[0]
    assert replies.prompt_of(conv, 2, tok) == tok.encode_chat(conv[:3])[0]
    assert replies.prompt_of(conv[:2], 2, tok) is None
    model, path = tiny(), str(tmp_path / "turn2.jsonl")
    made = replies.make_replies(model, tok, [conv, conv[:2]], path, 6, batch_size=2, turn=2)
    assert [r["index"] for r in made] == [0] and made[0]["prompt"] == tok.encode_chat(conv[:3])[0]
    assert made[0]["reply"] == generate(model, made[0]["prompt"], 6, Sampler(), {0}).tokens


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
