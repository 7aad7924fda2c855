"""Plain decoding of many prompts at once, with the batch kept full (continuous batching).

Training data is the base model's own replies (replies.py), and making them is plain decoding of
thousands of prompts. A pass over B rows costs far less than B one-row passes (on a 2-core CPU 16
rows cost about 2-3 one-row steps), so rows decode together; and as soon as a row's reply ends, the
next prompt takes its place, so the batch stays full until the prompts run out:

    row 0   [prompt a ....][reply a ......]<end>[prompt e ...][reply e ...
    row 1   [prompt b ..][reply b ...........................]<end>[prompt f ...
    row 2   [prompt c .......][reply c ..]<end>[prompt d ..][reply d ......

Each row is its own sequence: its cache slots start at 0, its positions are its slots, and each
decoding pass writes every row's new token at that row's own next slot (RowCache). A joining
prompt is prefilled alone, in its row. The tokens are what generate.generate gives for each
prompt with its own seeded sampler, up to the rounding of a batched product.
Read next: replies.py, where the replies are cached and turned into training windows.
"""

import time

import torch

from generate import sync
from model import KVCache, causal_mask


class RowCache(KVCache):
    """A KV cache whose B rows grow independently. In a decoding pass every row stores one token, at
    its own next slot, `at` (B,): the slots the model hands to update() say how many tokens each row
    stores (one), and where only to the range check. row(b) is row b alone, for its prefill."""

    def __init__(self, args, batch: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__(args, batch, max_len, device, dtype)
        self.at = torch.zeros(batch, dtype=torch.long, device=device)

    def update(self, layer, slots, k, v):
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[layer][rows, :, self.at] = k[:, :, 0]  # k (B, n_kv, 1, hd): row b's token at slot at[b]
        self.v[layer][rows, :, self.at] = v[:, :, 0]
        return self.k[layer], self.v[layer]

    def row(self, b: int) -> KVCache:
        """Row b as a one-row KVCache sharing its storage (a view: what it writes lands here)."""
        view = KVCache.__new__(KVCache)
        view.max_len, view.k, view.v = self.max_len, self.k[:, b:b + 1], self.v[:, b:b + 1]
        return view

    def keep(self, rows: list):
        """Keep only these rows, in this order (rows leave at the end, when no prompt is waiting)."""
        idx = torch.tensor(rows, device=self.k.device)
        self.k, self.v, self.at = self.k[:, idx], self.v[:, idx], self.at[idx]


@torch.no_grad()
def generate_stream(model, prompts: list, max_new_tokens: int, samplers: list, stop_ids=(),
                    batch_size: int = 16):
    """Yield (i, tokens) as each prompt's reply ends: the tokens generate.generate(model, prompts[i],
    max_new_tokens, samplers[i], stop_ids) emits, with batch_size rows decoding together."""
    dev, dtype = model.output.weight.device, model.output.weight.dtype
    waiting = list(range(len(prompts)))[::-1]  # a stack: the next prompt to join is waiting[-1]
    length = max((len(p) for p in prompts), default=0) + max_new_tokens
    cache = RowCache(model.args, min(batch_size, len(prompts)), length, dev, dtype)
    rows = [None] * len(cache.at)  # rows[b]: (prompt index, tokens emitted so far), or None: free

    def emit(b, i, logits_b):  # sample row b's next token; True if its reply goes on
        out = rows[b][1] if rows[b] else []
        y = samplers[i](logits_b)
        out.append(y)
        rows[b] = (i, out)
        return y not in stop_ids and len(out) < max_new_tokens

    while waiting or any(rows):
        for b in range(len(rows)):  # free rows take the next prompts, prefilled alone in their row
            while rows[b] is None and waiting:
                i = waiting.pop()
                n = len(prompts[i])
                ids, pos = torch.tensor([prompts[i]], device=dev), torch.arange(n, device=dev)
                h = model.run_layers(model.embed(ids), pos, causal_mask(n, device=dev), pos, cache.row(b))
                if emit(b, i, model.head(h[0, -1])):  # the LM head for the last token only
                    cache.at[b] = n
                else:  # a one-token reply: done already
                    yield rows[b]
                    rows[b] = None
        if not waiting and None in rows:  # no prompt left for the free rows: they leave the batch
            live = [b for b, r in enumerate(rows) if r is not None]
            if not live:
                return
            cache.keep(live)
            rows = [rows[b] for b in live]
        tokens = torch.tensor([[r[1][-1]] for r in rows], device=dev)  # (B, 1): each row's last token
        width = int(cache.at.max()) + 1
        mask = torch.arange(width, device=dev)[None, None, :] <= cache.at[:, None, None]  # (B, 1, width)
        logits = model(tokens, cache.at[:, None], mask, cache.at.max()[None], cache)[:, -1]
        for b, (i, _) in enumerate(rows):
            if emit(b, i, logits[b]):
                cache.at[b] += 1
            else:
                yield rows[b]
                rows[b] = None


def generate_batch(model, prompts: list, max_new_tokens: int, samplers: list, stop_ids=(),
                   batch_size: int = 16) -> list:
    """generate_stream's replies as a list, in the prompts' order."""
    out = [None] * len(prompts)
    for i, tokens in generate_stream(model, prompts, max_new_tokens, samplers, stop_ids, batch_size):
        out[i] = tokens
    return out


# ----------------------------------------------------------------------------- how many rows

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # beyond 64 rows, on a 2-core CPU, attention over the longest
                                         # row's width for every row costs more than the rows bring


@torch.no_grad()
def pass_costs(model, context: int, sizes=BATCH_SIZES, reps: int = 3) -> dict:
    """{B: seconds of one decoding pass over B rows} with `context` cached tokens per row: the
    measured curve the batch size is chosen from (the median of reps passes after one warm-up)."""
    dev, dtype = model.output.weight.device, model.output.weight.dtype
    costs = {}
    for B in sizes:
        cache = RowCache(model.args, B, context + 1, dev, dtype)
        cache.at.fill_(context)
        tokens, mask = torch.zeros(B, 1, dtype=torch.long, device=dev), torch.ones(B, 1, context + 1, dtype=torch.bool,
                                                                                    device=dev)
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            model(tokens, cache.at[:, None], mask, cache.at.max()[None], cache)
            sync(dev)
            times.append(time.perf_counter() - t0)
        costs[B] = sorted(times[1:])[len(times[1:]) // 2]
    return costs


def pick_batch_size(costs: dict, within: float = 0.9) -> int:
    """The smallest B whose rows per second, B / cost(B), reach `within` of the best on the curve: a
    bigger batch buys little more and makes the prompts wait longer (and its tail is longer)."""
    rate = {B: B / s for B, s in costs.items()}
    best = max(rate.values())
    return min(B for B, r in rate.items() if r >= within * best)
