"""The benchmark: Hidden Transfer against plain decoding and Medusa on MT-Bench, same model, same
machine, same run (METHOD.md, "Metrics" and "Baselines"). Methods take turns prompt by prompt, so
drift of a shared machine hits all alike; every output is checked against plain decoding's.
`--latency` instead measures what one verification pass costs against a one-token step, per tree
size (tools/latency.py). Last in the reading order: it times decode.py with train.py's checkpoints;
`python tools/results.py` turns its JSON into docs/RESULTS.md.

    python bench.py                     # needs checkpoints/transfer.pt and checkpoints/medusa.pt
    python bench.py --methods plain,transfer --untrained --prompts 2 --max-new-tokens 32   # smoke run
    python bench.py --drafter-checkpoint runs/t.pt --drafter-checkpoint runs/m.pt   # other checkpoints
    python bench.py --latency
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from checkpoint import DRAFTERS, default_checkpoint, load_drafter, open_checkpoint, save_atomic, train_command
from cli import (DTYPES, HelpFormatter, add_common_args, check_common_args, describe_machine, drafter_spec,
                 fit_context, int_range, list_of, load, run_main)
from data import pick_mtbench, read_mtbench
from decode import generate_tree
from generate import Generation, Sampler, generate
from plan import Plan
from tools import kernels, ties
from tools.compiled import Compiled
from tools.latency import latency_curve, latency_report
from tree import SHAPES, Tree

# ----------------------------------------------------------------------------- defaults, in one place
PROMPTS = 8              # one MT-Bench question per category (pick_mtbench goes round-robin)
MAX_NEW_TOKENS = 128     # with PROMPTS, a default run fits in about 15 minutes on a 2-core CPU
METHODS = "plain,transfer,medusa"  # plain decoding, then drafter kinds (checkpoint.DRAFTERS)
WARMUP_TOKENS = 8        # per method, untimed: first calls pay for allocation and kernel choice


def fail(message: str):
    """A user's mistake or a bad input file: one line on stderr, exit status 1 (argparse's usage
    errors exit with 2)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def environment(device) -> dict:
    # the load average says whether other work shared the CPU: timings under load are noisy
    return {"machine": describe_machine(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2)}


# ----------------------------------------------------------------------------- metrics

def _spread(xs) -> dict | None:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None


def method_metrics(gens: list, plain: list | None = None, depth: int = 0) -> dict:
    """METHOD.md's metrics for one method over prompts. gens, plain: Generation lists, prompt-aligned.

    tau = tokens after the first / passes, pooled over prompts (a mean of per-prompt taus would
    weigh a 5-token answer like a 128-token one). alpha_j = passes that accepted >= j drafts /
    passes that accepted >= j-1 (depth j accepted given depth j-1 was), for j = 1..depth.
    """
    acc = [a for g in gens for a in g.accepted]
    alpha = [sum(a >= j for a in acc) / max(1, sum(a >= j - 1 for a in acc)) for j in range(1, depth + 1)]
    ratios = [g.tokens_per_s / p.tokens_per_s for g, p in zip(gens, plain)] if plain else []
    return {"prompts": len(gens), "tokens": sum(len(g.tokens) for g in gens),
            "tokens_per_s": _spread([g.tokens_per_s for g in gens]), "speedup": _spread(ratios),
            "tau": sum(len(g.tokens) - 1 for g in gens) / max(1, len(acc)), "alpha": alpha,
            "passes": len(acc), "ms_per_pass": 1000 * sum(g.decode_s for g in gens) / max(1, len(acc))}


def first_difference(a: list, b: list) -> int | None:
    """Index of the first token where a and b differ (a prefix differs at its end), None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summarize(results: dict) -> dict:
    """Fill results' "mismatches", "summary" (per method) and "categories" from its "runs"."""
    runs, names = results["runs"], list(results["trees"])
    gens = {m: [Generation(**r["methods"][m]) for r in runs] for m in names}
    results["mismatches"] = [
        {"method": m, "prompt": r["prompt"], "category": r["category"], "turn": r["turn"], "position": at,
         **r.get("ties", {}).get(m, {})}  # gap, class, threshold: tools/ties.py
        for r in runs for m in names
        if (at := first_difference(r["methods"][m]["tokens"], r["methods"]["plain"]["tokens"])) is not None]
    results["summary"] = {}
    for m in names:
        depth = results["trees"][m]["depth"] if results["trees"][m] else 0
        results["summary"][m] = method_metrics(gens[m], gens["plain"], depth)
        results["summary"][m]["mismatches"] = sum(x["method"] == m for x in results["mismatches"])
    results["categories"] = {}
    for cat in dict.fromkeys(r["category"] for r in runs):  # in order of first appearance
        pick = [i for i, r in enumerate(runs) if r["category"] == cat]
        results["categories"][cat] = {m: method_metrics([gens[m][i] for i in pick],
                                                        [gens["plain"][i] for i in pick]) for m in names}
    return results


# ----------------------------------------------------------------------------- the run

def _one(model, method, prompt, max_new, temperature, top_p, seed, stop_ids, compiled=None) -> Generation:
    sampler = Sampler(temperature, top_p, seed)  # a fresh, equally seeded sampler for every method
    if compiled:  # compile for a new cache length bucket now, untimed (tools/compiled.py)
        compiled.warm_up(len(prompt) + max_new, method and method[1])
    if method is None:
        return generate(model, prompt, max_new, sampler, stop_ids, compiled=compiled)
    return generate_tree(model, method[0], prompt, method[1], max_new, sampler, stop_ids, compiled=compiled)


def run_bench(model, tok, methods: dict, prompts: list, max_new_tokens: int, temperature: float = 0.0,
              top_p: float = 1.0, seed: int = 0, truncate: str | None = None, compile: bool = False) -> dict:
    """Run every method on every prompt, interleaved, and return the results (see summarize).

    methods: {name: (drafter, plan.Plan or Tree), or None for plain decoding}; "plain" must be among them.
    prompts: [(category, [user turn 1, user turn 2, ...])]; turn 2 follows plain decoding's own
    answer to turn 1, as MT-Bench does, so every method sees the same second prompt.
    Ctrl-C stops early: the results then hold every prompt that all methods finished. A prompt
    too long for the model's context raises ValueError (cli.fit_context), or loses its first
    tokens with truncate="left"; first turns are checked before anything runs.
    compile: every method's decoding steps run compiled (tools/compiled.py), plain decoding's too.
    """
    if methods.get("plain", 0) is not None:
        raise ValueError("methods must include 'plain': None, the reference for speed and losslessness")
    methods = {"plain": None, **{m: v if v is None or isinstance(v[1], Plan) else (v[0], Plan.full(v[1], v[0].k))
                                 for m, v in methods.items()}}  # plain first: the others are compared with it
    compiled = {m: Compiled(model, v and v[0]) if compile else None for m, v in methods.items()}
    dev = model.output.weight.device
    results = {"env": {**environment(dev), "dtype": str(model.output.weight.dtype).removeprefix("torch.")},
               "settings": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                            "seed": seed, "prompts": len(prompts), "turns": max(len(t) for _, t in prompts),
                            "compile": compile},
               "trees": {m: None if v is None else {"size": v[1].tree.size, "depth": v[1].tree.depth,
                                                    "plan": v[1].text(), **v[1].fields()}
                         for m, v in methods.items()},
               "runs": [], "interrupted": False}
    extra = max((v[1].tree.size for v in methods.values() if v is not None), default=0)  # the largest tree
    fit = lambda messages: fit_context(model, tok.encode_chat(messages)[0], max_new_tokens, extra, truncate)
    first = [fit([{"role": "user", "content": turns[0]}]) for _, turns in prompts][0]
    for name, method in methods.items():  # warm-up, untimed
        _one(model, method, first, WARMUP_TOKENS, temperature, top_p, seed, tok.stop_ids, compiled[name])

    bar = tqdm(total=sum(len(t) for _, t in prompts) * len(methods), unit="gen", desc="MT-Bench")
    t0 = time.perf_counter()
    try:
        for i, (category, turns) in enumerate(prompts):
            messages = []
            for turn, text in enumerate(turns, start=1):
                messages.append({"role": "user", "content": text})
                ids = fit(messages)
                run = {"prompt": i, "category": category, "turn": turn, "prompt_tokens": len(ids),
                       "methods": {}}
                for name, method in methods.items():
                    bar.set_postfix(method=name, category=category)
                    run["methods"][name] = asdict(_one(model, method, ids, max_new_tokens, temperature,
                                                       top_p, seed, tok.stop_ids, compiled[name]))
                    bar.update()
                    at = first_difference(run["methods"][name]["tokens"], run["methods"]["plain"]["tokens"])
                    if at is not None:  # a near-tie of plain decoding's top two logits, or not: tools/ties.py
                        run.setdefault("ties", {})[name] = tie = ties.explain(
                            model, ids, at, temperature, top_p, seed, tok.stop_ids)
                        bar.write(f"MISMATCH: {name} differs from plain decoding on prompt {i} "
                                  f"({category}, turn {turn}) from token {at} on: {ties.describe(tie)}")
                results["runs"].append(run)  # only now: a run is complete when every method did it
                answer = tok.decode([t for t in run["methods"]["plain"]["tokens"] if t not in tok.stop_ids])
                messages.append({"role": "assistant", "content": answer})
    except KeyboardInterrupt:
        results["interrupted"] = True
        bar.write(f"interrupted: reporting the {len(results['runs'])} prompts that every method finished")
    bar.close()
    results["wall_s"] = time.perf_counter() - t0
    return summarize(results)


# ----------------------------------------------------------------------------- the report

def _fmt(s: dict | None, unit: str = "", digits: int = 1) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def report(results: dict) -> str:
    """The results as markdown: the main table, the per-category table, the trees, the mismatches."""
    env, s = results["env"], results["settings"]
    mode = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, top-p {s['top_p']}"
    lines = [f"MT-Bench, {s['prompts']} prompts x {s['turns']} turn(s), max {s['max_new_tokens']} new "
             f"tokens, {mode}, seed {s['seed']}; {env['machine']}, {env['dtype']}, "
             f"load average {env['load_average']} at the start",
             f"{len(results['runs'])} generations per method in {results['wall_s'] / 60:.1f} min"
             f"{' (INTERRUPTED)' if results['interrupted'] else ''}", ""]
    if not results["runs"]:
        return "\n".join(lines + ["nothing was measured"])
    lines += ["| method | tokens/s median (min-max) | speedup median (min-max) | tau "
              "| alpha_1 / .. / alpha_D | passes | ms/pass | mismatches |", "|" + "---|" * 8]
    for m, r in results["summary"].items():
        alpha = " / ".join(f"{a:.2f}" for a in r["alpha"]) or "-"
        lines.append(f"| {m} | {_fmt(r['tokens_per_s'])} | {_fmt(r['speedup'], 'x', 2)} | {r['tau']:.2f} | "
                     f"{alpha} | {r['passes']} | {r['ms_per_pass']:.1f} | {r['mismatches']} |")
    methods = list(results["summary"])
    lines += ["", "Per category: median speedup over plain / tau", "",
              "| category | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for cat, per in results["categories"].items():
        cells = [f"{per[m]['speedup']['median']:.2f}x / {per[m]['tau']:.2f}" for m in methods]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines += [""] + [f"plan of {m}: {t['size']} nodes, depth {t['depth']}: {t['plan']}"
                     for m, t in results["trees"].items() if t]
    lines += [f"MISMATCH: {x['method']} on prompt {x['prompt']} ({x['category']}, turn {x['turn']}) "
              f"from token {x['position']}: {ties.describe(x)}" for x in results["mismatches"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def find_checkpoints(args) -> dict:
    """{method: (path, checkpoint dict)} for the drafting methods, checked as files before the slow
    model load: each --drafter-checkpoint serves the method its stored kind names; the others read
    checkpoints/<kind>.pt. A missing default baseline is skipped with a note unless --methods named it."""
    found = {}
    for path in args.drafter_checkpoint:
        ckpt = open_checkpoint(path)
        if ckpt["kind"] not in args.methods or ckpt["kind"] in found:
            fail(f"{path} holds a {ckpt['kind']} drafter: --methods {','.join(args.methods)} needs one "
                 f"checkpoint per drafting method")
        found[ckpt["kind"]] = (path, ckpt)
    for kind in [m for m in args.methods if m != "plain" and m not in found]:
        path = default_checkpoint(kind, args.model)
        if os.path.exists(path):
            found[kind] = (path, open_checkpoint(path, kind))
        elif kind != "transfer" and not args.methods_given:
            print(f"note: no {kind} checkpoint at {path}, so no {kind} baseline this time: make it with "
                  f"`{train_command(kind)}`", file=sys.stderr)
            args.methods.remove(kind)
        else:
            fail(f"no {kind} checkpoint at {path}: make it with `{train_command(kind)}`, pass "
                 f"--drafter-checkpoint, or leave {kind} out of --methods (or pass --untrained for a smoke run)")
    return found


def load_drafters(model, args, found: dict) -> dict:
    """{method: (drafter, plan, measured accept rates or None)} for the drafting methods."""
    out = {}
    for name in [m for m in args.methods if m != "plain"]:
        path, ckpt = found.get(name, (None, {}))
        drafter, plan, _ = load_drafter(model, path, name, untrained=args.untrained)
        kernels.apply(drafter)
        if args.tree:  # one tree for every drafter, pseudo tokens sized to it: like for like
            try:
                plan = Plan.full(Tree.parse(args.tree, k=drafter.k), drafter.k)
            except ValueError as e:
                fail(f"--tree: {e}")
        out[name] = (drafter, plan, ckpt.get("accept_rates"))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_common_args(p)  # its --prompt is not used: the prompts are MT-Bench's
    p.set_defaults(max_new_tokens=MAX_NEW_TOKENS)
    p.add_argument("--methods", default=None, type=list_of(lambda m: m if m == "plain" else drafter_spec(m)),
                   help=f"comma list of plain and drafters: {', '.join(DRAFTERS)}, or your own as FILE.py:Class "
                        f"or module:Class; plain is required (default: {METHODS}, skipping medusa with a note if "
                        "its checkpoint is missing)")
    p.add_argument("--prompts", type=int_range(1), default=PROMPTS,
                   help="MT-Bench questions, taken round-robin over the categories")
    p.add_argument("--full", action="store_true", help="all 80 MT-Bench questions (overrides --prompts)")
    p.add_argument("--both-turns", action="store_true", help="also run each question's follow-up turn")
    p.add_argument("--drafter-checkpoint", action="append", default=[],
                   help="a drafter checkpoint from train.py, once per drafting method: the kind it holds "
                        "says which method it serves (default: checkpoints/<kind>.pt)")
    p.add_argument("--untrained", action="store_true",
                   help="smoke run: identity projections and zero Medusa heads instead of checkpoints")
    p.add_argument("--tree", default=None,
                   help="tree for every drafter, every node with pseudo tokens for the tree's depth: a name "
                        "(" + ", ".join(["chain", *SHAPES]) + ") or paths such as '0;1;0,0' (default: each "
                        "checkpoint's own plan)")
    p.add_argument("--mtbench", default=None, help="MT-Bench question.jsonl (default: the installed one)")
    p.add_argument("--latency", action="store_true",
                   help="measure pass time against tree size instead of running MT-Bench "
                        "(save it with --out, e.g. runs/latency.json, for tools/results.py)")
    p.add_argument("--out", default="results.json", help="where the results are saved as JSON")
    args = p.parse_args(argv)
    args.methods_given = args.methods is not None
    args.methods = args.methods or METHODS.split(",")
    if len(set(args.methods)) != len(args.methods):
        p.error(f"--methods {','.join(args.methods)}: list each method at most once")
    if "plain" not in args.methods and not args.latency:
        p.error("--methods must include plain: it is the reference for speedup and losslessness")
    if args.latency and args.methods == ["plain"]:
        p.error(f"--latency times drafters: put one of {', '.join(DRAFTERS)} in --methods")
    return args


def main(argv=None):
    args = parse_args(argv)
    check_common_args(args)
    try:
        found = {} if args.untrained else find_checkpoints(args)
        if not args.latency:
            questions = read_mtbench(args.mtbench)
            picked = pick_mtbench(questions, len(questions) if args.full else args.prompts)
        model, tok = load(args)
        drafters = load_drafters(model, args, found)
    except (OSError, ValueError) as e:  # a bad checkpoint (checkpoint.CheckpointError) or MT-Bench file
        fail(str(e))
    if args.untrained:
        print("--untrained: identity projections and zero Medusa heads: lossless, but expect no speedup",
              file=sys.stderr)

    if args.latency:
        results = {"env": {**environment(args.device), "dtype": args.dtype}, "latency": {},
                   "interrupted": False}
        print(f"{results['env']['machine']}, {args.dtype}, load average {results['env']['load_average']}")
        for name, (drafter, _, accept) in drafters.items():
            results["latency"][name] = curve = latency_curve(model, drafter, accept)
            print("\n" + latency_report(name, curve))
            if curve["interrupted"]:
                results["interrupted"] = True
                break
    else:
        prompts = [(q["category"], q["turns"][:2 if args.both_turns else 1]) for q in picked]
        methods = {m: None if m == "plain" else drafters[m][:2] for m in args.methods}
        try:
            results = run_bench(model, tok, methods, prompts, args.max_new_tokens, args.temperature,
                                args.top_p, args.seed, args.truncate, args.compile)
        except ValueError as e:  # a prompt too long for the model's context
            fail(str(e))
        print("\n" + report(results))
    save_atomic(args.out, results)
    print(f"\nsaved {args.out}")
    real = ties.divergences(results.get("mismatches", []))
    if real and DTYPES[args.dtype] == torch.float32:  # near-ties are rounding, reported above
        sys.exit(f"error: {len(real)} outputs diverge from plain decoding in float32 beyond a near-tie: "
                 "decoding is not lossless")
    if results["interrupted"]:
        sys.exit(130)  # what a shell reports for Ctrl-C: the saved results are partial
    return results


if __name__ == "__main__":
    run_main(main)  # Ctrl-C outside the measuring loops (they report what they have): exit 130
