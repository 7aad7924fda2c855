"""`python decode.py --trace`: one decoding step of Hidden Transfer, shown as the method describes it
(METHOD.md, "One decoding step"): the tree's tokens, positions and slots; the mask of the pass;
which pseudo tokens carry which draft; what the acceptance walk compared and accepted; what the
cache keeps; where the next drafts come from.

decode.generate_tree is not changed for it: Recorder stands in for the drafter and the sampler it
is given, records what every pass received and chose, and passes everything through, so the
tokens are the same as without it. report() then replays one pass from the record.
"""

import torch

from plan import Plan
from tree import draw_mask, pseudo_mask


class Recorder:
    """A drafter and a sampler for generate_tree that record each pass (the prefill's tree_pass and
    step_logits, every decoding step's step): its inputs (tokens, positions, ancestor mask, n,
    drafting nodes, depth), its drafts, and the target's choices in the order the walk made them."""

    def __init__(self, drafter, sampler):
        self.drafter, self.sampler, self.passes = drafter, sampler, []

    def __getattr__(self, name):  # everything not recorded is the drafter's own (k, kind, title, ...)
        return getattr(self.drafter, name)

    def record(self, tokens, pos, tree_mask, n, nodes, depth):
        nodes_list = list(range(tokens.shape[1])) if nodes is None else [int(v) for v in nodes]
        self.passes.append({"tokens": tokens[0].tolist(), "positions": pos.tolist(), "mask": tree_mask.cpu(),
                            "n": int(n), "nodes": nodes_list, "depth": depth or self.drafter.k, "choices": []})

    def step(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):  # a decoding step
        self.record(tokens, pos, tree_mask, n, nodes, depth)
        logits, drafts = self.drafter.step(model, tokens, pos, tree_mask, n, cache, nodes, depth)
        self.passes[-1]["drafts"] = drafts.detach().cpu()  # (len(nodes), depth, V)
        return logits, drafts

    def tree_pass(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):  # the prefill
        self.record(tokens, pos, tree_mask, n, nodes, depth)
        return self.drafter.tree_pass(model, tokens, pos, tree_mask, n, cache, nodes, depth)

    def step_logits(self, model, hidden, states):
        logits, drafts = self.drafter.step_logits(model, hidden, states)
        self.passes[-1]["drafts"] = drafts.detach().cpu()  # (len(nodes), depth, V)
        return logits, drafts

    def choose(self, logits) -> int:  # the sampler's stand-in: the same choice, written down
        y = self.sampler(logits)
        self.passes[-1]["choices"].append(y)
        return y


def walk(tree, tokens: list, choices: list) -> list:
    """Replay the acceptance walk (decode.accept) from the recorded choices: [(node v, choice y,
    the child accepted for it or None)], one entry per choice. A walk whose last choice a child
    carries was ended by a stop token or the token budget: that child is not accepted."""
    steps, v = [], 0
    for y in choices:
        child = next((c for c in tree.children[v] if tokens[c] == y), None)
        steps.append((v, y, child))
        if child is None:
            return steps
        v = child
    return steps[:-1] + [(steps[-1][0], steps[-1][1], None)]


def report(rec: Recorder, plan: Plan, show) -> str:
    """The first decoding pass that accepted a draft (else the first one), in full. plan: what
    generate_tree followed; show(id): how a token is printed."""
    decoding = rec.passes[1:]  # passes[0] is the prefill
    if not decoding:
        return "--trace: the prefill emitted every token asked for (raise --max-new-tokens to see a step)"
    cuts = [plan.cut(d) for d in range(plan.tree.depth + 1)]
    steps = []
    for p in decoding:  # the plan this pass ran: the cut whose ancestor mask it received
        run = next(c for c in cuts if c.tree.size == len(p["tokens"]) and torch.equal(c.tree.mask, p["mask"]))
        steps.append((p, run, walk(run.tree, p["tokens"], p["choices"])))
    index = next((i for i, (_, _, w) in enumerate(steps) if w[0][2] is not None), 0)
    p, run, w = steps[index]
    tree, n, tok = run.tree, p["n"], p["tokens"]
    layer = getattr(rec.drafter, "layer", None)  # Hidden Transfer's t (1-based); other drafters have none
    out = [f"--trace: decoding pass {index + 1} of {len(steps)}"
           + (" (the first that accepted a draft)" if w[0][2] is not None else " (no pass accepted a draft)")
           + f"; the cache holds n = {n} tokens; plan {run.text()}", "",
           "1. The tree: the root is the token the last pass emitted; node (r_1..r_j) carries the r_j-th "
           "ranked token of the draft q_j", "   node  token            path         position  cache slot"]
    for i, path in enumerate(tree.paths):
        what = "root" if not path else f"q_{len(path)} rank {path[-1]}"
        out.append(f"   [{i}]{'':<{3 - len(str(i))}} {show(tok[i]):<16} {what:<12} {p['positions'][i]:<9} {n + i}")
    labels = [f"[{i}]" for i in range(tree.size)]
    if layer:  # Hidden Transfer: pseudo tokens join after layer t
        labels += [f"({v},{j})" for v in p["nodes"] for j in range(1, p["depth"] + 1)]
        out += ["", f"2. The mask: row attends to column, columns in the order of the rows (the {n} cache columns, "
                f"all 1, left out). Layers 1..{layer} (t = {layer}) use the top-left block, the tree's ancestor mask; "
                f"layers {layer + 1}..L add the pseudo tokens:",
                draw_mask(pseudo_mask(p["mask"], p["depth"], p["nodes"]), labels), "",
                "3. Pseudo tokens: (v,i) sits at position pos(v) + i and drafts q_i, the token at pos(v) + i + 1; "
                "they are never cached"]
    else:
        out += ["", f"2. The mask: row attends to column (the {n} cache columns, all 1, left out); "
                f"{rec.drafter.title} drafts from the nodes' own states, with no pseudo tokens:",
                draw_mask(p["mask"], labels), "", "3. Drafts: node v's q_i guesses the token at pos(v) + i + 1"]
    for row, v in enumerate(p["nodes"]):
        for i in range(p["depth"]):
            top = p["drafts"][row, i].topk(3).indices.tolist()
            name = f"({v},{i + 1}) at {p['positions'][v] + i + 1}" if layer else f"[{v}]"
            out.append(f"   {name}: q_{i + 1} for position {p['positions'][v] + i + 2}, top 3: "
                       + ", ".join(show(x) for x in top))
    out += ["", "4. Acceptance: at node v the target model chooses y from v's logits; a child carrying y is "
            "accepted, else y is the bonus token and the walk stops"]
    for v, y, child in w:
        kids = ", ".join(f"[{c}] {show(tok[c])}" for c in tree.children[v]) or "none"
        carried = any(tok[c] == y for c in tree.children[v])
        verdict = (f"[{child}] carries it: accepted" if child is not None else
                   "a stop token or the last token asked for: stop" if carried else
                   "no child carries it: bonus token, stop")
        out.append(f"   at [{v}]: the model chooses {show(y)}; children {kids}: {verdict}")
    path = [0] + [c for _, _, c in w if c is not None]
    out += [f"   emitted {len(w)} token(s): {' '.join(show(y) for _, y, _ in w)} "
            f"({len(path) - 1} accepted draft(s) + the model's own)", "",
            f"5. The cache: the pass wrote the K/V of all {tree.size} nodes to slots {n}..{n + tree.size - 1}"
            + (" (of the pseudo tokens: none)" if layer else "") + f". The accepted path {path} moves from slots "
            f"{[n + v for v in path]} to {list(range(n, n + len(path)))}; the cache now holds {n + len(path)} "
            f"tokens, and the rest lies beyond its length. The bonus token {show(w[-1][1])} is the next root."]
    row, shift, avail = run.source(path)
    if avail:
        u = p["nodes"][row]
        name = (lambda i: f"({u},{i})") if layer else (lambda i: f"q_{i}")
        which = name(shift + 1) + (f"..{name(shift + avail)}" if avail > 1 else "")
        out.append(f"6. Next drafts: from node [{u}]'s {'pseudo tokens' if layer else 'drafts'} {which}"
                   + (f", shifted by {shift}: [{u}] is the deepest accepted node carrying enough" if shift else "")
                   + f"; the next tree is cut to {avail} draft(s)")
    else:
        out.append("6. Next drafts: no accepted node carries pseudo tokens that reach: the next pass verifies the "
                   "root alone and drafts anew")
    return "\n".join(out)
