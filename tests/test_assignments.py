"""The course assignments' grader is itself tested: the reference passes every check, a student
copy from assignments/make.py fails, and plausible wrong solutions (planted as small edits of the
reference) each fail at least one check. A grader that passes a wrong solution is a defect.

A planted edit must match the reference exactly once: when a refactor moves the code, the test
fails loudly instead of passing without planting anything. This file is left out of student copies.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "assignments"))

import make  # noqa: E402  (assignments/make.py)

# assignment -> [(file, reference text, wrong text, the mistake)]
PLANTED = {
    1: [("model.py", "q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)",
         "q, k = apply_rope(q, cos, sin), k", "RoPE on the queries only"),
        ("model.py", "        self.v[:, :, :, dst] = self.v[:, :, :, src]\n", "",
         "the cache move copies keys but not values"),
        ("model.py", "return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1),\n"
                     "                                              enable_gqa=self.n_kv != self.n_heads)",
         "g = self.n_heads // self.n_kv\n        return F.scaled_dot_product_attention("
         "q, k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1), attn_mask=mask.unsqueeze(1))",
         "kv heads tiled with repeat instead of repeat_interleave"),
        ("model.py", "self.k[layer][:, :, slots] = k\n        self.v[layer][:, :, slots] = v",
         "self.k[layer][:, :, :k.shape[2]] = k\n        self.v[layer][:, :, :v.shape[2]] = v",
         "K/V written to the first slots instead of the given ones"),
        ("model.py", "self.k[layer][:, :, slots] = k\n        self.v[layer][:, :, slots] = v",
         "self.k[layer][:1, :, slots] = k[:1]\n        self.v[layer][:1, :, slots] = v[:1]",
         "K/V written for batch row 0 only"),
        ("model.py", "attn_mask=mask.unsqueeze(1),", "attn_mask=mask[:1].unsqueeze(1),",
         "batch row 0's mask applied to every row"),
        ("model.py", "        self.k[:, :, :, dst] = self.k[:, :, :, src]\n        self.v[:, :, :, dst] = self.v[:, :, :, src]\n",
         "        for s, d in zip(src.tolist(), dst.tolist()):\n            self.k[:, :, :, d] = self.k[:, :, :, s]\n"
         "            self.v[:, :, :, d] = self.v[:, :, :, s]\n",
         "the cache move copied slot by slot, upward moves overwriting their own sources"),
        ("model.py", "        rows = [self.attend(q[:, :, :n], ck, cv, mask[:, :n, :kv_len])] if n else []\n"
                     "        if n < T:  # the ephemeral rows read the cache and the ephemeral tokens\n"
                     "            k = torch.cat([ck, k[:, :, n:]], dim=2)            # (B, n_kv, kv_len + T - n, hd)\n"
                     "            v = torch.cat([cv, v[:, :, n:]], dim=2)\n"
                     "            rows.append(self.attend(q[:, :, n:], k, v, mask[:, n:]))\n"
                     "        y = torch.cat(rows, dim=2) if len(rows) > 1 else rows[0]  # (B, nh, T, hd)\n",
         "        k = torch.cat([ck, k[:, :, n:]], dim=2)\n        v = torch.cat([cv, v[:, :, n:]], dim=2)\n"
         "        y = self.attend(q, k, v, mask)\n",
         "every row attends over cache + ephemeral columns: a masked NaN reaches the stored rows")],
    2: [("tree.py", "return n + self.depths", "return n + torch.arange(self.size, device=self.depths.device)",
         "siblings given different positions"),
        ("tree.py", "self.mask[i, self.path_to(i)] = True", "self.mask[i, self.path_to(i)[:-1]] = True",
         "a node does not see itself"),
        ("tree.py", "self.mask[i, self.path_to(i)] = True", "self.mask[self.path_to(i), i] = True",
         "descendants instead of ancestors (the mask transposed)"),
        ("tree.py", "self.ranks = torch.tensor([p[-1] if p else 0", "self.ranks = torch.tensor([p[0] if p else 0",
         "a node's rank read from the first step of its path"),
        ("tree.py", "            if top_r is not None and max(p) >= top_r:\n                raise ValueError(f\"tree "
                    "path {p} uses rank {max(p)} but the drafts keep only top_r={top_r}\")\n", "",
         "a rank of top_r or more accepted"),
        ("tree.py", "if k < self.depth or top_r <= int(self.ranks.max()):", "if top_r <= int(self.ranks.max()):",
         "drafts with fewer rows than the tree's depth accepted")],
    3: [("tree.py", "real = torch.cat([tree_mask, torch.zeros(N, pseudo.shape[0], dtype=torch.bool, device=dev)], 1)",
         "real = torch.cat([tree_mask, torch.ones(N, pseudo.shape[0], dtype=torch.bool, device=dev)], 1)",
         "real rows can see pseudo tokens"),
        ("tree.py", "own = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])",
         "own = owner[:, None] == owner[None, :]", "pseudo (a,i) sees its later siblings (a,j>i)"),
        ("tree.py", "rows = sees.repeat_interleave(k, dim=-2)", "rows = torch.cat([sees] * k, dim=-2)",
         "pseudo rows offset-major: (a,1), (b,1), .. take the wrong owner's row"),
        ("tree.py", "offsets = torch.arange(1, k + 1, device=owner_positions.device)",
         "offsets = torch.arange(k, device=owner_positions.device)", "pseudo (a,i) at position pos(a)+i-1"),
        ("transfer.py", "h = model.run_layers(h, all_pos, mask, slots, cache, t, model.args.n_layers)",
         "h = model.run_layers(h, all_pos, mask, slots, cache, t + 1, model.args.n_layers)",
         "the second half starts one layer late"),
        ("transfer.py", "mask = cache.attention_mask(pseudo_mask(tree_mask, depth, nodes), n, cached=N)",
         "own = pseudo_mask(tree_mask, depth, nodes)\n        mask = torch.cat([own.new_ones(own.shape[0], n), own], 1)[None]",
         "the pseudo mask's cache columns built by hand, not by cache.attention_mask"),
        ("transfer.py", "        if not 1 <= depth <= self.k:\n            raise ValueError(f\"depth {depth} must be "
                        "from 1 to k={self.k}\")\n", "", "a depth outside 1..k accepted")],
    4: [("decode.py", "        if child is None:\n            return path, emitted\n",
         "        if child is None:\n            return path, emitted[:-1]\n", "the bonus token dropped"),
        ("decode.py", "cache.move(tree.slots(n)[torch.tensor(path, device=dev)], ",
         "cache.move(tree.positions(n)[torch.tensor(path, device=dev)], ",
         "compaction copies the wrong slots (positions taken for slots)"),
        ("decode.py", "lambda v: sampler(logits[v])", "[sampler(row) for row in logits].__getitem__",
         "a fresh random draw per tree node instead of one per emitted token"),
        ("plan.py", "for depth_u in range(depth_v, -1, -1):", "for depth_u in range(depth_v + 1):",
         "the next drafts from the shallowest carrying ancestor, not the deepest"),
        ("plan.py", "u, shift = path[depth_u], depth_v - depth_u", "u, shift = path[depth_u], depth_v - depth_u - 1",
         "the fallback's shift off by one"),
        ("decode.py", "node_drafts[row, shift:shift + avail] if avail", "node_drafts[row, :avail] if avail",
         "an ancestor's drafts used unshifted"),
        ("decode.py", "if avail else node_drafts.new_zeros(0, node_drafts.shape[-1])", "if avail else node_drafts[0]",
         "a root-only step replaced by a full tree of the root's stale drafts"),
        ("decode.py", "cache = KVCache(model.args, 1, need, dev, dtype) if cache is None else cache",
         "cache = KVCache(model.args, 1, need, dev, dtype)",
         "the cache argument ignored: --compile's static cache never decoded into")],
    5: [("distill.py", "kl = (logp.exp() * (logp - logq)).sum(-1)", "kl = (logq.exp() * (logq - logp)).sum(-1)",
         "KL with its arguments swapped"),
        ("distill.py", "rows = (positions[..., None] + torch.arange(1, k + 1, device=h_L.device))",
         "rows = (positions[..., None] + torch.arange(k, device=h_L.device))", "the teacher read one position off"),
        ("transfer.py", "sees = torch.arange(T, device=h_t.device) <= positions[..., None]",
         "sees = torch.arange(T, device=h_t.device) < positions[..., None]", "pseudo (p,i) cannot see x_p"),
        ("transfer.py", "return x, pseudo_positions(positions, self.k), pseudo_rows(sees, self.k)",
         "return x, pseudo_positions(positions - 1, self.k), pseudo_rows(sees, self.k)",
         "pseudo (p,i) at position p+i-1"),
        ("distill.py", "/ valid.sum().clamp(min=1)", "/ valid.numel()", "the loss averaged over invalid targets too"),
        ("transfer.py", "x = self(src).flatten(1, 2)", "x = self.proj(src).unflatten(-1, (self.k, self.dim)).flatten(1, 2)",
         "h^t fed to the projection's weights in the model's dtype (no cast: a bf16 model fails)")],
    6: [("tools/tree_choice.py", "return 1.0 + float(node_accept_probs(tree, accept)[1:].sum())",
         "return float(node_accept_probs(tree, accept)[1:].sum())", "tau without the bonus token"),
        ("tools/tree_choice.py", "node_rate[0] = 1.0", "node_rate[0] = rates[0, 0]", "the root counted as a guess"),
        ("tools/tree_choice.py", "torch.where(mask, node_rate[None, :], torch.ones(())).prod(-1)",
         "torch.where(mask.T, node_rate[None, :], torch.ones(())).prod(-1)",
         "a node's probability taken over its descendants, not its ancestors"),
        ("tools/tree_choice.py", "-p * float(rates[len(path), r])", "-float(rates[len(path), r])",
         "nodes ranked by their own rate, not their path's probability"),
        ("tools/tree_choice.py", "    paths, frontier = [], []", "    if n_nodes > 1 + k * top_r:\n        raise ValueError("
                    "f\"n_nodes={n_nodes}: at most {1 + k * top_r} nodes\")\n    paths, frontier = [], []",
         "a tree's capacity taken as 1 + k * top_r"),
        ("tools/tree_choice.py", "    if rates.shape[0] < tree.depth or rates.shape[1] <= int(tree.ranks.max()):\n        raise",
         "    if False:\n        raise", "rates too small for the tree accepted")],
}


# assignment -> [(file, reference text, a correct solution written otherwise, what it does)]: these must pass
ALTERNATIVES = {
    1: [("model.py", "self.k[layer][:, :, slots] = k\n        self.v[layer][:, :, slots] = v",
         "self.k[layer].index_copy_(2, slots, k)\n        self.v[layer].index_copy_(2, slots, v)",
         "K/V written with index_copy_ along the slot axis")],
    4: [("decode.py", "    return node_drafts[row, shift:shift + avail] if avail else node_drafts.new_zeros(0, "
                      "node_drafts.shape[-1])",
         "    if avail == 0:\n        return node_drafts[:0, 0]\n    return node_drafts[row].narrow(0, shift, avail)",
         "next drafts sliced with narrow, none as an empty slice")],
}


def run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def student_copy(tmp, n):
    out = tmp / "copy"
    r = run(["assignments/make.py", str(n), "--out", str(out)], ROOT)
    assert r.returncode == 0, r.stderr
    assert not (out / "assignments" / "KEY.md").exists() and not (out / "tests" / "test_assignments.py").exists()
    assert not (out / ".git").exists()
    return str(out)


def edited_copy(tmp, table, n, i):
    """An uncut copy of the reference with edit i of assignment n from `table` made in it."""
    path, right, edit, what = table[n][i]
    out = str(tmp / "copy")
    make.make([], ROOT, out)
    with open(os.path.join(out, path)) as f:
        src = f.read()
    assert src.count(right) == 1, f"'{what}': the reference text is not in {path} exactly once " \
                                  "(did a refactor move it? update the table)"
    with open(os.path.join(out, path), "w") as f:
        f.write(src.replace(right, edit))
    return out


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every grading this file needs, run by one process (tests/grade_many.py: torch is imported
    once, each copy's modules afresh): {job: (exit status, output)}, or the error that kept a job's
    copy from being made."""
    jobs = [("reference", lambda: ROOT, ["all"])]
    for n in sorted(make.ASSIGNMENTS):
        jobs.append((("student", n), lambda n=n: student_copy(tmp_path_factory.mktemp("student"), n), [str(n)]))
    for n in sorted(PLANTED):
        for i in range(len(PLANTED[n])):
            jobs.append((("planted", n, i), lambda n=n, i=i: edited_copy(tmp_path_factory.mktemp("planted"),
                                                                           PLANTED, n, i), [str(n), "--first-failure"]))
    for n in sorted(ALTERNATIVES):
        for i in range(len(ALTERNATIVES[n])):
            jobs.append((("otherwise", n, i), lambda n=n, i=i: edited_copy(tmp_path_factory.mktemp("otherwise"),
                                                                             ALTERNATIVES, n, i), [str(n)]))
    results, ready = {}, []
    for key, prepare, args in jobs:
        try:
            ready.append((key, prepare(), args))
        except AssertionError as e:
            results[key] = e
    listing = tmp_path_factory.mktemp("jobs") / "jobs.json"
    listing.write_text(json.dumps([[copy, args] for _, copy, args in ready]))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "grade_many.py"), str(listing)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    for (key, _, _), (status, out) in zip(ready, json.loads(r.stdout.splitlines()[-1])):
        results[key] = (status, out)
    return results


def grading(graded, key):
    if isinstance(graded[key], AssertionError):
        raise graded[key]
    return graded[key]


def test_every_assignment_has_planted_mistakes():
    assert sorted(PLANTED) == sorted(make.ASSIGNMENTS)
    assert all(len(v) >= 3 for v in PLANTED.values())


def test_the_table_names_functions_that_exist():
    """make.py's table must name real functions; a stale entry is a clear error."""
    for n, (_, items) in make.ASSIGNMENTS.items():
        for path, name in items:
            with open(os.path.join(ROOT, path)) as f:
                out = make.cut(f.read(), [name], n, path)
            assert f'NotImplementedError("assignment {n}: implement {path[:-3]}.{name} (assignments/' in out
    with pytest.raises(LookupError, match="has no function Tree.nowhere"):
        make.cut("class Tree:\n    pass\n", ["Tree.nowhere"], 2, "tree.py")


def test_reference_passes_every_check(graded):
    status, out = grading(graded, "reference")
    assert status == 0, out
    assert "FAIL" not in out


def test_grade_runs_as_a_command():
    """The gradings above share one process; this one is the command a student types."""
    r = run(["assignments/grade.py", "1"], ROOT)
    assert r.returncode == 0 and "FAIL" not in r.stdout and "checks passed" in r.stdout, r.stdout + r.stderr
    r = run(["assignments/grade.py", "9"], ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: "), r.stderr


@pytest.mark.parametrize("n", sorted(make.ASSIGNMENTS))
def test_student_copy_fails_clearly(graded, n):
    status, out = grading(graded, ("student", n))
    assert status == 1, out
    assert f"not implemented yet: assignment {n}: implement" in out, out
    assert "Traceback" not in out


def test_all_cut_copy_still_imports_and_runs_its_scripts(tmp_path):
    out = tmp_path / "copy"
    assert run(["assignments/make.py", "all", "--out", str(out)], ROOT).returncode == 0
    r = run(["-c", "import model, tree, transfer, plan, generate, decode, distill, evaluate, replies, train, bench, "
                   "medusa, compiled, tools.analysis, tools.latency, tools.plan_search, tools.roofline"], out)
    assert r.returncode == 0, r.stderr
    r = run(["tree.py", "--help"], out)
    assert r.returncode == 0 and "--pseudo" in r.stdout


def test_make_refuses_bad_arguments(tmp_path):
    r = run(["assignments/make.py", "9", "--out", str(tmp_path / "x")], ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: assignment must be one of")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    r = run(["assignments/make.py", "1", "--out", str(tmp_path / "full")], ROOT)
    assert r.returncode == 1 and "not empty" in r.stderr


@pytest.mark.parametrize("n,i", [(n, i) for n in sorted(PLANTED) for i in range(len(PLANTED[n]))],
                         ids=[f"{n}-{m[3].replace(' ', '_')}" for n in sorted(PLANTED) for m in PLANTED[n]])
def test_planted_mistake_fails_a_check(graded, n, i):
    status, out = grading(graded, ("planted", n, i))
    assert status == 1 and "FAIL" in out, f"the grader passed a wrong solution ({PLANTED[n][i][3]}):\n{out}"


@pytest.mark.parametrize("n,i", [(n, i) for n in sorted(ALTERNATIVES) for i in range(len(ALTERNATIVES[n]))],
                         ids=[f"{n}-{m[3].replace(' ', '_')}" for n in sorted(ALTERNATIVES) for m in ALTERNATIVES[n]])
def test_a_correct_solution_written_otherwise_passes(graded, n, i):
    status, out = grading(graded, ("otherwise", n, i))
    assert status == 0 and "FAIL" not in out, f"the grader rejected a right answer ({ALTERNATIVES[n][i][3]}):\n{out}"
