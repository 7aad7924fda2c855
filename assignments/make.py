"""Make a student copy of this repository (`python assignments/make.py 3 --out ../ht-a3`, or `all`).

The assignment's functions, found by name with `ast` (the code carries no markers), keep their
signature and docstring; their body becomes `raise NotImplementedError("assignment N: ...")`.
Everything else is copied as is, except the key and the grader's tests. Read next: grade.py.
"""

import argparse
import ast
import os
import shutil
import subprocess
import sys

# The one table to update when a function moves: assignment -> (title, [(file, qualified name)]).
ASSIGNMENTS = {
    1: ("attention with positions, slots and a mask; the KV cache",
        [("model.py", "Attention.forward"), ("model.py", "KVCache.update"), ("model.py", "KVCache.move")]),
    2: ("the token tree: buffers, positions, slots and the ancestor mask",
        [("tree.py", "Tree.__init__"), ("tree.py", "Tree.positions"), ("tree.py", "Tree.slots"),
         ("tree.py", "Tree.tokens")]),
    3: ("the pseudo-token mask and the one-pass hidden transfer",
        [("tree.py", "pseudo_rows"), ("tree.py", "pseudo_positions"), ("tree.py", "pseudo_mask"),
         ("transfer.py", "HiddenTransfer.tree_pass")]),
    4: ("the acceptance walk, cache compaction, the plan's fallback and the decoding loop",
        [("decode.py", "accept"), ("decode.py", "next_drafts"), ("decode.py", "generate_tree"),
         ("plan.py", "Plan.source")]),
    5: ("self-distillation: the pseudo tokens of a window, the teacher and the KL loss",
        [("transfer.py", "HiddenTransfer.pseudo_inputs"), ("distill.py", "teacher_logprobs"),
         ("distill.py", "distill_loss")]),
    6: ("choosing a tree: acceptance probabilities, expected tau and the tree builder (then open-ended)",
        [("tools/tree_choice.py", "node_accept_probs"), ("tools/tree_choice.py", "expected_tau"),
         ("tools/tree_choice.py", "build_tree")]),
}

HANDOUTS = {1: "1-model.md", 2: "2-tree.md", 3: "3-transfer.md", 4: "4-decode.md", 5: "5-train.md",
            6: "6-open.md"}

# Never copied: version control, local outputs, caches, and what would hand out the answers.
SKIP_DIRS = {".git", "checkpoints", "runs", "__pycache__", ".pytest_cache", ".venv", ".whl"}
SKIP_FILES = {"assignments/KEY.md", "tests/test_assignments.py"}


def repo_files(root: str) -> list[str]:
    """Paths (relative, '/'-separated) of the files to copy: git's tracked and unignored files when
    `root` is a git checkout, else every file outside SKIP_DIRS."""
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout.split("\n")
        files = [f for f in out if f and os.path.isfile(os.path.join(root, f))]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
            files += [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for n in names]
    return sorted(f for f in set(files) if f not in SKIP_FILES and not SKIP_DIRS & set(f.split("/")[:-1])
                  and not f.endswith((".pyc", ".pt")))


def find_function(tree: ast.Module, qualname: str):
    """The def node named `qualname` ('f' or 'Class.method'), or None."""
    scope = tree.body
    *outer, name = qualname.split(".")
    for cls in outer:
        scope = next((n.body for n in scope if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if scope is None:
            return None
    return next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name),
                None)


def cut(source: str, qualnames: list[str], n: int, path: str = "<source>") -> str:
    """`source` with the bodies of `qualnames` replaced by a NotImplementedError (docstrings kept)."""
    tree, lines = ast.parse(source), source.splitlines(keepends=True)
    nodes = []
    for q in qualnames:
        node = find_function(tree, q)
        if node is None:
            raise LookupError(f"{path} has no function {q}: update ASSIGNMENTS in assignments/make.py")
        nodes.append((q, node))
    for q, node in sorted(nodes, key=lambda x: -x[1].lineno):  # bottom up: line numbers stay valid
        body = node.body
        doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str)
        first = body[1] if doc and len(body) > 1 else (None if doc else body[0])
        indent = " " * body[0].col_offset
        what = f"{path.removesuffix('.py')}.{q}"
        stub = f'{indent}raise NotImplementedError("assignment {n}: implement {what} (assignments/{HANDOUTS[n]})")\n'
        if first is None:  # a docstring alone: add the stub after it
            lines.insert(body[0].end_lineno, stub)
        else:
            lines[first.lineno - 1:node.end_lineno] = [stub]
    out = "".join(lines)
    ast.parse(out)  # the copy must still be valid Python
    return out


def make(numbers: list[int], root: str, out: str) -> list[str]:
    """Write the student copy to `out`; returns the cut functions as 'file:name'."""
    by_file = {}
    for n in numbers:
        for f, q in ASSIGNMENTS[n][1]:
            by_file.setdefault(f, []).append((q, n))
    sources = {}
    for f, items in by_file.items():  # cut everything in memory first: a stale table writes nothing
        with open(os.path.join(root, f)) as fh:
            src = fh.read()
        for q, n in items:
            src = cut(src, [q], n, f)
        sources[f] = src
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out")
    for f in repo_files(root):
        dst = os.path.join(out, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if f in sources:
            with open(dst, "w") as fh:
                fh.write(sources[f])
        else:
            shutil.copy2(os.path.join(root, f), dst)
    return [f"{f}:{q}" for f, items in by_file.items() for q, _ in items]


def parse_numbers(text: str) -> list[int]:
    if text == "all":
        return sorted(ASSIGNMENTS)
    if text.isdigit() and int(text) in ASSIGNMENTS:
        return [int(text)]
    raise ValueError(f"assignment must be one of {', '.join(map(str, ASSIGNMENTS))} or 'all', got {text!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a student copy of the repository for an assignment.")
    p.add_argument("assignment", help="assignment number (1-6), or 'all' to cut every assignment")
    p.add_argument("--out", required=True, help="directory for the student copy (new or empty)")
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="the reference repository to copy (default: the one holding this script)")
    args = p.parse_args(argv)
    try:
        numbers = parse_numbers(args.assignment)
        done = make(numbers, args.root, args.out)
    except (ValueError, LookupError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: cut {', '.join(done)}")
    for n in numbers:
        print(f"  assignment {n}: {ASSIGNMENTS[n][0]}; handout assignments/{HANDOUTS[n]}; "
              f"check: python assignments/grade.py {n}")


if __name__ == "__main__":
    main()
