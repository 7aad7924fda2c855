"""Choosing a tree from acceptance rates (METHOD.md, "Metrics": expected tau): the probability that
each node is accepted, the expected tokens of a step, and the tree of n nodes that maximises them
(Medusa's recipe). tools/plan_search.py builds every candidate plan on these trees and
tools/latency.py times them; a learner reads tree.py first.
"""

import heapq

import torch

from tree import Tree


def _rates(accept) -> torch.Tensor:
    rates = torch.as_tensor(accept, dtype=torch.float64)
    if rates.dim() != 2 or not bool(((rates >= 0) & (rates <= 1)).all()):
        raise ValueError("accept must be a (k, top_r) table of probabilities in [0, 1]")
    return rates


def node_accept_probs(tree: Tree, accept) -> torch.Tensor:
    """(N,) float64: P(node accepted) = the product of accept[depth-1][rank] along its path; root 1.

    This assumes that whether offset j's rank-r token is right depends only on (j, r), given the
    path so far was right, independent of which tokens came before.
    """
    rates = _rates(accept)
    if rates.shape[0] < tree.depth or rates.shape[1] <= int(tree.ranks.max()):
        raise ValueError(f"accept of shape {tuple(rates.shape)} does not cover the tree's depth and ranks")
    depths, ranks, mask = tree.depths.cpu(), tree.ranks.cpu(), tree.mask.cpu()
    node_rate = rates[(depths - 1).clamp(min=0), ranks]  # (N,)
    node_rate[0] = 1.0                                     # the root is decided, not guessed
    return torch.where(mask, node_rate[None, :], torch.ones(())).prod(-1)  # (N,) product over the path


def expected_tau(tree: Tree, accept) -> float:
    """Expected tokens per step: 1 (the bonus token) + sum over non-root nodes of P(node accepted).

    The ranks at one depth are mutually exclusive events (at most one token is the right one), so
    summing P over siblings is exact (node_accept_probs states the one assumption).
    """
    return 1.0 + float(node_accept_probs(tree, accept)[1:].sum())


def build_tree(accept, n_nodes: int) -> Tree:
    """The tree of n_nodes nodes (root included) with the highest expected_tau (Medusa's recipe).

    accept[j-1][r]: measured rate at which q_j's rank-r token is the right one at offset j. Grow
    greedily from the root, always adding the most probable node whose parent is already in.
    A child is never more probable than its parent, so this takes the n_nodes - 1 most probable
    nodes overall: the optimum under expected_tau's assumptions, and prefix-closed by construction.
    """
    rates = _rates(accept)
    k, top_r = rates.shape
    if n_nodes < 1:
        raise ValueError(f"n_nodes must be at least 1 (the root), got {n_nodes}")
    paths, frontier = [], []  # frontier: heap of (-P, depth, path), ties go to shallow, low ranks

    def push_children(path, p):
        if len(path) < k:
            for r in range(top_r):
                heapq.heappush(frontier, (-p * float(rates[len(path), r]), len(path) + 1, path + (r,)))

    push_children((), 1.0)
    while len(paths) + 1 < n_nodes:
        if not frontier:
            raise ValueError(f"n_nodes={n_nodes} exceeds every node a (k={k}, top_r={top_r}) tree can hold")
        neg_p, _, path = heapq.heappop(frontier)
        paths.append(path)
        push_children(path, -neg_p)
    return Tree(paths, k=k, top_r=top_r)
