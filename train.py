"""Train the drafter by self-distillation: the frozen base model teaches its own pseudo tokens
(or, with --drafter medusa, Medusa heads) to predict what it would say k tokens ahead.

METHOD.md, "Training the projection": one frozen pass gives h^t, the real tokens' K/V and the
teacher distributions; P positions per sequence get k pseudo tokens each, which run through
layers t+1..L in ONE pass against that cache; loss = sum_i w_i KL(P_(p+i) || Q_(p,i)). Then the
held-out metrics and the tree choice (analysis.py, read next; then decode.py, which uses the result).

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

from data import batches, encode_conversations, read_sharegpt, sharegpt_path, split_holdout
from generate import add_common_args, check_common_args, float_range, int_range, list_of, load, run_main
from medusa import Medusa
from model import KVCache, causal_mask
from transfer import HiddenTransfer, default_layer, load_checkpoint, model_identity, save_checkpoint
from tree import chain, expected_tau

# ----------------------------------------------------------------------------- the objective

def training_mask(positions: torch.Tensor, k: int, T: int) -> torch.Tensor:
    """(B, P*k, T + P*k) bool: what each pseudo token of layers t+1..L may attend to in training.

    Rows are pseudo tokens, source-major ((p,1)..(p,k) for each chosen p); columns are the T real
    tokens (in the cache) then the pseudo tokens, as model.py orders them. Pseudo (p,i) sees real
    tokens 0..p and its siblings (p,j<=i): exactly what it sees in decoding, where p is the last
    accepted token (METHOD.md's mask). For T = 4, positions [1, 2], k = 2:

        keys ->   x0 x1 x2 x3 | (1,1) (1,2) (2,1) (2,2)
        (1,1)      1  1  .  . |   1     .     .     .
        (1,2)      1  1  .  . |   1     1     .     .
        (2,1)      1  1  1  . |   .     .     1     .
        (2,2)      1  1  1  . |   .     .     1     1
    """
    B, P = positions.shape
    src = positions.repeat_interleave(k, dim=1)                                # (B, P*k)
    real = torch.arange(T, device=positions.device) <= src[..., None]         # (B, P*k, T)
    owner = torch.arange(P * k, device=positions.device) // k
    offset = torch.arange(P * k, device=positions.device) % k
    own = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])  # (P*k, P*k)
    return torch.cat([real, own.expand(B, -1, -1)], dim=-1)


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


def frozen_pass(model, drafter, ids):
    """(h^t (B, T, d), h^L (B, T, d), cache) from one pass of the frozen model over real tokens.
    Hidden Transfer's pseudo tokens attend to the real K/V kept in the cache; Medusa needs none."""
    B, T = ids.shape
    L, t = model.args.n_layers, getattr(drafter, "layer", model.args.n_layers)
    w = model.output.weight
    cache = KVCache(model.args, B, T, w.device, w.dtype) if isinstance(drafter, HiddenTransfer) else None
    pos, mask = torch.arange(T, device=w.device), causal_mask(T, device=w.device)
    slots = pos if cache is not None else None
    h_t = model.run_layers(model.embed(ids), pos, mask, slots, cache, 0, t)
    return h_t, model.run_layers(h_t, pos, mask, slots, cache, t, L), cache


def draft_states(model, drafter, h_t, h_L, cache, positions):
    """The LM-head inputs of the drafts, (B, P, k, d), with gradients into the drafter only."""
    P, k, d, dtype = positions.shape[1], drafter.k, model.args.dim, h_t.dtype
    wd = drafter.proj.weight.dtype  # fp32 in training (AdamW in bf16 loses small updates)
    at = positions[..., None].expand(-1, -1, d)                                # (B, P, d)
    if isinstance(drafter, Medusa):
        return drafter(model.norm(h_L.gather(1, at)).to(wd)).to(dtype)
    pseudo = drafter(h_t.gather(1, at).to(wd)).to(dtype).flatten(1, 2)         # (B, P*k, d)
    pos = (positions[..., None] + torch.arange(1, k + 1, device=positions.device)).flatten(1)
    none = torch.zeros(0, dtype=torch.long, device=positions.device)  # all pseudo: none is cached
    h = model.run_layers(pseudo, pos, training_mask(positions, k, h_t.shape[1]), none, cache,
                         drafter.layer, model.args.n_layers)
    return h.unflatten(1, (P, k))                                              # (B, P, k, d)


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
    with torch.no_grad():
        h_t, h_L, cache = frozen_pass(model, drafter, ids)
        positions, valid = choose_positions(assistant, args.positions_per_seq, drafter.k,
                                            step_generator(args.seed, step))
        teacher = teacher_logprobs(model, h_L, positions, drafter.k)
    logits = drafter.draft_logits(model, draft_states(model, drafter, h_t, h_L, cache, positions))
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
        os.makedirs(args.cache_dir, exist_ok=True)
        torch.save(saved, cached + ".tmp")
        os.replace(cached + ".tmp", cached)
    print(f"token windows ({cached}): {saved['note']}")
    return list(zip(*saved["train"])), list(zip(*saved["held"]))


# ----------------------------------------------------------------------------- the loop

RUN_KEYS = ("drafter", "k", "transfer_layer", "seq_len", "batch_size", "positions_per_seq", "lr", "warmup",
            "seed", "offset_weights", "teacher_topk", "conversations", "holdout")


def make_drafter(args, model):
    L, dim = model.args.n_layers, model.args.dim
    if args.drafter == "medusa":
        drafter = Medusa(dim, args.k)
    else:
        args.transfer_layer = args.transfer_layer or default_layer(L)
        if not 1 <= args.transfer_layer < L:
            sys.exit(f"error: --transfer-layer must be from 1 to {L - 1} for this {L}-layer model")
        drafter = HiddenTransfer(dim, args.k, args.transfer_layer)
    return drafter.to(model.output.weight.device)  # fp32 master weights whatever the model's dtype


def restore(args, model, drafter, opt):
    """Continue exactly where --out stopped: drafter, AdamW state and step (the data stream, the
    positions and the learning rate are functions of the seed and step). Returns (step, history)."""
    if not os.path.exists(args.out):
        sys.exit(f"error: --resume: no checkpoint at {args.out} to continue; drop --resume or fix --out")
    _, ckpt = load_checkpoint(args.out, model)
    changed = [k for k in RUN_KEYS if ckpt["train_args"].get(k) != getattr(args, k)]
    if changed:
        sys.exit(f"error: --resume: {args.out} was trained with other {', '.join(changed)}; "
                 "use the same flags, or a new --out")
    drafter.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    print(f"resuming {args.out} at step {ckpt['step']} of {args.steps}")
    return ckpt["step"], ckpt["history"]


def run(args, model, train_windows, held_windows) -> dict:
    """Train, evaluate, choose the tree, save to --out. Returns the saved checkpoint's fields."""
    from analysis import evaluate, format_metrics, select_tree  # late: analysis.py imports this file
    model.requires_grad_(False)  # frozen: only the drafter learns
    drafter = make_drafter(args, model)
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.lr, weight_decay=0.0)
    step, history = restore(args, model, drafter, opt) if args.resume else (0, [])
    first, train_s = step, 0.0  # seconds in train_step this run, evaluations left out
    fields = lambda **more: {"step": step, "optimizer": opt.state_dict(), "train_args": dict(vars(args)),
                             "history": history, **more}
    data = batches(train_windows, args.batch_size, args.seed, start_step=step)
    bar = tqdm(total=args.steps, initial=step, unit="step", desc=f"training {args.drafter}")
    try:
        while step < args.steps:
            ids, assistant = next(data)
            t0 = time.perf_counter()
            ids, assistant = ids.to(model.output.weight.device), assistant.to(model.output.weight.device)
            loss = train_step(model, drafter, opt, ids, assistant, args, step)
            dt, step = time.perf_counter() - t0, step + 1
            train_s += dt
            history.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{ids.numel() / dt:.0f}")
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                metrics = evaluate(model, drafter, held_windows, args)
                bar.write(f"step {step}: {format_metrics(metrics)}")
                save_checkpoint(args.out, drafter, model, fields(eval=metrics))
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(args.out, drafter, model, fields())
        print(f"\ninterrupted after step {step}: saved {args.out}; to continue, add --resume")
        raise  # saved: now stop the caller too (the command line exits 130, so `&&` chains stop)
    bar.close()
    save_checkpoint(args.out, drafter, model, fields())  # trained: an interrupt from here on loses nothing

    metrics = evaluate(model, drafter, held_windows, args, args.top_r)
    print(f"held-out, step {step}: {format_metrics(metrics)}")
    sizes = [n for n in args.tree_sizes if n >= 2]  # 1 node, the root alone, accepts nothing
    tree, table, step_ms = (select_tree(model, drafter, metrics["accept"], sizes) if sizes
                            else (chain(args.k), {}, None))
    out = fields(eval=metrics, accept_rates=metrics["accept"], tree=[list(p) for p in tree.paths[1:]],
                 latency_ms={n: ms for n, (_, ms) in table.items()}, step_ms=step_ms, finished=True)
    save_checkpoint(args.out, drafter, model, out)
    last = history[-20:] or [float("nan")]
    print(f"\n{args.drafter}: {step} steps; this run trained {train_s / 60:.1f} min "
          f"({train_s / max(1, step - first):.2f} s/step); loss {sum(last) / len(last):.3f} (mean of the "
          f"last {len(last)} steps); tree of {tree.size} nodes, expected tau "
          f"{expected_tau(tree, metrics['accept']):.2f}")
    print(f"saved {args.out}; try it: python decode.py --transfer {args.out} --check")
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
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p)  # --model --device --dtype --seed --threads (and decoding flags, unused here)
    p.add_argument("--drafter", default="transfer", choices=["transfer", "medusa"],
                   help="Hidden Transfer projections, or the Medusa-1 baseline heads")
    # 1800 steps of ~0.75 s (B=1, T=256, P=48, t=20, k=3, fp32, 2-core CPU): ~26 min with evaluations.
    # t = 2L/3: lowest held-out KL at every offset in a 150-step sweep over t = 6,10,15,20,25 (analysis.py).
    p.add_argument("--steps", type=int_range(1), default=1800, help="optimizer steps")
    p.add_argument("--batch-size", type=int_range(1), default=1, help="sequences per step")
    p.add_argument("--seq-len", type=int_range(2), default=256, help="tokens per window (<= context)")
    p.add_argument("--positions-per-seq", type=int_range(0), default=48,
                   help="training positions drawn per sequence from assistant turns (0 = all)")
    p.add_argument("--transfer-layer", type=int_range(1), default=None,
                   help="t: pseudo tokens start after layer t; None = 2 * n_layers // 3 (20 for SmolLM2)")
    p.add_argument("--k", type=int_range(1, 64), default=3, help="future offsets drafted per token")
    p.add_argument("--lr", type=float_range(0, lo_open=True), default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int_range(0), default=50, help="warm-up steps before the cosine decay")
    p.add_argument("--offset-weights", type=list_of(float_range(0)), default=None,
                   help="loss weights w_i, e.g. 1,0.8,0.6; None = all 1")
    p.add_argument("--teacher-topk", type=int_range(0), default=0,
                   help="KL over the teacher's top-K tokens only, renormalised (0 = full vocabulary)")
    p.add_argument("--sharegpt", default=None, help="ShareGPT json/jsonl; None = the installed one")
    p.add_argument("--conversations", type=int_range(1), default=2000, help="ShareGPT conversations to read")
    p.add_argument("--holdout", type=int_range(1), default=100, help="conversations held out for evaluation")
    p.add_argument("--eval-windows", type=int_range(1), default=100, help="held-out windows evaluated on")
    p.add_argument("--eval-every", type=int_range(0), default=600, help="eval and save every N steps; 0: end")
    p.add_argument("--top-r", type=int_range(1), default=10, help="draft ranks measured for acceptance rates")
    p.add_argument("--tree-sizes", type=list_of(int_range(1)), default="1,2,3,4,6,8,12,16,24,32",
                   help="tree sizes (nodes, root included) to time at the end ('' = keep a chain)")
    p.add_argument("--out", default=None, help="checkpoint; None = checkpoints/<drafter>.pt")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    p.add_argument("--cache-dir", default="runs", help="where tokenised windows are cached")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="gpu: a larger recipe for one GPU " + str(PRESETS["gpu"]))
    p.set_defaults(**PRESETS.get(p.parse_known_args(argv)[0].preset, {}))  # a preset moves the defaults
    args = p.parse_args(argv)
    args.out = args.out or f"checkpoints/{args.drafter}.pt"
    args.offset_weights = args.offset_weights or [1.0] * args.k
    if len(args.offset_weights) != args.k:
        p.error(f"--offset-weights needs {args.k} numbers (one per offset), got {len(args.offset_weights)}")
    if args.seq_len < args.k + 2:  # every window needs a position with k targets after it
        p.error(f"--seq-len {args.seq_len} must be more than --k + 1 = {args.k + 1}")
    return args


def main(argv=None):
    args = parse_args(argv)
    check_common_args(args)
    model, tok = load(args)
    try:
        train_windows, held_windows = load_windows(args, model, tok)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if len(train_windows) < args.batch_size:
        sys.exit(f"error: --batch-size {args.batch_size} is more than the {len(train_windows)} training "
                 "windows; read more --conversations")
    return run(args, model, train_windows, held_windows)


if __name__ == "__main__":
    run_main(main)
