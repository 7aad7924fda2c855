"""Token trees for one Hidden Transfer step: shapes, named shapes, buffers and masks.

A tree is a prefix-closed list of rank paths (METHOD.md, "One decoding step"), typed as a path
string ('0;1;0,0') or by name (SHAPES); from it come the tokens, RoPE positions, cache slots and
masks of one verification pass, including the mask of the pseudo tokens in the layers after the
transfer layer (METHOD.md, "Attention rules"), written once for decoding (a tree) and training (a
causal window). Pure tensor code, no model. Which tree is worth verifying is tools/tree_choice.py's
question. Run `python tree.py --pseudo` to see a tree and its masks. Read next: drafter.py.
"""

import startup  # noqa: F401  (first: Ctrl-C while Python imports is one line, not a traceback)
import argparse
import copy
import operator

import torch


class Tree:
    """A tree shape, and the index buffers that one decoding step needs.

    Nodes are sorted by (depth, path), so parents come before children. Example, paths
    [(0,), (1,), (0, 0), (0, 1), (1, 0)]: the root r is the decided token, (1,) is q_1's
    second-ranked token, (0, 1) is q_2's second-ranked token below q_1's first:

        [0] r                 ancestor mask     0 1 2 3 4 5
         +- [1] rank 0                      0   1 . . . . .
         |   +- [3] rank 0                  1   1 1 . . . .
         |   +- [4] rank 1                  2   1 . 1 . . .
         +- [2] rank 1                      3   1 1 . 1 . .
             +- [5] rank 0                  4   1 1 . . 1 .
                                            5   1 . 1 . . 1

    Position ids versus cache slots, with n accepted tokens in the cache:

        node      0    1    2    3    4    5
        position  n    n+1  n+1  n+2  n+2  n+2    (n + depth: one depth, one position)
        slot      n    n+1  n+2  n+3  n+4  n+5    (n + index: every node needs its own K/V)
    """

    def __init__(self, paths, k: int | None = None, top_r: int | None = None):
        clean = [_as_path(p) for p in paths]
        seen = set()
        for p in clean:
            if p in seen:
                raise ValueError(f"tree path {p} appears twice; list each node once")
            seen.add(p)
        for p in clean:
            if p[:-1] and p[:-1] not in seen:
                raise ValueError(f"tree path {p} has no parent {p[:-1]}; paths must be prefix-closed")
            if k is not None and len(p) > k:
                raise ValueError(f"tree path {p} has depth {len(p)} but the drafts reach only k={k} offsets")
            if top_r is not None and max(p) >= top_r:
                raise ValueError(f"tree path {p} uses rank {max(p)} but the drafts keep only top_r={top_r}")

        self.paths = [()] + sorted(clean, key=lambda p: (len(p), p))
        self.size = len(self.paths)                                  # N, the root included
        self.depth = max(len(p) for p in self.paths)                 # D
        self.k = k                                                   # draft offsets, if known
        # ranks the drafts must supply: as given, else the fewest this tree reads (max rank + 1)
        self.top_r = top_r if top_r is not None else 1 + max((max(p) for p in clean), default=0)
        index = {p: i for i, p in enumerate(self.paths)}
        self.parents = torch.tensor([index[p[:-1]] if p else -1 for p in self.paths])  # (N,)
        self.depths = torch.tensor([len(p) for p in self.paths])                       # (N,)
        self.ranks = torch.tensor([p[-1] if p else 0 for p in self.paths])             # (N,)
        # sorted order puts siblings in rank order, so appending keeps children in rank order
        self.children = [[] for _ in self.paths]
        for i, p in enumerate(self.paths[1:], start=1):
            self.children[index[p[:-1]]].append(i)

        # mask[i, j]: node i may attend to node j, i.e. j is i itself or one of its ancestors
        self.mask = torch.zeros(self.size, self.size, dtype=torch.bool)  # (N, N)
        for i in range(self.size):
            self.mask[i, self.path_to(i)] = True

    @classmethod
    def parse(cls, text: str, k: int | None = None, top_r: int | None = None) -> "Tree":
        """A tree from a name (SHAPES, or 'chain': chain(k)) or from paths: Tree.parse('0;0,0;1') ==
        Tree([(0,), (0, 0), (1,)]), ranks split by ',', paths by ';'."""
        name = text.strip()
        if name == "chain":
            if k is None:
                raise ValueError("tree 'chain' needs k, the number of drafts")
            return chain(k)
        if name in SHAPES:
            return cls(SHAPES[name], k=k, top_r=top_r)
        try:
            paths = [tuple(int(r) for r in p.split(",")) for p in text.split(";") if p.strip()]
        except ValueError:
            raise ValueError(f"tree {text!r} is neither a name ({', '.join(['chain', *SHAPES])}) nor "
                             "paths like '0;0,0;1' (paths split by ';', ranks by ',')") from None
        if not paths:  # the root alone drafts nothing: never what a user typing a tree meant
            raise ValueError(f"tree {text!r} has no paths: name at least one, e.g. '0' or '0;0,0;1'")
        return cls(paths, k=k, top_r=top_r)

    def path_to(self, i: int) -> list[int]:
        """Node indices from the root down to node i."""
        path = []
        while i != -1:
            path.append(i)
            i = int(self.parents[i])
        return path[::-1]

    def to(self, device) -> "Tree":
        """A copy whose index tensors (parents, depths, ranks, mask) live on `device`."""
        moved = copy.copy(self)
        for name in ("parents", "depths", "ranks", "mask"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def tokens(self, root_token, drafts_topr: torch.Tensor) -> torch.Tensor:
        """Token id of every node (N,): the root's is given, node (.., r_j) takes drafts_topr[j-1, r_j].

        drafts_topr: (k, top_r) token ids, row j-1 the ranked top tokens of q_j.
        """
        k, top_r = drafts_topr.shape
        if k < self.depth or top_r <= int(self.ranks.max()):
            raise ValueError(f"drafts of shape {(k, top_r)} are too small for a tree of depth "
                             f"{self.depth} and max rank {int(self.ranks.max())}")
        depths, ranks = self.depths.to(drafts_topr.device), self.ranks.to(drafts_topr.device)
        out = torch.full((self.size,), root_token, dtype=torch.long, device=drafts_topr.device)
        out[1:] = drafts_topr[depths[1:] - 1, ranks[1:]]  # (N-1,): node (.., r_j) reads q_j's rank r_j
        return out

    def positions(self, n: int) -> torch.Tensor:
        """RoPE position ids (N,): n + depth."""
        return n + self.depths

    def slots(self, n: int) -> torch.Tensor:
        """Cache slots (N,): n + node index."""
        return n + torch.arange(self.size, device=self.depths.device)

    def attention_mask(self, n: int) -> torch.Tensor:
        """(1, N, n + N) bool: every node sees the n cached tokens, its ancestors and itself
        (what model.KVCache.attention_mask(tree.mask, n) gives)."""
        return torch.cat([torch.ones(self.size, n, dtype=torch.bool, device=self.mask.device), self.mask],
                         dim=1).unsqueeze(0)

    def draw(self) -> str:
        """The tree as indented ASCII, one node per line: [index] and rank."""
        lines = ["[0] r"]

        def walk(i, indent):
            kids = self.children[i]
            for c, child in enumerate(kids):
                last = c == len(kids) - 1
                lines.append(f"{indent} +- [{child}] rank {int(self.ranks[child])}")
                walk(child, indent + ("    " if last else " |  "))
        walk(0, "")
        return "\n".join(lines)

    def __repr__(self):
        return f"Tree(size={self.size}, depth={self.depth}, paths={self.paths[1:]})"


def _as_path(p) -> tuple[int, ...]:
    if isinstance(p, int):
        raise ValueError(f"tree path {p} is a bare int; write a depth-1 path as ({p},)")
    try:  # operator.index takes numpy and 0-d tensor integers too, but not floats
        p = tuple(operator.index(r) for r in p)
    except TypeError:
        raise ValueError(f"tree path {tuple(p)} must hold non-negative integer ranks")
    if not p:
        raise ValueError("tree path () is the root, which is implicit; leave it out")
    if min(p) < 0:
        raise ValueError(f"tree path {p} must hold non-negative integer ranks")
    return p


def chain(k: int) -> Tree:
    """The simplest tree: the top-1 token of q_1..q_k, one after the other (N = k + 1)."""
    return Tree([(0,) * j for j in range(1, k + 1)], k=k)


# Named shapes (--tree NAME), as Medusa names its trees; depth <= 2, so any k >= 2 drafts them; the
# larger are tools/tree_choice.build_tree's best for SmolLM2-135M. To add one, add a line. The rule
# (tests/test_tree.py): a name has a letter (never read as paths) and is not "chain"; "tree" + a
# number N has exactly N nodes, the root included; other names promise nothing. Paths: prefix-closed.
SHAPES = {
    "pair": [(0,)],                                                   # 2 nodes: q_1's top token
    "fan3": [(0,), (1,)],                                             # 3: q_1's top two
    "tree4": [(0,), (1,), (0, 0)],                                    # 4: and q_2's top below the first
    "tree8": [(0,), (1,), (2,), (3,), (0, 0), (0, 1), (1, 0)],        # 8
    "tree16": [(0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,), (8,), (0, 0), (0, 1), (0, 2), (0, 3),
               (0, 4), (1, 0)],                                       # 16
}


def pseudo_rows(sees: torch.Tensor, k: int) -> torch.Tensor:
    """The attention rows of pseudo tokens: (..., M, C) -> (..., M*k, C + M*k) bool.

    sees[a]: the columns (cache, real tokens) that owner token a itself may attend to. Its pseudo
    tokens (a,1)..(a,k), owner-major, see the same columns plus their siblings (a,j<=i): the one
    owner/offset rule of METHOD.md's "Attention rules". Decoding passes the tree's ancestor rows,
    training the causal rows of its window. For two owners and k = 2:

        columns ->   sees   | (a,1) (a,2) (b,1) (b,2)
        (a,1)       sees[a] |   1     .     .     .
        (a,2)       sees[a] |   1     1     .     .
        (b,1)       sees[b] |   .     .     1     .
        (b,2)       sees[b] |   .     .     1     1
    """
    M, dev = sees.shape[-2], sees.device
    owner = torch.arange(M * k, device=dev) // k   # (M*k,) which owner a pseudo row belongs to
    offset = torch.arange(M * k, device=dev) % k   # (M*k,) its offset i - 1
    own = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])  # (M*k, M*k)
    rows = sees.repeat_interleave(k, dim=-2)                                          # (..., M*k, C)
    return torch.cat([rows, own.expand(*rows.shape[:-1], M * k)], dim=-1)


def pseudo_positions(owner_positions: torch.Tensor, k: int) -> torch.Tensor:
    """(..., M) -> (..., M*k) RoPE positions of the pseudo tokens, owner-major: (a, i) sits at pos(a) + i."""
    offsets = torch.arange(1, k + 1, device=owner_positions.device)
    return (owner_positions[..., None] + offsets).flatten(-2)  # (..., M, k) -> (..., M*k)


def pseudo_mask(tree_mask: torch.Tensor, k: int, nodes=None) -> torch.Tensor:
    """Mask of layers t+1..L over one pass's own tokens: (N + M*k, N + M*k) bool, M = len(nodes)
    (all N by default). model.KVCache.attention_mask then puts the cache's columns first.

    Rows and columns: [tree nodes (N) | pseudo tokens, node-major: (a,1)..(a,k), (b,1)..]. The tree
    nodes go to cache slots, the pseudo tokens are the pass's ephemeral tail (model.py). For a chain
    r -> a and k = 2 (METHOD.md, "Attention rules"; cache columns, all 1, added later):

        keys ->  (cache) | r  a | (r,1) (r,2) (a,1) (a,2)
        r        1 ... 1 | 1  . |   .     .     .     .      real rows never see a pseudo token,
        a        1 ... 1 | 1  1 |   .     .     .     .      so their logits stay the base model's
        (r,1)    1 ... 1 | 1  . |   1     .     .     .
        (r,2)    1 ... 1 | 1  . |   1     1     .     .
        (a,1)    1 ... 1 | 1  1 |   .     .     1     .      pseudo (a,i) sees what a sees, a,
        (a,2)    1 ... 1 | 1  1 |   .     .     1     1      and its own pseudo (a,j<=i)
    `nodes` (tree indices, in the order their pseudo tokens are appended) gives pseudo tokens to
    only some nodes; k may be less than the drafter's k (fewer drafts per node, see drafter.py).
    """
    N, dev = tree_mask.shape[0], tree_mask.device
    nodes = torch.arange(N, device=dev) if nodes is None else torch.as_tensor(nodes, device=dev)
    # tree_mask[a] already includes a itself (the diagonal), so a row of it is "ancestors of a + a"
    pseudo = pseudo_rows(tree_mask[nodes], k)                                         # (P, N + P)
    real = torch.cat([tree_mask, torch.zeros(N, pseudo.shape[0], dtype=torch.bool, device=dev)], 1)
    return torch.cat([real, pseudo], 0)                                               # (N+P, N+P)


# ----------------------------------------------------------------------------- printing

def draw_mask(mask: torch.Tensor, labels: list[str] | None = None) -> str:
    """A (R, C) bool mask as a grid of 1 and '.', rows labelled (default: their index)."""
    labels = labels or [str(i) for i in range(mask.shape[0])]
    width = max(len(s) for s in labels)
    head = " " * width + "   " + " ".join(str(j % 10) for j in range(mask.shape[1]))
    rows = [f"{s:>{width}}   " + " ".join("1" if v else "." for v in row.tolist())
            for s, row in zip(labels, mask)]
    return "\n".join([head] + rows)


def main(args):
    tree = Tree.parse(args.paths, k=args.k)
    print(tree)
    print("\n" + tree.draw())
    print(f"\nancestor mask (N={tree.size}): row i may attend to column j")
    print(draw_mask(tree.mask))
    print(f"\nwith n={args.n} cached tokens:")
    print("position ", tree.positions(args.n).tolist())
    print("slot     ", tree.slots(args.n).tolist())
    if args.pseudo:
        m = pseudo_mask(tree.mask, args.k)  # cache columns left out: they are all 1
        labels = [f"[{i}]" for i in range(tree.size)]
        labels += [f"({a},{i})" for a in range(tree.size) for i in range(1, args.k + 1)]
        print(f"\npseudo mask after the transfer layer (k={args.k}; cache columns, all 1, left out)")
        print(draw_mask(m, labels))


if __name__ == "__main__":
    from cli import int_range, run_main
    parser = argparse.ArgumentParser(description="Print a token tree, its buffers and its masks.")
    parser.add_argument("--paths", default="0;1;0,0;0,1;1,0;0,0,0",
                        help="tree paths without the root (ranks split by ',', paths by ';'), or a name: "
                             + ", ".join(["chain", *SHAPES]))
    parser.add_argument("--k", type=int_range(1, 64), default=3, help="draft offsets; no path may be deeper")
    parser.add_argument("--n", type=int_range(0), default=10, help="cached tokens, for positions and slots")
    parser.add_argument("--pseudo", action="store_true",
                        help="also print the pseudo-token mask of the layers after the transfer layer")
    try:
        run_main(lambda: main(parser.parse_args()))
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
