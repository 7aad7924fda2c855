"""Experiments on the drafter, built on train.py's functions (arXiv 2404.12022; METHOD.md, "Metrics"):
(a) a layer sweep: equal short trainings for several transfer layers t, (b) the cosine similarity
between pseudo and real hidden states at every layer after t (the paper: the gap narrows with
depth), (c) whether training on the model's own replies pays, and (d) re-timing a checkpoint's
plan choice on this machine (latency.select_plan). Read next: latency.py.

    python analysis.py --cosine                         # uses checkpoints/transfer.pt
    python analysis.py --select-tree                    # re-choose its plan on this machine
    python analysis.py --sweep-layers 6,10,15,20,25 --sweep-steps 150
    python analysis.py --self-distill 100 --self-distill-steps 300
"""

import argparse
import hashlib
import json
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import train
from checkpoint import build_drafter, model_identity, open_checkpoint, save_atomic, save_checkpoint
from data import encode_conversations, read_sharegpt, split_holdout
from generate import HelpFormatter, Sampler, check_common_args, generate, int_range, list_of, load, run_main
from latency import select_plan
from model import KVCache, causal_mask

# ----------------------------------------------------------------------------- the tree, again

def retime_plan(model, path, sizes):
    """Choose the checkpoint's plan again from its stored acceptance rates, with this machine's timings."""
    ckpt = open_checkpoint(path)
    drafter = build_drafter(ckpt, path, model)
    if ckpt.get("accept_rates") is None:
        raise ValueError(f"{path} has no measured acceptance rates: let its train.py run finish")
    plan, table = select_plan(model, drafter, ckpt["accept_rates"], [n for n in sizes if n >= 2])
    ckpt.update(**plan.fields(), plan_table=table)
    save_checkpoint(path, drafter, model,
                    {k: v for k, v in ckpt.items() if k not in ("kind", "config", "identity", "state_dict")})
    print(f"saved the plan in {path}")


# ----------------------------------------------------------------------------- the paper's analyses

@torch.no_grad()
def hidden_similarity(model, drafter, windows, args):
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
        positions, valid = train.choose_positions(assistant, args.positions_per_seq, k,
                                                  train.step_generator(args.seed + 1, j))
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
    print(f"\ncosine(pseudo h~^l_(p,i), real h^l_(p+i))  |  copy: cosine(h^l_p, h^l_(p+i))")
    offsets = " ".join(f"  i={i}" for i in range(1, k + 1))
    print(f"layer {offsets}  | {offsets}")
    for r in range(pseudo_cos.shape[0]):
        print(f"{t + r:>5} " + " ".join(f"{c:>5.3f}" for c in pseudo_cos[r].tolist()) + "  | "
              + " ".join(f"{c:>5.3f}" for c in copy_cos[r].tolist()))


def sweep_layers(model, layers, steps, train_args, train_windows, held_windows):
    """Equal short trainings for each transfer layer t; prints per-offset top-1 / top-5."""
    rows = []
    for t in layers:
        args = argparse.Namespace(**{**vars(train_args), "transfer_layer": t, "steps": steps, "resume": False,
                                     "drafter_checkpoint": f"{train_args.cache_dir}/sweep-t{t}.pt",
                                     "eval_every": 0, "tree_sizes": [], "drafter": "transfer"})
        rows.append((t, train.run(args, model, train_windows, held_windows)["eval"]))
    show = lambda xs: " ".join(f"{x:.2f}" for x in xs)
    print(f"\nlayer sweep: {steps} steps each, held-out top-1 / top-5 per offset")
    for t, m in rows:
        print(f"t={t:>3}  top-1 {show(m['top1'])}   top-5 {show(m['top5'])}   "
              f"chain tau {m['tau_chain']:.2f}")
    return rows


def regenerate(model, tok, conversations, args):
    """The first user turn of each conversation, answered by the base model itself (--max-new-tokens,
    --temperature, --top-p as in generate.py); prompts longer than --seq-len, or too long for the
    model's context with --max-new-tokens after them, are skipped."""
    out = []
    for conv in tqdm(conversations, desc="regenerating replies", unit="conv"):
        turns = conv[:2] if conv[0]["role"] == "system" else conv[:1]
        prompt, _ = tok.encode_chat(turns, add_generation_prompt=True)
        if len(prompt) <= min(args.seq_len, model.args.max_seq_len - args.max_new_tokens):
            gen = generate(model, prompt, args.max_new_tokens,
                           Sampler(args.temperature, args.top_p, args.seed), tok.stop_ids)
            out.append(turns + [{"role": "assistant", "content": tok.decode(gen.tokens)}])
    print(f"self-distillation: {len(out)} of {len(conversations)} replies regenerated by the base model")
    return out


def self_distill(model, tok, n, steps, train_args, sharegpt_windows, held_windows):
    """Does it pay to train on the model's own replies? Two equal trainings, one on ShareGPT's replies,
    one on n first turns re-answered by the base model; both evaluated on the same ShareGPT held-out
    windows. The regenerated replies are cached in --cache-dir (they take minutes)."""
    conversations = list(read_sharegpt(train_args.sharegpt, limit=train_args.conversations))
    train_c, _ = split_holdout(conversations, train_args.holdout, seed=0)  # train.load_windows' split
    key = [model_identity(model), train_args.sharegpt, n, train_args.conversations, train_args.holdout,
           train_args.max_new_tokens, train_args.temperature, train_args.top_p, train_args.seed]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    path = f"{train_args.cache_dir}/self-distill-{digest}.json"
    if os.path.exists(path):
        with open(path) as f:
            own = json.load(f)
    else:
        own = regenerate(model, tok, train_c[:n], train_args)
        save_atomic(path, own)
    rows = []
    for name, windows in (("ShareGPT replies", sharegpt_windows),
                          ("own replies", encode_conversations(tok, own, train_args.seq_len))):
        out = f"{train_args.cache_dir}/self-distill-{name.split()[0]}.pt"
        args = argparse.Namespace(**{**vars(train_args), "steps": steps, "resume": False, "eval_every": 0,
                                     "drafter_checkpoint": out, "tree_sizes": []})
        rows.append((name, len(windows), train.run(args, model, windows, held_windows)["eval"]))
    print(f"\nself-distillation: {steps} steps each, held-out (ShareGPT) metrics")
    for name, n_windows, m in rows:
        print(f"{name:<17} ({n_windows} windows)  {train.format_metrics(m)}")
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
    parser.add_argument("--windows", type=int_range(1), default=50, help="held-out windows for --cosine")
    parser.add_argument("--sweep-layers", type=list_of(int_range(1)), default=None,
                        help="transfer layers to compare, e.g. 6,10,15,20,25")
    parser.add_argument("--sweep-steps", type=int_range(1), default=150,
                        help="training steps per layer of the sweep")
    parser.add_argument("--self-distill", type=int_range(0), default=0,
                        help="compare training on N regenerated first replies with training on ShareGPT's")
    parser.add_argument("--self-distill-steps", type=int_range(1), default=300,
                        help="training steps of each side")
    args, rest = parser.parse_known_args(argv)
    if not (args.cosine or args.select_tree or args.sweep_layers or args.self_distill):
        parser.error("pick an analysis: --cosine, --select-tree, --sweep-layers and/or --self-distill")
    train_args = train.parse_args(rest)
    check_common_args(train_args)
    model, tok = load(train_args)
    try:
        if args.select_tree:
            retime_plan(model, train_args.drafter_checkpoint, train_args.tree_sizes)
        if not (args.cosine or args.sweep_layers or args.self_distill):
            return  # the plan needs no data: only the stored acceptance rates and this machine
        train_windows, held_windows = train.load_windows(train_args, model, tok)
        if args.cosine:
            path = train_args.drafter_checkpoint
            drafter = build_drafter(open_checkpoint(path, "transfer"), path, model)
            print_similarity(*hidden_similarity(model, drafter, held_windows[:args.windows], train_args),
                             drafter.layer)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.sweep_layers:
        sweep_layers(model, args.sweep_layers, args.sweep_steps, train_args, train_windows, held_windows)
    if args.self_distill:
        self_distill(model, tok, args.self_distill, args.self_distill_steps, train_args, train_windows,
                     held_windows)


if __name__ == "__main__":
    run_main(main)
