"""decode.py --trace (trace_step.py): recording changes no token, the replayed walk is the one
decode.accept made, and the report shows the pass it names: the tree, the mask of the pass, the
pseudo tokens, the walk, the cache's move and the next drafts."""

import pytest

import decode
from conftest import Oracle, tiny
from decode import generate_tree
from generate import Sampler, generate
from plan import Plan
from trace_step import Recorder, report, walk
from tree import Tree, draw_mask, pseudo_mask

PROMPT = [4, 8, 15, 16, 23, 42]
PLAN = Plan(Tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], k=3), (0, 1, 3), 3)


@pytest.mark.parametrize("sampler", [lambda: Sampler(), lambda: Sampler(0.8, 0.9, seed=3)])
def test_recording_changes_no_token_and_replays_every_walk(sampler):
    model = tiny(3)
    ref = generate(model, PROMPT, 30, sampler())
    oracle = Oracle(model, PROMPT + ref.tokens)
    recorder = Recorder(oracle, sampler())
    out = generate_tree(model, recorder, PROMPT, PLAN, 30, recorder.choose)
    assert out.tokens == ref.tokens and max(out.accepted) >= 2, "the oracle's drafts get accepted"
    passes = recorder.passes[1:]  # [0] is the prefill
    assert len(passes) == out.passes
    emitted = []
    for p, accepted in zip(passes, out.accepted):
        tree = next(PLAN.cut(d).tree for d in range(4) if PLAN.cut(d).tree.size == len(p["tokens"]))
        steps = walk(tree, p["tokens"], p["choices"])
        assert sum(child is not None for _, _, child in steps) == accepted
        emitted += [y for _, y, _ in steps]
    assert [recorder.passes[0]["choices"][0]] + emitted == out.tokens


def test_the_report_shows_the_first_pass_that_accepted_a_draft():
    model = tiny(3)
    ref = generate(model, PROMPT, 30, Sampler())
    recorder = Recorder(Oracle(model, PROMPT + ref.tokens), Sampler())
    out = generate_tree(model, recorder, PROMPT, PLAN, 30, recorder.choose)
    index = next(i for i, a in enumerate(out.accepted) if a)
    p = recorder.passes[1 + index]
    text = report(recorder, PLAN, str)
    assert text.startswith(f"--trace: decoding pass {index + 1} of {out.passes} (the first that accepted a draft)")
    assert f"the cache holds n = {p['n']} tokens" in text
    assert draw_mask(pseudo_mask(p["mask"], p["depth"], p["nodes"]),
                     [f"[{i}]" for i in range(len(p["tokens"]))]
                     + [f"({v},{j})" for v in p["nodes"] for j in range(1, p["depth"] + 1)]) in text
    assert f"({out.accepted[index]} accepted draft(s) + the model's own)" in text
    assert "moves from slots" in text and "6. Next drafts: " in text


def test_decode_trace_on_the_tiny_model(capsys):
    decode.main(["--model", "tiny", "--untrained", "--trace", "--tree", "tree4", "--max-new-tokens", "12",
                 "--threads", "1"])
    out = capsys.readouterr().out
    for section in ("1. The tree", "2. The mask", "3. Pseudo tokens", "4. Acceptance", "5. The cache",
                    "6. Next drafts"):
        assert section in out, section
