"""tools/prompt_lookup.py, the transformers peers of bench.py: prompt lookup and plain generate() on a
tiny model's weights emit plain decoding's greedy tokens, their tokens per pass are counted from
transformers' forward passes (a model that follows a cycle makes prompt lookup accept whole drafts),
bench.py times them beside our methods and reports both ratios, sampling marks them not comparable,
and without transformers bench.py goes on with a note, or says in one line why it cannot."""

import json
import sys

import pytest
import torch

import bench
from conftest import FakeTokenizer, perturb, tiny
from generate import Sampler, generate
from tools import prompt_lookup, results
from transfer import HiddenTransfer
from tree import chain

PROMPTS = [("writing", ["Write a poem."]), ("math", ["What is 2 + 2?"]), ("coding", ["Reverse a list in Python."])]
CYCLE = [10, 11, 12, 13, 14, 15]


def cycling() -> torch.nn.Module:
    """A tiny model whose next token depends on the current one alone: t -> the next of CYCLE (others
    repeat themselves). Attention and feed-forward write nothing, so the last state is the normed
    embedding, and the untied head's row for perm(t) is t's embedding."""
    model = tiny(tie_embeddings=False)
    with torch.no_grad():
        for block in model.layers:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
        source = list(range(model.args.vocab_size))  # source[j]: the token whose successor is j
        for a, b in zip(CYCLE, CYCLE[1:] + CYCLE[:1]):
            source[b] = a
        model.output.weight.copy_(model.tok_embeddings.weight[source])
    return model


@pytest.fixture(scope="module")
def peers():
    model = tiny()
    return model, prompt_lookup.build(model, ["plain", "transformers", "prompt-lookup"])


def test_the_peers_emit_plain_decodings_greedy_tokens(peers):
    model, built = peers
    assert list(built) == ["transformers", "prompt-lookup"] and built["prompt-lookup"].lookup == 10
    stops = FakeTokenizer.stop_ids
    for prompt in ([5, 9, 12, 40, 7, 3, 22], [10, 11, 12, 13, 14] * 6):
        ref = generate(model, prompt, 40, Sampler(), stops)
        for name, peer in built.items():
            out = peer.generate(prompt, 40, stop_ids=stops)
            assert out.tokens == ref.tokens, name
        plain = built["transformers"].generate(prompt, 40, stop_ids=stops)
        assert plain.tau == 1.0 and plain.passes == len(plain.tokens) - 1


def test_tokens_per_pass_come_from_the_forward_passes():
    model = cycling()
    prompt = CYCLE * 2 + [10, 11]
    ref = generate(model, prompt, 48, Sampler())
    assert ref.tokens[:8] == [12, 13, 14, 15, 10, 11, 12, 13]  # the model follows its cycle
    peer = prompt_lookup.build(model, ["prompt-lookup"])["prompt-lookup"]
    calls, forward = [], peer.hf.forward
    peer.hf.forward = lambda *a, **kw: calls.append(kw["input_ids"].shape[1]) or forward(*a, **kw)
    out = peer.generate(prompt, 48)
    assert out.tokens == ref.tokens
    assert len(calls) == out.passes + 1  # the prompt's pass, then one per entry of out.accepted
    assert all(n >= a + 1 for n, a in zip(calls[1:], out.accepted))  # no pass accepts more than it verified
    assert 1 <= len(out.tokens) - sum(a + 1 for a in out.accepted) <= 11  # what the prompt's pass emitted
    assert out.tau > 5 and max(out.accepted) == 10  # whole drafts of prompt_lookup_num_tokens accepted
    peer.lookup = 2
    short = peer.generate(prompt, 48)
    assert short.tokens == ref.tokens and max(short.accepted) == 2 and 2.5 < short.tau <= 3.0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_bench_times_the_peers_beside_the_methods(peers, temperature):
    model, built = peers
    methods = {"plain": None, "transfer": (perturb(HiddenTransfer(64, 3, 2)), chain(3)), **built}
    out = bench.run_bench(model, FakeTokenizer(), methods, PROMPTS, 16, temperature, 0.9, seed=1)
    s, h = out["summary"], out["headline"]
    assert list(out["peers"]) == ["transformers", "prompt-lookup"] and out["trees"]["prompt-lookup"] is None
    assert out["peers"]["prompt-lookup"]["baseline"] == "transformers"
    assert s["prompt-lookup"]["over_baseline"]["median"] > 0 and "over_baseline" not in s["transformers"]
    assert h["fastest"] not in out["peers"] and "prompt-lookup" in h["against_fastest_plain"]
    assert s["transformers"]["tau"] == 1.0
    text = bench.report(out)
    assert "peer prompt-lookup (transformers " in text and "x plain, " in text and "x transformers; tau" in text
    if temperature == 0:
        assert out["mismatches"] == [] and s["prompt-lookup"]["mismatches"] == 0
        assert all(r["methods"]["prompt-lookup"]["tokens"] == r["methods"]["plain"]["tokens"] for r in out["runs"])
    else:  # transformers' own sampler: its tokens are not compared with our seeded sampler's
        assert s["prompt-lookup"]["mismatches"] is None and s["transfer"]["mismatches"] == s["plain"]["mismatches"] == 0
        assert {x["method"] for x in out["mismatches"]} <= {"transfer"} and "not comparable" in text
    json.dumps(out)


def test_results_md_shows_the_peer_rows(peers, tmp_path):
    model, built = peers
    b = bench.run_bench(model, FakeTokenizer(), {"plain": None, **built}, PROMPTS[:2], 8)
    (tmp_path / "results.json").write_text(json.dumps(b))
    text = results.main(["--bench", str(tmp_path / "results.json"), "--train", "--latency", "", "--hf", "",
                         "--out", str(tmp_path / "RESULTS.md")])
    assert "| prompt-lookup |" in text and "Peer prompt-lookup (transformers " in text and "x transformers." in text
    assert "best mode faster than transformers' prompt lookup" in text


# ----------------------------------------------------------------------------- the command line

@pytest.fixture
def injected(monkeypatch):
    model = tiny()
    monkeypatch.setattr(bench, "load", lambda args: (model, FakeTokenizer()))
    return model


def test_without_transformers_the_default_run_goes_on_with_a_note(injected, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    out = tmp_path / "r.json"
    bench.main(["--untrained", "--prompts", "1", "--max-new-tokens", "4", "--modes", "eager", "--out", str(out)])
    assert list(json.loads(out.read_text())["summary"]) == ["plain", "transfer", "medusa"]
    err = capsys.readouterr().err
    assert "note: transformers is not installed" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        bench.main(["--untrained", "--methods", "plain,prompt-lookup", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1
    assert "--methods prompt-lookup: transformers is not installed" in err
