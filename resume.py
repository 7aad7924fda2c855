"""Resume an interrupted train.py run exactly (train.py --resume).

Nothing but the checkpoint is needed: the data stream, the positions each step draws and the
learning rate are pure functions of the seed, the step and the seconds trained (train.py), so the
drafter, AdamW's state, the step, the loss and evaluation history and the training time are all a
run has to keep. A run continues only with the flags that shaped it (RUN_KEYS).
"""

import os
import sys

from checkpoint import build_drafter, open_checkpoint, verify_checksum

RUN_KEYS = ("drafter", "data", "replies", "second_turns", "reply_tokens", "sampled", "seq_len", "batch_size",
            "positions_per_seq", "lr", "warmup", "seed", "offset_weights", "teacher_topk", "objective",
            "budget_minutes", "conversations", "holdout", "drafter_option")


def resumable(args, model, config: dict) -> dict:
    """The checkpoint --resume continues, checked before any long work: it exists, loads, fits the
    model and was trained with these flags; config: the drafter's config these flags make. A bad
    one is a ValueError (one line)."""
    path = args.drafter_checkpoint
    if not os.path.exists(path):
        raise ValueError(f"--resume: no checkpoint at {path} to continue; drop --resume or fix "
                         "--drafter-checkpoint")
    ckpt = open_checkpoint(path, args.drafter)
    drafter = build_drafter(ckpt, path, model)  # refuses another model, config or shape
    verify_checksum(ckpt, path)
    missing = [f for f in ("step", "optimizer", "history", "train_args") if f not in ckpt]
    if missing:
        raise ValueError(f"--resume: {path} has no {', '.join(missing)}: it is not a checkpoint of an "
                         "unfinished train.py run")
    train_args = ckpt["train_args"] if isinstance(ckpt["train_args"], dict) else {}
    changed = [k for k in RUN_KEYS if train_args.get(k) != getattr(args, k)]
    changed += ["drafter config"] if ckpt["config"] != config else []
    if changed:
        raise ValueError(f"--resume: {path} was trained with other {', '.join(changed)}; "
                         "use the same flags, or a new --drafter-checkpoint")
    del drafter
    return ckpt


def restore(args, model, drafter, opt):
    """Continue exactly where --drafter-checkpoint stopped: drafter, AdamW state and step (the data
    stream, the positions and the learning rate are functions of the seed and step), the loss and
    evaluation history and the training time. Returns (step, history, evals, train_s)."""
    path = args.drafter_checkpoint
    try:
        ckpt = resumable(args, model, drafter.config())
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        drafter.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history = int(ckpt["step"]), [float(x) for x in ckpt["history"]]
        evals, train_s = list(ckpt.get("evals", [])), float(ckpt.get("train_s", 0.0))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"error: --resume: {path} holds a damaged training state ({why})")
    print(f"resuming {path} at step {step} of {args.steps}")
    return step, history, evals, train_s
