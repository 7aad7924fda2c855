"""Train the drafter by self-distillation: the frozen base model teaches its own pseudo tokens
(or, with --drafter medusa, Medusa heads) to predict what it would say k tokens ahead.

METHOD.md, "Training the projection": one frozen pass gives h^t, the real tokens' K/V and the
teacher distributions; P positions per sequence get k pseudo tokens each, which run through
layers t+1..L in ONE pass against that cache (each drafter's train_pass, drafter.py); loss =
sum_i w_i KL(P_(p+i) || Q_(p,i)). Then the held-out metrics (evaluate, here) and the tree choice
(latency.select_plan). Read next: analysis.py, the experiments built on these functions.

    python train.py                     # Hidden Transfer: about 20 minutes on a 2-core CPU
    python train.py --drafter medusa    # the Medusa-1 baseline: same data, targets and budget
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import (DRAFTERS, build_drafter, default_checkpoint, model_identity, open_checkpoint,
                        save_atomic, save_checkpoint)
from data import batches, encode_conversations, read_sharegpt, sharegpt_path, split_holdout
from distributed import ddp, is_main, setup, shard
from generate import (HelpFormatter, add_common_args, check_common_args, float_range, int_range, list_of, load,
                      run_main)
from latency import select_plan
from plan import Plan, expected_tokens
from tree import chain, expected_tau

# ----------------------------------------------------------------------------- the objective

def choose_positions(assistant: torch.Tensor, P: int, k: int, g: torch.Generator):
    """Training positions p, and which targets (p, i) are valid. assistant: (B, T) bool.

    p qualifies when the token it decides, x_(p+1), is an assistant token: that is where decoding
    drafts (p is the last accepted token, the drafts aim at x_(p+2)..). Up to P of them per row,
    at random (P = 0: all), sorted; short rows are padded with p = 0, never valid. Target (p, i)
    needs the teacher at p+i, so it is valid only if p + i <= T - 1.
    Returns positions (B, P') long and valid (B, P', k) bool.
    """
    B, T = assistant.shape
    dev, assistant, rows = assistant.device, assistant.cpu(), []
    for b in range(B):
        idx = assistant[b, 1:].nonzero().flatten()  # p such that x_(p+1) is an assistant token
        if P and len(idx) > P:
            idx = idx[torch.randperm(len(idx), generator=g)[:P]].sort().values
        rows.append(idx)
    positions = torch.zeros(B, max(1, max(len(r) for r in rows)), dtype=torch.long)  # (B, P')
    real = torch.zeros_like(positions, dtype=torch.bool)
    for b, r in enumerate(rows):
        positions[b, :len(r)], real[b, :len(r)] = r, True
    ahead = positions[..., None] + torch.arange(1, k + 1)                     # (B, P', k): p + i
    return positions.to(dev), (real[..., None] & (ahead <= T - 1)).to(dev)


def teacher_logprobs(model, h_L, positions, k):
    """log P_(p+i) for every (p, i), (B, P, k, V); the head runs once per distinct row p+i."""
    B, T, d = h_L.shape
    rows = (positions[..., None] + torch.arange(1, k + 1, device=h_L.device)).clamp(max=T - 1)
    flat = rows + T * torch.arange(B, device=h_L.device)[:, None, None]        # (B, P, k) into B*T
    uniq, inverse = torch.unique(flat, return_inverse=True)
    logp = F.log_softmax(model.head(h_L.reshape(B * T, d)[uniq]).float(), dim=-1)  # (U, V)
    return logp[inverse]


def distill_loss(logits, teacher, valid, weights, topk=0):
    """sum_i w_i KL(P_(p+i) || Q_(p,i)), averaged over valid targets. Returns (loss, kl (B, P, k)).
    topk > 0 keeps only the teacher's top-k tokens, renormalised (Q stays over the full vocabulary)."""
    logp, logq = teacher, F.log_softmax(logits.float(), dim=-1)                # (B, P, k, V)
    if topk:
        logp, idx = teacher.topk(topk, dim=-1)
        logp, logq = logp - logp.logsumexp(-1, keepdim=True), logq.gather(-1, idx)
    kl = (logp.exp() * (logp - logq)).sum(-1)                                  # (B, P, k)
    w = torch.as_tensor(weights, dtype=kl.dtype, device=kl.device)
    return (kl * w * valid).sum() / valid.sum().clamp(min=1), kl.detach()


def step_generator(seed: int, step: int) -> torch.Generator:
    # Each step draws its positions from its own seed: a resumed run needs no saved RNG state.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_step(model, drafter, opt, ids, assistant, args, step) -> float:
    """One optimizer step on a batch: ids, assistant (B, T). Returns the loss."""
    positions, valid = choose_positions(assistant, args.positions_per_seq, drafter.k,
                                        step_generator(args.seed, step))
    states, h_L = drafter.train_pass(model, ids, positions)
    with torch.no_grad():
        teacher = teacher_logprobs(model, h_L, positions, drafter.k)
    logits = drafter.draft_logits(model, states)
    loss, _ = distill_loss(logits, teacher, valid, args.offset_weights, args.teacher_topk)
    opt.param_groups[0]["lr"] = lr_at(step, args)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
    opt.step()
    return loss.item()


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to lr/10: a pure function of the step, so nothing to resume."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    done = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


# ----------------------------------------------------------------------------- held-out metrics

@torch.no_grad()
def evaluate(model, drafter, windows, args, top_r: int = 10) -> dict:
    """Per offset i: top-1 / top-5 agreement of q_i with the base model's argmax at p+i, the KL, and
    accept[i-1][r] = share of targets whose rank-r draft token IS that argmax (METHOD.md, "Metrics").
    The rates are unconditional (not given that offsets < i were right), the simplification
    tree.expected_tau then assumes away. Positions follow the training rule, with a fixed seed."""
    k, dev = drafter.k, model.output.weight.device
    hits, count, kl_sum = torch.zeros(k, top_r), torch.zeros(k), torch.zeros(k)
    for j in range(0, len(windows), args.batch_size):
        ids = torch.stack([w[0] for w in windows[j:j + args.batch_size]]).to(dev)        # (B, T)
        assistant = torch.stack([w[1] for w in windows[j:j + args.batch_size]]).to(dev)  # (B, T)
        positions, valid = choose_positions(assistant, args.positions_per_seq, k,
                                            step_generator(args.seed + 1, j))
        states, h_L = drafter.train_pass(model, ids, positions)
        teacher = teacher_logprobs(model, h_L, positions, k)                         # (B, P, k, V)
        logits = drafter.draft_logits(model, states)                                 # (B, P, k, V)
        ranked = logits.topk(top_r, dim=-1).indices                                  # (B, P, k, top_r)
        hits += ((ranked == teacher.argmax(-1, keepdim=True)) & valid[..., None]).sum((0, 1)).float().cpu()
        count += valid.sum((0, 1)).float().cpu()
        kl = distill_loss(logits, teacher, valid, [1.0] * k)[1]                      # (B, P, k)
        kl_sum += (kl * valid).sum((0, 1)).float().cpu()
    accept = hits / count.clamp(min=1)[:, None]                                      # (k, top_r)
    return {"top1": accept[:, 0].tolist(), "top5": accept[:, :5].sum(1).tolist(),
            "kl": (kl_sum / count.clamp(min=1)).tolist(), "accept": accept.tolist(),
            "tau_chain": expected_tau(chain(k), accept), "targets": int(count[0])}


def format_metrics(m: dict) -> str:
    show = lambda xs: "/".join(f"{x:.2f}" for x in xs)
    return (f"top-1 {show(m['top1'])}  top-5 {show(m['top5'])}  KL {show(m['kl'])}  "
            f"chain tau {m['tau_chain']:.2f}  ({m['targets']} positions)")


# ----------------------------------------------------------------------------- data

def load_windows(args, model, tok):
    """(train windows, held-out windows) of (ids (T,), assistant mask (T,)), tokenised once, then read
    from --cache-dir (keyed by model, data, sizes). Held-out conversations are never trained on."""
    path = args.sharegpt or sharegpt_path()
    key = [model_identity(model), tok.template, os.path.abspath(path), os.path.getsize(path), args.seq_len,
           args.conversations, args.holdout, args.eval_windows]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    cached = os.path.join(args.cache_dir, f"windows-{digest}.pt")
    if os.path.exists(cached):
        saved = torch.load(cached, weights_only=True)
    else:
        conversations = list(read_sharegpt(path, limit=args.conversations))
        train_c, held_c = split_holdout(conversations, args.holdout, seed=0)
        train_w = encode_conversations(tok, train_c, args.seq_len)
        held_w = encode_conversations(tok, held_c, args.seq_len, max_windows=args.eval_windows)
        if not train_w or not held_w:
            raise ValueError(f"{len(train_w)} training and {len(held_w)} held-out windows of "
                             f"{args.seq_len} tokens: read more --conversations or lower --seq-len")
        pack = lambda ws: (torch.stack([w[0] for w in ws]), torch.stack([w[1] for w in ws]))  # (N, T) x 2
        saved = {"train": pack(train_w), "held": pack(held_w), "note": (
            f"{len(conversations)} ShareGPT conversations read from {path}, {args.holdout} held out; "
            f"{len(train_w)} training and {len(held_w)} held-out windows")}
        save_atomic(cached, saved)
    print(f"token windows ({cached}): {saved['note']}")
    return list(zip(*saved["train"])), list(zip(*saved["held"]))


# ----------------------------------------------------------------------------- the loop

RUN_KEYS = ("drafter", "seq_len", "batch_size", "positions_per_seq", "lr", "warmup",
            "seed", "offset_weights", "teacher_topk", "conversations", "holdout")


def make_drafter(args, model):
    """A fresh drafter of kind --drafter; fp32 master weights whatever the model's dtype."""
    drafter = DRAFTERS[args.drafter].for_model(model, args.k, args.transfer_layer)
    return drafter.to(model.output.weight.device)


def restore(args, model, drafter, opt):
    """Continue exactly where --drafter-checkpoint stopped: drafter, AdamW state and step (the data
    stream, the positions and the learning rate are functions of the seed and step).
    Returns (step, history)."""
    path = args.drafter_checkpoint
    if not os.path.exists(path):
        sys.exit(f"error: --resume: no checkpoint at {path} to continue; drop --resume or fix "
                 "--drafter-checkpoint")
    ckpt = open_checkpoint(path, args.drafter)
    build_drafter(ckpt, path, model)  # refuses another model, config or shape
    changed = [k for k in RUN_KEYS if ckpt.get("train_args", {}).get(k) != getattr(args, k)]
    changed += ["drafter config"] if ckpt["config"] != drafter.config() else []
    if changed:
        sys.exit(f"error: --resume: {path} was trained with other {', '.join(changed)}; "
                 "use the same flags, or a new --drafter-checkpoint")
    drafter.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    print(f"resuming {path} at step {ckpt['step']} of {args.steps}")
    return ckpt["step"], ckpt["history"]


def run(args, model, train_windows, held_windows) -> dict:
    """Train, evaluate, choose the tree, save to --drafter-checkpoint. Returns the saved fields."""
    model.requires_grad_(False)  # frozen: only the drafter learns
    out_path = args.drafter_checkpoint
    drafter = make_drafter(args, model)
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.lr, weight_decay=0.0)
    step, history = restore(args, model, drafter, opt) if args.resume else (0, [])
    first, train_s = step, 0.0  # seconds in train_step this run, evaluations left out
    fields = lambda **more: {"step": step, "optimizer": opt.state_dict(), "train_args": dict(vars(args)),
                             "history": history, **more}
    data = shard(batches(train_windows, args.batch_size, args.seed, start_step=step))  # torchrun: rows of it
    bar = tqdm(total=args.steps, initial=step, unit="step", desc=f"training {args.drafter}")
    try:
        while step < args.steps:
            ids, assistant = next(data)
            t0 = time.perf_counter()
            ids, assistant = ids.to(model.output.weight.device), assistant.to(model.output.weight.device)
            loss = train_step(model, ddp(drafter), opt, ids, assistant, args, step)  # ddp: distributed.py
            dt, step = time.perf_counter() - t0, step + 1
            train_s += dt
            history.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{ids.numel() / dt:.0f}")
            if args.eval_every and step % args.eval_every == 0 and step < args.steps and is_main():
                metrics = evaluate(model, drafter, held_windows, args)
                bar.write(f"step {step}: {format_metrics(metrics)}")
                save_checkpoint(out_path, drafter, model, fields(eval=metrics))
    except KeyboardInterrupt:
        bar.close()
        if is_main():  # torchrun: rank 0 alone saves
            save_checkpoint(out_path, drafter, model, fields())
        print(f"\ninterrupted after step {step}: saved {out_path}; to continue, add --resume")
        raise  # saved: now stop the caller too (the command line exits 130, so `&&` chains stop)
    bar.close()
    if not is_main():  # torchrun: the other ranks only trained; rank 0 evaluates and saves
        return fields()
    save_checkpoint(out_path, drafter, model, fields())  # trained: an interrupt from here on loses nothing

    metrics = evaluate(model, drafter, held_windows, args, args.top_r)
    print(f"held-out, step {step}: {format_metrics(metrics)}")
    sizes = [n for n in args.tree_sizes if n >= 2]  # 1 node, the root alone, accepts nothing
    plan, table = (select_plan(model, drafter, metrics["accept"], sizes) if sizes
                   else (Plan.full(chain(args.k), args.k), None))
    out = fields(eval=metrics, accept_rates=metrics["accept"], **plan.fields(), plan_table=table, finished=True)
    save_checkpoint(out_path, drafter, model, out)
    last = history[-20:] or [float("nan")]
    print(f"\n{args.drafter}: {step} steps; this run trained {train_s / 60:.1f} min "
          f"({train_s / max(1, step - first):.2f} s/step); loss {sum(last) / len(last):.3f} (mean of the "
          f"last {len(last)} steps); plan {plan.text()}, expected tau "
          f"{expected_tokens(plan, metrics['accept'])[0]:.2f}")
    print(f"saved {out_path}; try it: python decode.py --drafter-checkpoint {out_path} --check")
    return out


# ----------------------------------------------------------------------------- command line

# --preset NAME replaces the defaults below; flags given explicitly still win. The gpu recipe
# (untested here: written on a CPU-only machine) spends a GPU's speed on batch, positions and steps.
PRESETS = {
    "gpu": dict(steps=6000, batch_size=16, positions_per_seq=0, conversations=30000, holdout=300,
                eval_windows=400, eval_every=500, warmup=200, device="cuda"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_common_args(p)  # --model --device --dtype --seed --threads (and decoding flags, unused here)
    p.add_argument("--drafter", default="transfer", choices=list(DRAFTERS),
                   help="transfer: Hidden Transfer projections; medusa: the Medusa-1 baseline heads")
    # 2400 steps of ~0.56 s (B=1, T=256, P=48, t=20, k=2, fp32, 2-core CPU): about 25 min with evaluations.
    # lr 3e-3, k = 2 and halving offset weights: the README's lever table (issue 8).
    # t = 2L/3: lowest held-out KL at every offset in a 150-step sweep over t = 6,10,15,20,25 (analysis.py).
    p.add_argument("--steps", type=int_range(1), default=2400, help="optimizer steps")
    p.add_argument("--batch-size", type=int_range(1), default=1, help="sequences per step")
    p.add_argument("--seq-len", type=int_range(2), default=256, help="tokens per window (<= context)")
    p.add_argument("--positions-per-seq", type=int_range(0), default=48,
                   help="training positions drawn per sequence from assistant turns (0 = all)")
    p.add_argument("--transfer-layer", type=int_range(1), default=None,
                   help="t: pseudo tokens start after layer t; None = 2 * n_layers // 3 (20 for SmolLM2)")
    p.add_argument("--k", type=int_range(1, 64), default=2, help="future offsets drafted per token")
    p.add_argument("--lr", type=float_range(0, lo_open=True), default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int_range(0), default=50, help="warm-up steps before the cosine decay")
    p.add_argument("--offset-weights", type=list_of(float_range(0)), default=None,
                   help="loss weights w_i, one per offset, e.g. 1,0.8,0.6; None = 1, 0.5, 0.25, ...")
    p.add_argument("--teacher-topk", type=int_range(0), default=0,
                   help="KL over the teacher's top-K tokens only, renormalised (0 = full vocabulary)")
    p.add_argument("--sharegpt", default=None, help="ShareGPT json/jsonl; None = the installed one")
    p.add_argument("--conversations", type=int_range(1), default=2000, help="ShareGPT conversations to read")
    p.add_argument("--holdout", type=int_range(1), default=100, help="conversations held out for evaluation")
    p.add_argument("--eval-windows", type=int_range(1), default=100, help="held-out windows evaluated on")
    p.add_argument("--eval-every", type=int_range(0), default=600, help="eval and save every N steps; 0: end")
    p.add_argument("--top-r", type=int_range(1), default=10, help="draft ranks measured for acceptance rates")
    p.add_argument("--tree-sizes", type=list_of(int_range(1)), default="1,2,3,4,6,8,12,16,24,32",
                   help="tree sizes (nodes, root included) whose plans are timed at the end ('' = keep a chain)")
    p.add_argument("--drafter-checkpoint", default=None,
                   help="where the drafter is saved (and --resume reads it); None = checkpoints/<drafter>.pt")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --drafter-checkpoint exactly")
    p.add_argument("--cache-dir", default="runs", help="where tokenised windows are cached")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="gpu: a larger recipe for one GPU " + str(PRESETS["gpu"]))
    p.set_defaults(**PRESETS.get(p.parse_known_args(argv)[0].preset, {}))  # a preset moves the defaults
    args = p.parse_args(argv)
    args.drafter_checkpoint = args.drafter_checkpoint or default_checkpoint(args.drafter)
    args.offset_weights = args.offset_weights or [0.5 ** i for i in range(args.k)]  # 1, 0.5, 0.25, ...
    if len(args.offset_weights) != args.k:
        p.error(f"--offset-weights needs {args.k} numbers (one per offset), got {len(args.offset_weights)}")
    if args.seq_len < args.k + 2:  # every window needs a position with k targets after it
        p.error(f"--seq-len {args.seq_len} must be more than --k + 1 = {args.k + 1}")
    return args


def main(argv=None):
    args = parse_args(argv)
    check_common_args(setup(args))  # setup: under torchrun, join the other processes (distributed.py)
    model, tok = load(args)
    try:
        train_windows, held_windows = load_windows(args, model, tok)
        if len(train_windows) < args.batch_size:
            raise ValueError(f"--batch-size {args.batch_size} is more than the {len(train_windows)} "
                             "training windows; read more --conversations")
        return run(args, model, train_windows, held_windows)
    except (OSError, ValueError) as e:  # a bad data file, a bad checkpoint to --resume, --transfer-layer
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run_main(main)
