"""docs/RESULTS.md, written from the JSON files the measuring commands save, never by hand:

    python tools/hf_baseline.py                   # runs/hf_baseline.json: plain decoding against transformers
    python train.py; python train.py --drafter medusa   # checkpoints/<kind>.json: held-out acceptance, the plan
    python bench.py --latency --out runs/latency.json   # the pass cost per tree size
    python bench.py                               # results.json: the benchmark
    python tools/results.py                       # docs/RESULTS.md and its figures

Each section says which file it came from; a file that is missing leaves its section out, with a
line saying how to make it. The figures need matplotlib (an optional dependency: without it the
tables are still written, and one line says so).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

if os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):  # `python tools/x.py`:
    sys.path[0] = os.path.dirname(os.path.abspath(sys.path[0]))  # the root (as tools.x: nothing to do)

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)

from cli import HelpFormatter, check_writable, run_main

FIGURES = "figures"  # beside the markdown


def read(path):
    """The JSON object in path, None if there is no such file; anything else is one line, exit 1."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        sys.exit(f"error: {path} is not a readable JSON file: {e}")
    if not isinstance(obj, dict):
        sys.exit(f"error: {path} holds a JSON {type(obj).__name__}, not the object its command saves")
    return obj


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(head, rows) -> list:
    return [row(head), "|" + "---|" * len(head), *[row(r) for r in rows], ""]


def slashes(xs, digits=2) -> str:
    return " / ".join(f"{x:.{digits}f}" for x in xs)


# ----------------------------------------------------------------------------- sections

def hf_section(hf) -> list:
    out = ["## Plain decoding against transformers", "",
           f"`python tools/hf_baseline.py`: {hf['machine']}, {hf['dtype']}, the same GGUF and prompt "
           f"({hf['prompt_tokens']} tokens), {hf['new_tokens']} new tokens, end of sequence disabled, the two "
           f"taking turns, median of {hf['reps']}.", ""]
    rows = [[name, f"{sorted(s)[len(s) // 2]:.1f}", f"{min(s):.1f} - {max(s):.1f}"] for name, s in hf["tokens_per_s"].items()]
    return out + table(["implementation", "tokens/s (median)", "min - max"], rows) + [
        f"Ours / transformers: **{hf['ratio']:.2f}x**; the same tokens: {hf['same_tokens']}.", ""]


def train_section(runs: dict, figures) -> list:
    out = ["## Held-out acceptance", "",
           "How often each draft is the base model's own choice, per offset i (offset 1 drafts the token two "
           "ahead), on fixed positions of two held-out sets: `own`, the base model's greedy replies to held-out "
           "prompts (where decoding happens), and `sharegpt`, held-out ShareGPT conversations. From "
           "`checkpoints/<kind>.json`, which `python train.py [--drafter KIND]` writes.", ""]
    rows = []
    for kind, r in runs.items():
        a = r["train_args"]
        for name, m in r["eval"].items():
            rows.append([kind, a["data"], name, slashes(m["top1"]), slashes(m["top5"]), slashes(m["kl"]),
                         f"{m['tau_chain']:.2f}", m["targets"]])
    out += table(["drafter", "trained on", "held-out set", "top-1", "top-5", "KL", "simulated tau, chain",
                  "positions"], rows)
    for kind, r in runs.items():
        a, minutes = r["train_args"], r.get("minutes", {})
        out.append(f"- {kind}: {r['step']} steps ({a['steps']} asked), t = {a.get('transfer_layer') or '2L/3'}, "
                   f"k = {a['k']}, lr {a['lr']}, {a['positions_per_seq']} positions per {a['seq_len']}-token window"
                   + (f", {a['replies']} prompts answered ({a['reply_tokens']} tokens at most)" if a["data"] == "replies" else "")
                   + "; minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items())
                   + f"; {r.get('machine', '')}")
    out.append("")
    if figures is not None:
        out += [f"![acceptance per offset]({figures('acceptance', plot_acceptance, runs)})", ""]
    for kind, r in runs.items():
        if r.get("plan_table"):
            t = r["plan_table"]
            out += [f"### The plan chosen for {kind}", "",
                    f"From the `own` acceptance rates and this machine's pass times (one-token step "
                    f"{t['step_ms']:.1f} ms, {t['n_ctx']} cached tokens, median of {t['reps']}); the best plan "
                    "of each tree size, `tree [nodes with pseudo tokens x how many]`:", ""]
            out += table(["nodes", "plan", "E[tau]", "ms/pass", "ratio to a step", "E[speedup]"],
                         [[x["nodes"], f"`{x['plan']}`", f"{x['tau']:.2f}", f"{x['ms']:.1f}", f"{x['ratio']:.2f}",
                           f"{x['speedup']:.2f}x"] for x in t["rows"]])
            chosen = ";".join(",".join(map(str, p)) for p in r["tree"])
            out += [f"Chosen: `{chosen} [nodes {','.join(map(str, r['pseudo_nodes']))} x {r['pseudo_depth']}]`.", ""]
        if r.get("compiled_plan_table"):
            t = r["compiled_plan_table"]
            out += [f"For compiled decoding, the best eager plans compiled and timed again (compiled one-token "
                    f"step {t['step_ms']:.1f} ms; {t['compile_s']:.0f} s of compiling):", ""]
            out += table(["nodes", "plan", "E[tau]", "ms/pass", "ratio to a step", "E[speedup]"],
                         [[x["nodes"], f"`{x['plan']}`", f"{x['tau']:.2f}", f"{x['ms']:.1f}", f"{x['ratio']:.2f}",
                           f"{x['speedup']:.2f}x"] for x in t["rows"]])
    return out


def latency_section(lat, figures) -> list:
    out = ["## What a pass costs, against the floor", "",
           f"`python bench.py --latency --out runs/latency.json`: {lat['env']['machine']}, {lat['env']['dtype']}.", ""]
    if lat.get("rows"):
        c, m = lat["rows"], lat["rows"]["machine"]
        out += [f"The floor of a pass of R rows is max(weight bytes / read bandwidth, 2 x params x R / peak "
                f"product rate): {c['weight_mb']:.0f} MB of weights, {m['read_gb_s']:.1f} GB/s read, "
                f"{m['peak_gflop_s']:.0f} GFLOP/s, both measured here. Passes of R new tokens after "
                f"{c['n_ctx']} cached, every row through the LM head, eager and compiled (one graph per R), "
                f"timed in alternation, median of {c['reps']}:", ""]
        out += table(["rows", "floor ms", "eager ms", "eager / floor", "compiled ms", "compiled / floor"],
                     [[x["rows"], f"{x['floor_ms']:.1f} ({x['floor_bound']})", f"{x['eager_ms']:.1f}",
                       f"{x['eager_ratio']:.2f}", f"{x['compiled_ms']:.1f}" if "compiled_ms" in x else "-",
                       f"{x['compiled_ratio']:.2f}" if "compiled_ms" in x else "-"] for x in c["rows"]])
        if figures is not None:
            out += [f"![passes against the floor]({figures('roofline', plot_roofline, c)})", ""]
    out += ["One decoding step with the best tree of each size, every node carrying pseudo tokens, against a "
            "plain one-token step, eager:", ""]
    for name, c in lat["latency"].items():
        if c["step_ms"] is None:
            continue
        floors = "step_floor_ms" in c
        out += [f"{name}: one-token step {c['step_ms']:.1f} ms"
                + (f" ({c['step_ms'] / c['step_floor_ms']:.2f}x its floor)" if floors else "")
                + f", {c['n_ctx']} cached tokens, median of {c['reps']}.", ""]
        out += table(["nodes", "ms/pass", "ratio to a step", "E[tau]", "E[speedup]"] + (["pass / floor"] if floors else []),
                     [[x["nodes"], f"{x['ms']:.1f}", f"{x['ratio']:.2f}", "-" if x["tau"] is None else f"{x['tau']:.2f}",
                       "-" if x["speedup"] is None else f"{x['speedup']:.2f}x"]
                      + ([f"{x['ms'] / x['floor_ms']:.2f}"] if floors else []) for x in c["rows"]])
    if figures is not None:
        out += [f"![pass cost per tree size]({figures('pass_cost', plot_latency, lat)})", ""]
    return out


def targets_section(lat, bench) -> list:
    """The speed targets against the floor and the fastest plain decoder, from the two files."""
    rows = {x["rows"]: x for x in lat["rows"]["rows"]} if lat and lat.get("rows") else {}
    out, cells = ["## The speed targets", ""], []
    if 1 in rows and "compiled_ms" in rows[1]:
        step = rows[1]["compiled_ms"]
        cells.append(["compiled one-token step <= 1.5x the floor", f"{rows[1]['compiled_ratio']:.2f}x",
                      "met" if rows[1]["compiled_ratio"] <= 1.5 else "missed"])
        small = [f"{r}: {rows[r]['compiled_ms'] / step:.2f}x" for r in sorted(rows) if 1 < r <= 16]
        ok = all(rows[r]["compiled_ms"] / step <= 1.3 for r in rows if 1 < r <= 16)
        cells.append(["compiled passes of up to 16 rows <= 1.3x the compiled step", ", ".join(small),
                      "met" if ok else "missed"])
    if bench and bench.get("headline"):
        h, summary = bench["headline"], bench["summary"]
        cells.append(["best mode >= 1.3x the fastest plain decoder", f"{h['fastest']}: {h['speedup']['median']:.2f}x "
                      f"{h['fastest_plain']}", "met" if h["speedup"]["median"] >= 1.3 else "missed"])
        if "transfer" in summary:
            sp = summary["transfer"]["speedup"]["median"]
            cells.append(["eager >= 1.3x eager plain", f"{sp:.2f}x", "met" if sp >= 1.3 else "missed"])
        ours = len([x for x in bench["mismatches"] if x["method"] not in bench.get("peers", {})])  # not a peer's
        cells.append(["0 mismatches", str(ours), "met" if not ours else "missed"])
        if pl := h["against_fastest_plain"].get("prompt-lookup"):  # the peer a user without a drafter would pick
            cells.append(["best mode faster than transformers' prompt lookup", f"{h['speedup']['median']:.2f}x against "
                          f"{pl['median']:.2f}x", "met" if h["speedup"]["median"] > pl["median"] else "missed"])
    if not cells:
        return []
    return out + table(["target", "measured", ""], cells) + [
        "What each lever bought: docs/EXPERIMENTS.md, \"Speed against the floor\".", ""]


def bench_section(path, b, figures) -> list:
    s, env = b["settings"], b["env"]
    mode = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, top-p {s['top_p']}"
    flags = "" if s["temperature"] == 0 else f" --temperature {s['temperature']} --top-p {s['top_p']}"
    flags += "" if os.path.basename(path) == "results.json" else f" --out {os.path.basename(path)}"
    out = [f"## The benchmark: `{path}`", "",
           f"`python bench.py{flags}`: MT-Bench, {s['prompts']} prompts x {s['turns']} turn(s), {s['max_new_tokens']} new "
           f"tokens, {mode}, methods taking turns prompt by prompt, modes {', '.join(s.get('modes', ['eager']))}; "
           f"{env['machine']}, {env['dtype']}, load average {env['load_average']} at the start.", ""]
    if b.get("headline"):
        h = b["headline"]
        out += [f"Fastest lossless configuration: **{h['fastest']}, {h['speedup']['median']:.2f}x** (per prompt "
                f"{h['speedup']['min']:.2f}-{h['speedup']['max']:.2f}) the fastest plain decoder measured, "
                f"{h['fastest_plain']}.", ""]
    rows = []
    for m, r in b["summary"].items():
        sp = r["speedup"]
        rows.append([m, f"{r['tokens_per_s']['median']:.1f}", f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})",
                     f"{r['tau']:.2f}", slashes(r["alpha"]) or "-", f"{r['ms_per_pass']:.1f}",
                     "not comparable (transformers' own sampler)" if r["mismatches"] is None else r["mismatches"]])
    out += table(["method", "tokens/s (median)", "speedup over plain in its mode (min-max)", "tau", "alpha_1 / ..",
                  "ms/pass", "mismatches"], rows)
    for m, p in (b.get("peers", {}) if b.get("headline") else {}).items():  # transformers' (tools/prompt_lookup.py)
        base, n = b["summary"][m].get("over_baseline"), p["prompt_lookup_num_tokens"]
        out += [f"Peer {m} ({p['library']}, {f'prompt_lookup_num_tokens={n}' if n else 'plain'}): "
                f"{h['against_fastest_plain'][m]['median']:.2f}x {h['fastest_plain']}"
                + (f", {base['median']:.2f}x {p['baseline']}" if base else "") + ".", ""]
    if b.get("compile_s"):
        out += ["Compiled before timing (s): " + ", ".join(f"{m} {t:.0f}" for m, t in b["compile_s"].items()), ""]
    out += [f"Spread: {note}" for note in b.get("spread", [])] + ([""] if b.get("spread") else [])
    methods = list(b["summary"])
    out += table(["category", *methods], [[cat, *[f"{per[m]['speedup']['median']:.2f}x / {per[m]['tau']:.2f}"
                                                  for m in methods]] for cat, per in b["categories"].items()])
    out += [f"Plan of {m}: `{t['plan']}`" for m, t in b["trees"].items() if t] + [""]
    out += [f"Mismatch: {x['method']} on prompt {x['prompt']} from token {x['position']}: {x.get('class')}, "
            f"top-2 gap {x.get('gap')}" for x in b["mismatches"]]
    if figures is not None:
        name = "speedup_" + os.path.splitext(os.path.basename(path))[0]
        out += [f"![speedup per category]({figures(name, plot_categories, b)})", ""]
    return out


# ----------------------------------------------------------------------------- figures

def plot_acceptance(plt, runs):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, r in runs.items():
        for name, m in r["eval"].items():
            ax.plot(range(1, len(m["top1"]) + 1), m["top1"], marker="o", label=f"{kind}, {name}")
    ax.set(xlabel="offset i (drafts the token i+1 ahead)", ylabel="held-out top-1", ylim=(0, 1),
           title="Draft = the model's own choice")
    ax.legend()
    return fig


def plot_latency(plt, lat):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, c in lat["latency"].items():
        ax.plot([x["nodes"] for x in c["rows"]], [x["ratio"] for x in c["rows"]], marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="tree nodes", ylabel="pass time / one-token step", title="What a pass costs")
    ax.legend()
    return fig


def plot_roofline(plt, c):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = [x["rows"] for x in c["rows"]]
    ax.plot(rows, [x["floor_ms"] for x in c["rows"]], color="black", lw=1.5, label="floor (memory or compute)")
    ax.plot(rows, [x["eager_ms"] for x in c["rows"]], marker="o", label="eager")
    if all("compiled_ms" in x for x in c["rows"]):
        ax.plot(rows, [x["compiled_ms"] for x in c["rows"]], marker="s", label="compiled")
    ax.set(xscale="log", yscale="log", xlabel="rows in the pass", ylabel="ms per pass", title="Passes against the floor")
    ax.legend()
    return fig


def plot_categories(plt, b):
    methods = [m for m in b["summary"] if not m.startswith("plain")]
    cats = list(b["categories"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        ax.bar([i + j * width for i in range(len(cats))], [b["categories"][c][m]["speedup"]["median"] for c in cats],
               width, label=m)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(cats))], cats, rotation=30)
    ax.set(ylabel="speedup over plain decoding", title="MT-Bench, per category")
    ax.legend()
    fig.tight_layout()
    return fig


def figure_maker(folder):
    """A function (name, plot, data) -> relative path of the PNG it wrote; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no figures (pip install matplotlib); the tables are written")
        return None
    os.makedirs(os.path.join(folder, FIGURES), exist_ok=True)

    def make(name, plot, data):
        fig = plot(plt, data)
        fig.savefig(os.path.join(folder, FIGURES, f"{name}.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
        return f"{FIGURES}/{name}.png"
    return make


def write(args) -> str:
    hf, lat = read(args.hf), read(args.latency)
    runs = {os.path.splitext(os.path.basename(p))[0]: r for p in args.train if (r := read(p))}
    benches = {p: b for p in args.bench if (b := read(p))}
    figures = figure_maker(os.path.dirname(os.path.abspath(args.out)))
    out = ["# Results", "", f"Written by `python tools/results.py` on {datetime.date.today()} at commit "
           f"`{commit()}` from the files each section names; every number is fp32 unless it says otherwise.", ""]
    sections = [(hf, lambda: hf_section(hf), f"{args.hf}: `python tools/hf_baseline.py`"),
                (runs, lambda: train_section(runs, figures), "checkpoints/*.json: `python train.py`"),
                (lat, lambda: latency_section(lat, figures),
                 f"{args.latency}: `python bench.py --latency --out {args.latency}`"),
                (benches, lambda: [line for path, b in benches.items() for line in bench_section(path, b, figures)],
                 "results.json: `python bench.py`")]
    greedy = benches.get(args.bench[0]) if args.bench else None
    if lat or greedy:
        out += targets_section(lat, greedy)
    missing = []
    for data, section, how in sections:
        if data:
            out += section()
        else:
            missing.append(how)
    if missing:
        out += ["## Not measured yet", ""] + [f"- {m}" for m in missing] + [""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(out))
    print(f"wrote {args.out}" + (f"; not measured yet: {len(missing)} sections" if missing else ""))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--train", nargs="*", default=["checkpoints/transfer.json", "checkpoints/medusa.json"],
                   help="train.py's JSON summaries")
    p.add_argument("--bench", nargs="*", default=["results.json"], help="bench.py's results, one section each")
    p.add_argument("--latency", default="runs/latency.json", help="bench.py --latency's results")
    p.add_argument("--hf", default="runs/hf_baseline.json", help="tools/hf_baseline.py's results")
    p.add_argument("--out", default="docs/RESULTS.md", help="the markdown written (figures beside it)")
    args = p.parse_args(argv)
    check_writable(args.out, "--out")
    try:
        return write(args)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:  # a file of another shape
        given = [f for f in [*args.train, *args.bench, args.latency, args.hf] if f and os.path.exists(f)]
        sys.exit(f"error: one of {', '.join(given)} lacks what its section needs ({type(e).__name__}: {e}): "
                 "write it again with the command that makes it")


if __name__ == "__main__":
    run_main(main)
