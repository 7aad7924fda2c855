"""Held-out acceptance: how often each draft is the token the base model would choose (METHOD.md,
"Metrics"), on fixed positions of fixed held-out windows, so that two recipes are scored alike.

Two held-out sets: the base model's own replies to held-out prompts (where decoding happens: the
plan is chosen from these rates) and ShareGPT's held-out conversations. In each window the
positions are drawn once from the window's index, EVAL_POSITIONS of them by the training rule
(distill.choose_positions), whatever the training flags. Read next: train.py.
"""

import torch

from distill import choose_positions, distill_loss, teacher_logprobs

EVAL_POSITIONS = 48  # positions scored per held-out window
EVAL_BATCH = 4       # windows per evaluation pass (a memory bound only: the numbers do not depend on it)


def fixed_positions(assistant: torch.Tensor, k: int, first: int):
    """Positions (B, P) and valid targets (B, P, k) of windows first..first+B-1: each window's own,
    drawn with a generator seeded by its index, padded to the batch's widest (pads are not valid)."""
    rows = [choose_positions(assistant[b:b + 1], EVAL_POSITIONS, k, torch.Generator().manual_seed(first + b))
            for b in range(assistant.shape[0])]
    width = max(p.shape[1] for p, _ in rows)
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=assistant.device)
    valid = torch.zeros(len(rows), width, k, dtype=torch.bool, device=assistant.device)
    for b, (p, v) in enumerate(rows):
        positions[b, :p.shape[1]], valid[b, :p.shape[1]] = p[0], v[0]
    return positions, valid


@torch.no_grad()
def evaluate(model, drafter, windows, top_r: int = 10) -> dict:
    """Per offset i: top-1 / top-5 agreement of q_i with the base model's argmax at p+i, the KL, and
    accept[i-1][r] = share of targets whose rank-r draft token IS that argmax. The rates are
    unconditional (not given that offsets < i were right), the simplification tree_choice.expected_tau
    then assumes away. windows: [(ids (T,), assistant (T,))]."""
    k, dev = drafter.k, model.output.weight.device
    hits, count, kl_sum = torch.zeros(k, top_r), torch.zeros(k), torch.zeros(k)
    for j in range(0, len(windows), EVAL_BATCH):
        ids = torch.stack([w[0] for w in windows[j:j + EVAL_BATCH]]).to(dev)        # (B, T)
        assistant = torch.stack([w[1] for w in windows[j:j + EVAL_BATCH]]).to(dev)  # (B, T)
        positions, valid = fixed_positions(assistant, k, j)
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
            "tau_chain": chain_tau(accept[:, 0].tolist()), "targets": int(count[0])}


def chain_tau(top1: list) -> float:
    """Expected tokens per step of a chain of the top-1 drafts, offsets taken as independent (METHOD.md,
    "Metrics": 1 + the sum over depths j of the product of the top-1 rates up to j)."""
    tau, p = 1.0, 1.0
    for rate in top1:
        p *= rate
        tau += p
    return tau


def evaluate_all(model, drafter, held: dict, top_r: int = 10) -> dict:
    """{set name: evaluate(...)} for every held-out set (a dict of window lists)."""
    return {name: evaluate(model, drafter, windows, top_r) for name, windows in held.items() if windows}


def format_metrics(m: dict) -> str:
    show = lambda xs: "/".join(f"{x:.2f}" for x in xs)
    return (f"top-1 {show(m['top1'])}  top-5 {show(m['top5'])}  KL {show(m['kl'])}  "
            f"chain tau {m['tau_chain']:.2f}  ({m['targets']} positions)")


def format_all(metrics: dict) -> str:
    return "\n".join(f"  {name:<12} {format_metrics(m)}" for name, m in metrics.items())
