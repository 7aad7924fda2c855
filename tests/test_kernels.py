"""tools/kernels.py: the two forms of x @ W.T, the measured choice between them, and apply(), which
gives a model's nn.Linear layers the measured form from outside the model.

The choice is driven here by injected timings, so every test holds on any machine: the tests check
that the form the timings favour is the one computed, that both forms give the same numbers, and
that the cache keys on weight shape, dtype and row bucket.
"""

import pytest
import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer, causal_mask
from tools import kernels
from tools.kernels import FORMS, LinearKernels, MeasuredLinear, apply, linear


class FakeTimer:
    """Timings from a table {form: seconds}, or a function of rows; records what was timed."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, form, ring, rows):
        weight = next(ring)
        self.calls.append((form, tuple(weight.shape), weight.dtype, rows))
        return self.seconds(form, rows) if callable(self.seconds) else self.seconds[form]


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of each form while still computing it."""
    used = []
    for name, fn in list(FORMS.items()):
        monkeypatch.setitem(FORMS, name, lambda x, w, name=name, fn=fn: used.append(name) or fn(x, w))
    return used


def use_kernels(monkeypatch, k):
    monkeypatch.setattr(kernels, "KERNELS", k)
    return k


def test_injected_timings_choose_the_form_that_is_used(monkeypatch, spy):
    # transposed is "faster" up to 4 rows, F.linear beyond: the choice must follow, per bucket
    timer = FakeTimer(lambda form, rows: 1.0 if (form == "transposed") == (rows <= 4) else 2.0)
    use_kernels(monkeypatch, LinearKernels(timer))
    w = torch.randn(40, 16)
    for rows, expected in ((1, "transposed"), (3, "transposed"), (5, "linear"), (200, "linear")):
        spy.clear()
        x = torch.randn(1, rows, 16)
        y = linear(x, w)
        assert spy == [expected]
        assert y.shape == (1, rows, 40) and y.is_contiguous()
        torch.testing.assert_close(y, x @ w.T)


def test_a_product_runs_on_the_cheapest_bucket_that_holds_its_rows(monkeypatch):
    """When 4 rows cost less than 1 or 2 (made-up timings), 1-3 rows are padded to 4 with zeros: the
    same numbers, the product over 4 rows; 5 rows are not padded (8 costs more), 100 never."""
    timer = FakeTimer(lambda form, rows: {1: 3.0, 2: 3.0, 4: 1.0}.get(rows, 2.0 * rows) + (form == "linear"))
    k = use_kernels(monkeypatch, LinearKernels(timer))
    shapes = []
    monkeypatch.setitem(FORMS, "transposed", lambda x, w, fn=FORMS["transposed"]: shapes.append(x.shape[0]) or fn(x, w))
    w = torch.randn(40, 16)
    for rows, run in ((1, 4), (3, 4), (4, 4), (5, 8), (100, 100)):
        shapes.clear()
        x = torch.randn(1, rows, 16)
        y = linear(x, w)
        assert k.choice(w, rows) == ("transposed", run) and shapes == [run]
        assert y.shape == (1, rows, 40) and y.is_contiguous()
        torch.testing.assert_close(y, x @ w.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 33, 100])
def test_both_forms_agree(rows, dtype):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 64, dtype=dtype), torch.randn(96, 64, dtype=dtype)
    a, b = FORMS["linear"](x, w), FORMS["transposed"](x, w)
    assert a.shape == b.shape == (rows, 96) and a.is_contiguous() and b.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(a.float(), b.float(), **tol)
    torch.testing.assert_close(a.float(), x.float() @ w.float().T, **tol)


def test_cache_keys_on_shape_dtype_and_row_bucket():
    timer = FakeTimer(lambda form, rows: 1.0 if (form == "transposed") == (rows <= 4) else 2.0)
    k = LinearKernels(timer)
    w = torch.randn(40, 16)
    assert k.form(w, 3) == "transposed"
    # a new shape times both forms at every bucket, once
    assert timer.calls == [(f, (40, 16), torch.float32, b) for b in kernels.ROW_BUCKETS for f in FORMS]
    assert [k.form(w, rows) for rows in (1, 2, 4, 5, 8, 64, 500)] == ["transposed"] * 3 + ["linear"] * 4
    k.form(torch.randn(40, 16), 3)    # another weight of the same shape shares the entries
    n = len(timer.calls)
    k.form(torch.randn(16, 40), 3)    # a different shape is tuned separately
    k.form(w.bfloat16(), 3)           # and so is a different dtype
    assert len(timer.calls) == 3 * n
    assert {key[:2] for key in k.table} == {((40, 16), torch.float32), ((16, 40), torch.float32),
                                            ((40, 16), torch.bfloat16)}
    assert k.key(w, 3) == ((40, 16), torch.float32, 4) and k.key(w, 500)[2] == 64


def test_the_ring_hands_out_copies_of_the_weight():
    w = torch.randn(8, 16)
    ring = kernels.weight_ring(w)
    a, b = next(ring), next(ring)
    assert torch.equal(a, w) and torch.equal(b, w) and a.data_ptr() != b.data_ptr() != w.data_ptr()


def test_forced_form_times_nothing(monkeypatch, spy):
    timer = FakeTimer({"linear": 1.0, "transposed": 2.0})
    use_kernels(monkeypatch, LinearKernels(timer, force="transposed"))
    linear(torch.randn(2, 16), torch.randn(8, 16))
    assert spy == ["transposed"] and timer.calls == []


def test_apply_covers_every_weight_shape_and_bucket_and_keeps_the_parameters(monkeypatch):
    m = Transformer(ModelArgs.tiny()).init_random()
    names = dict(m.state_dict())
    timer = FakeTimer({"linear": 1.0, "transposed": 2.0})
    k = use_kernels(monkeypatch, LinearKernels(timer))
    apply(m)
    linears = [p for p in m.modules() if isinstance(p, torch.nn.Linear)]
    assert linears and all(type(p) is MeasuredLinear for p in linears)
    assert m.output.weight is m.tok_embeddings.weight  # tied weights stay tied
    assert {n: v.data_ptr() for n, v in m.state_dict().items()} == {n: v.data_ptr() for n, v in names.items()}
    shapes = {tuple(p.weight.shape) for p in linears}
    assert {key[0] for key in k.table} == shapes
    assert len(k.table) == len(shapes) * len(kernels.ROW_BUCKETS)
    n = len(timer.calls)
    apply(m)                          # cached: a second apply times nothing
    assert len(timer.calls) == n


def test_whole_model_same_logits_with_either_form_and_without(monkeypatch, spy):
    m = Transformer(ModelArgs.tiny()).init_random()
    tokens = torch.randint(m.args.vocab_size, (1, 12))
    plain = m(tokens, torch.arange(12), causal_mask(12))
    assert spy == [], "a model nobody applied the kernels to uses nn.Linear as it is"
    apply(m)
    logits = {}
    for form in FORMS:
        use_kernels(monkeypatch, LinearKernels(force=form))
        logits[form] = m(tokens, torch.arange(12), causal_mask(12))
    assert set(spy) == set(FORMS)
    for form in FORMS:
        torch.testing.assert_close(logits[form], plain, rtol=1e-5, atol=1e-5)


def test_the_real_timer_returns_seconds():
    assert 0 < kernels.time_form("linear", kernels.weight_ring(torch.randn(8, 16)), 2) < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_uses_f_linear_and_times_nothing(monkeypatch):
    timer = FakeTimer({"linear": 1.0, "transposed": 2.0})
    k = use_kernels(monkeypatch, LinearKernels(timer))
    x, w = torch.randn(3, 16, device="cuda"), torch.randn(8, 16, device="cuda")
    torch.testing.assert_close(linear(x, w), F.linear(x, w))
    apply(torch.nn.Linear(16, 8).cuda())
    assert timer.calls == [] and k.table == {}


def test_a_compiled_region_uses_the_timed_form_and_times_nothing(monkeypatch, spy):
    """tools/compiled.py: apply() times before compiling; inside the graph linear only looks the form up,
    and a shape nobody timed gets F.linear's form rather than a timing in the middle of a trace."""
    timer = FakeTimer({"linear": 2.0, "transposed": 1.0})
    k = use_kernels(monkeypatch, LinearKernels(timer))
    timed, untimed, x = torch.randn(8, 16), torch.randn(16, 8), torch.randn(2, 16)
    k.form(timed, 1)
    n = len(timer.calls)
    f = torch.compile(lambda x: linear(linear(x, timed), untimed), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x), (x @ timed.T) @ untimed.T)
    assert spy == ["transposed", "linear"] and len(timer.calls) == n
