"""Hidden Transfer with a transfer layer per offset: pseudo token (p, i) is made from h^(t_i)_p and
joins the pass at layer t_i, so an offset whose layer is lower gets more layers to become a draft.

    h~_(p,i) = W_i h^(t_i)_p, then layers t_i+1..L       default t_i = max(1, t - 2(i-1)): t, t-2, ...

The further ahead a draft guesses, the more work it may need, so by default offset 1 joins at the
paper's t and each later offset two layers earlier. Any order works (`--drafter-option layers=4,2`
names t_1..t_k). The attention rule stays transfer.py's, among the pseudo tokens present in a
layer: (a, i) sees what node a sees, a, and (a, j <= i) once (a, j) has joined; never (a, j > i),
so a smaller depth still changes no kept draft, and real rows never see a pseudo token.

In a pass the pseudo rows come after the real ones in blocks, one block per offset (all owners),
in the order the offsets join: each stage of layers runs the rows present so far, with the rows
and columns of the full mask (tree.pseudo_mask, or tree.pseudo_rows in training) that they are.

    python train.py --drafter transfer-layers                           # t, t-2, t-4, ...
    python train.py --drafter transfer-layers --k 3 --drafter-option layers=20,16,12
"""

import torch

from model import KVCache, Transformer, causal_mask
from transfer import HiddenTransfer, default_layer
from tree import pseudo_mask, pseudo_positions, pseudo_rows


def spread(layer: int, k: int) -> list[int]:
    """The default join layers: t, t-2, t-4, ..., never below layer 1."""
    return [max(1, layer - 2 * i) for i in range(k)]


class TransferLayers(HiddenTransfer):
    kind, title = "transfer-layers", "Hidden Transfer, a layer per offset"

    def __init__(self, dim: int, k: int, layer: int, bias: bool = True, layers=None):
        """layer: t, offset 1's layer; layers: t_1..t_k (default spread(t, k)), t_1 = t."""
        super().__init__(dim, k, layer, bias)
        layers = [layers] if isinstance(layers, int) else spread(layer, k) if layers is None else list(layers)
        if len(layers) != k or not all(isinstance(t, int) and not isinstance(t, bool) for t in layers):
            raise ValueError(f"layers={layers}: give k={k} whole numbers, one transfer layer per offset")
        if layers[0] != layer:
            raise ValueError(f"layers={layers} starts at {layers[0]}, but the transfer layer is {layer}: offset 1 "
                             "joins at the transfer layer (leave out --transfer-layer, or make them agree)")
        self.layers = layers

    @classmethod
    def for_model(cls, model: Transformer, k: int, layer: int | None = None, layers=None) -> "TransferLayers":
        """layers: t_1..t_k, one join layer per offset (default t, t-2, ...; t_1 is the transfer layer)."""
        first = layers if isinstance(layers, int) else layers[0] if layers else None
        drafter = cls(model.args.dim, k, layer or first or default_layer(model.args.n_layers), layers=layers)
        drafter.check(model)
        return drafter

    def config(self) -> dict:
        return {**super().config(), "layers": list(self.layers)}

    def check(self, model: Transformer):
        L = model.args.n_layers
        if not all(1 <= t < L for t in self.layers):
            raise ValueError(f"transfer layers {self.layers} must each be from 1 to {L - 1} for this {L}-layer model")

    def stages(self, depth: int) -> list[tuple[int, list[int]]]:
        """[(layer s, the offsets 1..depth that join after layer s)], s ascending."""
        return [(s, [i for i in range(1, depth + 1) if self.layers[i - 1] == s])
                for s in sorted(set(self.layers[:depth]))]

    @staticmethod
    def rows(joined: list[int], owners: int, depth: int, device) -> torch.Tensor:
        """Where the present pseudo rows (offset-major blocks, `joined` order) sit in the owner-major
        full mask: (a, i) is row a*depth + i-1 there."""
        i = torch.tensor(joined, dtype=torch.long, device=device) - 1
        return (torch.arange(owners, device=device) * depth + i[:, None]).flatten()  # (len(joined) * owners,)

    def tree_pass(self, model, tokens, pos, tree_mask, n, cache, nodes=None, depth=None):
        """Drafter.tree_pass: layers 1..L over the nodes, each offset's pseudo tokens joining after
        its layer. states: (len(nodes), depth, dim), offsets in order."""
        N, L, depth = tokens.shape[1], model.args.n_layers, self.k if depth is None else depth
        if not 1 <= depth <= self.k:
            raise ValueError(f"depth {depth} must be from 1 to k={self.k}")
        dev = tokens.device
        slots = n + torch.arange(N, device=dev)
        nodes = (torch.arange(N) if nodes is None else torch.as_tensor(nodes)).to(dev)
        M = len(nodes)
        full = pseudo_mask(tree_mask, depth, nodes)                         # (N + M*depth,)*2, owner-major
        full_pos = torch.cat([pos, pseudo_positions(pos[nodes], depth)])
        h, done, joined = model.embed(tokens), 0, []
        for stop, offsets in self.stages(depth) + [(L, [])]:
            keep = torch.cat([torch.arange(N, device=dev), N + self.rows(joined, M, depth, dev)]) if joined else None
            mask = full[:N, :N] if keep is None else full[keep][:, keep]
            at = pos if keep is None else full_pos[keep]
            h = model.run_layers(h, at, cache.attention_mask(mask, n, cached=N), slots, cache, done, stop)
            if offsets:  # W_i h^(s) of the drafting nodes, for the offsets joining here: one block each
                new = self(h[:, nodes], depth)[:, :, [i - 1 for i in offsets]]   # (1, M, len(offsets), dim)
                h, joined = torch.cat([h, new.transpose(1, 2).flatten(1, 2)], dim=1), joined + offsets
            done = stop
        blocks = h[0, N:].unflatten(0, (depth, M))                          # (depth, M, dim), `joined` order
        return h[0, :N], blocks[[joined.index(i) for i in range(1, depth + 1)]].transpose(0, 1)

    # ------------------------------------------------------------------------- training

    def frozen_pass(self, model, ids) -> dict:
        """Drafter.frozen_pass: h^s at every join layer s (B, S, T, dim), the real tokens' K/V in
        layers min(t_i)+1..L and the last-layer states."""
        (B, T), w, L = ids.shape, model.output.weight, model.args.n_layers
        stops, lo = sorted(set(self.layers)), min(self.layers)
        with torch.no_grad():
            cache = KVCache(model.args, B, T, w.device, w.dtype)
            pos, mask = torch.arange(T, device=w.device), causal_mask(T, device=w.device)
            h, done, kept = model.embed(ids), 0, []
            for stop in stops + [L]:
                h = model.run_layers(h, pos, mask, pos, cache, done, stop)
                kept.append(h)
                done = stop
        return {"h_s": torch.stack(kept[:-1], dim=1), "h_L": kept[-1],
                "k": cache.k[lo:].transpose(0, 1), "v": cache.v[lo:].transpose(0, 1)}

    def train_pass(self, model, ids, positions, frozen: dict | None = None):
        """Drafter.train_pass: the pseudo tokens of `positions` (B, P), all rows pseudo, run in the
        stages of tree_pass against the frozen pass's cache."""
        frozen = frozen or self.frozen_pass(model, ids)
        (B, T), (P, k), w, L = ids.shape, (positions.shape[1], self.k), model.output.weight, model.args.n_layers
        lo, dev = min(self.layers), w.device
        cache = KVCache(model.args, B, T, dev, w.dtype)
        cache.k[lo:], cache.v[lo:] = frozen["k"].transpose(0, 1), frozen["v"].transpose(0, 1)
        sees = torch.arange(T, device=dev) <= positions[..., None]          # (B, P, T) causal rows
        full, full_pos = pseudo_rows(sees, k), pseudo_positions(positions, k)  # (B, P*k, T + P*k), (B, P*k)
        none = torch.zeros(0, dtype=torch.long, device=dev)  # no slots: pseudo tokens are never cached
        h, done, joined = None, 0, []
        for j, (stop, offsets) in enumerate(self.stages(k) + [(L, [])]):
            if joined:
                keep = self.rows(joined, P, k, dev)
                mask = full[:, keep][:, :, torch.cat([torch.arange(T, device=dev), T + keep])]
                h = model.run_layers(h, full_pos[:, keep], mask, none, cache, done, stop)
            if offsets:
                h_s = frozen["h_s"][:, j]                                   # (B, T, d)
                src = h_s.gather(1, positions[..., None].expand(-1, -1, h_s.shape[-1]))  # (B, P, d)
                new = self(src)[:, :, [i - 1 for i in offsets]].transpose(1, 2).flatten(1, 2)
                h, joined = new if h is None else torch.cat([h, new], dim=1), joined + offsets
            done = stop
        blocks = h.unflatten(1, (k, P))                                     # (B, k, P, d), `joined` order
        return blocks[:, [joined.index(i) for i in range(1, k + 1)]].transpose(1, 2), frozen["h_L"]
