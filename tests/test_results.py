"""tools/results.py writes docs/RESULTS.md from the JSON files the measuring commands save: each
section from its file, a missing file named with the command that makes it, figures when matplotlib
is there and one line saying so when it is not."""

import json

import pytest

import bench
from conftest import FakeTokenizer, perturb, tiny
from tools import results, roofline
from tools.latency import latency_curve
from transfer import HiddenTransfer
from tree import chain


@pytest.fixture
def measured(tmp_path):
    """Small but real inputs: a bench run and a latency curve on a tiny model, hand-made others."""
    model = tiny()
    drafter = perturb(HiddenTransfer(64, 3, 2))
    b = bench.run_bench(model, FakeTokenizer(), {"plain": None, "transfer": (drafter, chain(3))},
                        [("writing", ["Write a poem."]), ("math", ["What is 2 + 2?"])], 8)
    (tmp_path / "results.json").write_text(json.dumps(b))
    rates = {"read_gb_s": 10.0, "peak_gflop_s": 100.0}
    lat = {"env": {"machine": "a test CPU", "dtype": "float32"}, "machine": rates,
           "rows": roofline.rows_curve(model, rates, rows=(1, 2), n_ctx=8, reps=1, compiled=False),
           "latency": {"transfer": latency_curve(model, drafter, sizes=(1, 2), reps=1,
                                              floor=lambda *a: roofline.floor_ms(model, rates, *a)["ms"])}}
    (tmp_path / "latency.json").write_text(json.dumps(lat))
    metrics = {"top1": [0.5, 0.25], "top5": [0.75, 0.5], "kl": [2.0, 3.0], "tau_chain": 1.62, "targets": 100}
    train = {"step": 10, "train_args": {"steps": 10, "data": "replies", "k": 2, "lr": 3e-3, "transfer_layer": None,
                                        "positions_per_seq": 48, "seq_len": 256, "replies": 400, "reply_tokens": 128},
             "eval": {"own": metrics, "sharegpt": metrics}, "minutes": {"training": 1.5}, "machine": "a test CPU",
             "plan_table": {"step_ms": 10.0, "n_ctx": 300, "reps": 5, "rows": [
                 {"nodes": 2, "plan": "0 [nodes 0,1 x 1]", "tau": 1.5, "ms": 11.0, "ratio": 1.1, "speedup": 1.36}]},
             "tree": [[0]], "pseudo_nodes": [0, 1], "pseudo_depth": 1}
    (tmp_path / "transfer.json").write_text(json.dumps(train))
    return tmp_path


def test_every_section_comes_from_its_file(measured, capsys):
    out = measured / "docs" / "RESULTS.md"
    text = results.main(["--train", str(measured / "transfer.json"), "--bench", str(measured / "results.json"),
                         "--latency", str(measured / "latency.json"), "--hf", str(measured / "none.json"),
                         "--out", str(out)])
    assert out.read_text() == text
    assert "## Held-out acceptance" in text and "| transfer | replies | own | 0.50 / 0.25 |" in text
    assert "`0 [nodes 0,1 x 1]`" in text and "## What a pass costs, against the floor" in text
    assert "| 2 | " in text and "eager / floor" in text and "pass / floor" in text
    assert "## The speed targets" in text and "| 0 mismatches | 0 | met |" in text
    assert "## The benchmark" in text and "| writing |" in text and "| transfer |" in text
    assert "## Not measured yet" in text and "python tools/hf_baseline.py" in text  # the missing file, named
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().out and "![" not in text
    else:
        assert (out.parent / "figures" / "pass_cost.png").exists() and "![pass cost" in text
