"""Plain autoregressive decoding: the reference every speedup is divided by, and the output that
Hidden Transfer must reproduce token for token; and the sampler both decoders share, which makes
exactly one draw per emitted token (what keeps seeded Hidden Transfer sampling lossless; METHOD.md,
"Why it is lossless"). Read next: decode.py.

    python generate.py --prompt "What is the capital of France? Answer in one sentence."
"""

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)
import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from cli import (HelpFormatter, add_common_args, check_common_args, describe_machine, encode_prompt, fit_context,
                 load, run_main)
from compiled import CompiledModel, static_length
from model import KVCache, Transformer, causal_mask


# ----------------------------------------------------------------------------- the sampler

class Sampler:
    """Picks the target model's token from its logits: argmax when temperature is 0, else one draw.

    A draw is ONE step of one seeded generator per emitted token: Gumbel noise g (V,), and the token
    argmax(log p + g), an exact sample of p (the Gumbel-max trick). Two decoders that visit the same
    distributions in the same order emit the same tokens, even when a tree pass and a one-token pass
    round the logits differently: only a near-tie of the top two of log p + g can flip, as in greedy.
    (Inverse-CDF sampling flips whenever its one number falls within rounding of any of V edges.)
    """

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) logits -> (V,) log-probabilities after temperature and top-p (-inf outside the nucleus);
        float64 and shifted by the largest logit, so any temperature > 0 is finite (1e-40: greedy)."""
        x = logits.double()
        logp = torch.log_softmax((x - x.max()) / self.temperature, dim=-1)
        if self.top_p < 1.0:  # keep the smallest head of the distribution whose mass reaches top_p
            p, order = logp.exp().sort(descending=True, stable=True)  # exact ties: the lower id first
            logp = logp.index_fill(0, order[(p.cumsum(0) - p) >= self.top_p], -math.inf)
        return logp

    def draw(self, vocab_size: int) -> torch.Tensor:
        """The one draw for this token: Gumbel(0, 1) noise (V,) from the seeded generator."""
        u = torch.rand(vocab_size, generator=self.generator, dtype=torch.float64)
        return -torch.log(-torch.log(u))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """log p + g for this token's draw: the sampled token is their argmax."""
        logp = self.log_probs(logits)
        return logp + self.draw(len(logp)).to(logp.device)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        return int(self.scores(logits).argmax())


# ----------------------------------------------------------------------------- plain decoding

@dataclass
class Generation:
    """What one generation produced, and what it cost. Shared by every decoder."""
    tokens: list = field(default_factory=list)   # emitted token ids (a final stop token included)
    accepted: list = field(default_factory=list)  # per decoding pass: number of draft tokens accepted
    prefill_s: float = 0.0                        # seconds spent on the prompt
    decode_s: float = 0.0                         # seconds spent on the passes after it

    @property
    def passes(self) -> int:   # target forward passes after the prefill
        return len(self.accepted)

    @property
    def tau(self) -> float:    # mean accepted length: tokens per pass after the prompt's, bonus token included
        return (sum(self.accepted) + self.passes) / max(self.passes, 1)  # = (tokens - 1) / passes for ours; peers fill accepted

    @property
    def tokens_per_s(self) -> float:  # end to end, prompt included
        return len(self.tokens) / max(self.prefill_s + self.decode_s, 1e-9)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate(model: Transformer, prompt: list, max_new_tokens: int, sampler: Sampler,
             stop_ids=(), on_token=None, cache=None) -> Generation:
    """One token per forward pass, until a stop token or max_new_tokens.
    cache: the KVCache to decode into, at least prompt + max_new_tokens long (default a new one);
    compiled.CompiledModel, with its cache, runs the same steps compiled."""
    fit_context(model, prompt, max_new_tokens)  # a prompt that does not fit is the caller's to cut
    dev = model.output.weight.device
    n = len(prompt)
    cache = KVCache(model.args, 1, n + max_new_tokens, dev, model.output.weight.dtype) if cache is None else cache
    if cache.max_len < n + max_new_tokens:
        raise ValueError(f"the cache holds {cache.max_len} slots; this generation needs {n + max_new_tokens}")
    out = Generation()
    t0 = time.perf_counter()
    ids = torch.tensor([prompt], device=dev)
    logits = model(ids, torch.arange(n, device=dev), causal_mask(n, device=dev),
                   torch.arange(n, device=dev), cache)[0, -1]
    for step in range(max_new_tokens):
        y = sampler(logits)
        if step == 0:
            sync(dev)
            t1 = time.perf_counter()
            out.prefill_s = t1 - t0
        else:
            out.accepted.append(0)
        out.tokens.append(y)
        if on_token:
            on_token([y])
        if y in stop_ids or step + 1 == max_new_tokens:
            break
        p = n + step  # the new token's position, and its cache slot
        at = torch.tensor([p], device=dev)
        logits = model(torch.tensor([[y]], device=dev), at,
                       torch.ones(1, 1, p + 1, dtype=torch.bool, device=dev), at, cache)[0, -1]
    sync(dev)
    out.decode_s = time.perf_counter() - t1
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    add_common_args(parser)
    parser.add_argument("--compile", action="store_true",
                        help="run the one-token step under torch.compile with static shapes, compiled "
                             "before decoding (compiled.py; CUDA graphs on a GPU): the same tokens")
    args = parser.parse_args(argv)
    check_common_args(args)
    model, tok = load(args)
    prompt = encode_prompt(args, model, tok)
    stream, cache = tok.stream(), None
    if args.compile:  # the one-token step compiled, all shapes static (compiled.py): the same tokens
        model = CompiledModel(model, static_length(len(prompt) + args.max_new_tokens, model))
        cache = model.cache
        print(f"compiled in {model.warm_up():.0f} s", file=sys.stderr)
    out = generate(model, prompt, args.max_new_tokens, Sampler(args.temperature, args.top_p, args.seed),
                   tok.stop_ids, on_token=lambda ids: print(stream.push(ids), end="", flush=True), cache=cache)
    print(f"\n\n{len(out.tokens)} tokens, {out.tokens_per_s:.1f} tokens/s "
          f"({describe_machine(args.device)}, {args.dtype})")
    return out


if __name__ == "__main__":
    run_main(main)
