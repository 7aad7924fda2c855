"""The benchmark: Hidden Transfer against plain decoding and Medusa on MT-Bench, same model, same
machine, same run (METHOD.md, "Metrics" and "Baselines"), with transformers' prompt lookup and plain
generate() as peers when it is installed (tools/prompt_lookup.py). Methods take turns prompt by
prompt, so drift of a shared machine hits all alike; every output is checked against plain decoding's.
`--latency` instead measures what one verification pass costs against a one-token step, per tree
size (tools/latency.py). Last in the reading order: it times decode.py with train.py's checkpoints;
`python tools/results.py` turns its JSON into docs/RESULTS.md.

    python bench.py                     # needs checkpoints/transfer.pt and checkpoints/medusa.pt
    python bench.py --methods plain,transfer --untrained --prompts 2 --max-new-tokens 32   # smoke run
    python bench.py --drafter-checkpoint runs/t.pt --drafter-checkpoint runs/m.pt   # other checkpoints
    python bench.py --methods plain,transformers,prompt-lookup --modes eager   # transformers' peers only
    python bench.py --latency
"""

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)
import argparse
import contextlib
import os
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from checkpoint import (DRAFTERS, check_ranks, default_checkpoint, drafter_spec, load_drafter, open_checkpoint,
                        save_atomic, train_command)
from cli import (DTYPES, HelpFormatter, add_common_args, check_common_args, check_writable, describe_machine,
                 fit_context, int_range, list_of, load, run_main)
from compiled import CompiledDrafter, CompiledModel, compiler_works, no_recompiles, static_length
from data import pick_mtbench, read_mtbench
from decode import generate_tree
from generate import Generation, Sampler, generate
from plan import Plan
from report import first_difference, method_metrics, reference_in, report, summarize  # noqa: F401 (tests)
from tools import kernels, prompt_lookup, roofline, ties
from tools.latency import latency_curve, latency_report
from tree import SHAPES, Tree

# ----------------------------------------------------------------------------- defaults, in one place
PROMPTS = 8              # one MT-Bench question per category (pick_mtbench goes round-robin)
MAX_NEW_TOKENS = 128     # with PROMPTS, a default run fits in about 15 minutes on a 2-core CPU
METHODS = "plain,transfer,medusa,transformers,prompt-lookup"  # plain, drafter kinds, the peers (transformers')
MODES = "eager,compiled"  # every method as the reading path runs it, and compiled (compiled.py)
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


# ----------------------------------------------------------------------------- the run

def _one(model, method, prompt, max_new, temperature, top_p, seed, stop_ids, cache=None) -> Generation:
    if isinstance(method, prompt_lookup.Peer):  # transformers' generate(): its own sampler
        return method.generate(prompt, max_new, temperature, top_p, seed, stop_ids)
    sampler = Sampler(temperature, top_p, seed)  # a fresh, equally seeded sampler for every method
    if method is None:
        return generate(model, prompt, max_new, sampler, stop_ids, cache=cache)
    return generate_tree(model, method[0], prompt, method[1], max_new, sampler, stop_ids, cache=cache)


def compiled_methods(model, methods: dict, plans: dict, length: int, backend: str = "inductor") -> tuple:
    """The methods' compiled stand-ins (compiled.py), compiled now, each drafter with its plan from
    `plans`: ({"kind:compiled": (model, method, cache)}, {name: compile seconds}). One static cache of
    `length` slots serves them all."""
    cm = CompiledModel(model, length, backend)
    entries, seconds = {"plain:compiled": (cm, None, cm.cache)}, {"plain:compiled": cm.warm_up()}
    for name, v in methods.items():
        if isinstance(v, tuple):  # a drafter (plain decoding and the peers: None, a Peer)
            plan = plans.get(name, v[1])
            cd = CompiledDrafter(v[0], cm, plan)
            seconds[f"{name}:compiled"] = cd.warm_up()
            entries[f"{name}:compiled"] = (cm, (cd, cd.plan), cm.cache)
    return entries, seconds


def run_bench(model, tok, methods: dict, prompts: list, max_new_tokens: int, temperature: float = 0.0,
              top_p: float = 1.0, seed: int = 0, truncate: str | None = None, modes=("eager",),
              compiled_plans: dict | None = None, backend: str = "inductor") -> dict:
    """Run every method in every mode on every prompt, interleaved, and return the results (report.py).

    methods: {name: (drafter, plan.Plan or Tree), None for plain decoding, or a tools.prompt_lookup.Peer
    (eager only)}; "plain" must be among them.
    modes: "eager", and "compiled": every method also with its steps compiled (compiled.py), compiled
    before anything is timed, and nothing recompiled while timing (a recompilation raises);
    compiled_plans: {name: the plan it runs compiled} (default: the same plan as eager).
    prompts: [(category, [user turn 1, user turn 2, ...])]; turn 2 follows plain decoding's own
    answer to turn 1, as MT-Bench does, so every method sees the same second prompt.
    Ctrl-C stops early: the results then hold every prompt that all methods finished. A prompt
    too long for the model's context raises ValueError (cli.fit_context), or loses its first
    tokens with truncate="left"; first turns are checked before anything runs.
    """
    if methods.get("plain", 0) is not None:
        raise ValueError("methods must include 'plain': None, the reference for speed and losslessness")
    methods = {"plain": None, **{m: (v[0], Plan.full(v[1], v[0].k)) if isinstance(v, tuple) and not isinstance(
        v[1], Plan) else v for m, v in methods.items()}}  # plain first: the others are compared with it
    extra = max((v[1].tree.size for v in methods.values() if isinstance(v, tuple)), default=0)  # the largest tree
    fit = lambda messages: fit_context(model, tok.encode_chat(messages)[0], max_new_tokens, extra, truncate)
    firsts = [fit([{"role": "user", "content": turns[0]}]) for _, turns in prompts]
    entries = {name: (model, v, None) for name, v in methods.items()}  # name: (model, method, cache)
    compile_s = {}
    if "compiled" in modes:  # one cache for every prompt: the longest prompt (all its turns) and answers
        longest = max(len(tok.encode_chat([{"role": "user", "content": t} for t in turns])[0])
                      + (max_new_tokens + 8) * (len(turns) - 1) for _, turns in prompts)
        need = min(longest, model.args.max_seq_len - max_new_tokens - extra) + max_new_tokens + extra
        compiled, compile_s = compiled_methods(model, methods, compiled_plans or {}, static_length(need, model),
                                               backend)
        entries.update(compiled)
    dev = model.output.weight.device
    results = {"env": {**environment(dev), "dtype": str(model.output.weight.dtype).removeprefix("torch.")},
               "settings": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                            "seed": seed, "prompts": len(prompts), "turns": max(len(t) for _, t in prompts),
                            "modes": list(modes)},
               "trees": {m: None if not isinstance(v, tuple) else {"size": v[1].tree.size, "depth": v[1].tree.depth,
                                                                 "plan": v[1].text(), **v[1].fields()}
                         for m, (_, v, _) in entries.items()},
               "peers": {m: v.info(temperature) for m, v in methods.items() if isinstance(v, prompt_lookup.Peer)},
               "compile_s": compile_s, "runs": [], "interrupted": False}
    for m, v, cache in entries.values():  # warm-up, untimed: first calls pay for allocation
        _one(m, v, firsts[0], WARMUP_TOKENS, temperature, top_p, seed, tok.stop_ids, cache)

    bar = tqdm(total=sum(len(t) for _, t in prompts) * len(entries), unit="gen", desc="MT-Bench")
    t0 = time.perf_counter()
    try:
        with no_recompiles() if compile_s else contextlib.nullcontext():
            for i, (category, turns) in enumerate(prompts):
                messages = []
                for turn, text in enumerate(turns, start=1):
                    messages.append({"role": "user", "content": text})
                    ids = fit(messages)
                    run = {"prompt": i, "category": category, "turn": turn, "prompt_tokens": len(ids),
                           "load_average": round(os.getloadavg()[0], 2), "methods": {}}
                    for name, (m, v, cache) in entries.items():
                        bar.set_postfix(method=name, category=category)
                        run["methods"][name] = asdict(_one(m, v, ids, max_new_tokens, temperature, top_p, seed,
                                                           tok.stop_ids, cache))
                        bar.update()
                        ref = reference_in(results, name)
                        at = None if ref is None else first_difference(run["methods"][name]["tokens"],
                                                                       run["methods"][ref]["tokens"])
                        if at is not None:  # a near-tie of plain decoding's top two logits, or not
                            run.setdefault("ties", {})[name] = tie = ties.explain(
                                model, ids, at, temperature, top_p, seed, tok.stop_ids)
                            bar.write(f"MISMATCH: {name} differs from {ref} on prompt {i} ({category}, turn "
                                      f"{turn}) from token {at} on: {ties.describe(tie)}")
                    results["runs"].append(run)  # only now: a run is complete when every method did it
                    answer = tok.decode([t for t in run["methods"]["plain"]["tokens"] if t not in tok.stop_ids])
                    messages.append({"role": "assistant", "content": answer})
    except KeyboardInterrupt:
        results["interrupted"] = True
        bar.write(f"interrupted: reporting the {len(results['runs'])} prompts that every method finished")
    bar.close()
    results["wall_s"] = time.perf_counter() - t0
    return summarize(results)


def latency(model, drafters: dict, args) -> dict:
    """--latency: this machine's floor (tools/roofline.py), passes of 1..64 rows against it, eager and
    (with compiled in --modes) compiled, then each drafter's tree passes against a one-token step."""
    dtype = model.output.weight.dtype
    results = {"env": {**environment(args.device), "dtype": args.dtype}, "latency": {}, "interrupted": False}
    print(f"{results['env']['machine']}, {args.dtype}, load average {results['env']['load_average']}")
    results["machine"] = rates = roofline.machine(args.device, dtype)
    compiled = "compiled" in args.modes and compiler_works(args.device)
    results["rows"] = curve = roofline.rows_curve(model, rates, compiled=compiled)
    print("\n" + roofline.rows_report(curve))
    results["interrupted"] = curve["interrupted"]
    for name, (drafter, _, accept, _) in drafters.items():
        if results["interrupted"]:
            break
        floor = lambda rows, upper, layer: roofline.floor_ms(model, rates, rows, upper, layer)["ms"]
        results["latency"][name] = curve = latency_curve(model, drafter, accept, floor=floor)
        print("\n" + latency_report(name, curve))
        results["interrupted"] = curve["interrupted"]
    return results


# ----------------------------------------------------------------------------- command line

def drafting(args) -> list:
    """The drafting methods of --methods: neither plain decoding nor a peer (tools/prompt_lookup.py)."""
    return [m for m in args.methods if m != "plain" and m not in prompt_lookup.PEERS]


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
    for kind in [m for m in drafting(args) if m not in found]:
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
    """{method: (drafter, plan, measured accept rates or None, the plan for compiled decoding)} for
    the drafting methods (train.py chooses a plan for each mode, from passes timed in that mode)."""
    out = {}
    for name in drafting(args):
        path, ckpt = found.get(name, (None, {}))
        drafter, plan, _ = load_drafter(model, path, name, untrained=args.untrained)
        kernels.apply(drafter)
        compiled_plan = plan
        try:
            if args.tree:  # one tree for every drafter and mode, pseudo tokens sized to it: like for like
                plan = compiled_plan = Plan.full(Tree.parse(args.tree, k=drafter.k), drafter.k)
            elif ckpt.get("compiled_plan"):
                compiled_plan = Plan.from_fields(ckpt["compiled_plan"], drafter.k)
            check_ranks(compiled_plan, model.args.vocab_size)
        except (TypeError, ValueError, KeyError) as e:
            fail(f"--tree: {e}" if args.tree else f"{path} stores a bad compiled plan: {e}")
        out[name] = (drafter, plan, ckpt.get("accept_rates"), compiled_plan)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_common_args(p)  # its --prompt is not used: the prompts are MT-Bench's
    kernels.add_arg(p)
    prompt_lookup.add_arg(p)
    p.set_defaults(max_new_tokens=MAX_NEW_TOKENS)
    p.add_argument("--methods", default=None, type=list_of(lambda m: m if m == "plain" or m in prompt_lookup.PEERS
                                                            else drafter_spec(m)),
                   help=f"comma list of plain, drafters: {', '.join(DRAFTERS)}, or your own as FILE.py:Class "
                        "or module:Class, and transformers' peers: transformers (plain generate()), prompt-lookup; "
                        f"plain is required (default: {METHODS}, skipping medusa with a note if its checkpoint is "
                        "missing and the peers if transformers is)")
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
    p.add_argument("--modes", type=list_of(str), default=MODES,
                   help="eager: the steps as the reading path runs them; compiled: also every method with its "
                        "steps compiled (compiled.py), compiled before timing; the headline compares the fastest "
                        "lossless method with the fastest plain decoder measured")
    p.add_argument("--out", default="results.json", help="where the results are saved as JSON")
    args = p.parse_args(argv)
    if not args.modes or not set(args.modes) <= {"eager", "compiled"} or len(set(args.modes)) != len(args.modes):
        p.error(f"--modes {','.join(args.modes)}: a comma list of eager, compiled")
    args.methods_given = args.methods is not None
    args.methods = args.methods or METHODS.split(",")
    if len(set(args.methods)) != len(args.methods):
        p.error(f"--methods {','.join(args.methods)}: list each method at most once")
    if "plain" not in args.methods and not args.latency:
        p.error("--methods must include plain: it is the reference for speedup and losslessness")
    if args.latency and not drafting(args):
        p.error(f"--latency times drafters: put one of {', '.join(DRAFTERS)} in --methods")
    return args


def main(argv=None):
    args = parse_args(argv)
    check_common_args(args)
    check_writable(args.out, "--out", ".json")  # now, not after the whole benchmark has run
    asked = [m for m in args.methods if m in prompt_lookup.PEERS and not args.latency]
    if asked and (why := prompt_lookup.missing()):  # a test-time dependency (requirements-test.txt)
        if args.methods_given:
            fail(f"--methods {','.join(asked)}: {why}; or leave them out of --methods")
        print(f"note: {why}, so no transformers peers ({', '.join(asked)}) this time", file=sys.stderr)
        args.methods = [m for m in args.methods if m not in prompt_lookup.PEERS]
    try:
        found = {} if args.untrained else find_checkpoints(args)
        if not args.latency:
            questions = read_mtbench(args.mtbench)
            picked = pick_mtbench(questions, len(questions) if args.full else args.prompts)
        model, tok = load(args)
        kernels.use(args.matmul, model)  # the measured CPU product forms (tools/kernels.py)
        drafters = load_drafters(model, args, found)
        peers = {} if args.latency else prompt_lookup.build(model, args.methods, args.prompt_lookup_tokens)
    except (OSError, ValueError) as e:  # a bad checkpoint (checkpoint.CheckpointError) or MT-Bench file
        fail(str(e))
    if args.untrained:
        print("--untrained: identity projections and zero Medusa heads: lossless, but expect no speedup",
              file=sys.stderr)

    if args.latency:
        results = latency(model, drafters, args)
    else:
        prompts = [(q["category"], q["turns"][:2 if args.both_turns else 1]) for q in picked]
        methods = {m: None if m == "plain" else peers[m] if m in peers else drafters[m][:2] for m in args.methods}
        compiled_plans = {m: drafters[m][3] for m in drafting(args)}
        if "compiled" in args.modes and not compiler_works(args.device):
            print("note: torch.compile needs a C++ compiler on a CPU (none found: set CXX or install g++): "
                  "timing eager decoding only", file=sys.stderr)
            args.modes = [m for m in args.modes if m != "compiled"] or ["eager"]
        try:
            results = run_bench(model, tok, methods, prompts, args.max_new_tokens, args.temperature,
                                args.top_p, args.seed, args.truncate, args.modes, compiled_plans)
        except ValueError as e:  # a prompt too long for the model's context
            fail(str(e))
        results["checkpoints"] = {m: path for m, (path, _) in found.items()}
        print("\n" + report(results))
    save_atomic(args.out, results)
    print(f"\nsaved {args.out}")
    real = [x for x in ties.divergences(results.get("mismatches", [])) if x["method"] not in prompt_lookup.PEERS]
    if real and DTYPES[args.dtype] == torch.float32:  # near-ties are rounding, reported above
        sys.exit(f"error: {len(real)} outputs diverge from plain decoding in float32 beyond a near-tie: "
                 "decoding is not lossless")
    if results["interrupted"]:
        sys.exit(130)  # what a shell reports for Ctrl-C: the saved results are partial
    return results


if __name__ == "__main__":
    run_main(main)  # Ctrl-C outside the measuring loops (they report what they have): exit 130
