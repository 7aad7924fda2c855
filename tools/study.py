"""The lever study of docs/EXPERIMENTS.md: one row per training run, from the JSON summaries that
train.py writes beside each checkpoint (and, for the runs that were benchmarked, bench.py's results).

    python train.py --drafter-checkpoint checkpoints/study/mlp.pt --drafter transfer-mlp --budget-minutes 6
    python bench.py --drafter-checkpoint checkpoints/study/mlp.pt --methods plain,transfer-mlp \\
        --out runs/study/mlp-bench.json
    python tools/study.py checkpoints/study/*.json --bench runs/study/*-bench.json

Each row: the run's name (its file name), the train.py flags that differ from the defaults (the
command that made it), the minutes of reply generation and of training, held-out top-1 and top-5
per offset on both sets, E[tau] of the best tree of 2, 8 and 32 nodes with pseudo tokens on every
node (tools/tree_choice.py, from the own set's acceptance rates), and the benchmark's speedup in
each mode where a results file names the checkpoint.
"""

import argparse
import json
import os
import sys

if os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):  # `python tools/x.py`:
    sys.path[0] = os.path.dirname(os.path.abspath(sys.path[0]))  # the root (as tools.x: nothing to do)

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)

import train
from cli import HelpFormatter, run_main
from tools.tree_choice import build_tree, expected_tau

NODES = (2, 8, 32)
UNSHOWN = {"drafter_checkpoint", "cache_dir", "threads", "device", "offset_weights", "eval_every", "tree_sizes",
           "compiled_finalists"}  # where, how fast, what else: not what is learned


def command(train_args: dict) -> str:
    """The train.py flags of a run that differ from today's defaults."""
    defaults = vars(train.parse_args([]))
    flags = []
    for key, value in train_args.items():
        if key in UNSHOWN or key not in defaults or defaults[key] == value:
            continue
        value = ",".join(map(str, value)) if isinstance(value, list) else value
        flags.append(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}"))
    return " ".join(flags) or "(defaults)"


def speedups(bench_files: list) -> dict:
    """{checkpoint path: {mode: speedup against plain decoding in the same mode}} from bench results."""
    out = {}
    for path in bench_files:
        with open(path) as f:
            results = json.load(f)
        for name, s in results.get("summary", {}).items():
            ckpt = results.get("checkpoints", {}).get(name.split(":")[0])
            if ckpt and s.get("speedup"):
                mode = name.split(":")[1] if ":" in name else "eager"
                out.setdefault(os.path.abspath(ckpt), {})[mode] = (s["speedup"]["median"], s["tau"], s["alpha"][0])
    return out


def row(path: str, run: dict, bench: dict) -> list:
    ev, minutes = run["eval"], run.get("minutes", {})
    fmt = lambda xs: "/".join(f"{x:.2f}" for x in xs)
    cell = lambda name, key: fmt(ev[name][key]) if name in ev else "-"
    taus = [f"{expected_tau(build_tree(run['accept_rates'], n), run['accept_rates']):.2f}" for n in NODES]
    pt = os.path.abspath(os.path.splitext(path)[0] + ".pt")
    speed = bench.get(pt, {})
    return [os.path.splitext(os.path.basename(path))[0], f"`{command(run['train_args'])}`",
            f"{minutes['data']:.1f}" if minutes.get("data", 0) >= 0.05 else "cached",
            f"{minutes.get('training', 0):.1f}",
            cell("own", "top1"), cell("own", "top5"), cell("sharegpt", "top1"), cell("sharegpt", "top5"),
            " / ".join(taus), speed_cell(speed)]


def speed_cell(speed: dict) -> str:
    """'eager 1.21x (tau 1.40, alpha_1 0.40); compiled ...' from {mode: (speedup, tau, alpha_1)}, or '-'."""
    modes = sorted(speed, key=lambda m: m != "eager")  # eager first
    cells = [f"{m} {speed[m][0]:.2f}x (tau {speed[m][1]:.2f}, alpha_1 {speed[m][2]:.2f})" for m in modes]
    return "; ".join(cells) or "-"


HEAD = ["run", "train.py flags", "gen. min", "train min", "own top-1", "own top-5", "ShareGPT top-1",
        "ShareGPT top-5", "E[tau] 2 / 8 / 32 nodes", "bench speedup, same mode"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("summaries", nargs="+", help="train.py's JSON summaries (checkpoints/<name>.json)")
    p.add_argument("--bench", nargs="*", default=[], help="bench.py results files of some of those checkpoints")
    args = p.parse_args(argv)
    bench = speedups(args.bench)
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for path in args.summaries:
        with open(path) as f:
            run = json.load(f)
        if not isinstance(run, dict) or "eval" not in run or not run.get("accept_rates"):
            sys.exit(f"error: {path} is not the summary of a finished train.py run")
        lines.append("| " + " | ".join(row(path, run, bench)) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
