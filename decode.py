"""Hidden Transfer generation: draft, verify and accept in one forward pass per step, losslessly.

METHOD.md, "One decoding step": the drafts of the last accepted token fill a token tree; one pass
verifies every node (ancestor mask) and, through pseudo tokens, drafts the next step; the
acceptance walk keeps exactly the tokens the model alone would emit; the KV cache keeps only the
accepted path. Any drafter.Drafter drafts (transfer.py's HiddenTransfer, medusa.py's Medusa):
only how drafts are made differs. Read next: medusa.py, the baseline drafter.

    python decode.py --prompt "Write a haiku about autumn." --check
    python decode.py --drafter medusa          # checkpoints/medusa.pt, from train.py --drafter medusa
"""

import argparse
import sys
import time

import torch

from checkpoint import DRAFTERS, load_drafter, open_checkpoint
from generate import (Generation, HelpFormatter, Sampler, add_common_args, check_common_args, compiled_for,
                      describe_machine, encode_prompt, fit_context, generate, load, run_main, sync)
from model import KVCache
from plan import Plan
from tree import Tree


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


@torch.no_grad()
def generate_tree(model, drafter, prompt: list, plan: Plan | Tree, max_new_tokens: int, sampler: Sampler,
                  stop_ids=(), on_token=None, on_step=None, compiled=None) -> Generation:
    """Generate with a drafter and a decoding plan. Same output as generate.generate, fewer passes.

    plan: a plan.Plan (a tree, which nodes carry pseudo tokens and how many), or a bare Tree, which
    gets plan.Plan.full: every node carries as many pseudo tokens as the tree is deep.
    on_step(cache, n), if given, is called after every step with the cache and the number of
    accepted tokens it holds (the tests check the cache against a fresh prefill there).
    compiled: a compiled.Compiled of this model and drafter: the steps run compiled (the same tokens).
    """
    plan = plan if isinstance(plan, Plan) else Plan.full(plan, drafter.k)
    if max(plan.tree.depth, plan.depth) > drafter.k:
        raise ValueError(f"the plan reads {max(plan.tree.depth, plan.depth)} drafts but the drafter "
                         f"drafts only {drafter.k}")
    fit_context(model, prompt, max_new_tokens, plan.tree.size)  # the last pass holds a whole tree
    dev = model.output.weight.device
    runs = {}  # drafts available -> (the plan cut to them, its tree and nodes on the device)

    def run_for(avail: int):
        if avail not in runs:
            run = plan.cut(min(plan.tree.depth, avail))
            runs[avail] = run, run.tree.to(dev), torch.tensor(run.nodes, device=dev)
        return runs[avail]

    n, need = len(prompt), len(prompt) + max_new_tokens + plan.tree.size
    cache = compiled.cache(need) if compiled else KVCache(model.args, 1, need, dev, model.output.weight.dtype)
    step = compiled.tree_pass if compiled else drafter.tree_pass  # the prefill below stays eager
    out = Generation()
    t0 = time.perf_counter()

    # Prefill: the prompt is a chain (causal mask) whose last token alone gets pseudo tokens.
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    hidden, states = drafter.tree_pass(model, torch.tensor([prompt], device=dev),
                                       torch.arange(n, device=dev), causal, 0, cache,
                                       nodes=torch.tensor([n - 1], device=dev), depth=plan.depth)
    logits, drafts = drafter.step_logits(model, hidden[-1:], states)  # (1, V), (1, depth, V)
    root = sampler(logits[0])
    out.tokens.append(root)
    if on_token:
        on_token([root])
    drafts = drafts[0]  # (depth, V): q_1.., for positions n+1..
    sync(dev)
    t1 = time.perf_counter()
    out.prefill_s = t1 - t0
    done = root in stop_ids or max_new_tokens == 1

    while not done:
        # 1. The tree, cut to the drafts there are: the root is the token just emitted, at position
        #    n; the other nodes are ranked draft tokens (none at all: the root is verified alone).
        run, tree, nodes = run_for(len(drafts))
        top = drafts[:tree.depth].topk(tree.top_r, dim=-1).indices    # (depth, top_r)
        tokens = tree.tokens(root, top)                                # (N,)
        # 2. One pass verifies every node and drafts from the pseudo tokens of the plan's nodes.
        hidden, states = step(model, tokens[None], tree.positions(n), tree.mask, n, cache,
                              nodes=nodes, depth=run.depth)
        logits, node_drafts = drafter.step_logits(model, hidden, states)  # (N, V), (len(nodes), depth, V)
        # 3. Accept.
        path, emitted = accept(tree.children, tokens.tolist(), lambda v: sampler(logits[v]),
                               max_new_tokens - len(out.tokens), stop_ids)
        out.tokens += emitted
        out.accepted.append(len(path) - 1)
        if on_token:
            on_token(emitted)
        done = emitted[-1] in stop_ids or len(out.tokens) >= max_new_tokens
        # 4. Keep the accepted path's K/V, moved to contiguous slots n..n+depth.
        path_t = torch.tensor(path, device=dev)
        cache.move(tree.slots(n)[path_t], n + torch.arange(len(path), device=dev))
        n += len(path)
        root = emitted[-1]
        if on_step:
            on_step(cache, n)
        # 5. The next drafts: the pseudo tokens of the last accepted node, or of its deepest
        #    ancestor that carries some, shifted (plan.py); none left: a root-only step follows.
        if not done:
            row, shift, avail = run.source(path)
            drafts = node_drafts[row, shift:] if avail else logits.new_zeros(0, logits.shape[-1])
    sync(dev)
    out.decode_s = time.perf_counter() - t1
    return out


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    add_common_args(parser)
    parser.add_argument("--drafter", default=None, choices=list(DRAFTERS),
                        help="the drafter kind (default: whatever the checkpoint holds; transfer when "
                             "there is none)")
    parser.add_argument("--drafter-checkpoint", default=None,
                        help="drafter checkpoint from train.py (default: checkpoints/<drafter>.pt; when "
                             "that does not exist yet, an untrained drafter, with a note)")
    parser.add_argument("--tree", default=None,
                        help="tree paths, e.g. '0;1;0,0' (ranks separated by ',', paths by ';'), or "
                             "'chain'; every node then carries pseudo tokens for the tree's depth "
                             "(default: the plan stored in the checkpoint, else a chain)")
    parser.add_argument("--untrained", action="store_true",
                        help="no checkpoint: an untrained drafter (identity projection, zero heads): "
                             "lossless, but drafts poorly")
    parser.add_argument("--check", action="store_true",
                        help="also run plain decoding and report whether the outputs are identical")
    args = parser.parse_args(argv)
    check_common_args(args)
    try:
        if args.drafter_checkpoint and not args.untrained:
            open_checkpoint(args.drafter_checkpoint, args.drafter)  # a bad file fails before the slow load
        model, tok = load(args)
        drafter, plan, note = load_drafter(model, args.drafter_checkpoint, args.drafter, args.untrained)
    except ValueError as e:  # checkpoint.CheckpointError: one line naming the file
        sys.exit(f"error: {e}")
    print(note, file=sys.stderr)
    if args.tree:
        try:
            plan = Plan.full(Tree.parse(args.tree, k=drafter.k), drafter.k)
        except ValueError as e:
            sys.exit(f"error: --tree: {e}")
    prompt = encode_prompt(args, model, tok, plan.tree.size)
    stream = tok.stream()
    show = lambda ids: print(stream.push([i for i in ids if i not in tok.stop_ids]), end="", flush=True)
    compiled = compiled_for(args, model, drafter, len(prompt) + args.max_new_tokens, plan)
    out = generate_tree(model, drafter, prompt, plan, args.max_new_tokens,
                        Sampler(args.temperature, args.top_p, args.seed), tok.stop_ids, on_token=show,
                        compiled=compiled)
    print(f"\n\n{drafter.title}: {len(out.tokens)} tokens, tau {out.tau:.2f}, "
          f"{out.tokens_per_s:.1f} tokens/s, plan {plan.text()} "
          f"({describe_machine(args.device)}, {args.dtype})")
    if args.check:
        ref = generate(model, prompt, args.max_new_tokens, Sampler(args.temperature, args.top_p, args.seed),
                       tok.stop_ids, compiled=compiled)
        same = ref.tokens == out.tokens
        print(f"plain decoding:  {len(ref.tokens)} tokens, {ref.tokens_per_s:.1f} tokens/s; "
              f"speedup {out.tokens_per_s / ref.tokens_per_s:.2f}x; outputs identical: {same}")
        if not same:
            first = next(i for i, (a, b) in enumerate(zip(out.tokens + [-1], ref.tokens + [-1])) if a != b)
            print(f"first difference at token {first}", file=sys.stderr)
            sys.exit(1)
    return out


if __name__ == "__main__":
    run_main(main)
