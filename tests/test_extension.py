"""Extending the method from outside the project: a drafter class in a file or a module, named on the
command line as FILE.py:Class or module:Class (checkpoint.drafter_kind), goes through the project's
real code paths: trained by train.py, saved and loaded by checkpoint.py (which records where the
class came from), decoded losslessly by decode.py (greedy and seeded), benchmarked by bench.py.
Nothing in the project is edited to admit them. The first test runs the commands as a user types
them, on the tiny model; the others use this file's own classes as `test_extension:Class`.
And: no module imports a project module inside a function.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bench
import train
import checkpoint
from checkpoint import CheckpointError, drafter_kind, load_drafter
from conftest import FakeTokenizer, fake_windows, tiny
from decode import generate_tree
from drafter import Drafter
from generate import Sampler, generate
from model import causal_mask
from transfer import HiddenTransfer
from tree import Tree


class LastHidden(Drafter):
    """Draft from the last layer's state of a node: q_i = head(h + A_i h), A_i a trained linear map
    (zero at start, so every q_i starts as the model's own next-token guess)."""
    kind, title = "last-hidden", "last hidden state + linear"

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.dim, self.k = dim, k
        self.proj = nn.Linear(dim, k * dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def config(self) -> dict:
        return {"dim": self.dim, "k": self.k}

    def forward(self, h, depth=None):
        a = self.proj.weight[:(depth or self.k) * self.dim]           # only the maps asked for
        return h.unsqueeze(-2) + (h @ a.T).unflatten(-1, (-1, self.dim))  # (..., depth, dim)

    def tree_pass(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):
        N = tokens.shape[1]
        slots = torch.arange(n, n + N)
        h = model.run_layers(model.embed(tokens), pos, cache.attention_mask(tree_mask, n), slots, cache)[0]
        nodes = torch.arange(N) if nodes is None else torch.as_tensor(nodes)
        return h, self(h[nodes], depth)

    def draft_logits(self, model, states):
        return model.head(states)

    def train_pass(self, model, ids, positions, frozen=None):
        T, d = ids.shape[1], model.args.dim
        with torch.no_grad():
            h_L = model.run_layers(model.embed(ids), torch.arange(T), causal_mask(T))
        return self(h_L.gather(1, positions[..., None].expand(-1, -1, d))), h_L


def decodes_losslessly_and_benches(model, drafter, plan, tree):
    """The plan train.py chose and another tree, greedy and seeded: exactly plain decoding's tokens;
    then bench.py beside plain decoding, with no mismatch. Returns bench's results."""
    prompt = fake_windows(1, seed=2)[0][0][:10].tolist()
    for t in (plan, tree):
        for sampler in (lambda: Sampler(), lambda: Sampler(0.8, 0.9, seed=5)):
            ref = generate(model, prompt, 24, sampler())
            assert generate_tree(model, drafter, prompt, t, 24, sampler()).tokens == ref.tokens
    prompts = [("writing", ["Write a poem."]), ("math", ["What is 2 + 2?"])]
    results = bench.run_bench(model, FakeTokenizer(), {"plain": None, drafter.kind: (drafter, plan)}, prompts, 12)
    assert results["mismatches"] == [] and f"| {drafter.kind} |" in bench.report(results)
    return results


@pytest.fixture
def named():
    """drafter_kind(spec), as a --drafter flag would call it; the kinds it adds are removed after."""
    before = dict(checkpoint.DRAFTERS), dict(checkpoint.SOURCES)
    yield drafter_kind
    for registry, old in zip((checkpoint.DRAFTERS, checkpoint.SOURCES), before):
        registry.clear()
        registry.update(old)


@pytest.fixture
def registered(named):
    assert named("test_extension:LastHidden") == "last-hidden"
    return LastHidden


def test_a_new_drafter_trains_decodes_and_benches(registered, tmp_path):
    model, path = tiny(), str(tmp_path / "last.pt")
    args = train.parse_args(["--drafter", "last-hidden", "--steps", "8", "--seq-len", "24", "--lr", "1e-2", "--k", "3",
                             "--positions-per-seq", "6", "--warmup", "2", "--eval-every", "0",
                             "--tree-sizes", "2,4", "--compiled-finalists", "0", "--drafter-checkpoint", path])
    out = train.run(args, model, fake_windows(8), fake_windows(2, seed=1))
    assert out["finished"] and len(out["history"]) == 8 and len(out["eval"]["held-out"]["top1"]) == 3

    drafter, plan, note = load_drafter(model, path, "last-hidden")
    assert isinstance(drafter, LastHidden) and drafter.proj.weight.abs().sum() > 0, "it trained"
    assert plan.fields() == {k: out[k] for k in ("tree", "pseudo_nodes", "pseudo_depth")}
    assert "(last-hidden)" in note

    tree = Tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], k=3)
    results = decodes_losslessly_and_benches(model, drafter, plan, tree)
    s = results["summary"]
    assert s["last-hidden"]["tokens"] == s["plain"]["tokens"]


class MLPTransfer(HiddenTransfer):
    """Hidden Transfer with a 2-layer MLP for the projection: h~_(p,i) = h + (W2 SiLU(W1 h))_i, the
    residual keeping the identity start (W2 = 0) that the linear projection has."""
    kind, title = "mlp-transfer", "Hidden Transfer, MLP projection"

    def projection(self, dim, k, bias):
        mlp = nn.Sequential(nn.Linear(dim, 2 * dim, bias=bias), nn.SiLU(), nn.Linear(2 * dim, k * dim, bias=bias))
        nn.init.zeros_(mlp[2].weight)
        return Residual(mlp, k)


class Residual(nn.Module):
    def __init__(self, inner, k):
        super().__init__()
        self.inner, self.k = inner, k

    def forward(self, h):                      # (..., dim) -> (..., k*dim): k copies of h, plus the MLP
        return torch.cat([h] * self.k, dim=-1) + self.inner(h)


@pytest.fixture
def mlp(named):
    assert named("test_extension:MLPTransfer") == "mlp-transfer"
    return MLPTransfer


def test_an_mlp_projection_trains_decodes_losslessly_and_benches(mlp, tmp_path):
    model, path = tiny(), str(tmp_path / "mlp.pt")
    args = train.parse_args(["--drafter", "mlp-transfer", "--steps", "12", "--seq-len", "24", "--lr", "1e-2",
                             "--k", "2", "--transfer-layer", "2", "--positions-per-seq", "6", "--warmup", "2",
                             "--eval-every", "0", "--tree-sizes", "2,3", "--compiled-finalists", "0",
                             "--drafter-checkpoint", path])
    out = train.run(args, model, fake_windows(8), fake_windows(2, seed=1))
    assert out["finished"] and out["history"][-1] < out["history"][0]

    drafter, plan, _ = load_drafter(model, path, "mlp-transfer")
    assert isinstance(drafter, MLPTransfer) and isinstance(drafter.proj, Residual)
    untrained = MLPTransfer(64, 2, 2)
    assert any(not torch.equal(x, untrained.state_dict()[n]) for n, x in drafter.state_dict().items()), "it trained"
    decodes_losslessly_and_benches(model, drafter, plan, Tree.parse("tree4", k=2))


def test_the_new_kind_is_a_choice_of_every_script(named):
    args = train.parse_args(["--drafter", "test_extension:LastHidden"])
    assert args.drafter == "last-hidden" and args.drafter_checkpoint == "checkpoints/last-hidden.pt"
    assert checkpoint.SOURCES["last-hidden"] == "test_extension:LastHidden"
    assert bench.parse_args(["--methods", "plain,test_extension:LastHidden"]).methods == ["plain", "last-hidden"]
    assert bench.parse_args(["--methods", "plain,last-hidden"]).methods == ["plain", "last-hidden"]  # named now


# ----------------------------------------------------------------------------- from the command line

ROOT = Path(__file__).resolve().parent.parent
MINE = '''
import torch.nn as nn
from transfer import HiddenTransfer


class Mine(HiddenTransfer):
    """Hidden Transfer with a rank-16 projection (W_i = B_i A: one A shared by the offsets)."""
    kind = "mine"

    def projection(self, dim, k, bias):
        return nn.Sequential(nn.Linear(dim, 16, bias=False), nn.Linear(16, k * dim, bias=bias))
'''


def shell(command: str, cwd) -> subprocess.CompletedProcess:
    """`command` in bash, in `cwd`, with $TMPDIR = cwd and $R = the repository, as a user types it."""
    env = {**os.environ, "TMPDIR": str(cwd), "R": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", command.replace("python ", f"{sys.executable} ")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_drafter_in_a_file_outside_the_repository_trains_decodes_and_benches(tmp_path):
    (tmp_path / "mine.py").write_text(MINE)
    train_run = shell('python $R/train.py --model tiny --drafter "$TMPDIR/mine.py:Mine" --steps 30 --threads 1', tmp_path)
    assert train_run.returncode == 0, train_run.stderr[-2000:]
    saved = torch.load(tmp_path / "checkpoints/tiny/mine.pt", weights_only=True)  # plain data: no code runs
    assert saved["kind"] == "mine" and saved["source"] == f"{tmp_path}/mine.py:Mine"

    decoded = shell('python $R/decode.py --model tiny --drafter "$TMPDIR/mine.py:Mine" --check --show '
                    '--max-new-tokens 40 --threads 1', tmp_path)
    assert decoded.returncode == 0 and "(mine), plan" in decoded.stderr, decoded.stderr[-2000:]
    assert "tokens identical to plain decoding: yes" in decoded.stdout, decoded.stdout
    benched = shell('python $R/bench.py --model tiny --methods "plain,$TMPDIR/mine.py:Mine" --prompts 2 '
                    '--max-new-tokens 16 --modes eager --threads 1 --out "$TMPDIR/bench.json"', tmp_path)
    assert benched.returncode == 0 and "| mine |" in benched.stdout, benched.stderr[-2000:]
    assert '"mismatches": []' in (tmp_path / "bench.json").read_text().replace("\n", "")

    # the checkpoint alone does not run the file: the class must be named, and be there
    unnamed = shell("python $R/decode.py --model tiny --drafter-checkpoint checkpoints/tiny/mine.pt", tmp_path)
    assert unnamed.returncode == 1 and unnamed.stderr.strip().splitlines() == [
        f"error: checkpoints/tiny/mine.pt holds a mine drafter whose class is {tmp_path}/mine.py:Mine: name it "
        f"to load it (--drafter {tmp_path}/mine.py:Mine; bench.py: --methods plain,{tmp_path}/mine.py:Mine)"]
    (tmp_path / "mine.py").rename(tmp_path / "moved.py")
    gone = shell('python $R/decode.py --model tiny --drafter "$TMPDIR/mine.py:Mine"', tmp_path)
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    assert gone.stderr.strip().splitlines()[-1].endswith(f"there is no file {tmp_path}/mine.py")


@pytest.mark.parametrize("text, spec, message", [
    (None, "absent.py:Mine", "there is no file .*absent.py"),
    ("x = 1\n", "{}:Mine", "has no class Mine that subclasses drafter.Drafter"),
    ("class Mine:\n    pass\n", "{}:Mine", "has no class Mine that subclasses drafter.Drafter"),
    ("def broken(:\n", "{}:Mine", r"importing .* failed: SyntaxError: .*line 1\)$"),
    ("import nowhere_to_be_found\n", "{}:Mine", r"failed: ModuleNotFoundError: .*nowhere_to_be_found.*line 1\)$"),
    ("import json\njson.loads('{')\n", "{}:Mine", r"failed: JSONDecodeError: .*d\.py, line 2\)$"),  # its line, not json's
    ("from transfer import HiddenTransfer\nclass Mine(HiddenTransfer):\n    kind = 'medusa'\n", "{}:Mine",
     "its kind 'medusa' is taken"),
    (None, "no_such_module_here:Mine", "failed: ModuleNotFoundError"),
    (None, "eagle", "unknown drafter 'eagle': give a kind"),
])
def test_a_bad_drafter_spec_is_one_line(named, tmp_path, text, spec, message):
    if text is not None:
        (tmp_path / "d.py").write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        named(spec.format(tmp_path / "d.py") if "{}" in spec else str(tmp_path / spec) if ".py" in spec else spec)
    assert "\n" not in str(e.value)


def test_a_class_without_a_kind_of_its_own_is_named_after_itself(named, tmp_path):
    """A subclass of HiddenTransfer inherits kind "transfer": it gets "mine2", and never replaces
    the project's own Hidden Transfer; the same file named twice is imported once."""
    (tmp_path / "m.py").write_text("from transfer import HiddenTransfer\nclass Mine2(HiddenTransfer):\n    pass\n")
    assert named(f"{tmp_path}/m.py:Mine2") == "mine2" == named(f"{tmp_path}/m.py:Mine2")
    assert checkpoint.DRAFTERS["transfer"] is HiddenTransfer and checkpoint.DRAFTERS["mine2"].title == "Mine2"
    assert named("transfer:HiddenTransfer") == "transfer" and "transfer" not in checkpoint.SOURCES  # the project's own


def test_a_checkpoint_needs_the_class_it_was_trained_with(named, tmp_path):
    model = tiny()
    for name in ("a", "b"):
        (tmp_path / f"{name}.py").write_text("from transfer import HiddenTransfer\nclass Mine(HiddenTransfer):\n"
                                             "    kind = 'mine'\n")
    named(f"{tmp_path}/a.py:Mine")
    path = str(tmp_path / "a.pt")
    checkpoint.save_checkpoint(path, checkpoint.DRAFTERS["mine"].for_model(model, 2), model, {})
    assert load_drafter(model, path, "mine")[0].kind == "mine"
    checkpoint.SOURCES["mine"] = f"{tmp_path}/b.py:Mine"  # as if another file of the same kind were named
    with pytest.raises(CheckpointError, match=f"whose class is {tmp_path}/a.py:Mine: name it"):
        load_drafter(model, path, "mine")


def test_no_function_imports_a_project_module():
    """Imports run one way (model <- tree <- drafter <- transfer / medusa <- checkpoint <- decode <- bench;
    checkpoint <- train <- analysis): no import hides inside a function to dodge a cycle."""
    root = Path(__file__).resolve().parent.parent
    project = {p.stem for p in root.glob("*.py")}
    late = []
    for file in sorted(root.glob("*.py")):
        for fn in ast.walk(ast.parse(file.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                             else [node.module] if isinstance(node, ast.ImportFrom) else [])
                    late += [f"{file.name}:{node.lineno} {n}" for n in names if n and n.split(".")[0] in project]
    assert not late, late
