"""The prepared GPU check (run it through gpu_check.sh): what this project's numbers are on one
GPU, written as markdown and JSON to a folder, in at most about 8 minutes on one H100.

Sections: the environment; the CUDA tests; the pass cost per tree size against a one-token step
(SmolLM2-135M, and a Llama-2-7B-shaped model with random weights), eager and compiled, bf16; plain
decoding tokens/s, eager and compiled; a short `train.py --preset gpu` of both drafters (which also
chooses their plans by timing passes here: plan_search.select_plan); `bench.py --device cuda` (eager and compiled).
Whatever needs the real model or data is skipped, with a note, where they are absent. `--device
cpu` is a dry run at tiny sizes (CI runs it). docs/GPU.md says how to get the files there.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

if os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):  # `python tools/x.py`:
    sys.path[0] = os.path.dirname(os.path.abspath(sys.path[0]))  # the root (as tools.x: nothing to do)

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)

import torch

from cli import HelpFormatter, float_range, int_range, run_main
from compiled import CompiledDrafter, CompiledModel, no_recompiles, static_length
from generate import Sampler, generate
from model import ModelArgs, Transformer
from plan import Plan
from transfer import HiddenTransfer
from tools.tree_choice import build_tree
from tools.latency import CONTEXT, latency_curve, made_up_accept, paired_times, plain_step, tree_step
from weights import default_model_path, load_model

LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000,
                 rope_theta=10000.0, tie_embeddings=False, max_seq_len=4096)
SIZES, COMPILED_SIZES = (1, 2, 4, 8, 16, 32, 64), (8, 32)   # tree nodes timed eager / compiled
K = 2  # drafts per node: train.py's default


def environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "cuda": torch.version.cuda, "load_average": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def random_model(args: ModelArgs, device, dtype) -> Transformer:
    """Random weights built on the device itself (a 7B model would take minutes on the CPU)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args).eval()
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.requires_grad_(False)


@torch.no_grad()
def compiled_curve(model, drafter, sizes, reps, backend, n_ctx=CONTEXT) -> dict:
    """Like latency.latency_curve, through compiled.py's static-shape stand-ins: a one-token step,
    then a pass per tree size (the same trees, every node carrying pseudo tokens: plan.Plan.full),
    each timed against the same call made eagerly, in alternation ("eager_ms": the compiled speedup
    is their ratio)."""
    dev, t0 = model.output.weight.device, time.perf_counter()
    cm = CompiledModel(model, static_length(n_ctx + max(sizes) + 1, model), backend=backend)
    cm.warm_up()
    eager, step = paired_times(plain_step(model, n_ctx), plain_step(cm, n_ctx, cm.cache), dev, reps)
    curve = {"n_ctx": n_ctx, "reps": reps, "step_ms": 1000 * step, "eager_step_ms": 1000 * eager, "rows": []}
    for n in sizes:
        plan = Plan.full(build_tree(made_up_accept(drafter.k), n), drafter.k)
        cd = CompiledDrafter(drafter, cm, plan)
        cd.warm_up()
        eager, ms = paired_times(tree_step(model, drafter, plan, n_ctx), tree_step(cm, cd, plan, n_ctx, cm.cache),
                                 dev, reps)
        curve["rows"].append({"nodes": n, "ms": 1000 * ms, "ratio": ms / step, "eager_ms": 1000 * eager})
    curve["compile_s"] = time.perf_counter() - t0
    return curve


@torch.no_grad()
def plain_speed(model, new_tokens, backend, rounds: int = 3) -> dict:
    """Plain decoding tokens/s from a 64-token prompt (no stop token), eager and compiled in
    alternation, `rounds` generations each: the median of each, and whether they emit the same tokens."""
    prompt, speeds, tokens = list(range(1, 65)), {"eager": [], "compiled": []}, {}
    cm = CompiledModel(model, static_length(len(prompt) + new_tokens, model), backend=backend)
    cm.warm_up()
    generate(model, prompt, 4, Sampler())  # eager warm-up
    with no_recompiles():
        for _ in range(rounds):
            for name, m, cache in (("eager", model, None), ("compiled", cm, cm.cache)):
                g = generate(m, prompt, new_tokens, Sampler(), cache=cache)
                speeds[name].append((len(g.tokens) - 1) / g.decode_s)
                tokens[name] = g.tokens
    out = {name: {"tokens": len(tokens[name]), "decode_tokens_per_s": statistics.median(s), "runs": s}
           for name, s in speeds.items()}
    out["same_tokens"] = tokens["eager"] == tokens["compiled"]
    return out


def run_script(cmd: list, log: str, timeout: int) -> dict:
    """A subprocess (pytest, train.py, bench.py) with its output in a log file."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(1, timeout)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log) as f:
        tail = f.read()[-1500:]
    return {"command": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "log": os.path.basename(log), "tail": tail}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("out", help="folder for results.md, results.json and the logs")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu: a dry run at tiny sizes")
    p.add_argument("--model", default=None, help="SmolLM2 GGUF (default: the installed one, if any)")
    p.add_argument("--sharegpt", default=None,
                   help="ShareGPT json for the short training run (default: train.py's, the installed one)")
    p.add_argument("--mtbench", default=None,
                   help="MT-Bench question.jsonl for bench.py (default: bench.py's, the installed one)")
    p.add_argument("--full", action="store_true",
                   help="with --device cpu: real sizes (SmolLM2 only: a 7B model needs 27 GB in fp32), inductor")
    p.add_argument("--threads", type=int_range(1, 1024), default=None, help="CPU threads (default: torch's)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: tests,latency,plain,train,bench (default: none)")
    p.add_argument("--budget", type=float_range(0), default=480,
                   help="seconds for the whole check: a section is not started with under 15 s left (it is "
                        "listed as out of time), and a script section gets at most what is left")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        sys.exit(f"error: --device {args.device!r} is not a device: cuda, cuda:N or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here: use --device cpu for a dry run")
    dry, skip = dev.type == "cpu" and not args.full, set(filter(None, args.skip.split(",")))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sys.exit(f"error: {args.out} is a file: name a folder for the results (it is made if missing)")
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    backend = "aot_eager" if dry else "inductor"   # the dry run checks the plumbing, not inductor
    reps, new_tokens = (2, 8) if dry else (10, 128)
    results = {"env": environment(dev), "dry_run": dry, "dtype": str(dtype), "sections": {}, "out_of_time": []}
    say = lambda *a: print(*a, flush=True)
    say(f"gpu_check: {results['env']}")
    try:
        model_path = args.model or default_model_path()
    except Exception as e:  # the real model did not travel: its sections are skipped
        model_path, results["no_model"] = None, str(e)
    py, t0 = sys.executable, time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - t0)

    def starts(section: str) -> bool:  # False, and noted, once the budget is spent
        if left() >= 15:
            return True
        results["out_of_time"].append(section)
        say(f"== {section}: skipped, out of time (--budget {args.budget:.0f} s)")
        return False

    def save():  # after every section: a check cut short still leaves what it measured
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(results))

    if "tests" not in skip and starts("tests"):  # the device-parametrized tests, on this device only
        say("== CUDA tests")
        results["sections"]["tests"] = run_script(
            [py, "-m", "pytest", "-q", "-k", "cuda", "tests/test_decode.py", "tests/test_model.py",
             "tests/test_tree.py", "tests/test_medusa.py", "tests/test_plan.py", "tests/test_compiled.py",
             "tests/test_kernels.py"],
            os.path.join(args.out, "tests.log"), min(240, left()))
        save()

    models = {} if args.full and dev.type == "cpu" else {"llama-2-7b-shaped (random)": lambda: random_model(
        ModelArgs.tiny() if dry else ModelArgs(**LLAMA2_7B), dev, dtype)}
    if model_path and not dry:  # the dry run times tiny models only: it must run in CI
        models["SmolLM2-135M"] = lambda: load_model(model_path, dev, dtype).requires_grad_(False)
    for name, build in models.items():
        if not {"latency", "plain"} - skip:
            break
        if not starts(name):
            continue
        say(f"== {name}")
        model = build()
        w = model.output.weight
        drafter = HiddenTransfer.for_model(model, K).to(w.device, w.dtype)
        sec = results["sections"].setdefault(name, {})
        if "latency" not in skip:
            cpu = dev.type == "cpu"
            sec["eager"] = latency_curve(model, drafter, sizes=(1, 2, 4) if dry else SIZES[:5 if cpu else 7],
                                         reps=reps)
            sec["compiled"] = compiled_curve(model, drafter, (4,) if dry else (4, 16) if cpu else COMPILED_SIZES,
                                             reps, backend)
        if "plain" not in skip:
            sec["plain_decoding"] = plain_speed(model, new_tokens, backend, rounds=1 if dry else 3)
        say(json.dumps(sec)[:2000])
        save()
        del model, drafter
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    ckpts = {kind: os.path.join(args.out, f"{kind}.pt") for kind in ("transfer", "medusa")}
    common = (["--device", args.device] + (["--model", model_path] if model_path else [])
              + (["--threads", str(args.threads)] if args.threads else []))
    for kind, ckpt in ckpts.items():  # the plan of each is chosen by timing passes here (--tree-sizes)
        if "train" in skip or not model_path:
            break
        if not starts(f"train {kind}"):
            continue
        say(f"== train.py --preset gpu --drafter {kind} (short)")
        sizes = ["--steps", "2", "--seq-len", "64", "--conversations", "40", "--holdout", "4", "--batch-size", "1",
                 "--positions-per-seq", "8", "--eval-windows", "4", "--tree-sizes", "", "--data", "sharegpt"] if dry else [
                 "--steps", "60", "--conversations", "1500", "--holdout", "50", "--replies", "256", "--eval-windows",
                 "50", "--eval-every", "0", "--tree-sizes", "2,4,8,16,32"]
        results["sections"][f"train {kind}"] = run_script(
            [py, "train.py", "--preset", "gpu", "--drafter", kind, *common, *sizes,
             "--drafter-checkpoint", ckpt, "--cache-dir", os.path.join(args.out, "runs")]
            + (["--sharegpt", args.sharegpt] if args.sharegpt else []),
            os.path.join(args.out, f"train-{kind}.log"), min(150, left()))
        save()
    if "bench" not in skip and model_path and starts("bench"):
        say("== bench.py")
        trained = all(os.path.exists(c) for c in ckpts.values())
        results["sections"]["bench"] = run_script(
            [py, "bench.py", *common, "--methods", "plain,transfer,medusa",
             "--out", os.path.join(args.out, "bench.json"), "--prompts", "1" if dry else "4",
             "--max-new-tokens", "8" if dry else "96", *(["--modes", "eager"] if dry else []),
             *([a for c in ckpts.values() for a in ("--drafter-checkpoint", c)] if trained else ["--untrained"])]
            + (["--mtbench", args.mtbench] if args.mtbench else []), os.path.join(args.out, "bench.log"),
            min(240, left()))

    save()
    say(f"wrote {args.out}/results.md and results.json"
        + (f"; out of time, not run: {', '.join(results['out_of_time'])}" if results["out_of_time"] else ""))
    failed = [k for k, v in results["sections"].items() if isinstance(v, dict) and v.get("rc") not in (None, 0)]
    if failed:
        sys.exit(f"error: these sections failed: {', '.join(failed)} (see their logs in {args.out})")


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"# gpu_check{' (DRY RUN on the CPU, tiny sizes)' if results['dry_run'] else ''}", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), f"dtype: {results['dtype']}", ""]
    if results.get("out_of_time"):
        lines += [f"Out of time (--budget), not run: {', '.join(results['out_of_time'])}.", ""]
    if results.get("no_model"):
        lines += [f"Real model absent ({results['no_model']}): its sections were skipped.", ""]
    for name, sec in results["sections"].items():
        if "rc" in sec:
            lines += [f"## {name}: exit {sec['rc']} in {sec['seconds']} s", f"`{sec['command']}`", "",
                      "```", sec["tail"].strip()[-800:], "```", ""]
            continue
        lines += [f"## {name}", ""]
        if sec.get("eager", {}).get("step_ms"):
            c = sec["eager"]
            rows = ", ".join(f"{r['nodes']} nodes {r['ms']:.2f} ms ({r['ratio']:.2f}x)" for r in c["rows"])
            lines.append(f"- pass cost, eager: one-token step {c['step_ms']:.2f} ms; {rows}")
        if "compiled" in sec:  # each compiled time beside the same call made eagerly, in alternation
            c = sec["compiled"]
            rows = ", ".join(f"{r['nodes']} nodes {r['ms']:.2f} ms ({r['ratio']:.2f}x; eager {r['eager_ms']:.2f})"
                             for r in c["rows"])
            lines.append(f"- pass cost, compiled (eager timed in alternation): one-token step {c['step_ms']:.2f} ms "
                         f"(eager {c['eager_step_ms']:.2f}); {rows}; compiling took {c['compile_s']:.0f} s")
        if "plain_decoding" in sec:
            p = sec["plain_decoding"]
            e, c = p["eager"]["decode_tokens_per_s"], p["compiled"]["decode_tokens_per_s"]
            lines.append(f"- plain decoding, median of {len(p['eager']['runs'])} in alternation: eager {e:.1f} "
                         f"tokens/s, compiled {c:.1f} tokens/s ({c / e:.2f}x), same tokens: {p['same_tokens']}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
