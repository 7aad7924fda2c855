"""The drafter interface: what decoding, training and checkpoints need from a drafter, written once.

transfer.py's HiddenTransfer and medusa.py's Medusa implement it; decode.py, train.py, bench.py and
the tools only ever call these methods, so a new drafter is one subclass in a file of your own,
named on the command line as `--drafter FILE.py:Class` (checkpoint.drafter_kind).
tests/test_extension.py trains, decodes and benches three that way.
Read next: transfer.py, the drafter this project is about.
"""

import torch
import torch.nn as nn

from model import Transformer


class Drafter(nn.Module):
    """A module that drafts the next k tokens of every node it is asked about.

    kind:  its one spelling, on every command line (--drafter), in reports and in checkpoints.
    title: how reports name it for people.
    k:     drafts per node, q_1..q_k; q_i guesses the token i+1 places after the node.
    """

    kind = ""
    title = ""
    k: int

    @classmethod
    def for_model(cls, model: Transformer, k: int, layer: int | None = None) -> "Drafter":
        """An untrained drafter of this kind sized for `model` (lossless, drafts poorly); `layer` is
        Hidden Transfer's t, which drafters without a transfer layer ignore."""
        return cls(model.args.dim, k)

    def config(self) -> dict:
        """The constructor's keyword arguments: a checkpoint rebuilds the drafter as cls(**config)."""
        raise NotImplementedError

    def check(self, model: Transformer):
        """Raise ValueError if this drafter cannot serve `model` (beyond its tensors' shapes)."""

    # ------------------------------------------------------------------------- decoding

    def tree_pass(self, model: Transformer, tokens, pos, tree_mask, n: int, cache, nodes=None,
                  depth: int | None = None):
        """ONE forward pass that verifies N tree nodes and drafts from some of them.

        tokens (1, N): the nodes' token ids; pos (N,): their RoPE positions; tree_mask (N, N): the
        ancestor mask; n: tokens already in `cache`. The nodes go to cache slots n..n+N-1. Build the
        attention masks with cache.attention_mask(...): compiled.py passes a cache whose masks
        span its whole length (and n as a 0-d tensor), so a compiled pass never changes shape.
        nodes: which nodes draft (default all, in order); depth: drafts per node (default k, at
        most k); pseudo (a, i) never sees (a, j > i), so a smaller depth changes no kept draft.
        Returns (hidden (N, dim): the nodes' last-layer states, which model.head turns into the
        verifying logits; states (len(nodes), depth, ...): what draft_logits reads, one per node).
        """
        raise NotImplementedError

    def step(self, model: Transformer, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):
        """One decoding step's model work (decode.generate_tree's step 2): tree_pass, then step_logits:
        (logits (N, V), drafts (len(nodes), depth, V)). compiled.py compiles exactly this."""
        hidden, states = self.tree_pass(model, tokens, pos, tree_mask, n, cache, nodes, depth)
        return self.step_logits(model, hidden, states)

    def draft_logits(self, model: Transformer, states: torch.Tensor) -> torch.Tensor:
        """states (..., depth, ...) from tree_pass or train_pass -> draft logits (..., depth, V)."""
        raise NotImplementedError

    def step_logits(self, model: Transformer, hidden: torch.Tensor, states: torch.Tensor):
        """A decoding step's logits from tree_pass's outputs: the verifying ones, model.head(hidden)
        (N, V), and the draft logits of every drafting node (len(nodes), depth, V). Two products
        here; a drafter whose drafts end in the LM head (both of ours) makes them one, and so reads
        the vocabulary-sized head weights once a step, not twice (on a CPU, a few ms a step)."""
        return model.head(hidden), self.draft_logits(model, states)

    # ------------------------------------------------------------------------- training

    def frozen_pass(self, model: Transformer, ids: torch.Tensor) -> dict | None:
        """What train_pass needs of the frozen model over windows ids (B, T), as a dict of tensors,
        batch first, with no gradient. train.py computes it once per window and passes it back every
        epoch (the frozen pass is most of a training step). None (the default): nothing to reuse."""
        return None

    def train_pass(self, model: Transformer, ids: torch.Tensor, positions: torch.Tensor,
                   frozen: dict | None = None):
        """Training and held-out evaluation (train.py): the frozen model over real windows ids (B, T)
        (or what frozen_pass gave for them), and the drafts of the positions (B, P) the loss is taken at.

        Must give exactly what tree_pass gives for the prefix ids[b, :p+1] with nodes=[p] (the
        prefill of decode.py): tests/test_train.py checks it. Returns (states (B, P, k, ...), with
        gradients into the drafter only; h_L (B, T, dim), the real tokens' last-layer states, from
        which train.py takes the teacher's distributions).
        """
        raise NotImplementedError
