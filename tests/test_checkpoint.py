"""checkpoint.py: every bad drafter checkpoint is refused in one line that names the file, by the
loader and on the real command line (exit 1, one `error:` line, no traceback); an explicit path is
binding, and only the missing default path falls back to an untrained drafter, with a note.

The command-line tests run decode.py on a tiny random LLaMA saved to a temporary directory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from checkpoint import (CheckpointError, build_drafter, load_drafter, model_identity, open_checkpoint,
                        save_atomic, save_checkpoint)
from conftest import tiny
from medusa import Medusa
from transfer import HiddenTransfer
from weights import load_model

REPO = Path(__file__).resolve().parent.parent


class RunsCode:
    """A pickle that would create a file when loaded: weights_only must refuse it unopened."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


class RunsShell:
    """A pickle of os.system: torch refuses its module as blocked ("unsupported GLOBAL ... blocked")."""

    def __reduce__(self):
        return os.system, ("true",)


def flipped(data: bytes, tensor: torch.Tensor, n: int = 64) -> bytes:
    """data with n bytes inside `tensor`'s stored bytes inverted: a file that still loads."""
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.index(raw) + len(raw) // 2
    return data[:at] + bytes(b ^ 0xFF for b in data[at:at + n]) + data[at + n:]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random LLaMA that --model can load: config.json, model.safetensors, tokenizer.json."""
    from test_model import random_hf_model
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["What is the capital of France? Answer in one sentence."], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    random_hf_model(vocab_size=320).save_pretrained(folder)
    return folder


def bad_checkpoints(folder: Path, model) -> dict:
    """{case: (path, words its one-line error must hold)}: every way a file can fail the loader."""
    good = folder / "good.pt"
    save_checkpoint(str(good), HiddenTransfer(model.args.dim, 3, 2), model, {})
    ckpt = torch.load(good, weights_only=True)
    cases = {"missing": (folder / "nowhere.pt", "no drafter checkpoint at"),
             "directory": (folder, "is a directory")}

    def write(name, data, words):
        path = folder / f"{name}.pt"
        path.write_bytes(data) if isinstance(data, bytes) else torch.save(data, path)
        cases[name] = (path, words)

    write("random bytes", os.urandom(4000), "not a drafter checkpoint")
    write("empty", b"", "is empty")
    write("truncated", good.read_bytes()[:len(good.read_bytes()) // 2], "truncated")
    write("unsafe pickle", {"kind": "transfer", "x": RunsCode(str(folder / "ran"))}, "not safe to load")
    write("blocked module", {"kind": "transfer", "x": RunsShell()}, "not safe to load")
    write("flipped bytes", flipped(good.read_bytes(), ckpt["state_dict"]["proj.weight"]), "damaged or was edited")
    write("edited weights", {**ckpt, "state_dict": {k: v + 1 for k, v in ckpt["state_dict"].items()}},
          "damaged or was edited")
    write("float node", {**ckpt, "tree": [[0], [1]], "pseudo_nodes": [0, 1.5], "pseudo_depth": 1},
          "must be integers")
    write("rank beyond the vocabulary", {**ckpt, "tree": [[0], [96]]}, "reads draft rank 96, but the model's "
          "vocabulary has only 96 tokens")
    write("not a dict", [1, 2, 3], "has no kind, config, identity, state_dict")
    write("no identity", {k: v for k, v in ckpt.items() if k != "identity"}, "has no identity")
    write("unknown kind", {**ckpt, "kind": "eagle"}, "unknown kind 'eagle'")
    save_checkpoint(str(folder / "other.pt"), HiddenTransfer(64, 3, 2), tiny(7), {})
    cases["another model"] = (folder / "other.pt", "different base model")
    write("wrong shapes", {**ckpt, "state_dict": {"proj.weight": torch.zeros(5, 5), "proj.bias": torch.zeros(5)}},
          "size mismatch")
    write("missing tensor", {**ckpt, "state_dict": {"proj.weight": ckpt["state_dict"]["proj.weight"]}},
          "Missing key")
    write("layer too deep", {**ckpt, "config": {**ckpt["config"], "layer": 9}}, "transfer layer 9")
    write("bad tree", {**ckpt, "tree": [[0, 0]]}, "bad tree")
    return cases


def test_every_bad_checkpoint_is_one_checkpoint_error(tmp_path):
    model = tiny()
    for case, (path, words) in bad_checkpoints(tmp_path, model).items():
        with pytest.raises(CheckpointError) as e:
            load_drafter(model, str(path))
        message = str(e.value)
        assert words in message and str(path) in message and "\n" not in message, (case, message)
    assert not (tmp_path / "ran").exists(), "the unsafe pickle ran code"


def test_wrong_kind_and_round_trip(tmp_path):
    model, path = tiny(), str(tmp_path / "t.pt")
    save_checkpoint(path, HiddenTransfer(64, 3, 2), model, {"tree": [[0], [1]]})
    with pytest.raises(CheckpointError, match="holds a transfer drafter, not medusa"):
        open_checkpoint(path, "medusa")
    drafter, plan, note = load_drafter(model, path, "transfer")
    assert isinstance(drafter, HiddenTransfer) and plan.tree.paths == [(), (0,), (1,)] and path in note
    assert plan.nodes == (0, 1, 2) and plan.depth == 1  # a stored tree alone: pseudo tokens sized to it
    save_checkpoint(path, HiddenTransfer(64, 3, 2), model, {"tree": [[0], [1]], "pseudo_nodes": [0],
                                                           "pseudo_depth": 2})
    assert load_drafter(model, path)[1].text() == "0;1 [nodes 0 x 2]"
    save_checkpoint(path, HiddenTransfer(64, 3, 2), model, {"tree": [[0]], "pseudo_nodes": [1],
                                                           "pseudo_depth": 2})
    with pytest.raises(CheckpointError, match="stores a bad plan"):
        load_drafter(model, path)
    assert isinstance(build_drafter(open_checkpoint(path), path, model), HiddenTransfer)


def test_checkpoints_saved_before_the_kind_names_still_load(tmp_path):
    model, path = tiny(), tmp_path / "old.pt"
    save_checkpoint(str(path), Medusa(64, 3), model, {})
    torch.save({**torch.load(path, weights_only=True), "kind": "Medusa"}, path)  # the class name, as once saved
    assert isinstance(load_drafter(model, str(path), "medusa")[0], Medusa)


def test_only_the_default_path_falls_back(tmp_path, monkeypatch):
    model = tiny()
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    drafter, plan, note = load_drafter(model)
    assert isinstance(drafter, HiddenTransfer) and "UNTRAINED" in note and "checkpoints/transfer.pt" in note
    drafter, _, note = load_drafter(model, kind="medusa")
    assert isinstance(drafter, Medusa) and "python train.py --drafter medusa" in note
    with pytest.raises(CheckpointError, match="no drafter checkpoint at checkpoints/transfr.pt"):
        load_drafter(model, "checkpoints/transfr.pt")
    save_checkpoint("checkpoints/transfer.pt", HiddenTransfer(64, 3, 2), model, {})
    assert "UNTRAINED" not in load_drafter(model)[2]


def test_save_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "sub" / "r.json")
    save_atomic(path, {"a": 1})
    assert json.loads(Path(path).read_text()) == {"a": 1}

    def broken_dump(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(path, {"a": 2})
    assert json.loads(Path(path).read_text()) == {"a": 1}, "the old file must survive an interrupted write"
    assert os.listdir(tmp_path / "sub") == ["r.json"], "no temporary file is left behind"


def test_two_writers_of_one_path_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Another process saving the same path while this one writes (simulated: the other save runs
    inside this one's write). With one shared temporary name, the inner save renames the outer's
    half-written file into place and the outer's rename then fails."""
    path, real_dump, nested = str(tmp_path / "r.json"), json.dump, []

    def dump(obj, f, **kw):
        if not nested:
            nested.append(1)
            save_atomic(path, {"writer": "other"})
        real_dump(obj, f, **kw)
    monkeypatch.setattr(json, "dump", dump)
    save_atomic(path, {"writer": "this"})
    assert json.loads(Path(path).read_text()) == {"writer": "this"} and os.listdir(tmp_path) == ["r.json"]


# ----------------------------------------------------------------------------- the command line

def decode(model_dir, cwd, *flags):
    return subprocess.run([sys.executable, str(REPO / "decode.py"), "--model", str(model_dir), "--template",
                           "chatml", "--max-new-tokens", "2", "--threads", "1", *flags],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


# one per stage of the loader (path, unpickling, safety, identity, kind, shapes; the in-process test
# above covers every case): a subprocess costs seconds
CLI_CASES = ("missing", "random bytes", "unsafe pickle", "another model", "wrong kind", "wrong shapes")


def test_bad_checkpoints_on_the_command_line(model_dir, tmp_path):
    model = load_model(model_dir)
    cases = bad_checkpoints(tmp_path, model)
    cases["wrong kind"] = (tmp_path / "good.pt", "holds a transfer drafter, not medusa")
    for case in CLI_CASES:
        path, words = cases[case]
        run = decode(model_dir, tmp_path, "--drafter-checkpoint", str(path),
                     *(["--drafter", "medusa"] if case == "wrong kind" else []))
        err = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(err) == 1 and err[0].startswith("error: "), (case, run.stderr)
        assert words in err[0] and "Traceback" not in run.stderr, (case, err)
    assert not (tmp_path / "ran").exists(), "the unsafe pickle ran code"
    assert model_identity(model) == model_identity(load_model(model_dir))  # the identity is stable


def test_mistyped_path_fails_but_a_missing_default_falls_back(model_dir, tmp_path):
    run = decode(model_dir, tmp_path, "--drafter-checkpoint", "checkpoints/transfr.pt")
    assert run.returncode == 1 and run.stderr.strip() == (
        "error: no drafter checkpoint at checkpoints/transfr.pt: make one with train.py "
        "(--drafter-checkpoint names where it saves)")
    run = decode(model_dir, tmp_path, "--check")  # no checkpoints/ in tmp_path: the default is missing
    assert run.returncode == 0, run.stderr
    assert "no checkpoint at checkpoints/transfer.pt yet: using an UNTRAINED" in run.stderr
    assert "Traceback" not in run.stderr and "tokens identical to plain decoding: yes" in run.stdout
