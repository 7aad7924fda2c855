"""Is our plain decoding an honest baseline? Its speed beside transformers' generate() on the same
weights, prompt, length, dtype and machine, measured in one run, alternating, median of several.

Every speedup in this project is divided by plain decoding's tokens/s, so plain decoding must be
at least as fast as the usual library's. transformers is a test-time peer only (requirements-test.txt);
it loads the same GGUF file. Both decode greedily with the end-of-sequence token disabled, so both
emit exactly --max-new-tokens tokens; the outputs are also compared token for token. 
    python tools/hf_baseline.py --max-new-tokens 128 --reps 5
"""

import argparse
import os
import statistics
import sys
import time

if os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):  # `python tools/x.py`:
    sys.path[0] = os.path.dirname(os.path.abspath(sys.path[0]))  # the root (as tools.x: nothing to do)

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)

import torch

from cli import (HelpFormatter, add_common_args, check_common_args, check_writable, describe_machine, encode_prompt,
                 int_range, load, run_main)
from checkpoint import save_atomic
from generate import Sampler, generate
from tools import kernels
from weights import default_model_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    add_common_args(parser)
    kernels.add_arg(parser)
    parser.add_argument("--reps", type=int_range(1), default=5, help="timed generations per implementation")
    parser.add_argument("--out", default="runs/hf_baseline.json", help="where the numbers are saved as JSON "
                        "(tools/results.py reads them)")
    args = parser.parse_args(argv)
    check_common_args(args)
    check_writable(args.out, "--out", ".json")  # now, not after the timings
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        sys.exit("error: transformers is not installed: pip install -r requirements-test.txt")
    model, tok = load(args)
    kernels.use(args.matmul, model)  # ours at its fastest: the measured CPU product forms
    path = args.model or default_model_path()
    if not path.endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=model.output.weight.dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=model.output.weight.dtype)
    hf = hf.to(args.device).eval()

    prompt = encode_prompt(args, model, tok)
    n = args.max_new_tokens
    ids = torch.tensor([prompt], device=args.device)

    def ours():
        return generate(model, prompt, n, Sampler(), stop_ids=()).tokens

    def theirs():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=tok.eos_id)
        return out[0, len(prompt):].tolist()

    times = {"ours": [], "transformers": []}
    outputs = {name: fn() for name, fn in (("ours", ours), ("transformers", theirs))}  # warm-up
    for _ in range(args.reps):  # alternate, so drift of a shared machine hits both alike
        for name, fn in (("ours", ours), ("transformers", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    speeds = {name: [n / t for t in ts] for name, ts in times.items()}
    ratio = statistics.median(times["transformers"]) / statistics.median(times["ours"])
    same = outputs["ours"] == outputs["transformers"]
    print(f"{describe_machine(args.device)}, {args.dtype}, prompt {len(prompt)} tokens, {n} new tokens, "
          f"median of {args.reps}\n")
    print("| implementation | tokens/s (median) | min - max |\n|---|---|---|")
    for name, s in speeds.items():
        print(f"| {name} | {statistics.median(s):.1f} | {min(s):.1f} - {max(s):.1f} |")
    print(f"\nours / transformers: {ratio:.2f}x; same tokens: {same}")
    save_atomic(args.out, {"machine": describe_machine(args.device), "dtype": args.dtype, "new_tokens": n,
                           "prompt_tokens": len(prompt), "reps": args.reps, "tokens_per_s": speeds,
                           "ratio": ratio, "same_tokens": same})
    print(f"saved {args.out}")


if __name__ == "__main__":
    run_main(main)
