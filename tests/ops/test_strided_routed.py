"""Every tensor argument of the routed-GEMM, projector and packing ops in any layout (issue 11).

Hypothesis draws tiny shapes and, per tensor argument, a layout: contiguous, transposed (same values, the
last two dims swapped in memory), strided (every other element of a larger buffer), interleaved (the
issue's ``torch.stack([m, ~m], -1)[..., 0]`` mask: stride 2 along the last dim), expanded (stride 0 along the first dim: the first slice
repeated) or row-sliced (a leading-dim slice with a row step). Results and gradients are compared with the
float64 reference on the same values by the tolerance rule, on the default backend and on Triton.

Default run: a few examples per op and backend. ``python3 -m pytest -m slow tests/ops/test_strided_routed.py``
(Hypothesis profile ``slow``, see tests/conftest.py) runs at least 500 per family.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import examples
from vlmkern import ops
from vlmkern.ops.projector import gather_linear, gather_linear_gelu
from vlmkern.ops.routed_linear import cogvlm_expert_ids, expert_linear, partial_lora_linear
from vlmkern.reference import packing as ref_packing, projector as ref_projector, routed_linear as ref
from vlmkern.testing import assert_close

LAYOUTS = ("contiguous", "transposed", "strided", "interleaved", "expanded", "rows")
BACKENDS = pytest.mark.parametrize("backend", ["auto", "triton"], indirect=True)


def _property(default: int):
    """Marked slow (its ``-m slow`` run draws ``examples(default)`` >= 500); the default run draws ``default``."""
    def wrap(fn):
        fn = settings(max_examples=examples(default), deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])(fn)
        return pytest.mark.slow(fn)
    return wrap


def lay(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` (a leaf or any tensor) in layout ``kind``; differentiable, values equal to ``t`` except for
    ``expanded`` (first slice along dim 0 repeated) and ``rows`` (every other dim-0 slice of a 2x taller
    stack of ``t`` and its negation, so the values are ``t``'s)."""
    if kind == "contiguous" or t.dim() == 0:
        return t
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "expanded":
        return t[:1].expand(t.shape)
    other = ~t if t.dtype == torch.bool else -t if t.is_floating_point() else t + 1
    if kind == "interleaved":   # the issue's torch.stack([m, ~m], -1)[..., 0]: flattens to a stride-2 view
        return torch.stack([t, other], -1)[..., 0]
    if kind == "rows":
        return torch.stack([t, other], 1).flatten(0, 1)[::2]
    big = torch.zeros([2 * s for s in t.shape], dtype=t.dtype)   # strided (and transposed for 1-D)
    idx = tuple(slice(None, None, 2) for _ in t.shape)
    big[idx] = t
    return big[idx]


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _compare(fn, ref_fn, tensors: dict, layouts: dict, grads: tuple = (), **kw):
    """Our ``fn`` on the laid-out fp32 ``tensors`` vs ``ref_fn`` in float64 (oracle) and float32 (baseline)."""
    runs = {}
    for name, impl, dtype in (("ours", fn, torch.float32), ("base", ref_fn, torch.float32),
                              ("exact", ref_fn, torch.float64)):
        leaves = {k: (_leaf(v.to(dtype)) if k in grads else v.to(dtype) if v.is_floating_point() else v)
                  if v is not None else None for k, v in tensors.items()}
        args = {k: None if v is None else lay(v, layouts.get(k, "contiguous")) for k, v in leaves.items()}
        y = impl(**args, **kw)
        if grads:
            y.backward(torch.cos(torch.arange(y.numel(), dtype=dtype)).reshape(y.shape))
        runs[name] = (y.detach(), {k: leaves[k].grad for k in grads})
    assert_close(runs["ours"][0], runs["base"][0], runs["exact"][0], dtype=torch.float32)
    for k in grads:
        assert_close(runs["ours"][1][k], runs["base"][1][k], runs["exact"][1][k], kind="grad",
                     dtype=torch.float32, name=f"d{k}")


def _layouts(names):
    return st.fixed_dictionaries({n: st.sampled_from(LAYOUTS) for n in names})


dims = st.integers(1, 6)


@BACKENDS
@_property(8)
@given(b=st.integers(1, 3), l=dims, i=dims, o=dims, r=st.integers(1, 4), bias=st.booleans(), seed=st.integers(0, 99),
       lays=_layouts(("x", "weight", "bias", "lora_a", "lora_b", "im_mask")))
def test_partial_lora_any_layout(backend, b, l, i, o, r, bias, seed, lays):
    g = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(b, l, i, generator=g), weight=torch.randn(o, i, generator=g),
             bias=torch.randn(o, generator=g) if bias else None, lora_a=torch.randn(r, i, generator=g),
             lora_b=torch.randn(o, r, generator=g), im_mask=torch.rand(b, l, generator=g) < 0.5)
    grads = tuple(k for k in ("x", "weight", "bias", "lora_a", "lora_b") if t[k] is not None)
    _compare(partial_lora_linear, ref.partial_lora_linear, t, lays, grads, scaling=1.5)


@BACKENDS
@_property(8)
@given(b=st.integers(1, 3), l=dims, i=dims, o=dims, e=st.integers(1, 3), stacked=st.booleans(),
       id_dtype=st.sampled_from([torch.int32, torch.int64, torch.uint8]), seed=st.integers(0, 99),
       lays=_layouts(("x", "weights", "expert_ids")))
def test_expert_linear_any_layout(backend, b, l, i, o, e, stacked, id_dtype, seed, lays):
    g = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(b, l, i, generator=g), weights=torch.randn(e, o, i, generator=g),
             expert_ids=torch.randint(0, e, (b, l), generator=g).to(id_dtype))

    def ours(x, weights, expert_ids):
        return expert_linear(x, weights if stacked else list(weights.unbind(0)), expert_ids)
    _compare(ours, ref.expert_linear, t, lays, ("x", "weights"))


@BACKENDS
@_property(8)
@given(b=st.integers(1, 3), l=dims, seed=st.integers(0, 99), kind=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.int32, torch.int64, torch.uint8]))
def test_cogvlm_expert_ids_any_layout(backend, b, l, seed, kind, dtype):
    types = (torch.rand(b, l, generator=torch.Generator().manual_seed(seed)) < 0.6).to(dtype)
    laid = lay(types, kind)
    want = torch.zeros(b, l, dtype=torch.int32)   # from the spec: vision iff this and the next are vision-type
    v = laid.contiguous() == 1
    want[:, :-1] = (v[:, :-1] & v[:, 1:]).to(torch.int32)
    assert torch.equal(cogvlm_expert_ids(laid), want)


@BACKENDS
@_property(8)
@given(b=st.integers(1, 3), l=dims, i=dims, o=dims, bias=st.booleans(), seed=st.integers(0, 99),
       lays=_layouts(("x", "weight", "bias")))
def test_linear_gelu_any_layout(backend, b, l, i, o, bias, seed, lays):
    g = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(b, l, i, generator=g), weight=torch.randn(o, i, generator=g),
             bias=torch.randn(o, generator=g) if bias else None)
    _compare(ops.linear_gelu, ref_projector.linear_gelu, t, lays, tuple(k for k in t if t[k] is not None))


def _gather_case(g, n_src, c, p, o, rows, with_extra, with_fill):
    total = n_src + (2 if with_extra else 0)
    index = torch.randint(0, total, (rows, p), generator=g)
    if with_fill:
        index[::3, 0] = -1
    return dict(x=torch.randn(2, n_src // 2, c, generator=g), index=index, weight=torch.randn(o, p * c, generator=g),
                bias=torch.randn(o, generator=g), extra=torch.randn(2, c, generator=g) if with_extra else None,
                fill=torch.randn(o, generator=g) if with_fill else None)


@BACKENDS
@_property(8)
@given(half=st.integers(1, 4), c=dims, p=st.integers(1, 3), o=dims, rows=st.integers(1, 7), extra=st.booleans(),
       fill=st.booleans(), id_dtype=st.sampled_from([torch.int32, torch.int64]), seed=st.integers(0, 99),
       lays=_layouts(("x", "index", "weight", "bias", "extra", "fill")))
def test_gather_linear_any_layout(backend, half, c, p, o, rows, extra, fill, id_dtype, seed, lays):
    t = _gather_case(torch.Generator().manual_seed(seed), 2 * half, c, p, o, rows, extra, fill)
    t["index"] = t["index"].to(id_dtype)
    if lays["index"] in ("expanded", "rows"):   # keep the drawn index valid: only a pure-layout change
        lays["index"] = "strided"
    grads = tuple(k for k in ("x", "weight", "bias", "extra", "fill") if t[k] is not None)
    _compare(gather_linear, ref_packing.gather_linear, t, lays, grads)


@BACKENDS
@_property(8)
@given(half=st.integers(1, 4), c=dims, p=st.integers(1, 3), o=dims, rows=st.integers(1, 7), extra=st.booleans(),
       seed=st.integers(0, 99), lays=_layouts(("x", "index", "weight", "bias", "extra")))
def test_gather_linear_gelu_any_layout(backend, half, c, p, o, rows, extra, seed, lays):
    t = _gather_case(torch.Generator().manual_seed(seed), 2 * half, c, p, o, rows, extra, False)
    del t["fill"]
    if lays["index"] in ("expanded", "rows"):
        lays["index"] = "transposed"
    grads = tuple(k for k in ("x", "weight", "bias", "extra") if t[k] is not None)
    _compare(gather_linear_gelu, ref_packing.gather_linear_gelu, t, lays, grads)


@BACKENDS
def test_issue_case_strided_mask_and_ids(backend):
    """The issue's 1x4x16 reproductions, on whichever backend the environment selects."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 4, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    a, bl = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)
    m = torch.tensor([[True, False, True, False]])
    strided = torch.stack([m, ~m], -1)[..., 0]
    assert strided.stride() != m.stride()
    torch.testing.assert_close(partial_lora_linear(x, w, b, a, bl, strided, 2.0),
                               ref.partial_lora_linear(x, w, b, a, bl, m, 2.0))
    ids = torch.tensor([[0, 1, 1, 0]], dtype=torch.int32)
    W = torch.randn(2, 8, 16, generator=g)
    torch.testing.assert_close(expert_linear(x, W, torch.stack([ids, 1 - ids], -1)[..., 0]),
                               ref.expert_linear(x, W, ids))


# ------------------------------------------------------------------------------------------ row isolation
@BACKENDS
@pytest.mark.parametrize("where", ["lora_a", "lora_b"])
def test_adapter_inf_reaches_only_image_rows(backend, where):
    """An inf in the adapter's weights: text rows' outputs and input gradients stay finite (forward and dx)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g).requires_grad_(True)
    w, b = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    params = dict(lora_a=torch.randn(3, 8, generator=g), lora_b=torch.randn(6, 3, generator=g))
    params[where][0, 0] = float("inf")
    mask = torch.tensor([[False, True, True, False, False], [False, False, False, False, True]])
    y = partial_lora_linear(x, w, b, params["lora_a"], params["lora_b"], mask, 2.0)
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y[~mask]).all() and not torch.isfinite(y[mask]).all()
    assert torch.isfinite(x.grad[~mask]).all()


@BACKENDS
def test_expert_inf_reaches_only_its_rows(backend):
    """An inf in expert 1's weight or on an expert-1 input row: expert 0's rows, their input gradients and
    expert 0's weight gradient stay finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    x[1, 4, 0] = float("inf")                          # an expert-1 row
    x.requires_grad_(True)
    w = torch.randn(2, 6, 8, generator=g)
    w[1, 0, 0] = float("inf")
    w.requires_grad_(True)
    ids = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 1, 1]])
    y = expert_linear(x, w, ids)
    y.backward(torch.ones_like(y))
    lang = ids == 0
    assert torch.isfinite(y[lang]).all() and not torch.isfinite(y[~lang]).all()
    assert torch.isfinite(x.grad[lang]).all()
    assert torch.isfinite(w.grad[0]).all()


def test_slow_profile_draws_500_examples():
    from hypothesis import settings as hs
    slow = hs.get_profile("slow")
    assert slow.max_examples >= 500 and slow.derandomize
    assert examples(8) == (8 if hs.get_current_profile_name() != "slow" else 500)
