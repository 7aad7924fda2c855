"""Decoding plans: a tree, which of its nodes carry pseudo tokens and how many, chosen by cost.

Every pseudo token costs a row in layers t+1..L of every pass, but a step only reads the pseudo
tokens of the node where its acceptance walk ends (METHOD.md, "One decoding step", steps 2 and 5).
So a plan gives pseudo tokens only to the nodes likely to end the walk, and only as many as the
next tree is deep. When the walk ends at a node that carries none, the next drafts come from the
deepest accepted ancestor that carries enough, shifted: pseudo (u, i) predicts the token i + 1
after u, so an ancestor s levels up stands in with its q_(s+1), q_(s+2), ...; the next tree is then
cut to the drafts there are. With no such ancestor, the next step verifies the root alone (a plain
step that drafts anew). Drafts only choose what is verified, so every plan is lossless.

Which plan to run is chosen by measurement (tools/plan_search.py: expected tokens per pass from
the acceptance rates, against this machine's pass times); decoding only follows one.
Read next: generate.py, plain decoding and the sampler, then decode.py, which follows a plan.
"""

from dataclasses import dataclass
from functools import cached_property, lru_cache

from tree import Tree, chain


@dataclass(frozen=True, eq=False)
class Plan:
    tree: Tree
    nodes: tuple  # the nodes that carry pseudo tokens, ascending; the root (0) always among them
    depth: int    # pseudo tokens each of them carries: q_1..q_depth (1 <= depth <= k)

    def __post_init__(self):
        if not all(isinstance(v, int) for v in (*self.nodes, self.depth)):  # a hand-edited checkpoint
            raise ValueError(f"pseudo-token nodes {self.nodes} and depth {self.depth!r} must be integers")
        if not self.nodes or self.nodes[0] != 0 or list(self.nodes) != sorted(set(self.nodes)):
            raise ValueError(f"pseudo-token nodes {self.nodes} must be ascending, once each, and include "
                             "the root 0 (a step whose drafts ran out verifies the root alone)")
        if self.nodes[-1] >= self.tree.size:
            raise ValueError(f"node {self.nodes[-1]} is not in a tree of {self.tree.size} nodes")
        if not 1 <= self.depth <= (self.tree.k or self.depth):
            raise ValueError(f"{self.depth} pseudo tokens per node: need 1 to k={self.tree.k}")

    @classmethod
    def full(cls, tree: Tree, k: int) -> "Plan":
        """Every node carries as many pseudo tokens as the tree is deep (at least 1): the simple plan."""
        return cls(tree, tuple(range(tree.size)), max(1, min(k, tree.depth)))

    @classmethod
    def from_fields(cls, fields: dict, k: int) -> "Plan":
        """The plan a checkpoint stores (fields()); a chain of k when it stores none, Plan.full when it
        stores only a tree (checkpoints from before plans)."""
        paths = fields.get("tree")
        tree = chain(k) if paths is None else Tree([tuple(p) for p in paths], k=k)
        if fields.get("pseudo_nodes") is None:
            return cls.full(tree, k)
        return cls(tree, tuple(fields["pseudo_nodes"]), fields["pseudo_depth"])

    def fields(self) -> dict:
        """What a checkpoint stores of the plan (plain lists and ints)."""
        return {"tree": [list(p) for p in self.tree.paths[1:]], "pseudo_nodes": list(self.nodes),
                "pseudo_depth": self.depth}

    @cached_property  # read by source() after every decoding step: built once per plan
    def counts(self) -> tuple:  # pseudo tokens per node (N,)
        carried = set(self.nodes)
        return tuple(self.depth if v in carried else 0 for v in range(self.tree.size))

    @property
    def pseudo_rows(self) -> int:  # pseudo tokens in one pass: rows in layers t+1..L
        return len(self.nodes) * self.depth

    def cut(self, depth: int) -> "Plan":
        """The plan on the tree cut to `depth` (nodes are sorted by depth: the kept ones are a prefix)."""
        return _cut(self, depth)

    def source(self, path: list) -> tuple:
        """Where the next drafts come from after a walk that accepted `path` (root..v, node indices).

        Returns (u's row in `nodes`, shift s, offsets available a): u is the deepest node on the path
        whose pseudo tokens still reach past v, s = depth(v) - depth(u), a = depth - s >= 1; the
        next drafts are u's q_(s+1)..q_(s+a). Returns (None, 0, 0) when no node on the path reaches.
        """
        counts, depth_v = self.counts, len(path) - 1
        for depth_u in range(depth_v, -1, -1):
            u, shift = path[depth_u], depth_v - depth_u
            if counts[u] > shift:
                return self.nodes.index(u), shift, counts[u] - shift
        return None, 0, 0

    def text(self) -> str:
        """'0;1;0,0 [nodes 0,1 x 2]': the tree paths as Tree.parse reads them, the nodes that carry
        pseudo tokens and how many each carries."""
        paths = ";".join(",".join(str(r) for r in p) for p in self.tree.paths[1:])
        return f"{paths or '(root only)'} [nodes {','.join(map(str, self.nodes))} x {self.depth}]"


@lru_cache(maxsize=256)
def _cut(plan: Plan, depth: int) -> Plan:
    if depth >= plan.tree.depth:
        return plan
    tree = Tree([p for p in plan.tree.paths[1:] if len(p) <= depth], k=plan.tree.k, top_r=plan.tree.top_r)
    return Plan(tree, tuple(v for v in plan.nodes if v < tree.size), plan.depth)
