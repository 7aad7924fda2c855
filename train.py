"""Train the drafter by self-distillation: the frozen base model teaches its own pseudo tokens
(or, with --drafter medusa, Medusa heads) to predict what it would say k tokens ahead.

METHOD.md, "Training the projection": one frozen pass gives h^t, the real tokens' K/V and the
teacher distributions; P positions per window get k pseudo tokens each, which run through layers
t+1..L in ONE pass against that cache (each drafter's train_pass, drafter.py); loss =
sum_i w_i KL(P_(p+i) || Q_(p,i)). The windows are the base model's own replies (replies.py), each
window's frozen pass is computed once and reused every epoch, and at the end come the held-out
metrics (evaluate.py) and the plan choice (tools/plan_search.py). Read next: bench.py.

    python train.py                     # Hidden Transfer on the model's own replies
    python train.py --drafter medusa    # the Medusa-1 baseline: same data, targets and budget
"""

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)
import argparse
import math
import os
import shlex
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import (DRAFTER_HELP, DRAFTERS, SOURCES, default_checkpoint, drafter_spec, model_identity,
                        save_atomic, save_checkpoint)
from cli import (HelpFormatter, add_common_args, check_common_args, check_vocab_flags, check_writable,
                 describe_machine, drafter_option, drafter_options, float_range, int_range, list_of, load, run_main,
                 uninterrupted)
from compiled import compiler_works
from data import batches
from distill import choose_positions, distill_loss, teacher_logprobs
from evaluate import evaluate_all, format_all
from frozen import FrozenPasses, frozen_copy, frozen_key
from plan import Plan
import tiny
from replies import load_windows
from resume import restore, resumable
from tools import distributed, kernels
from tools.plan_search import expected_tokens, select_compiled_plan, select_plan
from tree import chain

def step_generator(seed: int, step: int) -> torch.Generator:
    # Each step draws its positions from its own seed: a resumed run needs no saved RNG state.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lr_at(step: int, args, train_s: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to lr/10: a pure function of the step (with --budget-minutes,
    of the step and the seconds trained so far, which a checkpoint keeps), so nothing to resume."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    done = (step - args.warmup) / max(1, args.steps - args.warmup)
    if args.budget_minutes:  # the decay runs over the time budget, or the steps if they end first
        done = max(done, train_s / (60 * args.budget_minutes))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


FP16_MAX = 65504.0  # a weight beyond it is inf when decoding in float16: the run has diverged


def diverged(loss: float, drafter) -> str | None:
    """Why training cannot go on, or None: a loss that is not finite, or a weight that is not
    finite or beyond float16's range (a learning rate far too high, such as --lr 1e30)."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    biggest = max(float(p.detach().abs().max()) for p in drafter.parameters())
    if not biggest <= FP16_MAX:  # NaN fails this too
        return f"a weight is {biggest:.3g}" + ("" if math.isnan(biggest) or math.isinf(biggest)
                                                else f", beyond float16's range ({FP16_MAX:.0f})")
    return None


def train_step(model, drafter, opt, ids, assistant, args, step, frozen=None, train_s=0.0) -> float:
    """One optimizer step on a batch: ids, assistant (B, T); frozen: the batch's frozen pass, if kept.
    model is the frozen model the pseudo tokens run through (bf16 or fp32). Returns the loss."""
    positions, valid = choose_positions(assistant, args.positions_per_seq, drafter.k,
                                        step_generator(args.seed, step))
    states, h_L = drafter.train_pass(model, ids, positions, frozen)
    with torch.no_grad():
        teacher = teacher_logprobs(model, h_L, positions, drafter.k)
    logits = drafter.draft_logits(model, states)
    loss, _ = distill_loss(logits, teacher, valid, args.offset_weights, args.teacher_topk, args.objective)
    opt.param_groups[0]["lr"] = lr_at(step, args, train_s)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
    opt.step()
    return loss.item()


# ----------------------------------------------------------------------------- the loop

def make_drafter(args, model):
    """A fresh drafter of kind --drafter; fp32 master weights whatever the model's dtype."""
    cls = DRAFTERS[args.drafter]
    drafter = cls.for_model(model, args.k, args.transfer_layer, **drafter_options(cls, args.drafter_option))
    return drafter.to(model.output.weight.device)


def run(args, model, train_windows, held: dict, frozen_model=None, world=(0, 1), minutes=None) -> dict:
    """Train, evaluate, choose the plan, save to --drafter-checkpoint. Returns the saved fields.
    held: {name: windows} of the held-out sets (or one list). frozen_model: the frozen model the training passes
    run through (a bf16 copy; default `model`); evaluation and the plan choice use `model`.
    world: (rank, ranks) under torchrun; rank 0 alone evaluates and saves. minutes: what came before
    (making the data), reported beside training's."""
    model.requires_grad_(False)  # frozen: only the drafter learns
    held = held if isinstance(held, dict) else {"held-out": held}
    frozen_model, main_process = frozen_model or model, world[0] == 0
    out_path, dev = args.drafter_checkpoint, model.output.weight.device
    drafter = make_drafter(args, model)
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.lr, weight_decay=0.0)
    step, history, evals, train_s = restore(args, model, drafter, opt) if args.resume else (0, [], [], 0.0)
    trainee = distributed.wrap(drafter) if world[1] > 1 else drafter   # DDP: gradients averaged over ranks
    data = batches(train_windows, args.batch_size, args.seed, start_step=step)
    data = distributed.shard(data) if world[1] > 1 else data            # each rank its rows of a batch
    frozen = FrozenPasses(args.frozen_cache_gb * 2**30, spill=args.cache_dir, disk_budget=args.frozen_disk_gb * 2**30,
                          key=frozen_key(model_identity(frozen_model), drafter, frozen_model.output.weight.dtype))
    first, before_s = step, train_s  # train_s: seconds in training steps, earlier runs included
    fields = lambda **more: {"step": step, "optimizer": opt.state_dict(), "train_args": dict(vars(args)),
                             "history": history, "evals": evals, "train_s": train_s, **more}
    bar = tqdm(total=None if args.budget_minutes else args.steps, initial=step, unit="step", desc=f"training {args.drafter}")
    try:
        while step < args.steps and not (args.budget_minutes and train_s >= 60 * args.budget_minutes):
            indices, ids, assistant = next(data)
            t0 = time.perf_counter()
            ids, assistant = ids.to(dev), assistant.to(dev)
            loss = train_step(frozen_model, trainee, opt, ids, assistant, args, step,
                              frozen(drafter, frozen_model, indices, ids), train_s)
            why = diverged(loss, drafter)
            if why:  # nothing is saved: --drafter-checkpoint keeps the last good state, if any
                raise ValueError(f"training diverged at step {step + 1}: {why}; lower --lr (now {args.lr:g}). "
                                 f"Nothing was saved: {out_path} keeps its last good checkpoint, if any")
            dt, step = time.perf_counter() - t0, step + 1
            train_s += dt
            history.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", s_step=f"{dt:.2f}")
            if args.eval_every and step % args.eval_every == 0 and step < args.steps and main_process:
                evals.append({"step": step, "train_s": train_s, "held_out": evaluate_all(model, drafter, held)})
                bar.write(f"step {step} ({train_s / 60:.1f} min of training):\n{format_all(evals[-1]['held_out'])}")
                save_checkpoint(out_path, drafter, model, fields())
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cli.run_main turns it into this)
        if main_process:  # saved before anything else: the progress bar cannot stand in the way
            with uninterrupted():  # a second Ctrl-C must not cut the save short
                save_checkpoint(out_path, drafter, model, fields())
        bar.close()
        print(f"\ninterrupted after step {step}: saved {out_path}; to continue, add --resume")
        raise  # saved: now stop the caller too (the command line exits 130, so `&&` chains stop)
    bar.close()
    if not main_process:
        return fields()
    save_checkpoint(out_path, drafter, model, fields())  # trained: an interrupt from here on loses nothing

    t0 = time.perf_counter()
    metrics = evaluate_all(model, drafter, held, args.top_r)
    evals.append({"step": step, "train_s": train_s, "held_out": metrics})
    print(f"held-out, step {step}:\n{format_all(metrics)}")
    accept = metrics["own"]["accept"] if "own" in metrics else next(iter(metrics.values()))["accept"]
    eval_s, t0 = time.perf_counter() - t0, time.perf_counter()
    sizes = [n for n in args.tree_sizes if n >= 2]  # 1 node, the root alone, accepts nothing
    kernels.apply(drafter)  # time the passes as decoding will run them: the CPU's faster product forms
    plan, table, candidates = (select_plan(model, drafter, accept, sizes) if sizes
                               else (Plan.full(chain(args.k), args.k), None, None))
    compiled = {}
    if candidates and args.compiled_finalists and compiler_works(dev):  # the plan compiled decoding runs
        compiled_plan, compiled_table = select_compiled_plan(model, drafter, accept, candidates,
                                                             args.compiled_finalists)
        compiled = {"compiled_plan": compiled_plan.fields(), "compiled_plan_table": compiled_table}
    minutes = {**(minutes or {}), "training": train_s / 60, "evaluation": eval_s / 60,
               "plan": (time.perf_counter() - t0) / 60}
    out = fields(eval=metrics, accept_rates=accept, **plan.fields(), plan_table=table, **compiled, minutes=minutes,
                 machine=describe_machine(dev), finished=True)
    save_checkpoint(out_path, drafter, model, out)
    save_atomic(os.path.splitext(out_path)[0] + ".json", {k: v for k, v in out.items() if k != "optimizer"})
    last = history[-20:] or [float("nan")]
    print(f"\n{args.drafter}: {step} steps; this run trained {(train_s - before_s) / 60:.1f} min "
          f"({(train_s - before_s) / max(1, step - first):.2f} s/step); loss {sum(last) / len(last):.3f} (mean of the "
          f"last {len(last)} steps); plan {plan.text()}, expected tau {expected_tokens(plan, accept)[0]:.2f}")
    again = "".join(f" {flag} {shlex.quote(value)}" for flag, value in  # what this run was told to load
                    (("--model", args.model), ("--drafter", SOURCES.get(args.drafter))) if value)
    print(f"saved {out_path}; try it: python decode.py{again} --drafter-checkpoint {out_path} --show")
    return out


# ----------------------------------------------------------------------------- command line

# --preset NAME replaces the defaults below; flags given explicitly still win. The gpu recipe
# (untested here: written on a CPU-only machine) spends a GPU's speed on data, batch and steps.
PRESETS = {
    "gpu": dict(steps=6000, batch_size=16, positions_per_seq=0, conversations=30000, holdout=300, replies=8000,
                reply_batch=64, eval_windows=200, eval_every=500, warmup=200, device="cuda"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_args(p)  # --model --device --dtype --seed --threads (and decoding flags, unused here)
    kernels.add_arg(p)
    p.add_argument("--drafter", default="transfer", type=drafter_spec, help=DRAFTER_HELP)
    p.add_argument("--drafter-option", action="append", type=drafter_option, metavar="NAME=VALUE",
                   help="a knob of the drafter kind, repeatable: transfer-mlp hidden=N (MLP width, default dim), "
                        "transfer-lora rank=R (default 8), transfer-layers layers=T1,..,Tk (default t, t-2, ...)")
    # the data (docs/EXPERIMENTS.md: what each lever bought on a 2-core CPU)
    p.add_argument("--data", default="replies", choices=["replies", "sharegpt"],
                   help="replies: the base model's own replies to ShareGPT's first user turns; sharegpt: "
                        "ShareGPT's conversations as they are")
    p.add_argument("--replies", type=int_range(1), default=400, help="training prompts the base model answers")
    p.add_argument("--reply-tokens", type=int_range(1), default=128, help="longest reply, in tokens")
    p.add_argument("--reply-batch", type=int_range(0), default=0,
                   help="rows of the continuous batch the replies are made in (0: picked from the measured pass costs)")
    p.add_argument("--second-turns", type=int_range(0), default=0,
                   help="also answer the second user turn of this many training conversations (after ShareGPT's "
                        "first exchange)")
    p.add_argument("--max-prompt", type=int_range(1), default=192,
                   help="longest prompt answered, in tokens (second turns: twice this)")
    p.add_argument("--sampled", type=float_range(0, 1), default=0.0,
                   help="share of the replies sampled (at --reply-temperature, --reply-top-p), the rest greedy")
    p.add_argument("--reply-temperature", type=float_range(0, lo_open=True), default=0.7,
                   help="temperature of the sampled replies")
    p.add_argument("--reply-top-p", type=float_range(0, 1, lo_open=True), default=0.9,
                   help="nucleus mass of the sampled replies")
    p.add_argument("--sharegpt", default=None, help="ShareGPT json/jsonl; None = the installed one")
    p.add_argument("--conversations", type=int_range(2), default=2000, help="ShareGPT conversations to read")
    p.add_argument("--holdout", type=int_range(1), default=100,
                   help="the first N conversations read are held out: never trained on, never answered for it")
    p.add_argument("--eval-windows", type=int_range(1), default=50, help="windows of each held-out set")
    # the recipe
    p.add_argument("--steps", type=int_range(1), default=600, help="optimizer steps")
    p.add_argument("--batch-size", type=int_range(1), default=1, help="windows per step")
    p.add_argument("--seq-len", type=int_range(2), default=256, help="tokens per training window (<= context)")
    p.add_argument("--positions-per-seq", type=int_range(0), default=48,
                   help="training positions drawn per window from assistant tokens (0 = all)")
    p.add_argument("--transfer-layer", type=int_range(1), default=None,
                   help="t: pseudo tokens start after layer t; None = 2 * n_layers // 3 (20 for SmolLM2)")
    p.add_argument("--k", type=int_range(1, 64), default=2, help="future offsets drafted per token")
    p.add_argument("--lr", type=float_range(0, lo_open=True), default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int_range(0), default=50, help="warm-up steps before the cosine decay")
    p.add_argument("--offset-weights", type=list_of(float_range(0)), default=None,
                   help="loss weights w_i, one per offset, e.g. 1,0.8,0.6; None = 1, 0.5, 0.25, ...")
    p.add_argument("--objective", default="kl", choices=["kl", "tree"],
                   help="kl: the full-vocabulary KL; tree: plus the teacher's top-1 token's cross-entropy where "
                        "the drafter ranks it within a tree's width (distill.distill_loss)")
    p.add_argument("--budget-minutes", type=float_range(0), default=0,
                   help="stop training after this many minutes, the learning rate decaying over them (0: --steps only)")
    p.add_argument("--teacher-topk", type=int_range(0), default=0,
                   help="KL over the teacher's top-K tokens only, renormalised (0 = full vocabulary)")
    p.add_argument("--frozen-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the frozen model in training passes (auto: bfloat16 where it is faster here; "
                        "evaluation and the plan choice stay in --dtype)")
    p.add_argument("--frozen-cache-gb", type=float_range(0), default=4.0,
                   help="memory for keeping each window's frozen pass to reuse every epoch (0: recompute)")
    p.add_argument("--frozen-disk-gb", type=float_range(0), default=16.0,
                   help="disk under --cache-dir for the frozen passes beyond --frozen-cache-gb, kept for later runs")
    # the end of the run
    p.add_argument("--eval-every", type=int_range(0), default=600, help="eval and save every N steps; 0: end")
    p.add_argument("--top-r", type=int_range(1), default=10, help="draft ranks measured for acceptance rates")
    p.add_argument("--tree-sizes", type=list_of(int_range(1)), default="1,2,3,4,6,8,12,16,24,32",
                   help="tree sizes (nodes, root included) whose plans are timed at the end ('' = keep a chain)")
    p.add_argument("--compiled-finalists", type=int_range(0), default=3,
                   help="the best plans of that search compiled and timed again as compiled decoding runs them "
                        "(bench.py's compiled mode uses the winner); 0: none")
    p.add_argument("--drafter-checkpoint", default=None,
                   help="where the drafter is saved (and --resume reads it); None = checkpoints/<drafter>.pt, "
                        "with a JSON summary beside it")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --drafter-checkpoint exactly")
    p.add_argument("--cache-dir", default="runs", help="where the replies are cached")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="gpu: a larger recipe for one GPU " + str(PRESETS["gpu"]))
    known = p.parse_known_args(argv)[0]  # a preset, or --model tiny, moves the defaults
    p.set_defaults(**PRESETS.get(known.preset, {}), **(tiny.TRAIN if known.model == tiny.NAME else {}))
    args = p.parse_args(argv)
    if args.drafter_checkpoint is None:  # "" stays, to be refused by main in one line
        args.drafter_checkpoint = default_checkpoint(args.drafter, args.model)
    args.offset_weights = args.offset_weights or [0.5 ** i for i in range(args.k)]  # 1, 0.5, 0.25, ...
    if len(args.offset_weights) != args.k:
        p.error(f"--offset-weights needs {args.k} numbers (one per offset), got {len(args.offset_weights)}")
    try:  # a name the kind does not take; its values are the drafter's to check (main: make_drafter)
        drafter_options(DRAFTERS[args.drafter], args.drafter_option)
    except ValueError as e:
        p.error(str(e))
    if args.seq_len < args.k + 2:  # every window needs a position with k targets after it
        p.error(f"--seq-len {args.seq_len} must be more than --k + 1 = {args.k + 1}")
    return args


def main(argv=None):
    args = parse_args(argv)
    world = distributed.setup(args)  # under torchrun: join the other processes (tools/distributed.py)
    check_common_args(args)
    check_writable(args.drafter_checkpoint, "--drafter-checkpoint")  # now, not when saving after training
    if args.drafter_checkpoint.endswith(".json"):
        sys.exit(f"error: --drafter-checkpoint {args.drafter_checkpoint}: a checkpoint is not JSON (the JSON "
                 "summary is written beside it); name it .pt")
    if args.model == tiny.NAME and not args.sharegpt:  # the tiny model learns on synthetic conversations
        args.sharegpt = tiny.conversations_file(args.cache_dir, args.conversations)
    model, tok = load(args)
    kernels.use(args.matmul, model)  # the measured CPU product forms (tools/kernels.py)
    try:
        check_vocab_flags(args, model)
        make_drafter(args, model)  # a bad --transfer-layer or --drafter-option value: refused now
        if args.resume:
            resumable(args, model, make_drafter(args, model).config())  # a bad checkpoint is refused now, not after the replies
        train_windows, held, info = load_windows(args, model, tok)
        print(f"{info['note']} ({info['generation_min']:.1f} min)")
        if len(train_windows) < args.batch_size:
            raise ValueError(f"--batch-size {args.batch_size} is more than the {len(train_windows)} "
                             "training windows; answer more --replies or read more --conversations")
        frozen_model = frozen_copy(args, model, train_windows[0][0][None].to(model.output.weight.device), kernels.apply)
        return run(args, model, train_windows, held, frozen_model, world, {"data": info["generation_min"]})
    except (OSError, ValueError) as e:  # a bad data file, a bad checkpoint to --resume, --transfer-layer
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run_main(main)
