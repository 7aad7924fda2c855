"""Experiments on the drafter, built on train.py's functions (arXiv 2404.12022; METHOD.md, "Metrics"):
(a) a layer sweep: equal short trainings for several transfer layers t, (b) the cosine similarity
between pseudo and real hidden states at every layer after t (the paper: the gap narrows with
depth), and (c) re-timing a checkpoint's plan choice on this machine (plan_search.select_plan).
docs/EXPERIMENTS.md has what they measured.

    python tools/analysis.py --cosine                         # uses checkpoints/transfer.pt
    python tools/analysis.py --select-tree                    # re-choose its plan on this machine
    python tools/analysis.py --sweep-layers 6,10,15,20,25 --sweep-steps 150
"""

import argparse
import json
import os
import sys

if os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):  # `python tools/x.py`:
    sys.path[0] = os.path.dirname(os.path.abspath(sys.path[0]))  # the root (as tools.x: nothing to do)

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)

import torch
import torch.nn.functional as F

import train
from checkpoint import build_drafter, open_checkpoint, save_atomic, save_checkpoint, verify_checksum
from cli import HelpFormatter, check_common_args, describe_machine, int_range, list_of, load, run_main
from compiled import compiler_works
from evaluate import fixed_positions, format_all
from model import KVCache, causal_mask
from replies import load_windows
from tools import kernels
from tools.plan_search import select_compiled_plan, select_plan

# ----------------------------------------------------------------------------- the tree, again

def retime_plan(model, path, sizes):
    """Choose the checkpoint's plan again from its stored acceptance rates, with this machine's timings."""
    ckpt = open_checkpoint(path)
    drafter = build_drafter(ckpt, path, model)
    verify_checksum(ckpt, path)  # never re-sign a damaged or edited file
    if ckpt.get("accept_rates") is None:
        raise ValueError(f"{path} has no measured acceptance rates: let its train.py run finish")
    summary = os.path.splitext(path)[0] + ".json"  # train.py's summary beside it, for tools/results.py
    fields = None
    if os.path.exists(summary):  # read first: a bad summary must not leave the checkpoint rewritten alone
        with open(summary) as f:
            fields = json.load(f)  # a malformed file: ValueError, one line
        if not isinstance(fields, dict):
            raise ValueError(f"{summary} holds a JSON {type(fields).__name__}, not train.py's summary; "
                             "move it away and rerun")
    kernels.apply(drafter)  # time the passes as decoding will run them
    plan, table, candidates = select_plan(model, drafter, ckpt["accept_rates"], [n for n in sizes if n >= 2])
    ckpt.update(**plan.fields(), plan_table=table)
    if compiler_works(model.output.weight.device):  # and the plan compiled decoding runs (train.py's choice)
        compiled_plan, compiled_table = select_compiled_plan(model, drafter, ckpt["accept_rates"], candidates)
        ckpt.update(compiled_plan=compiled_plan.fields(), compiled_plan_table=compiled_table)
    save_checkpoint(path, drafter, model, {k: v for k, v in ckpt.items()
                                           if k not in ("kind", "config", "identity", "state_dict", "checksum")})
    if fields is not None:
        save_atomic(summary, {**fields, **plan.fields(), "plan_table": table,
                              **{k: ckpt[k] for k in ("compiled_plan", "compiled_plan_table") if k in ckpt},
                              "machine": describe_machine(model.output.weight.device)})
    print(f"saved the plan in {path}")


# ----------------------------------------------------------------------------- the paper's analyses

@torch.no_grad()
def hidden_similarity(model, drafter, windows):
    """Mean cosine similarity, at every layer l = t..L, of the pseudo state h~^l_(p,i) with the real
    state it stands in for, h^l_(p+i); and, as the yardstick, of the source state h^l_p with
    h^l_(p+i) (what copying would give). Returns two (L - t + 1, k) tensors: pseudo, copy.
    Read them side by side: a few huge dimensions that every token shares (massive activations)
    make raw cosines high for any pair, so only the gap to the copy column says much."""
    t, L, k, d = drafter.layer, model.args.n_layers, drafter.k, model.args.dim
    pseudo_cos, copy_cos, count = torch.zeros(L - t + 1, k), torch.zeros(L - t + 1, k), torch.zeros(k)
    dev, dtype = model.output.weight.device, model.output.weight.dtype
    for j, (ids, assistant) in enumerate(windows):
        ids, assistant = ids[None].to(dev), assistant[None].to(dev)            # (1, T)
        T = ids.shape[1]
        cache, pos = KVCache(model.args, 1, T, dev, dtype), torch.arange(T, device=dev)
        mask = causal_mask(T, device=dev)
        real = [model.run_layers(model.embed(ids), pos, mask, pos, cache, 0, t)]  # real[l - t] = h^l
        for layer in range(t, L):
            real.append(model.run_layers(real[-1], pos, mask, pos, cache, layer, layer + 1))
        positions, valid = fixed_positions(assistant, k, j)  # the held-out positions evaluate.py scores
        P = positions.shape[1]
        # the pseudo tokens exactly as HiddenTransfer.train_pass builds them, then one layer at a time
        x, x_pos, x_mask = drafter.pseudo_inputs(real[0], positions)            # (1, P*k, d), ...
        x, none = x.to(dtype), torch.zeros(0, dtype=torch.long, device=dev)
        ahead = x_pos.clamp(max=T - 1)                                         # (1, P*k): rows of h^l_(p+i)
        for layer in range(t, L + 1):
            if layer > t:
                x = model.run_layers(x, x_pos, x_mask, none, cache, layer - 1, layer)
            h = real[layer - t]
            target = h.gather(1, ahead[..., None].expand(-1, -1, d))           # (1, P*k, d)
            source = h.gather(1, positions.repeat_interleave(k, 1)[..., None].expand(-1, -1, d))
            cos = F.cosine_similarity(x.float(), target.float(), dim=-1).view(1, P, k)
            pseudo_cos[layer - t] += (cos * valid).sum((0, 1)).cpu()
            cos = F.cosine_similarity(source.float(), target.float(), dim=-1).view(1, P, k)
            copy_cos[layer - t] += (cos * valid).sum((0, 1)).cpu()
        count += valid.sum((0, 1)).float().cpu()
    return pseudo_cos / count.clamp(min=1), copy_cos / count.clamp(min=1)


def print_similarity(pseudo_cos, copy_cos, t):
    k = pseudo_cos.shape[1]
    print("\ncosine(pseudo h~^l_(p,i), real h^l_(p+i))  |  copy: cosine(h^l_p, h^l_(p+i))")
    offsets = " ".join(f"  i={i}" for i in range(1, k + 1))
    print(f"layer {offsets}  | {offsets}")
    for r in range(pseudo_cos.shape[0]):
        print(f"{t + r:>5} " + " ".join(f"{c:>5.3f}" for c in pseudo_cos[r].tolist()) + "  | "
              + " ".join(f"{c:>5.3f}" for c in copy_cos[r].tolist()))


def sweep_layers(model, layers, steps, train_args, train_windows, held):
    """Equal short trainings for each transfer layer t; prints each held-out set's metrics.
    Returns [(t, {set: metrics})]."""
    rows = []
    for t in layers:
        args = argparse.Namespace(**{**vars(train_args), "transfer_layer": t, "steps": steps, "resume": False,
                                     "drafter_checkpoint": f"{train_args.cache_dir}/sweep-t{t}.pt",
                                     "eval_every": 0, "tree_sizes": [], "drafter": "transfer"})
        rows.append((t, train.run(args, model, train_windows, held)["eval"]))
    print(f"\nlayer sweep: {steps} steps each, held-out metrics")
    for t, sets in rows:
        print(f"t={t:>3}\n{format_all(sets)}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter,
                                     epilog="Any other flag is train.py's (data, --seq-len, --lr, ...), "
                                            "--drafter-checkpoint too: the drafter for --cosine and "
                                            "--select-tree (default: checkpoints/<drafter>.pt).")
    parser.add_argument("--cosine", action="store_true",
                        help="cosine similarity of pseudo and real hidden states, per layer after t")
    parser.add_argument("--select-tree", action="store_true",
                        help="choose the decoding plan again with THIS machine's pass times and store it "
                             "in --drafter-checkpoint (train.py does this at the end; rerun it after moving "
                             "a checkpoint to another machine)")
    parser.add_argument("--windows", type=int_range(1), default=50,
                        help="windows of the own-replies held-out set for --cosine")
    parser.add_argument("--sweep-layers", type=list_of(int_range(1)), default=None,
                        help="transfer layers to compare, e.g. 6,10,15,20,25")
    parser.add_argument("--sweep-steps", type=int_range(1), default=150,
                        help="training steps per layer of the sweep")
    args, rest = parser.parse_known_args(argv)
    if not (args.cosine or args.select_tree or args.sweep_layers):
        parser.error("pick an analysis: --cosine, --select-tree and/or --sweep-layers")
    train_args = train.parse_args(rest)
    check_common_args(train_args)
    model, tok = load(train_args)
    kernels.use(train_args.matmul, model)
    L = model.args.n_layers
    if args.sweep_layers and max(args.sweep_layers) >= L:
        sys.exit(f"error: --sweep-layers {max(args.sweep_layers)}: a transfer layer must be from 1 to {L - 1} "
                 f"for this {L}-layer model")
    try:
        if args.select_tree:
            retime_plan(model, train_args.drafter_checkpoint, train_args.tree_sizes)
        if not (args.cosine or args.sweep_layers):
            return  # the plan needs no data: only the stored acceptance rates and this machine
        train_windows, held, _ = load_windows(train_args, model, tok)
        if args.cosine:
            path = train_args.drafter_checkpoint
            drafter = build_drafter(open_checkpoint(path, "transfer"), path, model)
            print_similarity(*hidden_similarity(model, drafter, held["own"][:args.windows]),
                             drafter.layer)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.sweep_layers:
        sweep_layers(model, args.sweep_layers, args.sweep_steps, train_args, train_windows, held)


if __name__ == "__main__":
    run_main(main)
