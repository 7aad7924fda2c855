"""Assignment 5: transfer.HiddenTransfer.pseudo_inputs (the pseudo tokens of a training window),
distill.teacher_logprobs and distill.distill_loss, against a brute-force mask, the model's own full
forward, and the KL written out term by term."""

import torch
import torch.nn.functional as F

from common import (check, close, expect, final_states, random_transfer, tiny_model, training_inputs,
                    training_pseudo_states)

POSITIONS = torch.tensor([[0, 3, 6], [2, 5, 9]])  # (B, P): sorted training positions per sequence


@check("pseudo_inputs: rows are pseudo tokens (p,1)..(p,k) per chosen p, owner-major; inputs W_i h^t_p "
       "(the drafter's own map: self(h)); "
       "positions p+i; mask columns [T real tokens | pseudo tokens]: (p,i) sees real tokens 0..p (p "
       "included) and (p,j<=i) only")
def check_pseudo_inputs_brute_force():
    g = torch.Generator().manual_seed(0)
    for k, T in [(1, 10), (3, 12)]:
        B, P = POSITIONS.shape
        ht = random_transfer(tiny_model(0), 2, k=k)
        h_t = torch.randn(B, T, ht.dim, generator=g)
        with torch.no_grad():
            x, pos, got = training_inputs(ht, h_t, POSITIONS)
        expect(tuple(got.shape) == (B, P * k, T + P * k), f"mask shape {tuple(got.shape)}, expected "
               f"{(B, P * k, T + P * k)} for k={k}, T={T}")
        expect(tuple(x.shape) == (B, P * k, ht.dim), f"inputs shape {tuple(x.shape)}, expected {(B, P * k, ht.dim)}")
        for b in range(B):
            rows = [(int(p), i) for p in POSITIONS[b] for i in range(1, k + 1)]
            want = torch.zeros(len(rows), T + len(rows), dtype=torch.bool)
            for r, (p, i) in enumerate(rows):
                want[r, :p + 1] = True
                for c, (q, j) in enumerate(rows):
                    want[r, T + c] = q == p and j <= i
                with torch.no_grad():
                    want_x = ht(h_t[b, p])[i - 1]                             # W_i h^t_p (+ b_i)
                close(x[b, r], want_x, f"input of pseudo (p={p}, i={i}) in sequence {b}, k={k}")
            expect(torch.equal(got[b], want), f"training mask wrong for positions {POSITIONS[b].tolist()}, k={k}")
            expect(pos[b].tolist() == [p + i for p, i in rows], f"pseudo positions {pos[b].tolist()} for "
                   f"positions {POSITIONS[b].tolist()}, k={k}; expected p + i")


@check("the frozen model may run in bfloat16 while the drafter keeps fp32 weights: pseudo_inputs takes "
       "h^t in the model's dtype and returns inputs in it (the drafter's forward casts to its own dtype and "
       "back); never feed h^t to the projection's weights directly")
def check_pseudo_inputs_in_the_models_dtype():
    ht = random_transfer(tiny_model(0), 2, k=2)
    h_t = torch.randn(2, 10, ht.dim, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.no_grad():
        x, pos, mask = training_inputs(ht, h_t, POSITIONS)
    expect(x.dtype == torch.bfloat16, f"inputs in {x.dtype}; the frozen model's layers run in torch.bfloat16")
    with torch.no_grad():
        want = ht(h_t[0, POSITIONS[0, 1]].float())                            # (k, dim) in fp32
    close(x[0, 2:4].float(), want, "inputs of p=3 from a bfloat16 h^t", atol=0.1)


@check("pseudo states in training must equal decoding's: a causal forward from layer t over "
       "[x_0..x_p | (p,1)..(p,k)] (your mask drives the training pass)")
def check_pseudo_states_match_reference():
    model, T = tiny_model(1), 12
    ht = random_transfer(model, 2)
    ids = torch.randint(0, model.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = training_pseudo_states(model, ht, ids, POSITIONS)            # (B, P, k, d)
    for b in range(2):
        for m, p in enumerate(POSITIONS[b].tolist()):
            seq = ids[b, :p + 1].tolist()
            h = final_states(model, seq, 0, ht.layer)                         # (p+1, d)
            ref = final_states(model, None, ht.layer, None, h=torch.cat([h, ht(h[-1])]))[p + 1:]
            close(states[b, m], ref, f"pseudo states of p={p} in sequence {b}")


@check("the teacher for pseudo (p,i) is the base model's distribution at position p+i (it predicts "
       "x_(p+i+1)): log_softmax of the LM head on h^L at row p+i, (B, P, k, V)")
def check_teacher_logprobs():
    from distill import teacher_logprobs
    model, T, k = tiny_model(2), 12, 3
    ids = torch.randint(0, model.args.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h_L = torch.stack([final_states(model, ids[b].tolist()) for b in range(2)])  # (B, T, d)
        got = teacher_logprobs(model, h_L, POSITIONS, k)
        full = F.log_softmax(model.head(h_L).float(), dim=-1)                        # (B, T, V)
    expect(tuple(got.shape) == (2, 3, k, model.args.vocab_size), f"shape {tuple(got.shape)}")
    for b in range(2):
        for m, p in enumerate(POSITIONS[b].tolist()):
            for i in range(1, k + 1):
                if p + i <= T - 1:  # beyond the sequence there is no teacher (those targets are invalid)
                    close(got[b, m, i - 1], full[b, p + i], f"teacher of (p={p}, i={i}) in sequence {b}")


def reference_loss(logits, teacher, valid, weights, topk=0):
    """sum_i w_i KL(P || Q) averaged over valid targets, one target at a time."""
    B, P, k, V = logits.shape
    total, count = 0.0, 0
    for b in range(B):
        for m in range(P):
            for i in range(k):
                if not valid[b, m, i]:
                    continue
                p = teacher[b, m, i].double().exp()
                q = torch.softmax(logits[b, m, i].double(), -1)
                if topk:
                    idx = p.topk(topk).indices
                    p, q = p[idx] / p[idx].sum(), q[idx]
                total += weights[i] * float((p * (p.log() - q.log())).sum())
                count += 1
    return total / max(count, 1)


@check("distill_loss = sum_i w_i KL(P_(p+i) || Q_(p,i)) = sum P (log P - log Q), teacher first, averaged "
       "over VALID targets only; topk keeps the teacher's top-k tokens, renormalised")
def check_distill_loss_value():
    from distill import distill_loss
    g = torch.Generator().manual_seed(3)
    B, P, k, V = 2, 3, 3, 11
    logits = 2 * torch.randn(B, P, k, V, generator=g)
    teacher = F.log_softmax(3 * torch.randn(B, P, k, V, generator=g), -1)
    valid = torch.rand(B, P, k, generator=g) < 0.6
    weights = [1.0, 0.5, 0.25]
    for topk in (0, 4):
        loss, kl = distill_loss(logits, teacher, valid, weights, topk)
        close(loss, torch.tensor(reference_loss(logits, teacher, valid, weights, topk)),
              f"loss (topk={topk})", 1e-5)
        expect(tuple(kl.shape) == (B, P, k), f"per-target kl shape {tuple(kl.shape)}, expected {(B, P, k)}")


@check("the loss must be 0 when the drafts equal the teacher, and its gradient w.r.t. the logits "
       "w_i (softmax(logits) - P) / #valid (the KL's gradient, teacher held fixed)")
def check_distill_loss_gradient():
    from distill import distill_loss
    g = torch.Generator().manual_seed(4)
    B, P, k, V = 1, 2, 2, 7
    teacher = F.log_softmax(torch.randn(B, P, k, V, generator=g), -1)
    valid = torch.tensor([[[True, False], [True, True]]])
    same, _ = distill_loss(teacher.clone(), teacher, valid, [1.0, 1.0])
    close(same, torch.tensor(0.0), "loss when drafts equal the teacher", 1e-6)
    logits = torch.randn(B, P, k, V, generator=g, requires_grad=True)
    loss, _ = distill_loss(logits, teacher, valid, [1.0, 0.5])
    loss.backward()
    w = torch.tensor([1.0, 0.5])[None, None, :, None]
    want = w * valid[..., None] * (torch.softmax(logits.detach(), -1) - teacher.exp()) / valid.sum()
    close(logits.grad, want, "gradient of the loss", 1e-5)
