"""Medusa-1 heads: at initialisation every head IS the model's next-token head; decoding with them
through decode.generate_tree is lossless; a checkpoint round-trips. Tiny random models, fp32.
"""

import torch

from checkpoint import load_drafter, save_checkpoint
from conftest import perturb, tiny
from decode import generate_tree
from generate import Sampler, generate
from medusa import Medusa
from model import KVCache, causal_mask
from tree import Tree, chain


def test_heads_at_init_equal_the_models_next_token_logits():
    model, medusa = tiny(), Medusa(64, 3)
    tokens = torch.randint(96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, states = medusa.tree_pass(model, tokens, torch.arange(9), torch.ones(9, 9).tril().bool(),
                                          0, KVCache(model.args, 1, 9))
        full = model(tokens, torch.arange(9), causal_mask(9))[0]               # (9, V)
        assert torch.allclose(model.head(hidden), full, atol=1e-5)
        for j in range(9):
            drafts = medusa.draft_logits(model, states[j])                      # (k, V)
            assert torch.allclose(drafts, full[j].expand(3, -1), atol=1e-5)


def test_heads_are_residual_silu():
    medusa = Medusa(8, 2)
    with torch.no_grad():
        medusa.proj.weight.normal_()
        medusa.proj.bias.normal_()
    h = torch.randn(5, 8)
    U, b = medusa.proj.weight.view(2, 8, 8), medusa.proj.bias.view(2, 8)
    for i in range(2):
        want = h + torch.nn.functional.silu(h @ U[i].T + b[i])
        assert torch.allclose(medusa(h)[:, i], want, atol=1e-6)


def random_medusa(seed=0):
    return perturb(Medusa(64, 3), seed=seed)


def test_medusa_decoding_is_lossless(device):
    model = tiny(1, device)
    prompt = torch.randint(96, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = generate(model, prompt, 40, Sampler())
    trees = [Tree([]), chain(3), Tree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], k=3)]
    for medusa in (Medusa(64, 3).to(device), random_medusa().to(device)):
        for tree in trees:
            out = generate_tree(model, medusa, prompt, tree, 40, Sampler())
            assert out.tokens == ref.tokens, tree
    # seeded sampling emits the same tokens too (one draw per emitted token)
    ref = generate(model, prompt, 40, Sampler(0.8, 0.95, seed=7))
    out = generate_tree(model, random_medusa().to(device), prompt, trees[2], 40, Sampler(0.8, 0.95, seed=7))
    assert out.tokens == ref.tokens


def test_checkpoint_round_trip(tmp_path):
    model, medusa = tiny(), random_medusa()
    save_checkpoint(str(tmp_path / "m.pt"), medusa, model, {"tree": [[0]]})
    loaded, plan, note = load_drafter(model, str(tmp_path / "m.pt"))
    assert isinstance(loaded, Medusa) and loaded.config() == {"dim": 64, "k": 3}
    assert torch.equal(loaded.proj.weight, medusa.proj.weight)
    assert plan.tree.paths == [(), (0,)] and "(medusa)" in note
