"""Extending the method from one file: a new drafter kind, and a Hidden Transfer whose projection is
a 2-layer MLP, each defined in this file alone, go through the project's real code paths: trained by
train.py, saved and loaded by checkpoint.py, decoded losslessly by decode.py (greedy and seeded),
benchmarked by bench.py. Nothing in the project is edited to admit them: they implement
drafter.Drafter (or subclass transfer.HiddenTransfer) and are registered with checkpoint.register.
And: no module imports a project module inside a function.
"""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bench
import train
from checkpoint import DRAFTERS, load_drafter, register
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
def registered():
    register(LastHidden)
    yield LastHidden
    del DRAFTERS[LastHidden.kind]


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
def mlp():
    register(MLPTransfer)
    yield MLPTransfer
    del DRAFTERS[MLPTransfer.kind]


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


def test_the_new_kind_is_a_choice_of_every_script(registered):
    assert train.parse_args(["--drafter", "last-hidden"]).drafter_checkpoint == "checkpoints/last-hidden.pt"
    assert bench.parse_args(["--methods", "plain,last-hidden"]).methods == ["plain", "last-hidden"]


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
