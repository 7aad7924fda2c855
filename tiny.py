"""`--model tiny`: the whole loop in seconds. A small random LLaMA of the real architecture (RMSNorm,
RoPE, grouped-query attention, SwiGLU, tied head: model.py at toy size), a byte-level tokenizer
with a ChatML template, and synthetic conversations to train a drafter on.

The model's weights are random but fixed (seed 0), so a drafter trained for it fits it in every
later command; its replies are gibberish, but they are its own, and Hidden Transfer must reproduce
them token for token like any model's. train.py takes TRAIN as its defaults, so a drafter for it
trains, is evaluated and gets its plan in seconds:

    python train.py --model tiny && python decode.py --model tiny --show --check

It runs on one CPU thread unless --threads says otherwise: its products are too small to share,
and on a busy machine a second thread waiting for a core slows every step many times over.
"""

import json
import os
import random

import torch
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from model import ModelArgs, Transformer
from tokenizer import Tokenizer, _TokenizersBackend

NAME = "tiny"
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]  # one token per printable ASCII character
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]  # <unk>: any other character
# the context holds a long MT-Bench prompt, one token per character
ARGS = dict(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=len(CHARS) + len(SPECIAL),
            rope_theta=10000.0, max_seq_len=2048)
STD = 0.08  # 0.15: next tokens too random to draft; 0.05: one token repeated; 0.08: runs and variety

# train.py's defaults with --model tiny (flags given still win): seconds, not minutes
TRAIN = dict(conversations=120, holdout=20, replies=100, reply_tokens=48, reply_batch=50, seq_len=96,
             eval_windows=10, steps=200, warmup=10, lr=1e-2, positions_per_seq=24, tree_sizes=[2, 4],
             frozen_dtype="float32", eval_every=0, compiled_finalists=0)


def load_model(device="cpu", dtype=torch.float32) -> Transformer:
    """The tiny model: always the same random weights, in eval mode."""
    return Transformer(ModelArgs(**ARGS)).init_random(0, std=STD).eval().to(device=device, dtype=dtype)


def load_tokenizer(template: str | None = None) -> Tokenizer:
    """Characters as tokens (CHARS, then the ChatML markers and <unk>), through tokenizers' WordLevel."""
    tok = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(CHARS + SPECIAL)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # joined with nothing between
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return Tokenizer(_TokenizersBackend(tok), bos_id=None, eos_id=tok.token_to_id("<|im_end|>"), add_bos=False,
                     chat_template="<|im_start|>", template=template)


# ----------------------------------------------------------------------------- synthetic text

WORDS = {"who": ["the fox", "a robot", "my cat", "the teacher", "a tree", "the river"],
         "does": ["jumps over", "talks to", "looks at", "paints", "follows", "counts"],
         "what": ["the moon", "a red box", "seven stones", "the old bridge", "a blue bird", "the sea"]}
ASK = ["Tell me why {0} {1} {2}.", "Write a line about how {0} {1} {2}.", "Does {0} really {1} {2}?"]


def conversations(n: int, seed: int = 0) -> list:
    """n ShareGPT-style records: a made-up question, and a made-up answer (--data sharegpt's text)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        who, does, what = (rng.choice(WORDS[w]) for w in ("who", "does", "what"))
        answer = " ".join(f"{rng.choice(WORDS['who'])} {rng.choice(WORDS['does'])} {rng.choice(WORDS['what'])}."
                          for _ in range(rng.randint(2, 5)))
        out.append({"conversations": [{"from": "human", "value": rng.choice(ASK).format(who, does, what)},
                                      {"from": "gpt", "value": answer.capitalize()}]})
    return out


def conversations_file(folder: str, n: int) -> str:
    """The synthetic conversations as a ShareGPT json file in `folder` (train.py's --sharegpt)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"tiny-conversations-{n}.json")
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            json.dump(conversations(n), f)
        os.replace(path + ".tmp", path)
    return path
