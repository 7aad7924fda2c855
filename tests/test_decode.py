"""Losslessness is the product: Hidden Transfer must emit exactly what plain decoding emits.

Tiny random models (fp32), random projections, several transfer layers and tree shapes; an
"oracle" drafter that is right most of the time, so that deep acceptance, sibling acceptance,
cache compaction and stops inside a step are all exercised.
"""

import pytest
import torch

from conftest import Oracle, check_cache, perturb, random_transfer, tiny
from decode import accept, generate_tree
from generate import Sampler, generate
from medusa import Medusa
from model import KVCache, causal_mask
from tree import Tree, chain

TREES = {
    "root only": Tree([]),
    "chain-1": chain(1),
    "chain-3": chain(3),
    "wide": Tree([(0,), (1,), (2,), (3,), (0, 0), (1, 0)], k=3),
    "deep": Tree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0), (0, 0, 1)], k=3),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tree_name", list(TREES))
def test_greedy_equals_plain_with_random_projection(seed, tree_name, device):
    kv = [None, 2, 1][seed]  # plain multi-head, grouped-query, multi-query
    model = tiny(seed, device, n_kv_heads=kv, tie_embeddings=seed != 1, n_layers=3 + seed)
    prompt = torch.randint(0, model.args.vocab_size, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
    ref = generate(model, prompt, 30, Sampler())
    for layer in range(1, model.args.n_layers):
        out = generate_tree(model, random_transfer(model, layer, seed=seed), prompt, TREES[tree_name],
                            30, Sampler())
        assert out.tokens == ref.tokens, f"transfer layer {layer}"


@pytest.mark.parametrize("tree_name", ["chain-3", "wide", "deep"])
@pytest.mark.parametrize("max_new", [1, 2, 13, 29])
def test_oracle_drafts_greedy_lossless_and_cache_exact(tree_name, max_new, device):
    model = tiny(3, device)
    prompt = [4, 8, 15, 16, 23, 42]
    ref = generate(model, prompt, max_new, Sampler())
    oracle = Oracle(model, prompt + ref.tokens)
    emitted = []
    out = generate_tree(model, oracle, prompt, TREES[tree_name], max_new, Sampler(),
                        on_token=emitted.extend, on_step=check_cache(model, prompt, emitted))
    assert out.tokens == ref.tokens and len(out.tokens) == max_new
    if max_new > 10:
        assert out.tau > 1.5, "the oracle should get several tokens accepted per step"
        assert len(out.tokens) == 1 + sum(a + 1 for a in out.accepted[:-1]) + min(out.accepted[-1] + 1, max_new)


@pytest.mark.parametrize("tree_name", ["chain-3", "deep"])
def test_stops_at_eos_inside_a_step(tree_name, device):
    model = tiny(4, device)
    prompt = [1, 2, 3]
    full = generate(model, prompt, 40, Sampler()).tokens
    for cut in [3, 7, 12]:  # declare the token at `cut` a stop token: generation must end right there
        stop = {full[cut]} - set(full[:cut])
        if not stop:
            continue
        ref = generate(model, prompt, 40, Sampler(), stop_ids=stop)
        out = generate_tree(model, Oracle(model, prompt + full), prompt, TREES[tree_name], 40, Sampler(),
                            stop_ids=stop)
        assert out.tokens == ref.tokens == full[:cut + 1]


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 1.0), (0.7, 1.0), (1.0, 0.9)])
@pytest.mark.parametrize("tree_name", ["chain-3", "deep"])
def test_seeded_sampling_emits_the_same_tokens(temperature, top_p, tree_name, device):
    model = tiny(5, device, vocab_size=16)  # small vocab: drafts are often right, so acceptance is exercised
    prompt = [3, 1, 4, 1, 5]
    accepted = 0
    for seed in range(4):
        ref = generate(model, prompt, 25, Sampler(temperature, top_p, seed))
        out = generate_tree(model, random_transfer(model, 2, seed=seed), prompt, TREES[tree_name], 25,
                            Sampler(temperature, top_p, seed))
        assert out.tokens == ref.tokens, f"seed {seed}"
        accepted += sum(out.accepted)
    assert accepted > 0


def test_sampling_distribution_matches_the_model():
    """Independent of a shared generator: over many seeds, the 2nd and 3rd sampled tokens (the 3rd
    often an accepted draft) follow the model's exact distribution (chi-square test)."""
    model, V = tiny(6, vocab_size=6, n_layers=2, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64), 6
    prompt = [1, 2, 3]
    with torch.no_grad():
        def next_probs(prefixes):  # (B, T) -> (B, V): the model's next-token distribution
            x = torch.tensor(prefixes)
            return torch.softmax(model(x, torch.arange(x.shape[1]), causal_mask(x.shape[1]))[:, -1], -1)
        p1 = next_probs([prompt])[0]                                                     # (V,)
        p2 = next_probs([prompt + [a] for a in range(V)])                                # (V, V)
        p3 = next_probs([prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    expected = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()  # P(x2, x3), (V*V,)
    counts, trials, accepted = torch.zeros(V * V), 1500, 0
    drafter = random_transfer(model, 1)
    for seed in range(trials):
        out = generate_tree(model, drafter, prompt, TREES["wide"], 3, Sampler(1.0, 1.0, seed + 10**6))
        counts[out.tokens[1] * V + out.tokens[2]] += 1
        accepted += out.accepted[0]
    assert accepted > trials // 4, "the test must exercise accepted drafts"
    e = expected * trials
    keep = e > 5
    chi2 = float((((counts - e) ** 2) / e)[keep].sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, f"chi2 {chi2:.1f} with {dof} degrees of freedom"


def test_real_tokens_never_see_pseudo_tokens(device):
    model = tiny(7, device)
    tree = TREES["deep"].to(device)
    n, prompt = 5, torch.tensor([[9, 8, 7, 6, 5]], device=device)
    tokens = torch.randint(0, model.args.vocab_size, (1, tree.size)).to(device)
    at = torch.arange(n, device=device)
    outs = []
    for seed in (0, 1):
        cache = KVCache(model.args, 1, 32, device)
        model(prompt, at, causal_mask(n, device=device), at, cache)
        hidden, states = random_transfer(model, 2, seed=seed).tree_pass(
            model, tokens, tree.positions(n), tree.mask, n, cache)
        outs.append((model.head(hidden), states))
    assert torch.equal(outs[0][0], outs[1][0]), "a real token's logits depend on the projection"
    assert not torch.allclose(outs[0][1], outs[1][1]), "the pseudo tokens should depend on it"


def test_tree_pass_real_logits_equal_plain_forward(device):
    """Each tree node's logits equal a plain forward over its own root-to-node path."""
    model = tiny(8, device)
    tree, n = TREES["deep"].to(device), 4
    ctx = [3, 5, 7, 9]
    tokens = torch.randint(0, model.args.vocab_size, (1, tree.size), generator=torch.Generator().manual_seed(0))
    tokens, at = tokens.to(device), torch.arange(n, device=device)
    cache = KVCache(model.args, 1, 32, device)
    model(torch.tensor([ctx], device=device), at, causal_mask(n, device=device), at, cache)
    hidden, _ = random_transfer(model, 1).tree_pass(model, tokens, tree.positions(n), tree.mask, n, cache)
    logits = model.head(hidden)
    for i in range(tree.size):
        seq = ctx + tokens[0, tree.path_to(i)].tolist()
        T = len(seq)
        full = model(torch.tensor([seq], device=device), torch.arange(T, device=device),
                     causal_mask(T, device=device))[0, -1]
        torch.testing.assert_close(logits[i], full, rtol=0, atol=1e-5)


def random_medusa(model, seed=0):
    return perturb(Medusa(model.args.dim, 3), seed=seed).to(model.output.weight.device)


@pytest.mark.parametrize("make", [random_transfer, random_medusa], ids=["transfer", "medusa"])
@pytest.mark.parametrize("depth", [1, 2])
def test_fewer_drafts_per_node_are_the_first_drafts(make, depth, device):
    """tree_pass(depth=d) builds only d drafts per node, and they are the first d of the full k:
    pseudo (a, i) never sees (a, j > i), so dropping them changes no kept draft."""
    model = tiny(9, device)
    drafter = make(model, seed=depth) if make is random_medusa else make(model, 2, seed=depth)
    tree, n, at = TREES["deep"].to(device), 5, torch.arange(5, device=device)
    tokens = torch.randint(0, model.args.vocab_size, (1, tree.size), generator=torch.Generator().manual_seed(1))
    tokens, outs = tokens.to(device), []
    for d in (depth, None):
        cache = KVCache(model.args, 1, 32, device)
        model(torch.tensor([[9, 8, 7, 6, 5]], device=device), at, causal_mask(n, device=device), at, cache)
        with torch.no_grad():
            hidden, states = drafter.tree_pass(model, tokens, tree.positions(n), tree.mask, n, cache,
                                               nodes=[0, 3, 5], depth=d)
            outs.append((hidden, drafter.draft_logits(model, states)))      # (N, dim), (3, d, V)
    (hidden_d, logits_d), (hidden_k, logits_k) = outs
    assert logits_d.shape[:2] == (3, depth) and logits_k.shape[:2] == (3, 3)
    torch.testing.assert_close(hidden_d, hidden_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_d, logits_k[:, :depth], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits_d.argmax(-1), logits_k[:, :depth].argmax(-1))
    with pytest.raises(ValueError, match="depth"):
        drafter.tree_pass(model, tokens, tree.positions(n), tree.mask, n, cache, depth=4)


@pytest.mark.parametrize("make", [random_transfer, random_medusa], ids=["transfer", "medusa"])
def test_step_logits_are_the_head_and_the_drafts_in_one_product(make, device, monkeypatch):
    """Drafter.step_logits gives what model.head(hidden) and draft_logits(states) give, from ONE
    product with the LM head's weights (the largest single read of a small model's step)."""
    model = tiny(4, device)
    drafter = make(model, seed=1) if make is random_medusa else make(model, 2, seed=1)
    tree, n, at = TREES["wide"].to(device), 5, torch.arange(5, device=device)
    tokens = torch.randint(0, model.args.vocab_size, (1, tree.size), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.args, 1, 32, device)
    with torch.no_grad():
        model(torch.tensor([[9, 8, 7, 6, 5]], device=device), at, causal_mask(n, device=device), at, cache)
        hidden, states = drafter.tree_pass(model, tokens.to(device), tree.positions(n), tree.mask, n, cache,
                                           nodes=[0, 2, 4], depth=2)
        logits, drafts = drafter.step_logits(model, hidden, states)
        torch.testing.assert_close(logits, model.head(hidden), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(drafts, drafter.draft_logits(model, states), rtol=1e-5, atol=1e-5)
        assert drafts.shape == (3, 2, model.args.vocab_size)
        products = []
        hook = model.output.register_forward_hook(lambda module, x, y: products.append(x[0].shape[0]))
        drafter.step_logits(model, hidden, states)
        hook.remove()
    assert products == [tree.size + 3 * 2], "the LM head's weights are read once a step, for every row"


# ----------------------------------------------------------------------------- the acceptance walk alone

def test_accept_walk():
    #        0 (root)
    #       / \
    #   1:'a'  2:'b'
    #    |
    #   3:'c'
    children, tokens = [[1, 2], [3], [], []], [None, "a", "b", "c"]
    choices = {0: "b", 2: "z"}
    assert accept(children, tokens, choices.get, budget=10) == ([0, 2], ["b", "z"])
    choices = {0: "a", 1: "c", 3: "d"}
    assert accept(children, tokens, choices.get, budget=10) == ([0, 1, 3], ["a", "c", "d"])
    assert accept(children, tokens, choices.get, budget=2) == ([0, 1], ["a", "c"])    # budget ends it
    assert accept(children, tokens, choices.get, budget=10, stop_ids={"a"}) == ([0], ["a"])  # stop token
    assert accept(children, tokens, {0: "q"}.get, budget=10) == ([0], ["q"])         # nothing accepted


def test_accept_draws_once_per_emitted_token():
    calls = []
    children, tokens = [[1], [2], []], [None, 5, 6]
    choose = lambda v: calls.append(v) or [5, 6, 7][v]
    path, emitted = accept(children, tokens, choose, budget=10)
    assert calls == [0, 1, 2] and emitted == [5, 6, 7] and path == [0, 1, 2]


# ----------------------------------------------------------------------------- decode.py --show

class CharTok:
    """Token i is the letter chr(97 + i % 26); 95 the stop token. Enough for decode.DraftMarker."""
    stop_ids = {95}

    def decode(self, ids, skip_special=True):
        return "".join(chr(97 + i % 26) for i in ids if i not in self.stop_ids)

    def stream(self):
        from tokenizer import TextStream
        return TextStream(self)


@pytest.mark.parametrize("color", [False, True], ids=["piped", "terminal"])
def test_show_marks_every_accepted_draft(color, capsys):
    from decode import DraftMarker
    model, prompt = tiny(3), [4, 8, 15, 16, 23, 42]
    ref = generate(model, prompt, 30, Sampler())
    show = DraftMarker(CharTok(), color)
    out = generate_tree(model, Oracle(model, prompt + ref.tokens), prompt, TREES["chain-3"], 30, Sampler(),
                        on_token=show)
    text = capsys.readouterr().out
    start, end = ("\033[32m", "\033[0m") if color else ("[", "]")
    assert text.replace(start, "").replace(end, "") == CharTok().decode(out.tokens)
    drafted = [piece.split(end)[0] for piece in text.split(start)[1:]]  # the marked spans, in order
    assert "".join(drafted) == CharTok().decode(
        [t for step in steps_of(out) for t in step[:-1]]), "exactly the accepted drafts are marked"
    summary = show.summary(out)
    assert " ".join(map(str, out.accepted)) in summary and f"{out.tau:.2f}" in summary
    assert ("green" in summary) == color and ("brackets" in summary) != color


def steps_of(out):
    """The tokens of each pass (the prefill's first), from out.accepted: a pass emits accepted + 1."""
    steps, i = [out.tokens[:1]], 1
    for a in out.accepted:
        steps.append(out.tokens[i:i + a + 1])
        i += a + 1
    return steps
