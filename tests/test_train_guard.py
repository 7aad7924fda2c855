"""train.py never saves a diverged drafter, never loses its history on --resume, and refuses a bad
flag or checkpoint before any long work (the replies, the training), in one line.
"""

import math
import os

import pytest
import torch

import train
from checkpoint import open_checkpoint, save_checkpoint
from conftest import FakeTokenizer, fake_windows, tiny
from test_train import args_for, interrupt_after
from transfer import HiddenTransfer


def test_a_diverging_run_is_refused_and_keeps_the_last_good_checkpoint(tmp_path):
    model, data, held = tiny(), fake_windows(4), fake_windows(1, seed=1)
    args = args_for(tmp_path, "--steps", "2", "--tree-sizes", "")
    train.run(args, model, data, held)
    good = open_checkpoint(args.drafter_checkpoint)["checksum"]
    for lr in ("1e30", "1e6"):  # weights of ~1e30 (inf in float16); 1e6 beyond float16's range too
        with pytest.raises(ValueError, match="training diverged at step 1: a weight is .*lower --lr") as e:
            train.run(args_for(tmp_path, "--steps", "3", "--lr", lr, "--tree-sizes", ""), model, data, held)
        assert "\n" not in str(e.value)
        assert open_checkpoint(args.drafter_checkpoint)["checksum"] == good, "the last good checkpoint is kept"


def test_a_non_finite_loss_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "train_step", lambda *a, **kw: math.nan)
    with pytest.raises(ValueError, match="training diverged at step 1: the loss is nan"):
        train.run(args_for(tmp_path, "--steps", "3", "--tree-sizes", ""), tiny(), fake_windows(4),
                  fake_windows(1, seed=1))
    assert not os.path.exists(tmp_path / "drafter.pt")


def test_resume_keeps_the_evaluations_and_the_training_time(tmp_path, monkeypatch):
    model, data, held = tiny(), fake_windows(8), fake_windows(2, seed=1)
    flags = ["--steps", "6", "--eval-every", "2", "--tree-sizes", ""]
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train.run(args_for(tmp_path, *flags), model, data, held)
    saved = open_checkpoint(str(tmp_path / "drafter.pt"))
    assert [e["step"] for e in saved["evals"]] == [2] and saved["train_s"] > 0
    out = train.run(args_for(tmp_path, *flags, "--resume"), model, data, held)
    assert [e["step"] for e in out["evals"]] == [2, 4, 6]
    assert out["evals"][0] == saved["evals"][0] and out["train_s"] > saved["train_s"]


def test_resume_refuses_a_damaged_or_incomplete_checkpoint(tmp_path):
    model, data, held = tiny(), fake_windows(4), fake_windows(1, seed=1)
    args = args_for(tmp_path, "--steps", "2", "--tree-sizes", "")
    train.run(args, model, data, held)
    ckpt = torch.load(args.drafter_checkpoint, weights_only=True)
    resume = args_for(tmp_path, "--steps", "4", "--tree-sizes", "", "--resume")
    cases = {"edited": ({**ckpt, "step": "two"}, "damaged or was edited"),
             "no optimizer": ({k: v for k, v in ckpt.items() if k not in ("optimizer", "checksum")},
                              "has no optimizer"),
             "bad history": ({**{k: v for k, v in ckpt.items() if k != "checksum"}, "history": {"a": 1}},
                             "damaged training state")}
    for case, (edited, words) in cases.items():
        torch.save(edited, args.drafter_checkpoint)
        with pytest.raises(SystemExit, match=words) as e:
            train.run(resume, model, data, held)
        assert "\n" not in str(e.value.code), case


@pytest.fixture
def no_long_work(monkeypatch):
    """train.main with a tiny model, where making the replies is a test failure: what main must
    refuse, it refuses before them."""
    monkeypatch.setattr(train, "load", lambda args: (tiny(), FakeTokenizer()))

    def replies(*a):
        raise AssertionError("the replies were made before the bad flag was refused")
    monkeypatch.setattr(train, "load_windows", replies)


@pytest.mark.parametrize("flags, words", [
    (["--teacher-topk", "100000"], "--teacher-topk 100000 is more than the model's vocabulary of 96"),
    (["--top-r", "100000"], "--top-r 100000 is more than the model's vocabulary of 96"),
    (["--reply-tokens", "100000000"], "--reply-tokens 100000000 leaves no room"),
    (["--resume"], "--resume: no checkpoint at"),
    (["--drafter-checkpoint", "{tmp}/file/sub/d.pt"], "is a file, not a directory"),
    (["--drafter-checkpoint", "{tmp}"], "is a directory"),
    (["--drafter-checkpoint", ""], "--drafter-checkpoint is empty"),
    (["--drafter-checkpoint", "{tmp}/d.json"], "a checkpoint is not JSON"),
])
def test_bad_flags_are_refused_before_the_replies(flags, words, tmp_path, no_long_work):
    (tmp_path / "file").write_text("x")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    if "--drafter-checkpoint" not in flags:
        flags += ["--drafter-checkpoint", str(tmp_path / "none.pt")]
    with pytest.raises(SystemExit) as e:
        train.main(["--seq-len", "24", "--transfer-layer", "2", "--device", "cpu", *flags])
    assert words in str(e.value.code) and str(e.value.code).startswith("error: ")


def test_resume_of_another_run_is_refused_before_the_replies(tmp_path, no_long_work):
    path = str(tmp_path / "d.pt")
    save_checkpoint(path, HiddenTransfer(64, 2, 2), tiny(), {})  # a finished-looking file, no training state
    with pytest.raises(SystemExit, match="--resume: .* has no step, optimizer, history, train_args"):
        train.main(["--seq-len", "24", "--transfer-layer", "2", "--device", "cpu", "--resume",
                    "--drafter-checkpoint", path])
