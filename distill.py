"""The self-distillation objective (METHOD.md, "Training the projection"): where the pseudo tokens
are trained (positions inside the assistant's replies), what they are trained towards (the frozen
model's own distributions k tokens ahead) and the loss, sum_i w_i KL(P_(p+i) || Q_(p,i)). train.py
minimises it, evaluate.py scores drafts with the same positions and teacher. Read next: evaluate.py.
"""

import torch
import torch.nn.functional as F


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


def distill_loss(logits, teacher, valid, weights, topk=0, objective="kl", width=8):
    """sum_i w_i KL(P_(p+i) || Q_(p,i)), averaged over valid targets. Returns (loss, kl (B, P, k)).
    topk > 0 keeps only the teacher's top-k tokens, renormalised (Q stays over the full vocabulary).

    objective "tree" adds, per target, the cross-entropy of the teacher's top-1 token wherever the
    drafter ranks it among its top `width`: greedy verification accepts a draft when it IS that token,
    and a tree holds the drafter's top few, so those are the targets where raising that one token's
    rank buys acceptance; a target ranked further down is left to the KL."""
    logp, logq = teacher, F.log_softmax(logits.float(), dim=-1)                # (B, P, k, V)
    if objective == "tree":
        right = logq.gather(-1, teacher.argmax(-1, keepdim=True))               # (B, P, k, 1): log Q(top-1 of P)
        winnable = ((logq > right).sum(-1) < width).detach()                    # ranked within the tree's width
        extra = -right[..., 0] * winnable
    else:
        extra = 0.0
    if topk:
        logp, idx = teacher.topk(topk, dim=-1)
        logp, logq = logp - logp.logsumexp(-1, keepdim=True), logq.gather(-1, idx)
    kl = (logp.exp() * (logp - logq)).sum(-1)                                  # (B, P, k)
    w = torch.as_tensor(weights, dtype=kl.dtype, device=kl.device)
    return ((kl + extra) * w * valid).sum() / valid.sum().clamp(min=1), kl.detach()
