"""Visual-expert routed linear (vlmkern::expert_linear) and the CogVLM routing rule, vs the originals."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from vlmkern.ops.routed_linear import _triton as kern
from vlmkern.ops.routed_linear import EXPERT_LINEAR, cogvlm_expert_ids, expert_linear
from vlmkern.reference import routed_linear as ref
from vlmkern.reference.originals.cogvlm import get_expert_mask as _original_get_expert_mask
from vlmkern.testing import assert_close, assert_no_host_sync

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL = {
    "expert": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1),
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


def _original_split_linear(x, w_language, w_vision, token_type_ids):
    """The original expert dispatch: boolean gather/scatter, each token computed by one expert."""
    vision, language = _original_get_expert_mask(token_type_ids)
    out = torch.empty((*x.shape[:-1], w_language.shape[0]), dtype=x.dtype, device=x.device)
    out[vision] = F.linear(x[vision], w_vision)
    out[language] = F.linear(x[language], w_language)
    return out


def _cogvlm_types(B, L, n_vis, device, start=1):
    """``[BOS] + [boi, patches.., eoi] + text`` per sample, with padding text tokens (CogVLM's layout)."""
    t = torch.zeros(B, L, dtype=torch.long, device=device)
    t[:, start:start + n_vis] = 1
    return t


def _ids(kind, B, L, E, device):
    if kind == "cogvlm":
        return cogvlm_expert_ids(_cogvlm_types(B, L, min(L - 2, 27), device))
    if kind == "language":
        return torch.zeros(B, L, dtype=torch.int64, device=device)
    if kind == "vision":
        return torch.ones(B, L, dtype=torch.int64, device=device)
    return torch.randint(0, E, (B, L), device=device)


def _weights(device, E, out_f, in_f, dtype):
    return (torch.randn(E, out_f, in_f, device=device) / in_f ** 0.5).to(dtype)


def _run(fn, x, w, ids, grad):
    x, w = (t.detach().clone().requires_grad_(True) for t in (x, w))
    y = fn(x, w, ids)
    y.backward(grad.to(y.dtype))
    return y.detach(), x.grad, w.grad


def _check(x, w, ids, grad=None):
    grad = torch.randn(*x.shape[:-1], w.shape[1], device=x.device) if grad is None else grad
    ours = _run(expert_linear, x, w, ids, grad)
    base = _run(ref.expert_linear, x, w, ids, grad)
    exact = _run(ref.expert_linear, x.double(), w.double(), ids, grad)
    assert ours[0].dtype == x.dtype
    assert_close(ours[0], base[0], exact[0], name="y")
    assert_close(ours[1], base[1], exact[1], kind="grad", dtype=x.dtype, name="dx")
    assert_close(ours[2], base[2], exact[2], kind="grad", dtype=x.dtype, name="dweights")
    return ours


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["cogvlm", "language", "vision"])
def test_matches_reference_and_boolean_split(backend, device, dtype, kind):
    x = torch.randn(2, 37, 40, device=device).to(dtype)
    w = _weights(device, 2, 48, 40, dtype)
    ids = _ids(kind, 2, 37, 2, device)
    ours = _check(x, w, ids)
    if kind != "cogvlm":
        return
    types = _cogvlm_types(2, 37, 27, device)
    # Forward and gradients of the original boolean-split module, in the same precision.
    xo, wl, wv = (t.detach().clone().requires_grad_(True) for t in (x, w[0], w[1]))
    yo = _original_split_linear(xo, wl, wv, types)
    grad = torch.randn_like(yo)
    yo.backward(grad)
    xe, we = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ye = _original_split_linear(xe, we[0], we[1], types)
    ye.backward(grad.double())
    ours = _run(expert_linear, x, w, ids, grad)
    assert_close(ours[0], yo, ye, name="y vs original")
    assert_close(ours[1], xo.grad, xe.grad, kind="grad", dtype=dtype, name="dx vs original")
    assert_close(ours[2], torch.stack([wl.grad, wv.grad]), we.grad, kind="grad", dtype=dtype,
                 name="dweights vs original")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("num_experts", [2, 3])
def test_multi_tile_mixed_tiles(backend, device, small_tiles, num_experts):
    # 77 rows in row tiles of 16: homogeneous tiles, tiles with 2-3 experts, odd column / K sizes.
    x = torch.randn(77, 33, device=device)
    w = _weights(device, num_experts, 45, 33, torch.float32)
    ids = torch.zeros(77, dtype=torch.int64, device=device)
    ids[5:50] = 1
    ids[60:] = num_experts - 1
    ids[63] = 0
    _check(x, w, ids)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids_list=st.one_of(
    st.lists(st.integers(0, 1), min_size=40, max_size=40),
    st.tuples(st.integers(0, 39), st.integers(0, 40)).map(lambda r: [int(r[0] <= i < r[0] + r[1]) for i in range(40)]),
    st.sampled_from([[0] * 40, [1] * 40, [0] * 39 + [1], [1] + [0] * 39]),
))
def test_hypothesis_routing(backend, device, small_tiles, ids_list):
    torch.manual_seed(sum(ids_list))
    x = torch.randn(2, 20, 24, device=device)
    w = _weights(device, 2, 20, 24, torch.float32)
    _check(x, w, torch.tensor(ids_list, device=device).view(2, 20))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_separate_expert_matrices(backend, device, small_tiles):
    # CogVLM passes its two nn.Linear weights as they are (no stacking); strides may even differ.
    x = torch.randn(40, 24, device=device)
    ids = torch.zeros(40, dtype=torch.int64, device=device)
    ids[6:31] = 1
    wl = torch.randn(20, 24, device=device, requires_grad=True)
    wv = torch.randn(20, 24, device=device)
    wv_t = torch.randn(24, 20, device=device).t()  # a transposed view: strides differ from wl
    for w1 in (wv, wv_t):
        w1 = w1.detach().requires_grad_(True)
        y = expert_linear(x, [wl, w1], ids)
        y.square().sum().backward()
        ye = ref.expert_linear(x.double(), torch.stack([wl, w1]).double(), ids)
        torch.testing.assert_close(y.double(), ye, rtol=1e-5, atol=1e-5)
        gl, gv = wl.grad.clone(), w1.grad.clone()
        wl.grad = None
        wle, w1e = wl.detach().double().requires_grad_(True), w1.detach().double().requires_grad_(True)
        ref.expert_linear(x.double(), [wle, w1e], ids).square().sum().backward()
        torch.testing.assert_close(gl.double(), wle.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gv.double(), w1e.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_non_contiguous_single_and_zero_tokens(backend, device):
    x = torch.randn(30, 2, 24, device=device).transpose(0, 1)
    w = _weights(device, 2, 32, 24, torch.float32).transpose(1, 2).contiguous().transpose(1, 2)
    assert not x.is_contiguous() and not w.is_contiguous()
    _check(x, w, torch.randint(0, 2, (2, 30), device=device, dtype=torch.int32))
    _check(x[:1, :1], w, torch.ones(1, 1, dtype=torch.bool, device=device))
    xz = torch.randn(1, 0, 24, device=device, requires_grad=True)
    wz = w.detach().clone().requires_grad_(True)
    y = expert_linear(xz, wz, torch.zeros(1, 0, dtype=torch.long, device=device))
    assert y.shape == (1, 0, 32)
    y.sum().backward()
    assert wz.grad.abs().sum() == 0


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_257_tokens_cogvlm_layout_shipped_tiles(backend, device):
    types = _cogvlm_types(1, 257, 230, device)   # text, boi + 228 patches, eoi, text across 3 row tiles
    x = torch.randn(1, 257, 32, device=device).to(torch.bfloat16)
    _check(x, _weights(device, 2, 40, 32, torch.bfloat16), cogvlm_expert_ids(types))


def test_cogvlm_expert_ids_match_original(device):
    types = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 1, 1]], device=device)
    ids = cogvlm_expert_ids(types)
    assert ids.dtype == torch.int32 and ids.shape == types.shape
    # boi + patches use the vision expert; eoi and a trailing vision token use the language expert.
    assert ids.tolist() == [[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 1, 0]]
    vision, _ = _original_get_expert_mask(types)
    assert torch.equal(ids.bool(), vision)
    assert cogvlm_expert_ids(torch.ones(3, 1, dtype=torch.long, device=device)).sum() == 0  # decode step
    rand = torch.randint(0, 2, (4, 50), device=device)
    assert torch.equal(cogvlm_expert_ids(rand).bool(), _original_get_expert_mask(rand)[0])


def test_cogvlm_expert_ids_match_the_oracle(device):
    """The op computes its own routing: equal to the oracle's, edge shapes and other type values included."""
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 50), (2, 1), (1, 2), (0, 4), (2, 0)):
        for dtype in (torch.int64, torch.int32, torch.uint8):
            types = torch.randint(0, 3, shape, generator=g).to(device=device, dtype=dtype)
            got, expected = cogvlm_expert_ids(types), ref.cogvlm_expert_ids(types)
            assert got.dtype == expected.dtype == torch.int32 and torch.equal(got, expected)
    strided = torch.randint(0, 2, (4, 30), generator=g).to(device)[:, ::3]
    assert torch.equal(cogvlm_expert_ids(strided), ref.cogvlm_expert_ids(strided))


def test_out_of_range_ids_without_validation_give_nan_rows(device):
    x = torch.randn(6, 8, device=device)
    w = _weights(device, 2, 4, 8, torch.float32)
    ids = torch.tensor([0, 1, 2, -1, 1, 0], device=device)
    y = expert_linear(x, w, ids, validate_ids=False)
    assert torch.isnan(y[2:4]).all() and torch.isfinite(y[[0, 1, 4, 5]]).all()


def test_reference_backend_when_triton_cannot_run(monkeypatch):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert EXPERT_LINEAR.select(torch.randn(4, 8)) == "reference"


def test_opcheck(device):
    x = torch.randn(20, 24, device=device, requires_grad=True)
    w = _weights(device, 2, 32, 24, torch.float32).requires_grad_(True)
    ids = torch.zeros(20, dtype=torch.int32, device=device)
    ids[3:15] = 1
    w0, w1 = (t.detach().clone().requires_grad_(True) for t in w)
    torch.library.opcheck(torch.ops.vlmkern.expert_linear.default, (x, [w0, w1], ids))
    torch.library.opcheck(torch.ops.vlmkern.expert_linear.default, (x, [w0, w1, w0.detach() * 2], ids))
    xd = x.detach()  # backward-only op: no autograd formula of its own
    torch.library.opcheck(torch.ops.vlmkern.routed_tn.default, (xd, xd, ids, 2, 0, None, 1.0, 1.0))


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_compile_fullgraph_forward_backward(backend, device):
    torch._dynamo.reset()
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    w = _weights(device, 2, 24, 16, torch.float32).requires_grad_(True)
    types = _cogvlm_types(2, 9, 5, device)

    def f(x, w):
        return expert_linear(x, w, cogvlm_expert_ids(types)).square().sum()

    torch.compile(f, fullgraph=True, backend="aot_eager")(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    f(x, w).backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(expert_ids=torch.tensor([[0, 1, 2, 0, 1]])), ValueError, r"expert_ids must lie in \[0, num_experts=2\)"),
    (dict(expert_ids=torch.tensor([[0, -1, 0, 0, 1]])), ValueError, r"expert_ids must lie in \[0, num_experts=2\)"),
    (dict(expert_ids=torch.zeros(1, 6, dtype=torch.long)), ValueError, r"expert_ids must have shape x.shape\[:-1\]"),
    (dict(expert_ids=torch.zeros(5, dtype=torch.long)), ValueError, r"expert_ids must have shape x.shape\[:-1\]"),
    (dict(expert_ids=torch.zeros(1, 5)), TypeError, "expert_ids must have dtype"),
    (dict(weights=torch.randn(12, 8)), ValueError, "weights must be 3-D"),
    (dict(weights=torch.randn(0, 12, 8)), ValueError, "at least one expert"),
    (dict(weights=torch.randn(2, 12, 9)), ValueError, "in_features=9"),
    (dict(weights=torch.randn(2, 12, 8).half()), TypeError, "weights dtype float16 must match x dtype float32"),
    (dict(weights=[torch.randn(12, 8), torch.randn(12, 9)]), ValueError, r"weights\[1\] has shape \(12, 9\)"),
    (dict(weights=[torch.randn(12, 8), torch.randn(12, 8).half()]), TypeError, r"weights\[1\] dtype float16"),
    (dict(weights=[]), ValueError, "at least one expert"),
    (dict(weights="w"), TypeError, "weights must be a"),
    (dict(x=torch.ones(1, 5, 8, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(x="not a tensor"), TypeError, "x must be a torch.Tensor"),
    (dict(expert_ids=torch.zeros(1, 5, dtype=torch.long, device="meta")), ValueError, "expert_ids is on meta"),
])
def test_bad_input_names_the_argument(bad, exc, match):
    args = dict(x=torch.randn(1, 5, 8), weights=torch.randn(2, 12, 8), expert_ids=torch.zeros(1, 5, dtype=torch.long))
    args.update(bad)
    with pytest.raises(exc, match=match):
        expert_linear(**args)


def test_cogvlm_expert_ids_take_bool_types_as_the_original():
    """``get_expert_mask`` compares ``token_type_ids == VISION_TOKEN_TYPE`` (1), which a bool tensor takes."""
    types = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)) > 0.4
    assert torch.equal(cogvlm_expert_ids(types), cogvlm_expert_ids(types.long()))
    assert torch.equal(cogvlm_expert_ids(types).bool(), _original_get_expert_mask(types)[0])


def test_cogvlm_expert_ids_bad_input():
    with pytest.raises(ValueError, match="token_type_ids must be 2-D"):
        cogvlm_expert_ids(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="token_type_ids must have dtype"):
        cogvlm_expert_ids(torch.zeros(1, 5))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_cuda_no_host_sync_forward_backward(backend):
    types = _cogvlm_types(2, 300, 258, "cuda")
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = _weights("cuda", 2, 384, 256, torch.bfloat16).requires_grad_(True)
    grad = torch.randn(2, 300, 384, device="cuda", dtype=torch.bfloat16)
    assert_no_host_sync(lambda: expert_linear(x, w, cogvlm_expert_ids(types)).backward(grad))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_cuda_cogvlm_qkv_shape_bf16(backend):
    # CogVLM-17B qkv: 4096 -> 12288 per expert, 1227 vision-type tokens after BOS, 20 text tokens.
    types = _cogvlm_types(1, 1248, 1227, "cuda")
    x = torch.randn(1, 1248, 4096, device="cuda").bfloat16()
    w = _weights("cuda", 2, 12288, 4096, torch.bfloat16)
    _check(x, w, cogvlm_expert_ids(types))


@pytest.mark.parametrize("runs", [1, 3, 40])
def test_cpu_row_runs_and_scattered_rows_agree(runs):
    """Contiguous vision runs go through row views, many runs through an index: same math, same gradients."""
    torch.manual_seed(0)
    M, K, N = 4 * runs + 5, 24, 20
    ids = torch.zeros(M, dtype=torch.int32)
    for i in range(runs):
        ids[1 + 4 * i: 3 + 4 * i] = 1
    x = torch.randn(M, K, dtype=torch.float32, requires_grad=True)
    w = torch.randn(2, N, K, dtype=torch.float32, requires_grad=True)
    got = expert_linear(x, w, ids)
    expected = ref.expert_linear(x, w, ids)
    g = torch.randn_like(got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for u, v in zip(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(expected, (x, w), g)):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-4)
