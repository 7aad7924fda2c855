"""More capacity on the pseudo path: transfer-mlp, transfer-lora and transfer-layers (transfer_mlp.py,
transfer_lora.py, transfer_layers.py), each a drafter kind of its own.

Each decodes exactly what plain decoding emits (greedy and seeded sampling, eager and compiled),
with random weights far from its start; trains and decodes from the command line on --model tiny;
survives a checkpoint. LoRA's real rows are bit-identical to the frozen model's while its pseudo
rows change, and it leaves the model as it found it, after a pass and after an error. The
per-offset layers are Hidden Transfer when every offset shares one layer, and each start (MLP
branch, adapters at zero) is exactly the linear drafter. train_pass against tree_pass is
tests/test_train.py's test_training_pseudo_logits_equal_decoding, which covers these kinds too.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from checkpoint import DRAFTERS, load_drafter, save_checkpoint
from compiled import CompiledDrafter, CompiledModel, no_recompiles, static_length
from conftest import check_cache, fake_windows, perturb, tiny
from decode import generate_tree
from generate import Sampler, generate
from model import KVCache, causal_mask
from plan import Plan
from transfer import HiddenTransfer
from transfer_layers import TransferLayers, spread
from transfer_lora import TransferLoRA
from tree import Tree

KINDS = ["transfer-mlp", "transfer-lora", "transfer-layers"]
OPTIONS = {"transfer-mlp": {"hidden": 48}, "transfer-lora": {"rank": 4}, "transfer-layers": {"layers": [3, 1, 2]}}
TREE = Tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], k=3)
PLAN = Plan(Tree.parse("0;1;0,0;1,0;0,0,0", k=3), (0, 1), 3)  # cut steps and shifted drafts happen
PROMPTS = ([4, 8, 15, 16, 23, 42], [1, 2, 3], [7] * 11 + [3, 9])


def make(kind, model, options=False, scale=0.1, seed=0):
    """A drafter of `kind` for `model` (k = 3, t = 2, or OPTIONS[kind]), every weight moved off its start."""
    drafter = DRAFTERS[kind].for_model(model, 3, None if kind == "transfer-layers" and options else 2,
                                       **(OPTIONS[kind] if options else {}))
    return perturb(drafter, scale, seed)


def prefilled(model, n=6, length=32):
    cache = KVCache(model.args, 1, length)
    at = torch.arange(n)
    model(torch.tensor([PROMPTS[0][:n]]), at, causal_mask(n), at, cache)
    return cache


def tree_pass(drafter, model, tokens, n=6, **kw):
    cache = prefilled(model, n)
    with torch.no_grad():
        hidden, states = drafter.tree_pass(model, tokens, TREE.positions(n), TREE.mask, n, cache, **kw)
    return hidden, states, cache


def tokens_for(tree, seed=0):
    return torch.randint(96, (1, tree.size), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- losslessness

@pytest.mark.parametrize("options", [False, True], ids=["defaults", "options"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_and_sampled_decoding_equal_plain(kind, options):
    model = tiny(1)
    drafter, accepted = make(kind, model, options), 0
    for prompt in PROMPTS:
        for sampler in (lambda: Sampler(), lambda: Sampler(0.8, 0.9, seed=3)):
            ref = generate(model, prompt, 30, sampler())
            for plan in (TREE, PLAN):
                emitted = []
                out = generate_tree(model, drafter, prompt, plan, 30, sampler(), on_token=emitted.extend,
                                    on_step=check_cache(model, prompt, emitted))
                assert out.tokens == ref.tokens, (prompt, plan)
                accepted += sum(out.accepted)
    assert accepted > 0, "some drafts were accepted: the acceptance walk ran, not only the root"


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_decoding_equals_plain_without_recompiling(kind):
    """compiled.py's aot_eager setup (tests/test_compiled.py): one graph per plan, no recompilation,
    and the compiled step computes what the eager one does (the adapters are in the graph)."""
    model = tiny(1, n_layers=3)
    drafter = make(kind, model)
    cm = CompiledModel(model, static_length(max(map(len, PROMPTS)) + 25 + PLAN.tree.size, model, 64),
                       backend="aot_eager")
    cd = CompiledDrafter(drafter, cm, PLAN)
    cm.warm_up(), cd.warm_up()
    with no_recompiles(), torch.no_grad():
        for prompt in PROMPTS:
            for sampler in (lambda: Sampler(), lambda: Sampler(0.8, 0.9, seed=3)):
                ref = generate(model, prompt, 25, sampler())
                assert generate_tree(cm, cd, prompt, PLAN, 25, sampler(), cache=cm.cache).tokens == ref.tokens
        tree, n = PLAN.tree, len(PROMPTS[0])
        tokens = tokens_for(tree)
        args = (tokens, tree.positions(n), tree.mask, n)
        cache = prefilled(model, n, cm.cache.max_len)
        cm.cache.k.copy_(cache.k), cm.cache.v.copy_(cache.v)
        got = cd.step(cm, *args, cm.cache, torch.tensor(PLAN.nodes), PLAN.depth)
        want = drafter.step(model, *args, cache, torch.tensor(PLAN.nodes), PLAN.depth)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_drafts_per_node_are_the_first_drafts(kind):
    """Pseudo (a, i) never sees (a, j > i), in any layer: a smaller depth changes no kept draft."""
    model = tiny(9)
    drafter, tokens = make(kind, model, options=True), tokens_for(TREE, 1)
    h1, s1, _ = tree_pass(drafter, model, tokens, nodes=[0, 3, 5], depth=1)
    h3, s3, _ = tree_pass(drafter, model, tokens, nodes=[0, 3, 5])
    assert s1.shape[:2] == (3, 1) and s3.shape[:2] == (3, 3)
    torch.testing.assert_close(h1, h3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s3[:, :1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- each variant

@pytest.mark.parametrize("kind", KINDS)
def test_an_untrained_variant_is_the_linear_drafter(kind):
    """MLP branch W2 = 0, adapters B = 0, one layer for every offset: exactly HiddenTransfer."""
    model = tiny(2)
    options = {"layers": [2, 2, 2]} if kind == "transfer-layers" else {}
    drafter = DRAFTERS[kind].for_model(model, 3, 2, **options)
    linear = HiddenTransfer(model.args.dim, 3, 2)
    if kind == "transfer-mlp":
        linear.proj = drafter.proj.linear
    perturb(linear, 0.2, seed=4)  # the same random linear map in both (shared, or copied below)
    if kind != "transfer-mlp":
        drafter.proj.load_state_dict(linear.proj.state_dict())
    tokens = tokens_for(TREE, 2)
    (h, s, _), (h_lin, s_lin, _) = tree_pass(drafter, model, tokens), tree_pass(linear, model, tokens)
    assert torch.equal(h, h_lin)
    same = torch.equal if kind != "transfer-layers" else lambda a, b: torch.allclose(a, b, atol=1e-5)
    assert same(s, s_lin)  # transfer-layers orders its pseudo rows by offset: summed in another order


def test_lora_real_rows_are_the_frozen_models_bit_for_bit():
    """Real rows keep the frozen weights exactly: the verifying logits and the cache a pass writes
    are torch.equal to HiddenTransfer's with the same map, while the pseudo rows do change."""
    model = tiny(3)
    lora = make("transfer-lora", model, scale=0.3, seed=5)
    assert all(float(a.B.weight.detach().abs().min()) > 0 for layer in lora.adapters for a in layer.values())
    linear = HiddenTransfer(model.args.dim, 3, 2)
    linear.proj.load_state_dict(lora.proj.state_dict())
    tokens = tokens_for(TREE, 3)
    (h, s, cache), (h_lin, s_lin, cache_lin) = tree_pass(lora, model, tokens), tree_pass(linear, model, tokens)
    with torch.no_grad():
        logits, drafts = lora.step_logits(model, h, s)
        logits_lin, drafts_lin = linear.step_logits(model, h_lin, s_lin)
    assert torch.equal(logits, logits_lin) and torch.equal(h, h_lin)
    assert torch.equal(cache.k, cache_lin.k) and torch.equal(cache.v, cache_lin.v)
    assert not torch.allclose(drafts, drafts_lin, atol=1e-3), "the adapters change the pseudo rows"
    with torch.no_grad():
        for layer in lora.adapters:
            for adapter in layer.values():
                adapter.B.weight.zero_()
    assert torch.equal(tree_pass(lora, model, tokens)[1], s_lin), "B = 0: exactly the linear drafter"


def model_state(model):
    """Everything a pass could leave behind on the model: its module tree, hooks and tensors."""
    hooks = [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for name, m in model.named_modules()]
    return ([(n, id(m), type(m)) for n, m in model.named_modules()], hooks,
            {n: t.clone() for n, t in model.state_dict().items()},
            len(torch.nn.modules.module._global_forward_hooks))


def test_lora_leaves_the_model_as_it_found_it_after_a_pass_and_after_an_error(monkeypatch):
    model = tiny(3).requires_grad_(False)  # frozen, as train.py has it
    lora, before = make("transfer-lora", model), model_state(model)
    tree_pass(lora, model, tokens_for(TREE))
    lora.train_pass(model, fake_windows(1)[0][0][None], torch.tensor([[3, 9]]))[0].sum().backward()
    assert lora.adapters[0]["wq"].B.weight.grad.abs().sum() > 0, "the adapters learn"

    def fail(self, x):
        raise RuntimeError("adapter failed")
    monkeypatch.setattr(type(lora.adapters[0]["w2"]), "forward", fail)
    with pytest.raises(RuntimeError, match="adapter failed"):
        tree_pass(lora, model, tokens_for(TREE))
    monkeypatch.undo()
    after = model_state(model)
    assert before[:2] == after[:2] and before[3] == after[3] == 0
    assert all(torch.equal(before[2][n], t) for n, t in after[2].items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_per_offset_layers_join_where_they_are_told():
    assert spread(20, 4) == [20, 18, 16, 14] and spread(2, 3) == [2, 1, 1]
    model = tiny(4)
    drafter = TransferLayers.for_model(model, 3, layers=[3, 1, 2])
    assert drafter.layer == 3 and drafter.stages(3) == [(1, [2]), (2, [3]), (3, [1])]
    assert drafter.stages(2) == [(1, [2]), (3, [1])]
    with pytest.raises(ValueError, match="joins at the transfer layer"):
        TransferLayers.for_model(model, 2, 3, layers=[2, 1])
    with pytest.raises(ValueError, match="k=3 whole numbers"):
        TransferLayers.for_model(model, 3, layers=[3, 1])
    with pytest.raises(ValueError, match="from 1 to 3"):
        TransferLayers.for_model(model, 2, layers=[3, 4])
    # offset 2 made from h^1 rather than h^3: its draft changes, offset 1's does not
    tokens, moved = tokens_for(TREE, 4), TransferLayers(model.args.dim, 3, 3, layers=[3, 3, 3])
    moved.load_state_dict(perturb(drafter, 0.2, seed=6).state_dict())  # the same maps W_i
    s, s_same = tree_pass(drafter, model, tokens)[1], tree_pass(moved, model, tokens)[1]
    torch.testing.assert_close(s[:, 0], s_same[:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s[:, 1], s_same[:, 1], atol=1e-3)


# ----------------------------------------------------------------------------- checkpoints, flags

@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_save_and_reload_each_variant(kind, tmp_path):
    model, path = tiny(5), str(tmp_path / f"{kind}.pt")
    drafter = make(kind, model, options=True)
    save_checkpoint(path, drafter, model, {})
    loaded, _, note = load_drafter(model, path, kind)
    assert type(loaded) is type(drafter) and loaded.config() == drafter.config() and f"({kind})" in note
    assert all(value in loaded.config().values() for value in OPTIONS[kind].values())
    for (name, x), y in zip(drafter.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(x, y), name
    tokens = tokens_for(TREE, 5)
    for a, b in zip(tree_pass(drafter, model, tokens)[:2], tree_pass(loaded, model, tokens)[:2]):
        assert torch.equal(a, b)
    other = tiny(5, n_layers=3)  # another model: refused
    with pytest.raises(ValueError):
        load_drafter(other, path, kind)


def test_drafter_options_reach_the_drafter_and_guard_resume(tmp_path):
    flags = ["--seq-len", "24", "--positions-per-seq", "6", "--k", "3", "--warmup", "2", "--eval-every", "0",
             "--tree-sizes", "", "--drafter-checkpoint", str(tmp_path / "d.pt"), "--steps", "2",
             "--drafter", "transfer-lora", "--transfer-layer", "2"]
    args = train.parse_args(flags + ["--drafter-option", "rank=3"])
    assert args.drafter_option == [("rank", 3)] and train.make_drafter(args, tiny()).config()["rank"] == 3
    train.run(args, tiny(), fake_windows(4), fake_windows(1))
    with pytest.raises(SystemExit, match="other drafter_option, drafter config"):
        train.run(train.parse_args(flags + ["--drafter-option", "rank=5", "--resume"]), tiny(), fake_windows(4),
                  fake_windows(1))
    for bad in (["--drafter", "transfer", "--drafter-option", "rank=3"], ["--drafter-option", "rank"],
                ["--drafter", "transfer-mlp", "--drafter-option", "rank=3"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


# ----------------------------------------------------------------------------- the command line

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"transfer-mlp": "--drafter-option hidden=32", "transfer-lora": "--drafter-option rank=4",
            "transfer-layers": "--k 3"}


def shell(command, cwd):
    """`command` in bash in `cwd`, each `python X.py` the repository's, as a user types it."""
    return subprocess.run(["bash", "-c", command.replace("python ", f"{sys.executable} {ROOT}/")], cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("capacity")  # one replies cache for the three kinds


@pytest.mark.parametrize("kind", KINDS)
def test_each_variant_trains_and_decodes_losslessly_from_the_command_line(kind, workdir):
    trained = shell(f"python train.py --model tiny --drafter {kind} {COMMANDS[kind]} --steps 12 --threads 1 "
                    "--replies 40 --cache-dir runs", workdir)
    assert trained.returncode == 0, trained.stderr[-2000:]
    saved = torch.load(workdir / f"checkpoints/tiny/{kind}.pt", weights_only=True)
    assert saved["kind"] == kind and saved["finished"] and "source" not in saved
    decoded = shell(f"python decode.py --model tiny --drafter {kind} --check --max-new-tokens 40 --threads 1", workdir)
    assert decoded.returncode == 0, decoded.stderr[-2000:]
    assert f"drafter: checkpoints/tiny/{kind}.pt ({kind})" in decoded.stderr
    assert "tokens identical to plain decoding: yes" in decoded.stdout, decoded.stdout


def test_bench_runs_the_variants_beside_plain(workdir):
    missing = [k for k in KINDS if not (workdir / f"checkpoints/tiny/{k}.pt").exists()]
    if missing:
        pytest.skip(f"no checkpoints of {missing}: the command-line training test did not run first")
    benched = shell(f"python bench.py --model tiny --methods plain,{','.join(KINDS)} --prompts 2 "
                    "--max-new-tokens 16 --modes eager --threads 1 --out bench.json", workdir)
    assert benched.returncode == 0, benched.stderr[-2000:]
    assert all(f"| {k} |" in benched.stdout for k in KINDS), benched.stdout
    assert '"mismatches": []' in (workdir / "bench.json").read_text().replace("\n", "")
