"""Hidden Transfer generation: draft, verify and accept in one forward pass per step, losslessly.

METHOD.md, "One decoding step": the drafts of the last accepted token fill a token tree; one pass
verifies every node (ancestor mask) and, through pseudo tokens, drafts the next step; the
acceptance walk keeps exactly the tokens the model alone would emit; the KV cache keeps only the
accepted path. Any drafter.Drafter drafts (transfer.py's HiddenTransfer, medusa.py's Medusa):
only how drafts are made differs. Read next: medusa.py, the baseline drafter.

    python decode.py --prompt "Write a haiku about autumn." --check
    python decode.py --show                     # every token marked: drafted, or the model's own
    python decode.py --drafter medusa           # checkpoints/medusa.pt, from train.py --drafter medusa
"""

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)
import argparse
import sys
import time

import torch

from checkpoint import DRAFTER_HELP, check_ranks, drafter_spec, load_drafter, open_checkpoint
from cli import (HelpFormatter, add_common_args, check_common_args, describe_machine, encode_prompt, fit_context,
                 load, run_main)
from compiled import CompiledDrafter, CompiledModel, static_length
from generate import Generation, Sampler, generate, sync
from model import KVCache
from plan import Plan
from trace_step import Recorder, report
from tree import SHAPES, Tree


def accept(children, node_tokens, choose, budget: int, stop_ids=()):
    """The acceptance walk (METHOD.md step 3), a pure function a student can test alone.

    children[v]: the child nodes of node v; node_tokens[v]: the token node v carries;
    choose(v): the target model's choice at v (argmax, or ONE draw from its distribution).
    From the root, while a child of v carries the target's choice, accept that child and go on;
    the first choice no child carries is emitted too (the bonus token) and ends the walk.
    Returns (path: accepted node indices from the root 0, emitted: tokens in order). Also stops
    as soon as a stop token or the `budget`-th token is emitted, exactly where plain decoding would.
    """
    v, path, emitted = 0, [0], []
    while True:
        y = choose(v)
        emitted.append(y)
        if y in stop_ids or len(emitted) == budget:
            return path, emitted
        child = next((c for c in children[v] if node_tokens[c] == y), None)
        if child is None:
            return path, emitted
        v = child
        path.append(v)


def next_drafts(run: Plan, path: list, node_drafts: torch.Tensor) -> torch.Tensor:
    """The next step's drafts (a, V): the pseudo tokens of the last accepted node, or of its deepest
    accepted ancestor that carries some, shifted (plan.Plan.source); none left (0, V): the next step
    verifies the root alone."""
    row, shift, avail = run.source(path)
    return node_drafts[row, shift:shift + avail] if avail else node_drafts.new_zeros(0, node_drafts.shape[-1])


@torch.no_grad()
def generate_tree(model, drafter, prompt: list, plan: Plan | Tree, max_new_tokens: int, sampler: Sampler,
                  stop_ids=(), on_token=None, on_step=None, cache=None) -> Generation:
    """Generate with a drafter and a decoding plan. Same output as generate.generate, fewer passes.

    plan: a plan.Plan (a tree, which nodes carry pseudo tokens and how many), or a bare Tree, which
    gets plan.Plan.full: every node carries as many pseudo tokens as the tree is deep.
    on_token(ids) is called once per pass with the tokens it emitted: the drafts it accepted, then
    the model's own token. on_step(cache, n), if given, is called after every step with the cache
    and the number of accepted tokens it holds (the tests check the cache against a fresh prefill).
    cache: the KVCache to decode into (default a new one); compiled.py's stand-ins for model and
    drafter, with their cache, run the same steps compiled.
    """
    plan = plan if isinstance(plan, Plan) else Plan.full(plan, drafter.k)
    if max(plan.tree.depth, plan.depth) > drafter.k:
        raise ValueError(f"the plan reads {max(plan.tree.depth, plan.depth)} drafts but the drafter "
                         f"drafts only {drafter.k}")
    fit_context(model, prompt, max_new_tokens, plan.tree.size)  # the last pass holds a whole tree
    dev, dtype = model.output.weight.device, model.output.weight.dtype
    n, need = len(prompt), len(prompt) + max_new_tokens + plan.tree.size
    cache = KVCache(model.args, 1, need, dev, dtype) if cache is None else cache
    if cache.max_len < need:
        raise ValueError(f"the cache holds {cache.max_len} slots; this generation needs {need}")
    cuts = {}  # drafts available -> the plan cut to them, its tree and nodes on the device

    def cut(avail: int):
        if avail not in cuts:
            run = plan.cut(min(plan.tree.depth, avail))
            cuts[avail] = run, run.tree.to(dev), torch.tensor(run.nodes, device=dev)
        return cuts[avail]

    out, t0 = Generation(), time.perf_counter()
    # Prefill: the prompt is a chain (causal mask) whose last token alone gets pseudo tokens.
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    hidden, states = drafter.tree_pass(model, torch.tensor([prompt], device=dev),
                                       torch.arange(n, device=dev), causal, 0, cache,
                                       nodes=torch.tensor([n - 1], device=dev), depth=plan.depth)
    logits, drafts = drafter.step_logits(model, hidden[-1:], states)  # (1, V), (1, depth, V)
    root, drafts = sampler(logits[0]), drafts[0]                    # drafts: q_1.. for positions n+1..
    out.tokens.append(root)
    if on_token:
        on_token([root])
    sync(dev)
    t1 = time.perf_counter()
    out.prefill_s = t1 - t0
    done = root in stop_ids or max_new_tokens == 1

    while not done:
        # 1. Draft: the tree, cut to the drafts there are; the root is the token just emitted, at
        #    position n, the other nodes are ranked draft tokens (no drafts: the root alone).
        run, tree, nodes = cut(len(drafts))
        tokens = tree.tokens(root, drafts[:tree.depth].topk(tree.top_r, dim=-1).indices)  # (N,)
        # 2. Verify, and draft the next step: one pass over the nodes and the plan's pseudo tokens.
        logits, node_drafts = drafter.step(model, tokens[None], tree.positions(n), tree.mask, n, cache,
                                           nodes=nodes, depth=run.depth)  # (N, V), (len(nodes), depth, V)
        # 3. Accept: the walk keeps the tokens the model itself chooses.
        path, emitted = accept(tree.children, tokens.tolist(), lambda v: sampler(logits[v]),
                               max_new_tokens - len(out.tokens), stop_ids)
        out.tokens += emitted
        out.accepted.append(len(path) - 1)
        if on_token:
            on_token(emitted)
        # 4. Compact: the accepted path's K/V move to contiguous slots n..n+depth; the rest is dropped.
        cache.move(tree.slots(n)[torch.tensor(path, device=dev)], n + torch.arange(len(path), device=dev))
        n, root = n + len(path), emitted[-1]
        if on_step:
            on_step(cache, n)
        done = emitted[-1] in stop_ids or len(out.tokens) >= max_new_tokens
        # 5. The next drafts, from the pseudo tokens the walk ended on (plan.py says which).
        drafts = next_drafts(run, path, node_drafts)
    sync(dev)
    out.decode_s = time.perf_counter() - t1
    return out


# ----------------------------------------------------------------------------- seeing it work

class DraftMarker:
    """`--show`: the tokens of each pass as on_token receives them, the accepted drafts marked: green
    on a terminal, in [brackets] when piped. Stop tokens are not shown."""

    def __init__(self, tok, color: bool):
        self.tok, self.stream, self.color = tok, tok.stream(), color

    def __call__(self, ids):
        for group, drafted in ((ids[:-1], True), (ids[-1:], False)):  # accepted drafts, the model's own
            text = self.stream.push([i for i in group if i not in self.tok.stop_ids])
            if text and drafted:
                text = f"\033[32m{text}\033[0m" if self.color else f"[{text}]"
            print(text, end="", flush=True)

    def summary(self, out: Generation) -> str:
        mark = "green" if self.color else "[in brackets]"
        mean = sum(out.accepted) / max(out.passes, 1)
        return (f"\n\n{mark}: drafts a pass verified and accepted; the rest: the token the model itself "
                f"emitted at the end of each pass (and after the prompt)\n"
                f"accepted drafts per pass: {' '.join(map(str, out.accepted))}\n"
                f"tau = tokens per pass = 1 + {mean:.2f} accepted on average = {out.tau:.2f}, over "
                f"{out.passes} passes")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_args(parser)
    parser.add_argument("--compile", action="store_true",
                        help="run both decoding steps under torch.compile with static shapes, compiled "
                             "before decoding (compiled.py; CUDA graphs on a GPU): the same tokens")
    parser.add_argument("--drafter", default=None, type=drafter_spec,
                        help=DRAFTER_HELP + "; default: whatever the checkpoint holds, transfer when there is none")
    parser.add_argument("--drafter-checkpoint", default=None,
                        help="drafter checkpoint from train.py (default: checkpoints/<drafter>.pt; when "
                             "that does not exist yet, an untrained drafter, with a note)")
    parser.add_argument("--tree", default=None,
                        help="a tree for this run, every node carrying pseudo tokens for the tree's depth: "
                             "a name (" + ", ".join(["chain", *SHAPES]) + ") or paths such as "
                             "'0;1;0,0' (ranks split by ',', paths by ';'); default: the checkpoint's plan")
    parser.add_argument("--untrained", action="store_true",
                        help="no checkpoint: an untrained drafter (identity projection, zero heads): "
                             "lossless, but drafts poorly")
    parser.add_argument("--check", action="store_true",
                        help="also run plain decoding (same prompt, sampler and seed) and say whether the tokens "
                             "are identical, i.e. lossless; it times nothing (python bench.py measures speed)")
    parser.add_argument("--trace", action="store_true",
                        help="after the answer, print one decoding step in full: the tree's tokens, the mask, the "
                             "pseudo tokens' drafts, the acceptance walk, the cache (trace_step.py)")
    parser.add_argument("--show", action="store_true",
                        help="mark every token: a draft the pass accepted, or the model's own; then the "
                             "drafts accepted per pass and tau")
    args = parser.parse_args(argv)
    if args.trace and getattr(args, "compile", False):
        parser.error("--trace records eager passes: leave out --compile")
    check_common_args(args)
    try:
        if args.drafter_checkpoint and not args.untrained:
            open_checkpoint(args.drafter_checkpoint, args.drafter)  # a bad file fails before the slow load
        model, tok = load(args)
        drafter, plan, note = load_drafter(model, args.drafter_checkpoint, args.drafter, args.untrained,
                                           model_name=args.model)
    except ValueError as e:  # checkpoint.CheckpointError: one line naming the file
        sys.exit(f"error: {e}")
    print(note, file=sys.stderr)
    if args.tree:
        try:
            plan = check_ranks(Plan.full(Tree.parse(args.tree, k=drafter.k), drafter.k), model.args.vocab_size)
        except ValueError as e:
            sys.exit(f"error: --tree: {e}")
    prompt = encode_prompt(args, model, tok, plan.tree.size)
    if args.show:
        show = DraftMarker(tok, color=sys.stdout.isatty())
    else:
        stream = tok.stream()
        show = lambda ids: print(stream.push([i for i in ids if i not in tok.stop_ids]), end="", flush=True)
    sampler = Sampler(args.temperature, args.top_p, args.seed)
    recorder = Recorder(drafter, sampler) if args.trace else None  # records each pass, changes nothing
    cache = None
    if args.compile:  # both steps compiled, all shapes static (compiled.py): the same tokens
        model = CompiledModel(model, static_length(len(prompt) + args.max_new_tokens + plan.tree.size, model))
        drafter, cache = CompiledDrafter(drafter, model, plan), model.cache
        print(f"compiled in {model.warm_up() + drafter.warm_up():.0f} s", file=sys.stderr)
    out = generate_tree(model, recorder or drafter, prompt, plan, args.max_new_tokens,
                        recorder.choose if recorder else sampler, tok.stop_ids, on_token=show, cache=cache)
    if args.show:
        print(show.summary(out))
    if recorder:
        print("\n\n" + report(recorder, plan, lambda i: repr(tok.decode([i], skip_special=False))))
    print(f"\n\n{drafter.title}: {len(out.tokens)} tokens, tau {out.tau:.2f}, "
          f"{out.tokens_per_s:.1f} tokens/s, plan {plan.text()} "
          f"({describe_machine(args.device)}, {args.dtype})")
    if args.check:
        ref = generate(model, prompt, args.max_new_tokens, Sampler(args.temperature, args.top_p, args.seed),
                       tok.stop_ids, cache=cache)
        same = ref.tokens == out.tokens
        print(f"--check: plain decoding of the same prompt with the same sampler and seed emitted "
              f"{len(ref.tokens)} tokens; tokens identical to plain decoding: {'yes' if same else 'NO'}\n"
              "(the tokens/s above come from one run without warm-up: not a benchmark; python bench.py "
              "measures speed)")
        if not same:
            first = next(i for i, (a, b) in enumerate(zip(out.tokens + [-1], ref.tokens + [-1])) if a != b)
            sys.exit(f"error: not lossless: the tokens differ from plain decoding's from token {first} on")
    return out


if __name__ == "__main__":
    run_main(main)
