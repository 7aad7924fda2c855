"""Assignment 1: model.Attention.forward (positions, cache slots, mask, ephemeral tokens),
model.KVCache.update and model.KVCache.move. The reference is a slow attention written with one loop
per head, one sequence at a time."""

import math

import torch

from common import check, close, expect, tiny_model

CONFIGS = [dict(), dict(n_kv_heads=None), dict(n_kv_heads=1)]  # grouped-query, multi-head, multi-query


def rope(x, pos, inv_freq):
    """x (T, heads, hd) rotated by angle pos * inv_freq; dimension i pairs with i + hd/2."""
    ang = pos.double()[:, None] * inv_freq.double()[None, :]              # (T, hd/2)
    cos, sin = ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]  # (T, 1, hd/2)
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


@torch.no_grad()
def reference_logits(model, tokens, pos, mask):
    """Slow attention: tokens (T,), pos (T,), mask (T, T) bool over the same T tokens -> (T, V)."""
    a = model.args
    T, nh, nkv, hd = len(tokens), a.n_heads, a.n_kv_heads, a.head_dim
    h = model.tok_embeddings.weight[torch.as_tensor(tokens)]              # (T, dim)
    pos = torch.as_tensor(pos)
    for block in model.layers:
        att, x = block.attention, block.attention_norm(h)
        q = rope((x @ att.wq.weight.T).view(T, nh, hd), pos, model.inv_freq)
        k = rope((x @ att.wk.weight.T).view(T, nkv, hd), pos, model.inv_freq)
        v = (x @ att.wv.weight.T).view(T, nkv, hd)
        out = torch.zeros(T, nh, hd)
        for head in range(nh):
            kv = head // (nh // nkv)   # query heads 0..g-1 share kv head 0, and so on
            scores = (q[:, head] @ k[:, kv].T) / math.sqrt(hd)            # (T, T)
            scores = scores.masked_fill(~mask, float("-inf"))
            out[:, head] = torch.softmax(scores, dim=-1) @ v[:, kv]
        h = h + out.reshape(T, nh * hd) @ att.wo.weight.T
        h = h + block.feed_forward(block.ffn_norm(h))
    return model.head(h[None])[0]


def tokens_for(model, T, seed):
    return torch.randint(0, model.args.vocab_size, (T,), generator=torch.Generator().manual_seed(seed))


@check("with no cache every token is ephemeral: project q, k, v, rotate q AND k, let kv head j serve "
       "query heads j*g..(j+1)*g-1, then softmax(q k^T / sqrt(hd)) over the mask's True columns")
def check_full_forward_no_cache():
    for i, cfg in enumerate(CONFIGS):
        model, T = tiny_model(i, **cfg), 9
        x = tokens_for(model, T, i)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        with torch.no_grad():
            got = model(x[None], torch.arange(T), causal[None])[0]
        close(got, reference_logits(model, x, torch.arange(T), causal), f"logits, config {cfg or 'tiny'}")


@check("RoPE must use the position ids you are given (not 0..T-1), and the mask exactly as given")
def check_explicit_positions_and_mask():
    model, T = tiny_model(3), 8
    g = torch.Generator().manual_seed(3)
    x = tokens_for(model, T, 3)
    pos = torch.tensor([0, 3, 3, 4, 9, 9, 10, 20])                 # gaps and shared positions
    mask = (torch.rand(T, T, generator=g) < 0.5) | torch.eye(T, dtype=torch.bool)  # every row sees itself
    with torch.no_grad():
        got = model(x[None], pos, mask[None])[0]
    close(got, reference_logits(model, x, pos, mask), "logits with explicit positions and a random mask")


@check("prefill writes K/V at `slots`; a later call reads cache slots 0..kv_len-1 as the first mask "
       "columns, where kv_len = mask columns - ephemeral tokens")
def check_cached_decoding_matches_full_forward():
    from model import KVCache
    model, T, n = tiny_model(4), 10, 6
    x = tokens_for(model, T, 4)
    ref = reference_logits(model, x, torch.arange(T), torch.ones(T, T, dtype=torch.bool).tril())
    cache = KVCache(model.args, 1, 16)
    with torch.no_grad():
        got = [model(x[None, :n], torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril()[None],
                     torch.arange(n), cache)[0]]
        for p in range(n, T):  # one token per call, as plain decoding does
            at = torch.tensor([p])
            got.append(model(x[None, p:p + 1], at, torch.ones(1, 1, p + 1, dtype=torch.bool), at, cache)[0])
    close(torch.cat(got), ref, "logits of a prefill plus one-token steps")


@check("a token's cache slot is not its position: KVCache.update writes K/V exactly at `slots` (the slot "
       "axis, dim 2 of a layer's (B, n_kv, max_len, hd)) and the mask decides which slots are seen")
def check_slots_are_not_positions():
    from model import KVCache
    model, n = tiny_model(5), 5
    x = tokens_for(model, n + 2, 5)
    cache = KVCache(model.args, 1, 16)
    mask = torch.zeros(2, n + 4, dtype=torch.bool)  # columns: cache slots 0..n+3
    mask[:, :n] = True
    mask[0, n + 3] = True                # token 0 lives in slot n+3
    mask[1, [n + 3, n + 1]] = True       # token 1 in slot n+1, and sees token 0
    with torch.no_grad():
        model(x[None, :n], torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril()[None], torch.arange(n), cache)
        got = model(x[None, n:], torch.tensor([n, n + 1]), mask[None], torch.tensor([n + 3, n + 1]), cache)[0]
    ref = reference_logits(model, x, torch.arange(n + 2), torch.ones(n + 2, n + 2, dtype=torch.bool).tril())
    close(got, ref[n:], "logits of two tokens written to slots n+3 and n+1")
    expect(bool((cache.k[:, :, :, [n, n + 2]] == 0).all()), "slots n and n+2 were written; only slots n+3 "
           "and n+1 were given")
    expect(bool((cache.k[:, :, :, n + 3] != 0).any() and (cache.v[:, :, :, n + 1] != 0).any()),
           "slots n+3 and n+1 hold no keys/values after the call")


@check("tokens after the first len(slots) are ephemeral: they attend like any token (columns after "
       "the cache's), but their K/V are never written to the cache")
def check_ephemeral_tokens():
    from model import KVCache
    model, n = tiny_model(6), 4
    x = tokens_for(model, n + 3, 6)
    cache = KVCache(model.args, 1, 16)
    # 3 new tokens, the first cached at slot n, the other two ephemeral. Columns: slots 0..n | 2 ephemeral
    mask = torch.cat([torch.ones(3, n + 1, dtype=torch.bool),
                      torch.tensor([[0, 0], [1, 0], [1, 1]], dtype=torch.bool)], 1)  # (3, n + 3)
    with torch.no_grad():
        model(x[None, :n], torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril()[None], torch.arange(n), cache)
        got = model(x[None, n:], torch.arange(n, n + 3), mask[None], torch.tensor([n]), cache)[0]
    ref = reference_logits(model, x, torch.arange(n + 3), torch.ones(n + 3, n + 3, dtype=torch.bool).tril())
    close(got, ref[n:], "logits of one cached and two ephemeral tokens")
    expect(bool((cache.k[:, :, :, n + 1:] == 0).all() and (cache.v[:, :, :, n + 1:] == 0).all()),
           "ephemeral tokens were written into the cache")


@check("a batch of two: each row has its own positions (B, T) and mask (B, T, S), and both rows are "
       "written to the shared cache slots; apply each row's mask to its own row, write every row's K/V")
def check_a_batch_with_a_mask_per_row():
    from model import KVCache
    model, n = tiny_model(8), 6
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, model.args.vocab_size, (2, n + 2), generator=g)
    cache = KVCache(model.args, 2, 16)
    # row 0 is a plain sequence; row 1 starts with two pad slots that its mask hides (as batched
    # generation does), so its positions start two later
    pos = torch.stack([torch.arange(n), (torch.arange(n) - 2).clamp(min=0)])           # (2, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    visible = torch.ones(2, n, dtype=torch.bool)
    visible[1, :2] = False
    mask = (causal[None] & visible[:, None, :]) | torch.eye(n, dtype=torch.bool)       # (2, n, n)
    with torch.no_grad():
        model(x[:, :n], pos, mask, torch.arange(n), cache)
        step_mask = torch.cat([visible, torch.ones(2, 1, dtype=torch.bool)], 1)[:, None]  # (2, 1, n + 1)
        got = model(x[:, n:n + 1], pos[:, -1:] + 1, step_mask, torch.tensor([n]), cache)[:, 0]
    for b, start in ((0, 0), (1, 2)):  # each row alone: its own tokens, positions from 0
        seq = x[b, start:n + 1]
        T = len(seq)
        ref = reference_logits(model, seq, torch.arange(T), torch.ones(T, T, dtype=torch.bool).tril())
        close(got[b], ref[-1], f"logits of batch row {b} after a prefill of two rows with different masks")


@check("move copies keys AND values, in every layer and head, from slots src to slots dst "
       "(gather the sources before writing: they may overlap the destinations, below or above them)")
def check_kv_cache_move():
    from model import KVCache
    model = tiny_model(7)
    for src, dst in [([5, 7, 9], [2, 3, 4]), ([3, 4, 6, 8], [3, 4, 5, 6]), ([1], [1]), ([2, 3, 4], [3, 4, 5])]:
        cache = KVCache(model.args, 2, 12)
        cache.k.normal_(generator=torch.Generator().manual_seed(1))
        cache.v.normal_(generator=torch.Generator().manual_seed(2))
        k0, v0 = cache.k.clone(), cache.v.clone()
        cache.move(torch.tensor(src), torch.tensor(dst))
        want_k, want_v = k0.clone(), v0.clone()
        for s, d in zip(src, dst):  # sources are read before anything is written
            want_k[:, :, :, d], want_v[:, :, :, d] = k0[:, :, :, s], v0[:, :, :, s]
        expect(torch.equal(cache.k, want_k), f"keys after move({src} -> {dst}) are wrong")
        expect(torch.equal(cache.v, want_v), f"values after move({src} -> {dst}) are wrong")


@check("the stored tokens' rows read only the cache columns, never the ephemeral tokens' K/V: a masked "
       "column still enters the attention product as 0 x value, and 0 x NaN is NaN, so a NaN or inf in an "
       "ephemeral token (a drafter's pseudo token) would reach a real token")
def check_stored_rows_ignore_ephemeral_values():
    from model import KVCache
    model = tiny_model(3)
    attention, dim = model.layers[0].attention, model.args.dim
    ctx, n, e = 4, 3, 2                                       # cached, stored now, ephemeral
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n + e, dim, generator=g)
    pos, slots = torch.arange(ctx, ctx + n + e), torch.arange(ctx, ctx + n)
    cos, sin = model.rope(pos, x.dtype)
    mask = torch.zeros(n + e, ctx + n + e, dtype=torch.bool)  # columns: cache (ctx + n) | ephemeral (e)
    mask[:, :ctx] = True
    mask[:n, ctx:ctx + n] = torch.ones(n, n, dtype=torch.bool).tril()
    mask[n:, ctx:] = True
    outs = []
    for poison in (None, float("nan"), float("inf")):
        cache = KVCache(model.args, 1, 16)
        cache.k.normal_(generator=torch.Generator().manual_seed(1))
        cache.v.normal_(generator=torch.Generator().manual_seed(2))
        xp = x.clone()
        if poison is not None:
            xp[:, n:] = poison
        with torch.no_grad():
            outs.append(attention(xp, cos, sin, mask[None], slots, cache)[0, :n])
    expect(bool(torch.isfinite(outs[0]).all()), "the stored rows are not finite with finite inputs")
    for y, what in zip(outs[1:], ("NaN", "inf")):
        expect(torch.equal(y, outs[0]), f"the stored rows changed when the ephemeral tokens were {what}")
