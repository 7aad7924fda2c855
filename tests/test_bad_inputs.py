"""Every entry point meets a bad input with one `error:` line and exit status 1, never a traceback,
before any long work; the table of docs/ERRORS.md lists each case with that line (this file checks
that it does). The commands run in-process on a tiny random LLaMA saved to a temporary directory
(test_checkpoint.model_dir); data.py, SIGTERM and a double Ctrl-C run as real processes.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
import decode
import generate
import replies
from checkpoint import save_checkpoint
from conftest import mapped
from test_checkpoint import model_dir  # noqa: F401  (the fixture)
from test_cli import fake_sharegpt, read_until, script
from tools import analysis, gpu_check, hf_baseline, results
from transfer import HiddenTransfer
from weights import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "docs", "ERRORS.md")) as f:
    ERRORS_MD = f.read()


def refused(main, argv, capsys) -> str:
    """main(argv) stops with one `error:` line and exit status 1: sys.exit(line), or the line printed
    to stderr and sys.exit(1). Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    code, err = e.value.code, capsys.readouterr().err.strip().splitlines()
    line = code if isinstance(code, str) else (err[-1] if code == 1 and err else repr(code))
    assert line.startswith("error: ") and "\n" not in line, line
    assert not any(x.startswith("error: ") for x in err[:-1] if isinstance(code, int)), err
    return line


def stored(folder, model, name, **fields) -> str:
    path = str(folder / f"{name}.pt")
    save_checkpoint(path, HiddenTransfer(model.args.dim, 3, 2), model, fields)
    return path


# (entry point, its flags ({dir}: the tiny model's directory, {tmp}: a scratch directory), the words of
# the one line it must print)
CASES = {
    "empty prompt, --template raw": (generate.main, ["--template", "raw", "--prompt", ""],
                                     "the prompt has no tokens"),
    "non-UTF-8 --prompt": (generate.main, ["--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text"),
    "config.json a list": (generate.main, ["--model", "{tmp}/listcfg"], "holds a JSON list, not an object"),
    "--tree rank beyond the vocabulary": (decode.main, ["--untrained", "--tree", "0;400"],
                                          "the tree reads draft rank 400, but the model's vocabulary has only 320"),
    "stored plan rank beyond the vocabulary": (decode.main, ["--drafter-checkpoint", "{tmp}/rank.pt"],
                                               "stores a bad plan: the tree reads draft rank 500"),
    "stored plan float node": (decode.main, ["--drafter-checkpoint", "{tmp}/float.pt"],
                               "must be integers"),
    "bench.py --out a directory": (bench.main, ["--untrained", "--out", "{tmp}"], "is a directory: name a file"),
    "bench.py --out empty": (bench.main, ["--untrained", "--out", ""], "--out is empty"),
    "bench.py --out not .json": (bench.main, ["--untrained", "--out", "{tmp}/r.txt"],
                                 "the file is written as JSON, so its name must end in .json"),
    "bench.py --out under a file": (bench.main, ["--untrained", "--out", "{tmp}/afile/r.json"],
                                    "is a file, not a directory"),
    "bench.py --tree rank beyond the vocabulary": (bench.main, ["--untrained", "--tree", "0;999", "--out",
                                                                "{tmp}/r.json"], "reads draft rank 999"),
    "results.py malformed JSON": (results.main, ["--train", "{tmp}/bad.json", "--out", "{tmp}/R.md"],
                                  "is not a readable JSON file"),
    "results.py a JSON list": (results.main, ["--bench", "{tmp}/list.json", "--out", "{tmp}/R.md"],
                               "holds a JSON list, not the object its command saves"),
    "results.py an object of another shape": (results.main, ["--bench", "{tmp}/obj.json", "--out", "{tmp}/R.md"],
                                              "lacks what its section needs"),
    "analysis.py --sweep-layers 99": (analysis.main, ["--sweep-layers", "99"],
                                      "--sweep-layers 99: a transfer layer must be from 1 to 2"),
    "analysis.py --select-tree, a list summary": (analysis.main, ["--select-tree", "--drafter-checkpoint",
                                                                  "{tmp}/sel.pt"], "not train.py's summary"),
    "gpu_check.py --device nonsense": (gpu_check.main, ["{tmp}/gc", "--device", "nonsense"],
                                       "--device 'nonsense' is not a device"),
    "gpu_check.py, its folder a file": (gpu_check.main, ["{tmp}/afile", "--device", "cpu"],
                                        "is a file: name a folder for the results"),
    "results.py --out a directory": (results.main, ["--out", "{tmp}"], "is a directory: name a file"),
    "hf_baseline.py --out not .json": (hf_baseline.main, ["--out", "{tmp}/h.txt", "--device", "cpu"],
                                       "the file is written as JSON, so its name must end in .json"),
}
TAKES_MODEL = {generate.main, decode.main, bench.main, analysis.main}


@pytest.fixture
def scratch(tmp_path, model_dir):  # noqa: F811
    model = load_model(model_dir)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "listcfg").mkdir()
    for f in os.listdir(model_dir):
        (tmp_path / "listcfg" / f).write_bytes((model_dir / f).read_bytes())
    (tmp_path / "listcfg" / "config.json").write_text("[1, 2]")
    stored(tmp_path, model, "rank", tree=[[0], [500]])
    stored(tmp_path, model, "float", tree=[[0], [1]], pseudo_nodes=[0, 1.5], pseudo_depth=1)
    stored(tmp_path, model, "sel", accept_rates=[[0.5] * 10] * 3)
    (tmp_path / "sel.json").write_text("[1]")
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    return tmp_path


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line(case, scratch, model_dir, monkeypatch, capsys):  # noqa: F811
    main, flags, words = CASES[case]
    monkeypatch.chdir(scratch)  # no checkpoints/ here
    monkeypatch.setattr(bench, "run_bench", lambda *a, **kw: pytest.fail("the benchmark ran first"))
    flags = [f.replace("{tmp}", str(scratch)) for f in flags]
    if main in TAKES_MODEL:  # first: a case's own flag comes later and wins
        flags = ["--model", str(model_dir), "--template", "chatml", "--device", "cpu", "--threads", "1", *flags]
    before = (scratch / "sel.pt").read_bytes()
    line = refused(main, flags, capsys)
    assert words in line, (case, line)
    assert words in ERRORS_MD, f"docs/ERRORS.md does not list {case!r}: {words!r}"
    assert (scratch / "sel.pt").read_bytes() == before, "a refused command rewrote a checkpoint"


@pytest.mark.parametrize("line, why", [("[]", "a JSON list, not an object"), ("{}", "no index, prompt, reply"),
                                       ('{"index": "a", "prompt": [], "reply": [], "sampled": false}',
                                        "index 'a' is not a non-negative integer"),
                                       ("garbage", "a JSON str, not an object")])
def test_a_malformed_reply_cache_line_names_the_file_and_line(line, why, tmp_path):
    path = tmp_path / "replies.jsonl"
    good = json.dumps({"index": 0, "prompt": [1], "reply": [2], "sampled": False})
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(ValueError) as e:
        replies.read_done(str(path))
    assert f"{path}, line 2: not a reply record ({why}" in str(e.value) and "\n" not in str(e.value)
    assert "not a reply record" in ERRORS_MD


def test_a_tiny_temperature_samples_what_greedy_decoding_emits(model_dir, capsys):  # noqa: F811
    flags = ["--model", str(model_dir), "--template", "chatml", "--device", "cpu", "--max-new-tokens", "12"]
    greedy = generate.main(flags)
    assert generate.main(flags + ["--temperature", "1e-40"]).tokens == greedy.tokens


def test_data_py_runs_and_refuses_a_missing_file_in_one_line(tmp_path):
    sharegpt, mtbench = fake_sharegpt(tmp_path / "s.json", n=3), tmp_path / "q.jsonl"
    mtbench.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["Hi."]}) + "\n")
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *a], capture_output=True,
                                    text=True, timeout=120, cwd=ROOT)
    ok = run("--sharegpt", sharegpt, "--mtbench", str(mtbench), "--limit", "2")
    assert ok.returncode == 0 and "MT-Bench: 1 questions" in ok.stdout, ok.stderr
    bad = run("--sharegpt", str(tmp_path / "none.json"))
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: ") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def training(tmp_path, model_dir):  # noqa: F811
    out = tmp_path / "t.pt"
    p = script("train.py", "--model", str(model_dir), "--template", "chatml", "--data", "sharegpt", "--sharegpt",
               fake_sharegpt(tmp_path / "s.json", reply=400), "--conversations", "30", "--holdout", "1",
               "--eval-windows", "2", "--seq-len", "32", "--positions-per-seq", "4", "--frozen-dtype", "float32",
               "--transfer-layer", "2", "--steps", "100000", "--eval-every", "0", "--tree-sizes", "",
               "--drafter-checkpoint", str(out), "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
               "--device", "cpu")
    return p, out, read_until(p, r"training transfer.*\| *[1-9]\d*/100000")  # a step done


@pytest.mark.parametrize("signals, code, said", [((signal.SIGTERM,), 143, "terminated (SIGTERM)"),
                                                 ((signal.SIGINT, signal.SIGINT), 130, "interrupted (Ctrl-C)")],
                         ids=["sigterm", "ctrl-c twice"])
def test_sigterm_and_a_double_ctrl_c_save_and_exit_in_one_line(signals, code, said, tmp_path, model_dir):  # noqa: F811
    p, out, seen = training(tmp_path, model_dir)
    for s in signals:
        p.send_signal(s)
    stdout, err = p.communicate(timeout=60)
    assert p.returncode == code and "Traceback" not in seen + err, seen + err
    assert err.strip().splitlines()[-1] == said and "to continue, add --resume" in stdout
    assert torch.load(out, weights_only=True)["step"] >= 1


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see the import")
def test_ctrl_c_while_python_imports_torch_is_one_line():
    """Ctrl-C as soon as torch's library is mapped: Python is still importing torch (a second or
    more), long before any script code runs (startup.py, imported first, answers it)."""
    p = script("generate.py", "--max-new-tokens", "2", "--threads", "1", "--device", "cpu")
    while p.poll() is None and not mapped(p, "libtorch"):
        time.sleep(0.001)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["interrupted (Ctrl-C)"]
