"""The peers bench.py times beside our methods: transformers' prompt-lookup decoding (`generate(...,
prompt_lookup_num_tokens=N)`: the drafts are the tokens that followed the last n-gram's earlier
occurrence in the prompt or the text so far, verified in one pass of the model; no trained drafter,
what a user without one would pick) and transformers' own plain generate(). Both run on the same
weights (copied from our model: model.py keeps Hugging Face's layout), dtype, device, prompts,
max_new_tokens and stop tokens, stock (no tools/kernels.py forms).

transformers is a test-time dependency (requirements-test.txt): this file imports it only when a
peer is built, and bench.py runs without it. A peer returns a generate.Generation as our decoders
do: its tokens (a final stop token included), and for each forward pass of the model after the
first how many drafts it accepted: transformers' streamer receives each pass's tokens, a forward
hook counts the passes, and the two must agree. Greedy, its tokens must be plain decoding's;
sampling, transformers draws from torch's generator (seeded per generation), not with our
Sampler, so its tokens are not comparable with ours.
"""

import re
import time

import torch

from generate import Generation, sync
from weights import NAMES

PEERS = {"transformers": None, "prompt-lookup": "transformers"}  # name: the peer it is also compared with
LOOKUP_TOKENS = 10  # drafted tokens per pass: transformers' default for prompt lookup
HF_NAME = {f"{ours}.weight": f"{hf}.weight" for ours, hf, _ in NAMES}


def missing() -> str | None:
    """Why no peer can run here (transformers is not installed), or None."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install -r requirements-test.txt)"
    return None


def add_arg(parser):
    parser.add_argument("--prompt-lookup-tokens", type=int, default=LOOKUP_TOKENS,
                        help="prompt-lookup's prompt_lookup_num_tokens: drafted tokens per pass")


def hf_name(name: str) -> str:
    """model.py's parameter name -> transformers' LlamaForCausalLM's."""
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    return HF_NAME[f"layers.{{}}.{m.group(2)}"].format(m.group(1)) if m else HF_NAME[name]


def hf_model(model):
    """A transformers LlamaForCausalLM holding `model`'s weights, on its device in its dtype."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    a, w = model.args, model.output.weight
    rope = {"rope_type": "default", **(a.rope_scaling or {}), "rope_theta": a.rope_theta}
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                         head_dim=a.head_dim, max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps,
                         tie_word_embeddings=a.tie_embeddings, rope_parameters=rope,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = LlamaForCausalLM(config)
    hf.load_state_dict({hf_name(k): v for k, v in model.state_dict().items()})
    hf.generation_config = GenerationConfig()  # nothing inherited: every setting is passed per call
    return hf.to(device=w.device, dtype=w.dtype).eval()


class _Passes:
    """transformers' streamer protocol: put(ids) once with the prompt, then once per forward pass
    with the tokens it emitted; end(). Keeps each pass's count and when it arrived."""

    def __init__(self, device):
        self.device, self.sizes, self.times = device, [], []

    def put(self, ids):
        sync(self.device)
        self.sizes.append(ids.numel())
        self.times.append(time.perf_counter())

    def end(self):
        pass


class Peer:
    """One transformers decoder: plain generate() (lookup=None) or prompt lookup (lookup=N tokens)."""

    def __init__(self, name: str, hf, lookup: int | None):
        self.name, self.hf, self.lookup = name, hf, lookup

    def info(self, temperature: float) -> dict:
        """results["peers"][name]: what it is, the peer it is also compared with, and whose tokens it
        must reproduce (greedy: plain decoding's; sampling: none, another sampler)."""
        import transformers
        return {"library": f"transformers {transformers.__version__}", "baseline": PEERS[self.name],
                "prompt_lookup_num_tokens": self.lookup, "reference": "plain" if temperature == 0 else None}

    @torch.no_grad()
    def generate(self, prompt: list, max_new_tokens: int, temperature=0.0, top_p=1.0, seed=0,
                 stop_ids=()) -> Generation:
        dev = self.hf.device
        ids = torch.tensor([prompt], device=dev)
        stops = sorted(stop_ids)
        how = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature else {}
        if self.lookup:
            how["prompt_lookup_num_tokens"] = self.lookup
        passes, calls = _Passes(dev), []
        hook = self.hf.register_forward_hook(lambda *_: calls.append(1))
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(seed)  # transformers samples from torch's own generator
                t0 = time.perf_counter()
                out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                       eos_token_id=stops or None, pad_token_id=stops[0] if stops else 0,
                                       streamer=passes, **how)
                sync(dev)
                t1 = time.perf_counter()
        finally:
            hook.remove()
        tokens, emitted = out[0, len(prompt):].tolist(), passes.sizes[1:]  # the first put is the prompt
        if len(emitted) != len(calls) or sum(emitted) != len(tokens):
            raise RuntimeError(f"{self.name}: {len(calls)} forward passes but tokens emitted in {len(emitted)} "
                               f"({sum(emitted)} of {len(tokens)}): cannot count tokens per pass")
        return Generation(tokens=tokens, accepted=[e - 1 for e in emitted[1:]], prefill_s=passes.times[1] - t0,
                          decode_s=t1 - passes.times[1])


def build(model, names, lookup: int = LOOKUP_TOKENS) -> dict:
    """{name: Peer} for the peers in `names` (PEERS), sharing one copy of the model's weights."""
    names = [n for n in names if n in PEERS]
    if not names:
        return {}
    hf = hf_model(model)
    return {n: Peer(n, hf, lookup if n == "prompt-lookup" else None) for n in names}
