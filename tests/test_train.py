"""Training: the mask, the positions, train/decode agreement of the pseudo tokens, and the loop.

Tiny random models and fake windows; every test runs in seconds. The key test is
test_training_pseudo_logits_equal_decoding: training and decoding see the same pseudo tokens.
"""

import pytest
import torch

import train
from checkpoint import build_drafter, load_drafter, open_checkpoint
from conftest import fake_windows, tiny
from decode import generate_tree
from generate import Sampler, generate
from medusa import Medusa
from model import KVCache
from transfer import HiddenTransfer

T = 24  # window length of the fake data


def load_checkpoint(path, model):
    ckpt = open_checkpoint(path)
    return build_drafter(ckpt, path, model), ckpt


def args_for(tmp_path, *flags):
    return train.parse_args(["--seq-len", str(T), "--positions-per-seq", "6", "--transfer-layer", "2", "--k", "3",
                             "--lr", "1e-2", "--warmup", "2", "--eval-every", "0", "--tree-sizes", "2,3",
                             "--drafter-checkpoint", str(tmp_path / "drafter.pt"), *flags])


def random_drafter(kind, model, seed=0):
    torch.manual_seed(seed)
    d = HiddenTransfer(model.args.dim, 3, 2) if kind == "transfer" else Medusa(model.args.dim, 3)
    with torch.no_grad():  # move away from the identity / zero start, so every path matters
        d.proj.weight.add_(0.2 * torch.randn(d.proj.weight.shape))
        d.proj.bias.normal_(0, 0.1)
    return d


# ----------------------------------------------------------------------------- the pieces

def test_positions_follow_the_assistant_rule():
    assistant = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    pos, valid = train.choose_positions(assistant, 0, 3, torch.Generator().manual_seed(0))
    # p qualifies when x_(p+1) is an assistant token; row 1 has one such p and is padded
    assert pos.tolist() == [[1, 2, 4, 5, 6], [0, 0, 0, 0, 0]]
    assert valid[0].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]]  # p + i <= 7
    assert valid[1].tolist() == [[1, 1, 1]] + [[0, 0, 0]] * 4
    few, _ = train.choose_positions(assistant, 2, 3, torch.Generator().manual_seed(0))
    assert few.shape == (2, 2) and set(few[0].tolist()) <= {1, 2, 4, 5, 6}


def test_teacher_rows_are_the_base_model_distributions():
    model, ids = tiny(), fake_windows(2)[0][0][None]
    positions = torch.tensor([[3, 10, 22]])
    _, h_L = HiddenTransfer(64, 3, 2).train_pass(model, ids, positions)
    teacher = train.teacher_logprobs(model, h_L, positions, 3)                  # (1, 3, 3, V)
    full = torch.log_softmax(model(ids, torch.arange(T), torch.ones(1, T, T).tril().bool()), -1)
    for a, p in enumerate(positions[0].tolist()):
        for i in range(1, 4):
            assert torch.allclose(teacher[0, a, i - 1], full[0, min(p + i, T - 1)], atol=1e-5)


@pytest.mark.parametrize("kind", ["transfer", "medusa"])
def test_training_pseudo_logits_equal_decoding(kind):
    """Train path pseudo (p,i) == drafter.tree_pass over the prefix x_0..x_p with pseudo tokens for
    its last token, as decode.py's prefill does: training and decoding see the same tokens."""
    model, drafter = tiny(), random_drafter(kind, tiny())
    (ids, _), (ids2, _) = fake_windows(2)
    ids = torch.stack([ids, ids2])                                             # (2, T)
    positions = torch.tensor([[0, 5, 11, 20], [2, 3, 17, 23]])
    with torch.no_grad():
        logits = drafter.draft_logits(model, drafter.train_pass(model, ids, positions)[0])  # (B, P, k, V)
        for b in range(2):
            for a, p in enumerate(positions[b].tolist()):
                prefix = ids[b:b + 1, :p + 1]
                c = KVCache(model.args, 1, p + 1)
                _, states = drafter.tree_pass(model, prefix, torch.arange(p + 1),
                                              torch.ones(p + 1, p + 1).tril().bool(), 0, c,
                                              nodes=torch.tensor([p]))
                want = drafter.draft_logits(model, states[0])                  # (k, V)
                assert torch.allclose(logits[b, a], want, atol=1e-5), (b, p)


# ----------------------------------------------------------------------------- the loop

@pytest.mark.parametrize("kind", ["transfer", "medusa"])
def test_loss_goes_down_on_one_batch(kind, tmp_path):
    model = tiny()
    args = args_for(tmp_path, "--drafter", kind, "--steps", "40")
    drafter = train.make_drafter(args, model)
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.lr, weight_decay=0.0)
    ids, assistant = (torch.stack(x) for x in zip(*fake_windows(2)))
    losses = [train.train_step(model, drafter, opt, ids, assistant, args, 0) for _ in range(40)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_base_model_is_untouched_and_checkpoint_decodes(tmp_path):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = args_for(tmp_path, "--steps", "4", "--tree-sizes", "3,4")
    out = train.run(args, model, fake_windows(8), fake_windows(2, seed=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out["finished"] and len(out["eval"]["top1"]) == 3 and [r["nodes"] for r in out["plan_table"]["rows"]] == [3, 4]
    # what train.py saves, decode.py can use, losslessly
    drafter, plan, _ = load_drafter(model, args.drafter_checkpoint)
    assert plan.fields() == {k: out[k] for k in ("tree", "pseudo_nodes", "pseudo_depth")}
    prompt = fake_windows(1, seed=2)[0][0][:10].tolist()
    assert (generate_tree(model, drafter, prompt, plan, 20, Sampler()).tokens
            == generate(model, prompt, 20, Sampler()).tokens)


def interrupt_after(monkeypatch, n):
    """Make the (n+1)-th training step raise KeyboardInterrupt, as Ctrl-C would."""
    real, calls = train.train_step, []

    def step(*a, **kw):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(train, "train_step", step)


@pytest.mark.parametrize("kind", ["transfer", "medusa"])
def test_ctrl_c_saves_and_resume_is_exact(kind, tmp_path, monkeypatch):
    model, data, held = tiny(), fake_windows(8), fake_windows(2, seed=1)
    whole = train.run(args_for(tmp_path / "a", "--drafter", kind, "--steps", "6", "--tree-sizes", ""),
                      model, data, held)
    args = args_for(tmp_path / "b", "--drafter", kind, "--steps", "6", "--tree-sizes", "")
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):  # saved first, then passed on (the CLI exits 130)
            train.run(args, model, data, held)
    drafter, ckpt = load_checkpoint(args.drafter_checkpoint, model)
    assert ckpt["step"] == 3 and not ckpt.get("finished") and len(ckpt["history"]) == 3
    resumed = train.run(train.parse_args(list(args_flags(args)) + ["--resume"]), model, data, held)
    assert resumed["history"] == whole["history"]
    a = load_checkpoint(str(tmp_path / "a" / "drafter.pt"), model)[0]
    b = load_checkpoint(args.drafter_checkpoint, model)[0]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def args_flags(args):
    """The command line that made `args` (what a user types again to resume)."""
    return ["--seq-len", str(T), "--positions-per-seq", "6", "--transfer-layer", "2", "--k", "3", "--lr", "1e-2",
            "--warmup", "2", "--eval-every", "0", "--tree-sizes", "", "--drafter-checkpoint", args.drafter_checkpoint,
            "--drafter", args.drafter, "--steps", str(args.steps)]


def test_resume_refuses_other_flags(tmp_path):
    model = tiny()
    train.run(args_for(tmp_path, "--steps", "2", "--tree-sizes", ""), model, fake_windows(4),
              fake_windows(1))
    with pytest.raises(SystemExit, match="other lr"):
        train.run(args_for(tmp_path, "--steps", "4", "--lr", "5e-3", "--resume"), model, fake_windows(4),
                  fake_windows(1))


def test_evaluate_counts_identity_agreement():
    """With an oracle-free check: accept rates are shares, top-1 = rank 0, top-5 = ranks 0..4."""
    model = tiny()
    m = train.evaluate(model, Medusa(64, 3), fake_windows(3), args_for_eval(), top_r=8)
    acc = torch.tensor(m["accept"])
    assert acc.shape == (3, 8) and bool((acc.sum(1) <= 1 + 1e-6).all())
    assert m["top1"] == acc[:, 0].tolist() and torch.allclose(torch.tensor(m["top5"]), acc[:, :5].sum(1))


def args_for_eval():
    return train.parse_args(["--seq-len", str(T), "--positions-per-seq", "0"])


def test_bad_flags_are_one_line_errors():
    with pytest.raises(SystemExit):
        train.parse_args(["--offset-weights", "1,2,3"])  # k = 2: two weights


# ----------------------------------------------------------------------------- analysis.py

def test_hidden_similarity_starts_as_a_copy_for_the_identity_transfer():
    from analysis import hidden_similarity
    model = tiny()
    pseudo, copy = hidden_similarity(model, HiddenTransfer(64, 3, 2), fake_windows(2), args_for_eval())
    assert pseudo.shape == (3, 3)                       # layers t=2..L=4, offsets 1..3
    assert torch.allclose(pseudo[0], copy[0], atol=1e-5)  # at layer t, W = I copies h^t_p
    assert bool((pseudo <= 1 + 1e-5).all())


def test_layer_sweep_runs(tmp_path):
    from analysis import sweep_layers
    rows = sweep_layers(tiny(), [1, 3], 2, args_for(tmp_path, "--cache-dir", str(tmp_path)),
                        fake_windows(4), fake_windows(1))
    assert [t for t, _ in rows] == [1, 3] and all(len(m["top1"]) == 3 for _, m in rows)


# ----------------------------------------------------------------------------- data, self-distillation

class FakeTok:
    """Characters as token ids 1..95 (0 is the stop token), assistant characters masked True."""
    template, stop_ids = "fake", {0}

    def encode_chat(self, messages, add_generation_prompt=True, system=None):
        ids, mask = [], []
        for m in messages:
            ids += [1 + ord(c) % 95 for c in m["content"]]
            mask += [m["role"] == "assistant"] * len(m["content"])
        return ids + [1] * add_generation_prompt, mask + [False] * add_generation_prompt

    def decode(self, ids):
        return "".join(chr(31 + i) for i in ids if i)


def fake_sharegpt(path, n=30):
    import json
    import random
    rng = random.Random(0)
    text = lambda k: "".join(rng.choice("abcdefghij klmnop") for _ in range(k))
    records = [{"id": str(i), "conversations": [{"from": "human", "value": text(8)},
                                                 {"from": "gpt", "value": text(60)}]} for i in range(n)]
    path.write_text(json.dumps(records))
    return str(path)


def test_windows_are_cached_and_held_out_never_trained_on(tmp_path, capsys, monkeypatch):
    data = fake_sharegpt(tmp_path / "sharegpt.json")
    args = args_for(tmp_path, "--sharegpt", data, "--conversations", "30", "--holdout", "5",
                    "--eval-windows", "4", "--cache-dir", str(tmp_path / "cache"))
    train_w, held_w = train.load_windows(args, tiny(), FakeTok())
    assert "30 ShareGPT conversations read" in capsys.readouterr().out and len(held_w) == 4
    monkeypatch.setattr(train, "read_sharegpt", None)  # a second run must not read the data again
    again = train.load_windows(args, tiny(), FakeTok())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(train_w, again[0]))
    seen = {tuple(ids.tolist()) for ids, _ in train_w}
    assert not any(tuple(ids.tolist()) in seen for ids, _ in held_w)


def test_self_distill_experiment_runs(tmp_path):
    from analysis import self_distill
    data = fake_sharegpt(tmp_path / "sharegpt.json")
    args = args_for(tmp_path, "--sharegpt", data, "--conversations", "30", "--holdout", "5",
                    "--eval-windows", "4", "--cache-dir", str(tmp_path), "--max-new-tokens", "40")
    train_w, held_w = train.load_windows(args, tiny(), FakeTok())
    rows = self_distill(tiny(), FakeTok(), 6, 2, args, train_w, held_w)
    assert [name for name, _, _ in rows] == ["ShareGPT replies", "own replies"] and rows[1][1] > 0
