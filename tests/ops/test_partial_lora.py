"""Partial LoRA (vlmkern::partial_lora_linear): Triton kernels vs the reference, forward and gradients."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from vlmkern.ops.routed_linear import _triton as kern
from vlmkern.ops.routed_linear import PARTIAL_LORA, partial_lora_linear
from vlmkern.ops.routed_linear._dropout import pack_keep, packed_width, unpack_keep
from vlmkern.reference import routed_linear as ref
from vlmkern.reference.originals.internlm_xcomposer2 import plora_forward as original_plora
from vlmkern.testing import assert_close, assert_no_host_sync

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("x", "weight", "bias", "lora_a", "lora_b")
# Small tiles so that a few dozen rows span several row tiles (text-only, image-only and mixed ones).
SMALL = {
    "down": dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=16, num_warps=4, num_stages=1),
    "up": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1),
    "tn": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1),
}


@pytest.fixture
def small_tiles(monkeypatch):
    for name, cfg in SMALL.items():
        monkeypatch.setitem(kern.CONFIGS, name, cfg)
        monkeypatch.setitem(kern.CONFIGS, name + "_fp32", cfg)
    kern.clear_plans()
    yield
    kern.clear_plans()        # before monkeypatch restores the shipped configs


def _params(device, in_f, out_f, r, dtype, bias=True, lora_scale=1.0):
    weight = (torch.randn(out_f, in_f, device=device) / in_f ** 0.5).to(dtype)
    b = torch.randn(out_f, device=device).to(dtype) if bias else None
    lora_a = (torch.randn(r, in_f, device=device) / in_f ** 0.5 * lora_scale).to(dtype)
    lora_b = (torch.randn(out_f, r, device=device) / r ** 0.5).to(dtype)
    return weight, b, lora_a, lora_b


def _mask(kind, shape, device):
    m = torch.zeros(shape, dtype=torch.bool, device=device)
    flat = m.view(-1)
    if kind == "all":
        flat[:] = True
    elif kind == "some":  # IXC layout: text, an image run, text; second sample image-first
        flat[3:29] = True
        flat[shape[-1]:shape[-1] + 11] = True
    elif kind == "single":
        flat[flat.numel() // 2] = True
    return m


def _run(fn, x, params, mask, grad, scaling, **kw):
    """Output and (x, weight, bias, lora_a, lora_b) gradients of ``fn``."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, *params)]
    y = fn(*leaves, mask, scaling, **kw)
    y.backward(grad.to(y.dtype))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _check(x, params, mask, scaling=2.0, grad=None, seed=None, **kw):
    """Compare ops against the reference in x.dtype (baseline) and in float64 (oracle)."""
    dtype = x.dtype
    out_f = params[0].shape[0]
    grad = torch.randn(*x.shape[:-1], out_f, device=x.device) if grad is None else grad

    def call(fn, xx, pp):
        if seed is not None:
            torch.manual_seed(seed)
        return _run(fn, xx, pp, mask, grad, scaling, **kw)

    ours = call(partial_lora_linear, x, params)
    base = call(ref.partial_lora_linear, x, params)
    exact = call(ref.partial_lora_linear, x.double(), [p.double() if p is not None else None for p in params])
    assert ours[0].shape == base[0].shape and ours[0].dtype == dtype
    assert_close(ours[0], base[0], exact[0], name="y")
    for name, o, b, e in zip(NAMES, ours[1], base[1], exact[1]):
        if e is None:
            assert o is None
            continue
        assert_close(o, b, e, kind="grad", dtype=dtype, name=f"d{name}")
    return ours


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "some", "all", "single"])
def test_matches_reference_shipped_tiles(backend, device, dtype, kind):
    x = torch.randn(2, 37, 40, device=device).to(dtype)
    params = _params(device, 40, 48, 16, dtype)
    _check(x, params, _mask(kind, (2, 37), device))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tile_routing(backend, device, small_tiles, dtype):
    # 83 rows = 6 row tiles of 16: text-only, mixed and image-only tiles; out 70 = 3 partial column tiles.
    x = torch.randn(83, 36, device=device).to(dtype)
    params = _params(device, 36, 70, 16, dtype, bias=False)
    mask = torch.zeros(83, dtype=torch.bool, device=device)
    mask[20:52] = True
    mask[70] = True
    _check(x, params, mask, scaling=0.5)
    # Text rows are exactly the base GEMM: the same kernel with no image row gives the same bits there.
    y = partial_lora_linear(x, *params, mask, 0.5)
    y_text = partial_lora_linear(x, *params, torch.zeros_like(mask), 0.5)
    assert torch.equal(y[~mask], y_text[~mask])


@st.composite
def _masks(draw, n=48):
    kind = draw(st.sampled_from(["runs", "empty", "full", "single", "random"]))
    m = [False] * n
    if kind == "full":
        m = [True] * n
    elif kind == "single":
        m[draw(st.integers(0, n - 1))] = True
    elif kind == "runs":
        for _ in range(draw(st.integers(1, 3))):
            start, length = draw(st.integers(0, n - 1)), draw(st.integers(1, n))
            m[start:start + length] = [True] * len(m[start:start + length])
    elif kind == "random":
        m = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return m


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mask_list=_masks())
def test_hypothesis_masks(backend, device, small_tiles, mask_list):
    torch.manual_seed(len(mask_list) + sum(mask_list))
    x = torch.randn(2, 24, 20, device=device)
    params = _params(device, 20, 24, 16, torch.float32)
    mask = torch.tensor(mask_list, dtype=torch.bool, device=device).view(2, 24)
    _check(x, params, mask, scaling=1.0)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_dropout_reproduces_reference(backend, device, small_tiles, dtype):
    x = torch.randn(2, 19, 24, device=device).to(dtype)
    params = _params(device, 24, 32, 16, dtype)
    mask = _mask("some", (2, 19), device)
    ours = _check(x, params, mask, scaling=2.0, seed=123, dropout_p=0.3, training=True)
    eval_y = partial_lora_linear(x, *params, mask, 2.0, dropout_p=0.3, training=False)
    assert not torch.equal(ours[0][mask], eval_y[mask])       # dropout acted on image rows ...
    torch.testing.assert_close(ours[0][~mask], eval_y[~mask])  # ... and never touches text rows


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout_keep_mask_is_the_oracles(device, p):
    """The op draws its own dropout mask: the same bits and scale as the oracle's from the same generator state
    (strided inputs included: the mask has x's shape, not its layout), and none in eval mode or at p = 0."""
    from vlmkern.ops.routed_linear import dropout_keep_mask
    x = torch.randn(4, 6, 10, device=device).transpose(0, 2)
    for training in (True, False):
        torch.manual_seed(3)
        keep, scale = dropout_keep_mask(x, p, training)
        torch.manual_seed(3)
        ref_keep, ref_scale = ref.dropout_keep_mask(x, p, training)
        assert scale == ref_scale
        if ref_keep is None:
            assert keep is None
        else:       # kept bit-packed: the oracle's bools, 1 bit each
            assert keep.dtype == torch.uint8 and keep.shape == (*x.shape[:-1], packed_width(x.shape[-1]))
            assert torch.equal(unpack_keep(keep, x.shape[-1]), ref_keep)
    assert dropout_keep_mask(x, p, False) == (None, 1.0)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 33, 64, 128, 129])
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_pack_unpack_round_trip(device, n, rows):
    """Bit j & 7 of byte j >> 3 is column j, rows padded with 0 bits to a multiple of 16 bytes."""
    keep = torch.rand(rows, n, device=device) > 0.4
    packed = pack_keep(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_width(n))
    assert packed.shape[1] % 16 == 0 and packed.shape[1] * 8 >= n and packed.is_contiguous()
    assert torch.equal(unpack_keep(packed, n), keep)
    j = torch.arange(n, device=device)
    bits = (packed[:, j >> 3] >> (j & 7).to(torch.uint8)) & 1         # the kernels' addressing, column by column
    assert torch.equal(bits.bool(), keep)
    assert int(unpack_keep(packed, packed.shape[1] * 8)[:, n:].sum()) == 0     # padding bits are 0


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
@pytest.mark.parametrize("in_f,rows", [(33, 7), (65, 9)])
def test_dropout_odd_widths_match_the_oracle(backend, device, small_tiles, in_f, rows):
    """Forward and backward with dropout on widths that are no multiple of 8 and an odd row count (several row
    tiles, a partial packed byte): the oracle's result from the same seed."""
    x = torch.randn(rows, in_f, device=device)
    params = _params(device, in_f, 40, 8, torch.float32)
    mask = torch.arange(rows, device=device) % 3 != 1
    _check(x, params, mask, scaling=2.0, seed=11, dropout_p=0.3, training=True)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
@pytest.mark.parametrize("bad", ["bool", "unpadded", "strided"])
def test_backward_ops_refuse_an_unpacked_keep(backend, device, bad):
    """The ops' keep must be the packed mask: a bool one, or rows narrower than packed_width, would be misread or
    read out of bounds; the error names keep before any launch."""
    g, b = torch.randn(5, 33, device=device), torch.randn(4, 33, device=device)
    mask = torch.ones(5, dtype=torch.bool, device=device)
    keep = {"bool": torch.ones(5, 33, dtype=torch.bool, device=device),
            "unpadded": torch.ones(5, 5, dtype=torch.uint8, device=device),
            "strided": torch.ones(packed_width(33), 5, dtype=torch.uint8, device=device).t()}[bad]
    with pytest.raises(ValueError, match="keep must be the packed dropout mask"):
        torch.ops.vlmkern.lora_down(g, b, mask, keep, 1.0, 2.0)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_saved_keep_is_bit_packed(backend, device):
    """The backward keeps the dropout mask as packed bits, ``M * packed_width(in)`` bytes, and no bool mask."""
    M, in_f = 6, 33
    x = torch.randn(M, in_f, device=device, requires_grad=True)
    params = _params(device, in_f, 24, 8, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        partial_lora_linear(x, *params, torch.ones(M, dtype=torch.bool, device=device), 2.0, dropout_p=0.3,
                            training=True)
    assert not [t for t in saved if t.dtype == torch.bool and t.dim() == 2]
    keeps = [t for t in saved if t.dtype == torch.uint8]
    assert len(keeps) == 1 and keeps[0].shape == (M, packed_width(in_f))
    assert keeps[0].untyped_storage().nbytes() == M * packed_width(in_f)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_dropout_mask_is_drawn_for_all_rows(backend, device):
    # The random stream must not depend on the mask: the generator advances by the same amount.
    x = torch.randn(3, 16, device=device)
    params = _params(device, 16, 16, 16, torch.float32)
    states = []
    for kind in ("none", "all"):
        torch.manual_seed(7)
        partial_lora_linear(x, *params, _mask(kind, (3,), device), 1.0, dropout_p=0.5, training=True)
        states.append(torch.rand(4, device=device))
    torch.testing.assert_close(states[0], states[1])


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_fp16_overflow_does_not_become_nan(backend, device):
    # x·Aᵀ overflows fp16 (> 65504) while x·Wᵀ does not: the original's × 0 path writes NaN.
    x = torch.full((1, 6, 32), 30.0, device=device).half()
    weight = torch.full((16, 32), 0.01, device=device).half()
    lora_a = torch.full((16, 32), 100.0, device=device).half()
    lora_b = torch.ones(16, 16, device=device).half()
    no_image = torch.zeros(1, 6, dtype=torch.bool, device=device)
    assert torch.isnan(original_plora(x, weight, None, lora_a, lora_b, no_image, 1.0)).any()
    y = partial_lora_linear(x, weight, None, lora_a, lora_b, no_image, 1.0)
    assert torch.isfinite(y).all()
    assert torch.equal(y, F.linear(x, weight))
    some = no_image.clone()
    some[0, 2:4] = True
    y = partial_lora_linear(x, weight, None, lora_a, lora_b, some, 1.0)
    assert torch.isfinite(y[~some]).all()   # overflowing image rows do not leak into text rows
    assert torch.equal(y[~some], F.linear(x, weight)[~some])


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_257_tokens_shipped_tiles(backend, device):
    # 257 tokens = 3 row tiles of 128 (the last one a single row); a 129-token image run straddles two.
    x = torch.randn(1, 257, 32, device=device).to(torch.bfloat16)
    params = _params(device, 32, 48, 16, torch.bfloat16)
    mask = torch.zeros(1, 257, dtype=torch.bool, device=device)
    mask[0, 100:229] = True
    mask[0, 256] = True
    _check(x, params, mask)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_autocast_runs_in_autocast_dtype(backend, device):
    x = torch.randn(2, 9, 16, device=device)
    params = _params(device, 16, 24, 16, torch.float32)
    mask = _mask("some", (2, 9), device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        y = partial_lora_linear(x, *params, mask, 2.0)
    assert y.dtype == torch.bfloat16
    base = ref.partial_lora_linear(x.bfloat16(), *[p.bfloat16() for p in params], mask, 2.0)
    assert_close(y, base, ref.partial_lora_linear(x.double(), *[p.double() for p in params], mask, 2.0))


def test_no_mask_is_plain_linear(device):
    x = torch.randn(2, 5, 8, device=device)
    params = [p.requires_grad_(True) for p in _params(device, 8, 12, 16, torch.float32)]
    y = partial_lora_linear(x, *params, None, 1.0)
    torch.testing.assert_close(y, F.linear(x, params[0], params[1]))
    y.sum().backward()
    assert params[2].grad is None and params[3].grad is None


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_non_contiguous_and_odd_sizes(backend, device):
    x = torch.randn(40, 3, 33, device=device).transpose(0, 1)   # (3, 40, 33), non-contiguous
    assert not x.is_contiguous()
    params = _params(device, 33, 17, 16, torch.float32)
    mask = torch.rand(3, 40, device=device) > 0.5
    _check(x, params, mask)
    one = torch.randn(1, 1, 33, device=device)
    _check(one, params, torch.ones(1, 1, dtype=torch.bool, device=device))


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_zero_tokens(backend, device):
    x = torch.randn(2, 0, 8, device=device, requires_grad=True)
    params = [p.requires_grad_(True) for p in _params(device, 8, 12, 16, torch.float32)]
    y = partial_lora_linear(x, *params, torch.zeros(2, 0, dtype=torch.bool, device=device), 1.0)
    assert y.shape == (2, 0, 12)
    y.sum().backward()
    assert params[0].grad.abs().sum() == 0 and params[3].grad.abs().sum() == 0


def test_reference_backend_when_triton_cannot_run(monkeypatch):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 8)
    assert PARTIAL_LORA.select(x) == "reference"
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        partial_lora_linear(x, *_params("cpu", 8, 8, 16, torch.float32), torch.ones(4, dtype=torch.bool), 1.0)


def test_opcheck(device):
    x = torch.randn(20, 24, device=device, requires_grad=True)
    params = [p.requires_grad_(True) for p in _params(device, 24, 32, 16, torch.float32)]
    mask = torch.zeros(20, dtype=torch.bool, device=device)
    mask[4:13] = True
    keep = pack_keep(torch.rand(20, 24, device=device) > 0.2)
    op = torch.ops.vlmkern.partial_lora_linear.default
    torch.library.opcheck(op, (x, *params, mask, None, 2.0, 1.0))
    torch.library.opcheck(op, (x, params[0], None, params[2], params[3], mask, keep, 2.0, 1.25))
    # Backward-only ops (no autograd formula of their own): detached inputs.
    w, _, a, bl = [p.detach() for p in params]
    g = torch.randn(20, 32, device=device)
    torch.library.opcheck(torch.ops.vlmkern.lora_down.default, (g, bl.t(), mask, None, 2.0, 1.0))
    gm = torch.randn(20, 16, device=device)
    keep_out = pack_keep(torch.rand(20, 32, device=device) > 0.2)      # dX's mask: x's, over dX's columns
    torch.library.opcheck(torch.ops.vlmkern.lora_up.default, (g, w.t(), gm, a.t(), mask, keep_out, 1.25))


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_compile_fullgraph_forward_backward(backend, device):
    torch._dynamo.reset()
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    params = [p.requires_grad_(True) for p in _params(device, 16, 24, 16, torch.float32)]
    mask = _mask("some", (2, 9), device)

    def f(x, w, b, a, bl):
        return partial_lora_linear(x, w, b, a, bl, mask, 2.0).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(x, *params).backward()
    got = [t.grad.clone() for t in (x, *params)]
    for t in (x, *params):
        t.grad = None
    f(x, *params).backward()
    for name, g, t in zip(NAMES, got, (x, *params)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")

    def g(x, w, b, a, bl):  # training-mode dropout compiles too (the keep mask is drawn in the graph)
        return partial_lora_linear(x, w, b, a, bl, mask, 2.0, dropout_p=0.1, training=True).sum()

    torch.compile(g, fullgraph=True, backend="aot_eager")(x, *params).backward()


def _good():
    w, b, a, bl = _params("cpu", 8, 12, 4, torch.float32)
    return dict(x=torch.randn(2, 5, 8), weight=w, bias=b, lora_a=a, lora_b=bl,
                im_mask=torch.zeros(2, 5, dtype=torch.bool), scaling=2.0)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(im_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError, r"im_mask must have shape x.shape\[:-1\]"),
    (dict(im_mask=torch.zeros(10, dtype=torch.bool)), ValueError, r"im_mask must have shape x.shape\[:-1\]"),
    (dict(im_mask=torch.zeros(2, 5)), TypeError, "im_mask must have dtype bool"),
    (dict(im_mask=[[True] * 5] * 2), TypeError, "im_mask must be a bool torch.Tensor"),
    (dict(x=torch.randn(2, 5, 9)), ValueError, "in_features=8"),
    (dict(x=torch.ones(2, 5, 8, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(x=torch.randn(2, 5, 8).half()), TypeError, "weight dtype float32 must match x dtype float16"),
    (dict(weight=torch.randn(12, 8, 1)), ValueError, "weight must be 2-D"),
    (dict(lora_a=torch.randn(4, 9)), ValueError, r"lora_a must have shape \(r, in_features=8\)"),
    (dict(lora_a=torch.randn(4)), ValueError, "lora_a must be 2-D"),
    (dict(lora_b=torch.randn(12, 5)), ValueError, r"lora_b must have shape \(out_features=12, r=4\)"),
    (dict(lora_b=torch.randn(4, 12)), ValueError, r"lora_b must have shape \(out_features=12, r=4\)"),
    (dict(lora_b=torch.randn(12, 4).half()), TypeError, "lora_b dtype"),
    (dict(bias=torch.randn(13)), ValueError, "bias must have out_features=12"),
    (dict(scaling=float("nan")), ValueError, "scaling must be a finite float"),
    (dict(dropout_p=1.5), ValueError, r"dropout_p must be a float in \[0, 1\]"),
    (dict(im_mask=torch.zeros(2, 5, dtype=torch.bool, device="meta")), ValueError, "im_mask is on meta"),
])
def test_bad_input_names_the_argument(bad, exc, match):
    args = {**_good(), **bad}
    with pytest.raises(exc, match=match):
        partial_lora_linear(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_cuda_no_host_sync_forward_backward(backend):
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [p.requires_grad_(True) for p in _params("cuda", 256, 384, 64, torch.bfloat16)]
    mask = torch.zeros(2, 300, dtype=torch.bool, device="cuda")
    mask[0, 10:267] = True
    grad = torch.randn(2, 300, 384, device="cuda", dtype=torch.bfloat16)
    for m in (mask, torch.zeros_like(mask)):
        assert_no_host_sync(lambda: partial_lora_linear(x, *params, m, 1.0, dropout_p=0.05,
                                                        training=True).backward(grad))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("kind", ["none", "some", "all"])
def test_cuda_ixc_wqkv_shape_bf16(backend, kind):
    # InternLM-XComposer2 wqkv: 4096 -> 6144, r = 256, 677 tokens with a 257-token image run.
    x = torch.randn(1, 677, 4096, device="cuda").bfloat16()
    params = _params("cuda", 4096, 6144, 256, torch.bfloat16, bias=False)
    mask = torch.zeros(1, 677, dtype=torch.bool, device="cuda")
    if kind == "some":
        mask[0, 35:292] = True
    elif kind == "all":
        mask[:] = True
    _check(x, params, mask, scaling=1.0)


@pytest.mark.parametrize("runs", [1, 3, 40])
def test_cpu_row_runs_and_scattered_rows_agree(runs):
    """The CPU path computes contiguous runs of image rows on row views and many runs through an index: both
    give the masked full-size math, forward and every gradient."""
    from vlmkern.ops.routed_linear import _torch as ops_rl
    torch.manual_seed(0)
    M, K, N, R = 4 * runs + 5, 24, 20, 4
    mask = torch.zeros(M, dtype=torch.bool)
    for i in range(runs):
        mask[1 + 4 * i: 3 + 4 * i] = True
    rows = ops_rl._cpu_rows(mask)
    assert isinstance(rows, list) == (runs <= ops_rl._MAX_RUNS)
    x, w, b, a, bl = (torch.randn(*s, dtype=torch.float32, requires_grad=True)
                      for s in ((M, K), (N, K), (N,), (R, K), (N, R)))
    got = partial_lora_linear(x, w, b, a, bl, mask, 2.0)
    expected = ref.partial_lora_linear(x, w, b, a, bl, mask, 2.0)
    g = torch.randn_like(got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for u, v in zip(torch.autograd.grad(got, (x, w, b, a, bl), g), torch.autograd.grad(expected, (x, w, b, a, bl), g)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-4)


def test_text_only_cpu_inference_is_the_base_linear(monkeypatch):
    """No image row and no gradient on the CPU (a text decode step): exactly F.linear, the op is not called;
    with gradients the op runs so the adapter gets zero gradients."""
    from vlmkern.ops import routed_linear as ops_rl
    torch.manual_seed(0)
    x, w, b, a, bl = (torch.randn(*s) for s in ((1, 3, 24), (20, 24), (20,), (4, 24), (20, 4)))
    mask = torch.zeros(1, 3, dtype=torch.bool)
    calls = []
    op = ops_rl._partial_lora
    monkeypatch.setattr(ops_rl, "_partial_lora", lambda *args: calls.append(1) or op(*args))
    with torch.no_grad():
        assert torch.equal(partial_lora_linear(x, w, b, a, bl, mask, 2.0), F.linear(x, w, b))
    assert calls == []
    a.requires_grad_()
    y = partial_lora_linear(x, w, b, a, bl, mask, 2.0)
    assert calls == [1]
    torch.testing.assert_close(y, F.linear(x, w, b))
    assert torch.equal(torch.autograd.grad(y.sum(), a)[0], torch.zeros_like(a))
    mask[0, 1] = True                               # an image row: the op, under no_grad too
    with torch.no_grad():
        partial_lora_linear(x, w, b, a, bl, mask, 2.0)
    assert calls == [1, 1]


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_backward_runs_dx_and_g_as_one_forward_op_call(backend, monkeypatch):
    """Without dropout the backward's dX and G = m·s·(dY B) are one call of the forward op on (dY, Wᵀ, Bᵀ, Aᵀ),
    bit for bit what the two internal ops give; with create_graph those two ops run (they have no autograd
    formula: a second derivative raises a clear error instead of silently missing G's dependencies)."""
    from vlmkern.ops import routed_linear as ops_rl
    torch.manual_seed(0)
    x, w, b, a, bl = (torch.randn(*s, requires_grad=True) for s in ((2, 3, 8), (5, 8), (5,), (2, 8), (5, 2)))
    mask = torch.tensor([[False, True, True], [True, False, False]])
    calls = []
    for name in ("_partial_lora", "_lora_down", "_lora_up"):
        op = getattr(ops_rl, name)
        monkeypatch.setattr(ops_rl, name, lambda *args, _op=op, _name=name: calls.append(_name) or _op(*args))
    leaves = (x, w, b, a, bl)
    one_call = torch.autograd.grad(partial_lora_linear(x, w, b, a, bl, mask, 2.0).square().sum(), leaves)
    assert calls == ["_partial_lora", "_partial_lora"]
    calls.clear()
    two_ops = torch.autograd.grad(partial_lora_linear(x, w, b, a, bl, mask, 2.0).square().sum(), leaves,
                                  create_graph=True)
    assert calls == ["_partial_lora", "_lora_down", "_lora_up"]
    for name, u, v in zip(NAMES, one_call, two_ops):
        assert torch.equal(u, v), name
    with pytest.raises(RuntimeError, match="partial_lora_linear: double backward"):
        two_ops[0].sum().backward()
