"""data.py: the streaming ShareGPT reader, conversation filtering, MT-Bench picking, token windows
and batches. No model needed; a character-level fake tokenizer stands in for the real one."""

import argparse
import itertools
import json
from collections import Counter

import pytest
import torch

import data


def record(i, *turns):
    return {"id": f"r{i}", "conversations": [{"from": f, "value": v} for f, v in turns]}


RECORDS = [record(i, ("human", f"question {i}"), ("gpt", f"answer {i}")) for i in range(5)]


def write_array(path, records):
    path.write_text(json.dumps(records, indent=2))
    return path


# ----------------------------------------------------------------------------------------------
# Streaming parser

def test_reads_well_formed_json_array(tmp_path):
    path = write_array(tmp_path / "ok.json", RECORDS)
    assert list(data.iter_records(str(path))) == RECORDS


def test_truncated_array_yields_complete_records_and_drops_the_tail(tmp_path):
    text = json.dumps(RECORDS, indent=2)
    cut = text.index("answer 3") + 3  # inside record 3's last string
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    assert list(data.iter_records(str(path))) == RECORDS[:3]


@pytest.mark.parametrize("chunk", [7, 64])
def test_records_spanning_chunk_boundaries(tmp_path, monkeypatch, chunk):
    # Tiny chunks force every record to be reassembled across several reads.
    monkeypatch.setattr(data, "CHUNK_CHARS", chunk)
    text = json.dumps(RECORDS, indent=2)
    path = tmp_path / "cut.json"
    for cut in range(len(text) - 40, len(text) + 1):  # cuts in every position of the last record
        path.write_text(text[:cut])
        got = list(data.iter_records(str(path)))
        assert got == RECORDS[:len(got)] and len(got) >= 4


def test_every_cut_position_with_escapes_and_multibyte_text(tmp_path, monkeypatch):
    # Cut the raw bytes anywhere (inside an escape, a \\u sequence, a multi-byte character):
    # exactly the records that end before the cut come out, and nothing raises.
    monkeypatch.setattr(data, "CHUNK_CHARS", 5)
    records = [record(0, ("human", 'say "hi"\\n\tthen \\u00e9'), ("gpt", "café 日本 ✓")),
               record(1, ("human", "x" * 30), ("gpt", "\u00e9\u65e5" + "\\" * 3)),
               record(2, ("human", "π"), ("gpt", "ok"))]
    raw = json.dumps(records, indent=1, ensure_ascii=False).encode()
    ascii_raw = json.dumps(records, indent=1).encode()  # \\uXXXX escapes instead of UTF-8
    path = tmp_path / "cut.json"
    for blob in (raw, ascii_raw):
        text = blob.decode()
        ends, pos = [], text.index("{")
        for _ in records:
            pos = json.JSONDecoder().raw_decode(text, text.index("{", pos))[1]
            ends.append(len(text[:pos].encode()))
        for cut in range(1, len(blob) + 1):
            path.write_bytes(blob[:cut])
            got = list(data.iter_records(str(path)))
            assert got == records[:sum(e <= cut for e in ends)], cut


def test_malformed_middle_fails_loudly(tmp_path):
    text = json.dumps(RECORDS, indent=2).replace('"question 1"', '"question 1" oops', 1)
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="malformed json"):
        list(data.iter_records(str(path)))


def test_reads_jsonl_and_drops_a_cut_last_line(tmp_path):
    lines = [json.dumps(r) for r in RECORDS]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert list(data.iter_records(str(path))) == RECORDS
    path.write_text("\n".join(lines)[:-5])
    assert list(data.iter_records(str(path))) == RECORDS[:4]


def test_read_sharegpt_limit_counts_kept_conversations(tmp_path):
    records = [record(9, ("gpt", "orphan reply"))] + RECORDS
    path = write_array(tmp_path / "ok.json", records)
    got = list(data.read_sharegpt(str(path), limit=2))
    assert [c[0]["content"] for c in got] == ["question 0", "question 1"]


# ----------------------------------------------------------------------------------------------
# Roles and filtering

def test_role_mapping():
    r = record(0, ("system", "be brief"), ("human", "hi"), ("chatgpt", "hello"),
               ("user", "bye"), ("bing", "ciao"))
    assert data.to_messages(r) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"}]


def test_unknown_speakers_are_dropped():
    r = record(0, ("human", "hi"), ("narrator", "meanwhile"), ("gpt", "hello"))
    assert data.to_messages(r) == [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("turns", [
    [],                                                  # empty
    [("system", "only a system prompt")],                # nothing after the system turn
    [("gpt", "a reply"), ("human", "a question")],       # starts with the assistant
    [("human", "a"), ("human", "b"), ("gpt", "c")],      # does not alternate
    [("human", "a"), ("gpt", "b"), ("gpt", "c")],        # does not alternate
    [("human", "a"), ("system", "b"), ("gpt", "c")],     # system turn in the middle
    [("human", "a"), ("gpt", "   ")],                    # blank turn
])
def test_malformed_conversations_are_skipped(turns):
    assert data.to_messages(record(0, *turns)) is None


def test_not_a_sharegpt_record_fails_loudly():
    with pytest.raises(ValueError, match="ShareGPT"):
        data.to_messages({"messages": []})


def test_real_sharegpt_file():
    path = data.sharegpt_path()
    assert sum(1 for _ in data.iter_records(path)) == 17671  # the shipped file holds 17,671 complete records
    kept = list(data.read_sharegpt(path))
    assert 11000 < len(kept) < 11500  # a third start with "gpt": continuation parts


def test_real_mtbench():
    questions = data.read_mtbench()
    assert len(questions) == 80
    assert Counter(q["category"] for q in questions) == {c: 10 for c in (
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")}
    assert all(len(q["turns"]) == 2 and all(isinstance(t, str) for t in q["turns"])
               for q in questions)
    picked = data.pick_mtbench(questions, 8)
    assert len({q["category"] for q in picked}) == 8
    assert picked == data.pick_mtbench(questions, 8)
    assert {q["question_id"] for q in data.pick_mtbench(questions, 80)} == \
        {q["question_id"] for q in questions}


def test_pick_mtbench_round_robin():
    qs = [{"question_id": i, "category": c, "turns": ["?"]} for i, c in enumerate("aaabbc")]
    assert [q["question_id"] for q in data.pick_mtbench(qs, 5)] == [0, 3, 5, 1, 4]
    with pytest.raises(ValueError):
        data.pick_mtbench(qs, 7)


# ----------------------------------------------------------------------------------------------
# Token windows

class CharTokenizer:
    """One token per character; '<' opens and '>' closes every turn; assistant text is masked."""

    def encode_chat(self, messages, add_generation_prompt=False, system=None):
        ids, mask = [], []
        for m in messages:
            text = "<" + m["content"] + ">"
            ids += [ord(ch) for ch in text]
            mask += [m["role"] == "assistant" and ch not in "<>" for ch in text]
        return ids, mask


    def decode(self, ids, skip_special=True):
        return "".join(chr(i) for i in ids)


def conv(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def decode(ids):
    return "".join(chr(i) for i in ids.tolist())


def test_windows_have_exact_length_and_correct_masks():
    convs = [conv("ab", "XYZ"), conv("cd", "UVW")]  # 9 characters each: "<ab><XYZ>"
    windows = data.encode_conversations(CharTokenizer(), convs, seq_len=4, min_assistant_tokens=0)
    assert all(ids.shape == (4,) and ids.dtype == torch.long and m.dtype == torch.bool
               for ids, m in windows)
    stream = "".join(decode(ids) for ids, _ in windows)
    assert stream == "<ab><XYZ><cd><UVW>"[:16]  # 18 characters: four windows, tail of 2 dropped
    for ids, m in windows:
        assert m.tolist() == [ch in "XYZUVW" for ch in decode(ids)]


def test_long_conversation_spans_windows_and_short_ones_pack():
    long, short = conv("q", "A" * 20), conv("r", "BB")  # 25 and 7 characters
    windows = data.encode_conversations(CharTokenizer(), [long, short, short], seq_len=10,
                                        min_assistant_tokens=0)
    texts = [decode(ids) for ids, _ in windows]
    assert texts == ["<q><AAAAAA", "AAAAAAAAAA", "AAAA><r><B"]  # 39 characters, tail of 9 dropped
    windows = data.encode_conversations(CharTokenizer(), [short] * 6, seq_len=14,
                                        min_assistant_tokens=0)
    assert [decode(ids) for ids, _ in windows] == ["<r><BB>" * 2] * 3  # two per window


def test_pack_windows_takes_any_sequences_and_refuses_mismatched_masks():
    pairs = [([1, 2, 3], [False, True, True]), ([4, 5], [True, False])]
    windows = data.pack_windows(pairs, seq_len=2, min_assistant_tokens=0)
    assert [w[0].tolist() for w in windows] == [[1, 2], [3, 4]]
    assert [w[1].tolist() for w in windows] == [[False, True], [True, True]]
    with pytest.raises(ValueError, match="different lengths"):
        data.pack_windows([([1, 2], [True])], seq_len=2)


def test_min_assistant_tokens_filter_and_max_windows():
    convs = [conv("u" * 8, "a" * 2), conv("u" * 2, "a" * 8)]  # masks 2 and 8 per 14-char window
    windows = data.encode_conversations(CharTokenizer(), convs, seq_len=14, min_assistant_tokens=3)
    assert [int(m.sum()) for _, m in windows] == [8]
    windows = data.encode_conversations(CharTokenizer(), convs * 5, seq_len=14,
                                        min_assistant_tokens=0, max_windows=3)
    assert len(windows) == 3


# ----------------------------------------------------------------------------------------------
# Batches

def make_sequences(n=10, T=6):
    return [(torch.full((T,), i), torch.arange(T) % 2 == i % 2) for i in range(n)]


def test_batches_shapes_and_epochs():
    seqs = make_sequences()
    stream = data.batches(seqs, batch_size=3, seed=0)
    first_epoch = [next(stream) for _ in range(3)]  # 10 // 3 = 3 batches an epoch
    assert all(ids.shape == (3, 6) and m.shape == (3, 6) for _, ids, m in first_epoch)
    seen = torch.cat([ids[:, 0] for _, ids, _ in first_epoch]).tolist()
    assert len(set(seen)) == 9  # no repeats within an epoch
    for idx, ids, m in first_epoch:  # indices and masks travel with their ids
        assert idx.tolist() == ids[:, 0].tolist()
        assert torch.equal(m, torch.stack([seqs[i][1] for i in idx.tolist()]))


def test_batches_deterministic_and_resumable():
    seqs = make_sequences()
    take = lambda it, n: [ids[:, 0].tolist() for _, ids, _ in itertools.islice(it, n)]
    reference = take(data.batches(seqs, 3, seed=7), 20)
    assert reference == take(data.batches(seqs, 3, seed=7), 20)
    assert reference != take(data.batches(seqs, 3, seed=8), 20)
    for s in (0, 1, 3, 7, 13):
        assert take(data.batches(seqs, 3, seed=7, start_step=s), 20 - s) == reference[s:]


def test_batch_size_larger_than_data_fails_loudly():
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(make_sequences(2), 3, seed=0))


# ----------------------------------------------------------------------------------------------
# CLI

def test_cli_prints_counts_sample_and_categories(tmp_path, monkeypatch, capsys):
    # Stand-ins for tokenizer.py and weights.py keep this fast and independent of the model.
    monkeypatch.setattr(data, "load_tokenizer", lambda path: CharTokenizer())
    monkeypatch.setattr(data, "default_model_path", lambda: "fake")
    path = write_array(tmp_path / "ok.json", [record(9, ("gpt", "orphan"))] + RECORDS)
    data.main(argparse.Namespace(sharegpt=str(path), mtbench=None, model=None, limit=None,
                                 sample_chars=100))
    out = capsys.readouterr().out
    assert "records read 6, kept 5, skipped 1" in out and "kept turns 10" in out
    assert "<question 0><answer 0>" in out
    assert "MT-Bench: 80 questions, 8 categories" in out
