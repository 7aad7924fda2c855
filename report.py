"""What bench.py measured, as METHOD.md's metrics and as markdown: tau, alpha, speedups per method,
the headline against the fastest plain decoder, the spread of plain decoding across prompts,
mismatches. Pure functions of the results dictionary bench.run_bench fills.

Names: a method decoded eagerly is its kind ("plain", "transfer", "medusa"); compiled it is
"kind:compiled" (compiled.py). Each method is compared with plain decoding in its own mode; the
headline compares the best of them with the fastest plain decoder measured in the run. The peers
(results["peers"], tools/prompt_lookup.py: transformers' prompt lookup and plain generate()) are
reported beside them, never in the headline.
"""

import statistics

from generate import Generation
from tools import ties

SPREAD = 0.8  # plain decoding's slowest prompt under this fraction of its median tokens/s is explained


def plain_of(name: str) -> str:
    """The plain decoder a method is compared with: plain decoding in the same mode."""
    mode = name.partition(":")[2]
    return f"plain:{mode}" if mode else "plain"


def reference_of(name: str) -> str | None:
    """Whose tokens a method must reproduce: plain decoding in its mode; compiled plain decoding
    eager plain decoding's (a difference there is rounding, and must be a near-tie)."""
    return None if name == "plain" else ("plain" if name == plain_of(name) else plain_of(name))


def reference_in(results: dict, name: str) -> str | None:
    """reference_of, but a peer's own: plain decoding's tokens when greedy, none when it samples
    with transformers' own sampler (its tokens are then not comparable with ours)."""
    peers = results.get("peers", {})
    return peers[name]["reference"] if name in peers else reference_of(name)


def _spread(xs) -> dict | None:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None


def method_metrics(gens: list, plain: list | None = None, depth: int = 0) -> dict:
    """METHOD.md's metrics for one method over prompts. gens, plain: Generation lists, prompt-aligned.

    tau = tokens the passes after the prompt's emitted / those passes, pooled over prompts (a mean of
    per-prompt taus would weigh a 5-token answer like a 128-token one); for our decoders the tokens
    after the first, as the prompt's pass emits one (a peer's may also accept drafts). alpha_j =
    passes that accepted >= j drafts / passes that accepted >= j-1 (depth j accepted given depth
    j-1 was), for j = 1..depth.
    """
    acc = [a for g in gens for a in g.accepted]
    alpha = [sum(a >= j for a in acc) / max(1, sum(a >= j - 1 for a in acc)) for j in range(1, depth + 1)]
    ratios = [g.tokens_per_s / p.tokens_per_s for g, p in zip(gens, plain)] if plain else []
    return {"prompts": len(gens), "tokens": sum(len(g.tokens) for g in gens),
            "tokens_per_s": _spread([g.tokens_per_s for g in gens]), "speedup": _spread(ratios),
            "tau": sum(a + 1 for a in acc) / max(1, len(acc)), "alpha": alpha,
            "passes": len(acc), "ms_per_pass": 1000 * sum(g.decode_s for g in gens) / max(1, len(acc))}


def first_difference(a: list, b: list) -> int | None:
    """Index of the first token where a and b differ (a prefix differs at its end), None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def spread_note(name: str, runs: list, gens: list) -> str | None:
    """Why plain decoding's slowest prompt is under SPREAD x its median tokens/s, or None if it is not."""
    speeds = [g.tokens_per_s for g in gens]
    if not speeds or min(speeds) >= SPREAD * statistics.median(speeds):
        return None
    med, lengths = statistics.median(speeds), statistics.median(len(g.tokens) for g in gens)
    slow = [(r, g) for r, g in zip(runs, gens) if g.tokens_per_s < SPREAD * med]
    why = ("short answers, where the prompt's pass weighs more" if all(len(g.tokens) < 0.5 * lengths for _, g in slow)
           else "the machine was busier then (see the load average)")
    return (f"{name}: slowest prompt {min(speeds) / med:.2f}x the median tokens/s ({med:.1f}), under {SPREAD}x: "
            f"{why}. " + "; ".join(
                f"prompt {r['prompt']} ({r['category']}): {g.tokens_per_s:.1f} tokens/s, {len(g.tokens)} tokens, the "
                f"prompt's pass {100 * g.prefill_s / max(g.prefill_s + g.decode_s, 1e-9):.0f}% of its time, load "
                f"average {r.get('load_average', '?')}" for r, g in slow))


def summarize(results: dict) -> dict:
    """Fill results' "mismatches", "summary" (per method), "headline", "spread" and "categories"
    from its "runs"."""
    runs, names = results["runs"], list(results["trees"])
    gens = {m: [Generation(**r["methods"][m]) for r in runs] for m in names}
    results["mismatches"] = [
        {"method": m, "reference": ref, "prompt": r["prompt"], "category": r["category"], "turn": r["turn"],
         "position": at, **r.get("ties", {}).get(m, {})}  # gap, class, threshold: tools/ties.py
        for r in runs for m in names if (ref := reference_in(results, m))
        if (at := first_difference(r["methods"][m]["tokens"], r["methods"][ref]["tokens"])) is not None]
    results["summary"] = {}
    for m in names:
        depth = results["trees"][m]["depth"] if results["trees"][m] else 0
        results["summary"][m] = method_metrics(gens[m], gens[plain_of(m)], depth)
        peer = results.get("peers", {}).get(m, {})
        results["summary"][m]["mismatches"] = (None if peer and not peer["reference"]  # None: not comparable
                                               else sum(x["method"] == m for x in results["mismatches"]))
        base = peer.get("baseline")
        if base in gens:  # prompt lookup against transformers' own plain generate()
            results["summary"][m]["over_baseline"] = method_metrics(gens[m], gens[base])["speedup"]
    results["headline"] = headline(results, gens) if runs else None
    results["spread"] = [note for m in names if m == plain_of(m) and (note := spread_note(m, runs, gens[m]))]
    results["categories"] = {}
    for cat in dict.fromkeys(r["category"] for r in runs):  # in order of first appearance
        pick = [i for i, r in enumerate(runs) if r["category"] == cat]
        results["categories"][cat] = {m: method_metrics([gens[m][i] for i in pick],
                                                        [gens[plain_of(m)][i] for i in pick]) for m in names}
    return results


def headline(results: dict, gens: dict) -> dict:
    """The fastest plain decoder measured (median tokens/s), and the fastest lossless method (no
    divergence from its reference; not a peer) against it: the median over prompts of their tokens/s
    ratio, and every method's ratio, the peers' too."""
    summary = results["summary"]
    plains = [m for m in summary if m == plain_of(m)]
    fastest_plain = max(plains, key=lambda m: summary[m]["tokens_per_s"]["median"])
    bad = {x["method"] for x in ties.divergences(results["mismatches"])}
    peers = results.get("peers", {})  # timed beside the methods, whatever their tokens, never the headline
    against = {m: method_metrics(gens[m], gens[fastest_plain])["speedup"] for m in summary if m not in bad or m in peers}
    best = max((m for m in against if m not in peers), key=lambda m: against[m]["median"])
    return {"fastest_plain": fastest_plain, "fastest": best, "speedup": against[best],
            "against_fastest_plain": against}


def _fmt(s: dict | None, unit: str = "", digits: int = 1) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


NOT_COMPARABLE = "not comparable (transformers' own sampler)"


def _mismatches(r: dict) -> str:
    return NOT_COMPARABLE if r["mismatches"] is None else str(r["mismatches"])


def peer_lines(results: dict) -> list:
    """One line per peer: its tokens/s, against the fastest plain decoder and against transformers'
    plain generate(), its tau, and whether its tokens are plain decoding's."""
    h, out = results["headline"], []
    for m, p in results.get("peers", {}).items():
        r = results["summary"][m]
        what = f"prompt_lookup_num_tokens={p['prompt_lookup_num_tokens']}" if p["prompt_lookup_num_tokens"] else "plain"
        over = f", {r['over_baseline']['median']:.2f}x {p['baseline']}" if r.get("over_baseline") else ""
        out.append(f"peer {m} ({p['library']}, {what}, eager): {r['tokens_per_s']['median']:.1f} tokens/s, "
                   f"{h['against_fastest_plain'][m]['median']:.2f}x {h['fastest_plain']}{over}; tau {r['tau']:.2f}; "
                   f"mismatches with plain: {_mismatches(r)}")
    return [""] + out if out else []


def report(results: dict) -> str:
    """The results as markdown: the headline, the main table, the per-category table, the trees,
    compile times, the spread notes, the mismatches."""
    env, s = results["env"], results["settings"]
    mode = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, top-p {s['top_p']}"
    lines = [f"MT-Bench, {s['prompts']} prompts x {s['turns']} turn(s), max {s['max_new_tokens']} new "
             f"tokens, {mode}, seed {s['seed']}; {env['machine']}, {env['dtype']}, "
             f"load average {env['load_average']} at the start",
             f"{len(results['runs'])} generations per method in {results['wall_s'] / 60:.1f} min"
             f"{' (INTERRUPTED)' if results['interrupted'] else ''}", ""]
    if not results["runs"]:
        return "\n".join(lines + ["nothing was measured"])
    h, summary = results["headline"], results["summary"]
    lines += [f"Fastest lossless configuration here: {h['fastest']}, {h['speedup']['median']:.2f}x "
              f"(per prompt {h['speedup']['min']:.2f}-{h['speedup']['max']:.2f}) the fastest plain decoder "
              f"measured, {h['fastest_plain']} at {summary[h['fastest_plain']]['tokens_per_s']['median']:.1f} "
              "tokens/s", ""]
    lines += ["| method | tokens/s median (min-max) | speedup over plain in its mode | over the fastest plain "
              "| tau | alpha_1 / .. / alpha_D | passes | ms/pass | mismatches |", "|" + "---|" * 9]
    for m, r in summary.items():
        alpha = " / ".join(f"{a:.2f}" for a in r["alpha"]) or "-"
        fastest = _fmt(h["against_fastest_plain"].get(m), "x", 2)
        lines.append(f"| {m} | {_fmt(r['tokens_per_s'])} | {_fmt(r['speedup'], 'x', 2)} | {fastest} | "
                     f"{r['tau']:.2f} | {alpha} | {r['passes']} | {r['ms_per_pass']:.1f} | {_mismatches(r)} |")
    lines += peer_lines(results)
    methods = list(summary)
    lines += ["", "Per category: median speedup over plain in the same mode / tau", "",
              "| category | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for cat, per in results["categories"].items():
        cells = [f"{per[m]['speedup']['median']:.2f}x / {per[m]['tau']:.2f}" for m in methods]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines += [""] + [f"plan of {m}: {t['size']} nodes, depth {t['depth']}: {t['plan']}"
                     for m, t in results["trees"].items() if t]
    if results.get("compile_s"):
        lines.append("compiled before timing (seconds, untimed): " + ", ".join(
            f"{m} {sec:.0f}" for m, sec in results["compile_s"].items()))
    lines += [f"SPREAD: {note}" for note in results["spread"]]
    lines += [f"MISMATCH: {x['method']} differs from {x['reference']} on prompt {x['prompt']} ({x['category']}, "
              f"turn {x['turn']}) from token {x['position']}: {ties.describe(x)}" for x in results["mismatches"]]
    return "\n".join(lines)
