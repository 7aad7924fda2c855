"""Training: the mask, the positions, train/decode agreement of the pseudo tokens, and the loop.

Tiny random models and fake windows; every test runs in seconds. The key test is
test_training_pseudo_logits_equal_decoding: training and decoding see the same pseudo tokens.
"""

import os

import pytest
import torch

import distill
import evaluate
import frozen
import train
from checkpoint import DRAFTERS, build_drafter, load_drafter, model_identity, open_checkpoint
from conftest import fake_windows, perturb, tiny
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
                             "--compiled-finalists", "0", "--drafter-checkpoint", str(tmp_path / "drafter.pt"),
                             "--cache-dir", str(tmp_path / "cache"), *flags])


def random_drafter(kind, model, seed=0, **options):
    d = DRAFTERS[kind].for_model(model, 3, None if "layers" in options else 2, **options)  # k = 3, t = 2
    return perturb(d, 0.2, seed)  # away from the identity / zero start, so every path matters


# ----------------------------------------------------------------------------- the pieces

def test_positions_follow_the_assistant_rule():
    assistant = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    pos, valid = distill.choose_positions(assistant, 0, 3, torch.Generator().manual_seed(0))
    # p qualifies when x_(p+1) is an assistant token; row 1 has one such p and is padded
    assert pos.tolist() == [[1, 2, 4, 5, 6], [0, 0, 0, 0, 0]]
    assert valid[0].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]]  # p + i <= 7
    assert valid[1].tolist() == [[1, 1, 1]] + [[0, 0, 0]] * 4
    few, _ = distill.choose_positions(assistant, 2, 3, torch.Generator().manual_seed(0))
    assert few.shape == (2, 2) and set(few[0].tolist()) <= {1, 2, 4, 5, 6}


def test_teacher_rows_are_the_base_model_distributions():
    model, ids = tiny(), fake_windows(2)[0][0][None]
    positions = torch.tensor([[3, 10, 22]])
    _, h_L = HiddenTransfer(64, 3, 2).train_pass(model, ids, positions)
    teacher = distill.teacher_logprobs(model, h_L, positions, 3)                  # (1, 3, 3, V)
    full = torch.log_softmax(model(ids, torch.arange(T), torch.ones(1, T, T).tril().bool()), -1)
    for a, p in enumerate(positions[0].tolist()):
        for i in range(1, 4):
            assert torch.allclose(teacher[0, a, i - 1], full[0, min(p + i, T - 1)], atol=1e-5)


@pytest.mark.parametrize("kind, options", [("transfer", {}), ("medusa", {}), ("transfer-mlp", {}),
                                           ("transfer-lora", {}), ("transfer-layers", {}),
                                           ("transfer-layers", {"layers": [3, 1, 2]})])
def test_training_pseudo_logits_equal_decoding(kind, options):
    """Train path pseudo (p,i) == drafter.tree_pass over the prefix x_0..x_p with pseudo tokens for
    its last token, as decode.py's prefill does: training and decoding see the same tokens."""
    model, drafter = tiny(), random_drafter(kind, tiny(), **options)
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
    assert out["finished"] and len(out["eval"]["held-out"]["top1"]) == 3
    assert [r["nodes"] for r in out["plan_table"]["rows"]] == [3, 4]
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
    m = evaluate.evaluate(model, Medusa(64, 3), fake_windows(3), top_r=8)
    acc = torch.tensor(m["accept"])
    assert acc.shape == (3, 8) and bool((acc.sum(1) <= 1 + 1e-6).all())
    assert m["top1"] == acc[:, 0].tolist() and torch.allclose(torch.tensor(m["top5"]), acc[:, :5].sum(1))


def test_held_out_positions_are_fixed_per_window(monkeypatch):
    """A held-out window's positions depend on its index alone: not on the batch it is scored in,
    nor on any training flag (evaluate takes none), so two recipes are scored on the same targets."""
    windows = fake_windows(5, T=40)
    assistant = torch.stack([w[1] for w in windows])
    together, valid = evaluate.fixed_positions(assistant, 3, 0)
    for j in range(5):
        alone, v = evaluate.fixed_positions(assistant[j:j + 1], 3, j)
        n = int(v[0, :, 0].sum())
        assert torch.equal(together[j, :n], alone[0, :n]) and n == int(valid[j, :, 0].sum())
    model, drafter = tiny(), random_drafter("transfer", tiny())
    batched = evaluate.evaluate(model, drafter, windows)
    monkeypatch.setattr(evaluate, "EVAL_BATCH", 1)
    one_by_one = evaluate.evaluate(model, drafter, windows)
    assert batched["targets"] == one_by_one["targets"] and batched["top1"] == one_by_one["top1"]


def test_reusing_frozen_passes_changes_nothing(tmp_path):
    """Each window's frozen pass kept and reused, in memory (--frozen-cache-gb) or on disk
    (--frozen-disk-gb), trains exactly what recomputing does."""
    model, data = tiny(), fake_windows(3)
    runs = [train.run(args_for(tmp_path / f"{ram}-{disk}", "--steps", "7", "--tree-sizes", "", "--frozen-cache-gb", ram,
                               "--frozen-disk-gb", disk), model, data, fake_windows(1, seed=1))
            for ram, disk in (("0", "0"), ("1", "0"), ("0", "1"))]
    assert runs[0]["history"] == runs[1]["history"] == runs[2]["history"]
    assert not os.path.exists(tmp_path / "1-0" / "cache") and not os.path.exists(tmp_path / "0-0" / "cache")
    assert len(os.listdir(next((tmp_path / "0-1" / "cache").iterdir()))) == 3  # one file per window


def test_frozen_passes_on_disk_are_keyed_and_survive_an_interrupt(tmp_path, monkeypatch):
    model, windows = tiny(), fake_windows(4)
    drafter, calls = random_drafter("transfer", model), []
    real = HiddenTransfer.frozen_pass
    monkeypatch.setattr(HiddenTransfer, "frozen_pass", lambda self, m, ids: calls.append(len(ids)) or real(self, m, ids))
    key = frozen.frozen_key(model_identity(model), drafter, torch.float32)
    store = frozen.FrozenPasses(0, spill=str(tmp_path), key=key, disk_budget=2**30)
    batch = lambda js: (torch.tensor(js), torch.stack([windows[j][0] for j in js]))
    first = store(drafter, model, *batch([0, 1]))  # computed, written
    (tmp_path / f"frozen-{key}" / "half-written.pt.123.tmp").write_bytes(b"cut")  # what an interrupt leaves
    again = frozen.FrozenPasses(0, spill=str(tmp_path), key=key, disk_budget=2**30)  # a later run
    calls.clear()
    read = again(drafter, model, *batch([1, 0]))  # from disk: no frozen pass
    assert calls == [] and all(torch.equal(read[n], first[n].flip(0)) for n in first)
    again(drafter, model, *batch([2, 0]))  # window 2 is new: computed
    assert calls == [2]
    other = HiddenTransfer(model.args.dim, 3, 1)  # another transfer layer: other frozen passes, another key
    assert frozen.frozen_key(model_identity(model), other, torch.float32) != key
    assert frozen.frozen_key(model_identity(model), drafter, torch.bfloat16) != key
    small = frozen.FrozenPasses(0, spill=str(tmp_path / "small"), key=key, disk_budget=1)  # the bound holds
    small(drafter, model, *batch([0]))
    assert not os.path.exists(tmp_path / "small" / f"frozen-{key}") or not os.listdir(tmp_path / "small" / f"frozen-{key}")


def test_a_time_budget_ends_training_and_the_decay(tmp_path, monkeypatch):
    args = args_for(tmp_path, "--steps", "1000", "--budget-minutes", "0.5", "--warmup", "0")
    assert train.lr_at(10, args, 0.0) > 0.99 * args.lr and train.lr_at(10, args, 30.0) == pytest.approx(0.1 * args.lr)
    clock = iter(range(0, 10**6, 10))  # each step takes 10 "seconds": 30 s of budget is 3 steps
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock) / 2)
    out = train.run(args_for(tmp_path, "--steps", "1000", "--budget-minutes", "0.5", "--tree-sizes", ""),
                    tiny(), fake_windows(3), fake_windows(1, seed=1))
    assert out["step"] == 6 and out["train_s"] >= 30


def test_the_tree_objective_adds_the_winnable_top1_cross_entropy():
    teacher = torch.log_softmax(torch.tensor([[[[3.0, 2.0, 0.0, -1.0]]]]), -1)      # top-1: token 0
    near = torch.tensor([[[[1.0, 2.0, 0.0, -1.0]]]])                               # token 0 ranked 2nd
    far = torch.tensor([[[[-5.0, 2.0, 1.0, 0.0]]]])                                # token 0 ranked 4th
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    for logits, winnable in ((near, True), (far, False)):
        kl, _ = distill.distill_loss(logits, teacher, valid, [1.0])
        tree, _ = distill.distill_loss(logits, teacher, valid, [1.0], objective="tree", width=2)
        ce = -torch.log_softmax(logits, -1)[0, 0, 0, 0]
        assert torch.allclose(tree, kl + ce if winnable else kl)


def args_for_eval():
    return train.parse_args(["--seq-len", str(T), "--positions-per-seq", "0"])


def test_bad_flags_are_one_line_errors():
    with pytest.raises(SystemExit):
        train.parse_args(["--offset-weights", "1,2,3"])  # k = 2: two weights


# ----------------------------------------------------------------------------- analysis.py

def test_hidden_similarity_starts_as_a_copy_for_the_identity_transfer():
    from tools.analysis import hidden_similarity
    model = tiny()
    pseudo, copy = hidden_similarity(model, HiddenTransfer(64, 3, 2), fake_windows(2))
    assert pseudo.shape == (3, 3)                       # layers t=2..L=4, offsets 1..3
    assert torch.allclose(pseudo[0], copy[0], atol=1e-5)  # at layer t, W = I copies h^t_p
    assert bool((pseudo <= 1 + 1e-5).all())


def test_layer_sweep_runs(tmp_path):
    from tools.analysis import sweep_layers
    rows = sweep_layers(tiny(), [1, 3], 2, args_for(tmp_path, "--cache-dir", str(tmp_path)),
                        fake_windows(4), fake_windows(1))
    assert [t for t, _ in rows] == [1, 3] and all(len(m["held-out"]["top1"]) == 3 for _, m in rows)
