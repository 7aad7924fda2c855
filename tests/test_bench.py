"""bench.py and tools/latency.py: the metrics on hand-made generations, the interleaved run on a tiny
random model with a fake tokenizer (lossless, complete report, Ctrl-C), the command line end to
end with the model injected, and every one-line error with its exit status.
"""

import json

import pytest
import torch

import bench
import report
from checkpoint import save_checkpoint
from conftest import FakeTokenizer, perturb, tiny
from generate import Generation
from tools import latency, roofline
from tools.latency import latency_curve, latency_report, paired_times, pass_latency, step_latency
from medusa import Medusa
from model import ModelArgs, Transformer
from transfer import HiddenTransfer
from tree import Tree, chain

WIDE = Tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], k=3)


PROMPTS = [("writing", ["Write a poem.", "Shorter, please."]), ("math", ["What is 2 + 2?"]),
           ("coding", ["Reverse a list in Python."])]


def methods(model):
    dim = model.args.dim
    return {"plain": None, "transfer": (perturb(HiddenTransfer(dim, 3, 2)), chain(3)),
            "medusa": (perturb(Medusa(dim, 3), seed=1), WIDE)}


# ----------------------------------------------------------------------------- metrics

def test_metrics_of_hand_made_generations():
    # 3 passes accepting 2, 0, 1 drafts: 1 + 3 + 1 + 2 = 7 tokens
    ht = Generation(tokens=list(range(7)), accepted=[2, 0, 1], prefill_s=0.5, decode_s=0.5)
    plain = Generation(tokens=list(range(7)), accepted=[0] * 6, prefill_s=1.0, decode_s=1.0)
    m = report.method_metrics([ht], [plain], depth=3)
    assert m["tau"] == pytest.approx(2.0)
    assert m["alpha"] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert m["passes"] == 3 and m["ms_per_pass"] == pytest.approx(500 / 3)
    assert m["speedup"]["median"] == pytest.approx(2.0) and m["tokens_per_s"]["median"] == pytest.approx(7.0)
    p = report.method_metrics([plain], [plain])
    assert p["tau"] == 1.0 and p["alpha"] == [] and p["speedup"]["median"] == 1.0


def test_tau_is_pooled_over_prompts_and_spread_is_min_max():
    a = Generation(tokens=[1] * 11, accepted=[4, 4], prefill_s=1, decode_s=1)   # 10 tokens / 2 passes
    b = Generation(tokens=[1] * 3, accepted=[0, 0], prefill_s=1, decode_s=2)    # 2 tokens / 2 passes
    m = report.method_metrics([a, b])
    assert m["tau"] == pytest.approx(12 / 4)
    assert m["tokens_per_s"] == {"median": pytest.approx(3.25), "min": 1.0, "max": 5.5}
    assert m["speedup"] is None


def test_first_difference():
    assert report.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert report.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert report.first_difference([1, 2], [1, 2, 3]) == 2


# ----------------------------------------------------------------------------- the run

@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.8, 0.9)])
def test_run_bench_is_lossless_and_reports_every_method_and_category(temperature, top_p):
    model = tiny()
    results = bench.run_bench(model, FakeTokenizer(), methods(model), PROMPTS, 24, temperature, top_p, seed=3)
    assert results["mismatches"] == [] and not results["interrupted"]
    assert len(results["runs"]) == 4  # three first turns and one follow-up
    assert [r["turn"] for r in results["runs"]] == [1, 2, 1, 1]
    s = results["summary"]
    assert s["plain"]["tau"] == 1.0 and s["plain"]["passes"] == s["plain"]["tokens"] - 4
    assert s["plain"]["speedup"]["median"] == 1.0
    for m in ("transfer", "medusa"):
        assert s[m]["mismatches"] == 0 and len(s[m]["alpha"]) == 3
        assert s[m]["tokens"] == s["plain"]["tokens"] and s[m]["passes"] <= s["plain"]["passes"]
    text = bench.report(results)
    for word in ("plain", "transfer", "medusa", "writing", "math", "coding", "plan of medusa: 7 nodes"):
        assert word in text
    json.dumps(results)  # everything the CLI saves must be plain json


def test_compiled_mode_times_every_method_both_ways_and_heads_with_the_fastest_plain():
    """--modes eager,compiled: each method eagerly and compiled (compiled before timing, nothing
    recompiled while timing), each compared with plain decoding in its mode, compiled plain with eager
    plain; the headline names the fastest plain decoder measured and the fastest lossless method."""
    model = tiny()
    results = bench.run_bench(model, FakeTokenizer(), methods(model), PROMPTS, 16, modes=("eager", "compiled"),
                              compiled_plans={"medusa": chain(3)}, backend="aot_eager")
    names = ["plain", "transfer", "medusa", "plain:compiled", "transfer:compiled", "medusa:compiled"]
    assert list(results["summary"]) == names and results["mismatches"] == []
    assert set(results["compile_s"]) == set(names[3:]) and all(t > 0 for t in results["compile_s"].values())
    assert results["trees"]["medusa"]["size"] == 7 and results["trees"]["medusa:compiled"]["size"] == 4
    for r in results["runs"]:
        assert r["methods"]["transfer:compiled"]["tokens"] == r["methods"]["plain:compiled"]["tokens"] \
            == r["methods"]["plain"]["tokens"]
    h, s = results["headline"], results["summary"]
    assert h["fastest_plain"] == max(["plain", "plain:compiled"], key=lambda m: s[m]["tokens_per_s"]["median"])
    assert h["speedup"] == h["against_fastest_plain"][h["fastest"]]
    assert h["speedup"]["median"] == max(x["median"] for x in h["against_fastest_plain"].values())
    text = bench.report(results)
    assert "Fastest lossless configuration here:" in text and "| transfer:compiled |" in text
    assert "compiled before timing" in text


def test_spread_of_plain_decoding_is_explained_when_a_prompt_is_slow():
    fast = Generation(tokens=[1] * 20, accepted=[0] * 19, prefill_s=0.1, decode_s=0.9)   # 20 tokens/s
    short = Generation(tokens=[1] * 4, accepted=[0] * 3, prefill_s=0.2, decode_s=0.15)  # 11.4 tokens/s
    runs = [{"prompt": i, "category": "c", "load_average": 0.5} for i in range(3)]
    assert report.spread_note("plain", runs, [fast, fast, fast]) is None
    note = report.spread_note("plain", runs, [fast, fast, short])
    assert "prompt 2" in note and "0.57x the median" in note and "short answers" in note


def test_second_turn_follows_plain_decodings_answer():
    model, tok = tiny(), FakeTokenizer()
    results = bench.run_bench(model, tok, {"plain": None}, PROMPTS[:1], 6)
    first = results["runs"][0]["methods"]["plain"]["tokens"]
    answer = tok.decode([t for t in first if t not in tok.stop_ids])
    ids, _ = tok.encode_chat([{"role": "user", "content": "Write a poem."},
                              {"role": "assistant", "content": answer},
                              {"role": "user", "content": "Shorter, please."}])
    assert results["runs"][1]["prompt_tokens"] == len(ids)


def test_a_wrong_drafter_is_caught_as_a_mismatch():
    class Broken(HiddenTransfer):  # verification reads the wrong logits: no longer lossless
        def tree_pass(self, *a, **kw):
            hidden, states = super().tree_pass(*a, **kw)
            return hidden + 5 * torch.randn_like(hidden), states
    model = tiny()
    results = bench.run_bench(model, FakeTokenizer(), {"plain": None, "transfer": (Broken(64, 3, 2), chain(3))},
                              PROMPTS[1:], 16)
    assert results["summary"]["transfer"]["mismatches"] == 2
    assert all(x["class"] == "divergence" for x in results["mismatches"])
    assert "MISMATCH: transfer differs from plain on prompt 0 (math, turn 1)" in bench.report(results)


def test_ctrl_c_keeps_the_prompts_every_method_finished():
    calls = {"n": 0}

    class Interrupting(HiddenTransfer):
        def tree_pass(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 40:  # well into the second prompt
                raise KeyboardInterrupt
            return super().tree_pass(*a, **kw)
    model = tiny()
    ht = (Interrupting(64, 3, 2), chain(3))
    # plain listed last: run_bench still runs it first, as the others are compared with it
    results = bench.run_bench(model, FakeTokenizer(), {"transfer": ht, "plain": None}, PROMPTS, 24)
    assert results["interrupted"] and 1 <= len(results["runs"]) < 4
    assert "INTERRUPTED" in bench.report(results)


def test_plain_is_required():
    model = tiny()
    with pytest.raises(ValueError, match="plain"):
        bench.run_bench(model, FakeTokenizer(), {"transfer": methods(model)["transfer"]}, PROMPTS, 4)


# ----------------------------------------------------------------------------- latency

def test_paired_times_alternate_the_two_calls_so_drift_cancels(monkeypatch):
    """select_plan and gpu_check time a pass against a step in alternation: on a machine slowing down
    call by call (a made-up clock: the pass costs 2 units, the step 1, both x the slowdown) the two
    medians slow alike and their ratio stays near 2; timed one after the other it does not."""
    now, slowdown, calls = [0.0], [1.0], []

    def call(name, units):
        def fn():
            calls.append(name)
            now[0] += units * slowdown[0]
            slowdown[0] *= 1.05  # 5% slower at every call
        return fn
    monkeypatch.setattr(latency.time, "perf_counter", lambda: now[0])
    pass_s, step_s = paired_times(call("pass", 2), call("step", 1), torch.device("cpu"), reps=4)
    assert calls == ["pass", "step"] * 5  # a warm-up round, then 4
    assert abs(pass_s / step_s - 2 / 1.05) < 1e-9  # each pass timed one call before its step
    sequential = latency._median_time(call("pass", 2), torch.device("cpu"), 4) / \
        latency._median_time(call("step", 1), torch.device("cpu"), 4)
    assert abs(sequential - 2 / 1.05 ** 5) < 1e-9   # the steps, timed five calls later, look dearer


def test_latency_curve_and_report():
    model = tiny()
    drafter = perturb(HiddenTransfer(64, 3, 2))
    assert pass_latency(model, drafter, WIDE, n_ctx=20, reps=1) > 0 and step_latency(model, 20, 1) > 0
    curve = latency_curve(model, drafter, None, sizes=(1, 2, 4), n_ctx=20, reps=1)
    assert [r["nodes"] for r in curve["rows"]] == [1, 2, 4] and curve["rows"][0]["tau"] is None
    accept = [[0.6, 0.2], [0.4, 0.1], [0.3, 0.1]]
    curve = latency_curve(model, drafter, accept, sizes=(1, 4), n_ctx=20, reps=1)
    r = curve["rows"][1]
    assert r["tau"] > 1 and r["speedup"] == pytest.approx(r["tau"] / r["ratio"])
    assert "| 4 |" in latency_report("transfer", curve)


# ----------------------------------------------------------------------------- the command line

@pytest.fixture
def injected(monkeypatch):
    """main() with a tiny random model and the fake tokenizer in place of the real ones."""
    model = tiny()
    monkeypatch.setattr(bench, "load", lambda args: (model, FakeTokenizer()))
    return model


def one_line_exit(capsys, argv, code=1) -> str:
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_main_end_to_end(injected, tmp_path, capsys):
    out = tmp_path / "r.json"
    bench.main(["--untrained", "--prompts", "3", "--both-turns", "--max-new-tokens", "6", "--modes", "eager",
                "--out", str(out)])
    saved = json.loads(out.read_text())
    assert list(saved["summary"]) == ["plain", "transfer", "medusa", "transformers", "prompt-lookup"]  # the peers:
    assert list(saved["categories"]) == ["writing", "roleplay", "reasoning"] and len(saved["runs"]) == 6  # installed
    assert "| medusa |" in (out := capsys.readouterr().out) and "peer prompt-lookup (transformers" in out


def test_main_latency(injected, tmp_path, capsys):
    out = tmp_path / "lat.json"
    bench.main(["--latency", "--untrained", "--methods", "transfer", "--modes", "eager", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["nodes"] for r in saved["latency"]["transfer"]["rows"]] == [1, 2, 4, 8, 16, 32, 64]
    assert [r["rows"] for r in saved["rows"]["rows"]] == [1, 2, 4, 8, 16, 32, 64]
    assert all(r["floor_ms"] > 0 and r["eager_ms"] > 0 for r in saved["rows"]["rows"])
    assert saved["machine"]["read_gb_s"] > 0 and saved["machine"]["peak_gflop_s"] > 0
    text = capsys.readouterr().out
    assert "ratio to one-token step" in text and "The floor:" in text and "pass / floor" in text


def test_the_floor_is_the_weights_read_once_or_the_products_at_peak():
    model = tiny()
    rates = {"read_gb_s": 1.0, "peak_gflop_s": 1.0}  # made up: 1 byte and 1 flop per ns
    nbytes, (per_layer, head) = roofline.weight_bytes(model), roofline.layer_params(model)
    assert nbytes == 4 * sum(p.numel() for p in model.parameters())  # the tied head counted once
    one = roofline.floor_ms(model, rates, 1)
    flops = 2 * (per_layer * model.args.n_layers + head)
    assert one == {"ms": pytest.approx(1e-6 * max(nbytes, flops)), "bound": "memory"}
    many = roofline.floor_ms(model, rates, 64)
    assert many == {"ms": pytest.approx(1e-6 * flops * 64), "bound": "compute"}
    # a tree pass: 4 nodes below the transfer layer 2, 4 + 6 pseudo rows above it and in the head
    tree = roofline.floor_ms(model, {"read_gb_s": 1e9, "peak_gflop_s": 1.0}, 4, 10, layer=2)
    assert tree["ms"] == pytest.approx(1e-6 * 2 * (per_layer * (4 * 2 + 10 * 2) + head * 10))


def test_rows_curve_times_eager_and_compiled_passes_against_the_floor():
    model = tiny()
    rates = roofline.machine("cpu")
    curve = roofline.rows_curve(model, rates, rows=(1, 3), n_ctx=10, reps=1, backend="aot_eager")
    assert [r["rows"] for r in curve["rows"]] == [1, 3] and curve["compile_s"] > 0
    for r in curve["rows"]:
        assert r["compiled_ratio"] == pytest.approx(r["compiled_ms"] / r["floor_ms"])
        assert r["eager_ratio"] == pytest.approx(r["eager_ms"] / r["floor_ms"])
    assert "| 3 |" in roofline.rows_report(curve)


def test_missing_checkpoint_is_one_line_and_exit_1(capsys, tmp_path, monkeypatch):
    err = one_line_exit(capsys, ["--drafter-checkpoint", "nowhere/t.pt"])     # a path the user typed
    assert "nowhere/t.pt" in err
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here: a default path asked for by --methods is missing
    err = one_line_exit(capsys, ["--methods", "plain,medusa"])
    assert "checkpoints/medusa.pt" in err and "python train.py --drafter medusa" in err


def test_checkpoint_for_another_model_or_kind(injected, tmp_path, capsys):
    other = tiny(seed=7)
    save_checkpoint(str(tmp_path / "t.pt"), HiddenTransfer(64, 3, 2), other, {})
    err = one_line_exit(capsys, ["--methods", "plain,transfer", "--drafter-checkpoint", str(tmp_path / "t.pt")])
    assert "different base model" in err
    save_checkpoint(str(tmp_path / "m.pt"), Medusa(64, 3), injected, {"tree": [[0], [1]]})
    err = one_line_exit(capsys, ["--methods", "plain,transfer", "--drafter-checkpoint", str(tmp_path / "m.pt")])
    assert "holds a medusa drafter" in err


def test_checkpoints_serve_the_method_of_their_kind(injected, tmp_path, capsys):
    save_checkpoint(str(tmp_path / "m.pt"), perturb(Medusa(64, 3)), injected, {"tree": [[0], [1]]})
    save_checkpoint(str(tmp_path / "t.pt"), perturb(HiddenTransfer(64, 3, 2)), injected, {})
    out = tmp_path / "r.json"
    bench.main(["--drafter-checkpoint", str(tmp_path / "m.pt"), "--drafter-checkpoint", str(tmp_path / "t.pt"),
                "--prompts", "1", "--max-new-tokens", "6", "--modes", "eager", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["trees"]["medusa"]["size"] == 3 and saved["trees"]["transfer"]["size"] == 4
    assert saved["mismatches"] == []


def test_missing_mtbench_package_is_one_line(monkeypatch, capsys):
    import data
    monkeypatch.setattr(data, "MTBENCH_PACKAGE", "no-such-mtbench-package")
    err = one_line_exit(capsys, ["--methods", "plain"])
    assert "MT-Bench is not installed" in err


@pytest.mark.parametrize("argv", [["--methods", "plain,eagle"], ["--methods", "transfer"], ["--prompts", "0"],
                                  ["--modes", "fast"], ["--modes", ""], ["--modes", "eager,eager"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--untrained"])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


class TiedTop(Transformer):
    """Tokens 3 and 7 always tie for the top logit: argmax says 3, any rounding could say 7."""

    def head(self, h):
        logits = super().head(h)
        logits[..., [3, 7]] = 100.0
        return logits


@pytest.mark.parametrize("model, expected", [(TiedTop(ModelArgs.tiny()).eval(), "near-tie"),
                                             (tiny(), "divergence")], ids=["tie", "divergence"])
def test_mismatches_are_classified_by_plain_decodings_top2_gap(monkeypatch, model, expected):
    real_one = bench._one

    def forced(model, method, prompt, *args):  # "transfer" is plain decoding with its 3rd token changed
        out = real_one(model, None, prompt, *args)
        if method is not None:
            out.tokens[2] = 7 if out.tokens[2] == 3 else (out.tokens[2] + 1) % 90
        return out
    monkeypatch.setattr(bench, "_one", forced)
    results = bench.run_bench(model, FakeTokenizer(), {"plain": None, "transfer": (HiddenTransfer(64, 3, 2), chain(3))},
                              PROMPTS[1:2], 8)
    [x] = results["mismatches"]
    assert x["position"] == 2 and x["class"] == expected and x["threshold"] == 2e-4
    assert (x["gap"] == 0.0) if expected == "near-tie" else x["gap"] > 2e-4
    assert f"{expected}, plain decoding's top-2 logit gap" in bench.report(results)

