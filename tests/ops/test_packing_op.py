"""Gather-GEMM (vlmkern::gather_linear): Triton kernel vs the reference, forward and gradients, opcheck, compile,
bad input."""
import pytest
import torch

from vlmkern.ops.projector import gather_linear, gather_linear_gelu
from vlmkern.reference import packing as reference
from vlmkern.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(device, dtype, *, G, T, C, R, P, N, E=0, fill=False, sliced=True, index_dtype=torch.int64):
    """x is a (G, T, C) view with a dropped first token (as ``hidden_states[:, 1:]``); index mixes x rows, extra
    rows (reused many times, like a separator) and, with ``fill``, fill rows."""
    base = torch.randn(G, T + 1, C, device=device)
    x = (base[:, 1:] if sliced else base[:, :T].contiguous()).to(dtype)
    M = G * T
    index = torch.randint(0, M + E, (R, P), device=device)
    if E and R:
        index[::3] = M + torch.arange(P, device=device) % E      # many rows read the extra rows
    if fill and R:
        index[1::5, 0] = -1
    w = (torch.randn(N, P * C, device=device) / (P * C) ** 0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    extra = torch.randn(E, C, device=device).to(dtype) if E else None
    f = torch.randn(N, device=device).to(dtype) if fill else None
    return x, index.to(index_dtype), w, b, extra, f


def _run(fn, x, index, w, b, extra, f, grad, gelu):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, extra, f)]
    x_, w_, b_, e_, f_ = leaves
    if gelu:
        out = fn(x_, index, w_, b_, extra=e_)
    else:
        out = fn(x_, index, w_, b_, extra=e_, fill=f_)
    out.backward(grad.to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _check(x, index, w, b, extra, f, gelu, dtype):
    ours_fn = gather_linear_gelu if gelu else gather_linear
    ref_fn = reference.gather_linear_gelu if gelu else reference.gather_linear
    grad = torch.randn(index.shape[0], w.shape[0], device=x.device)
    out, g = _run(ours_fn, x, index, w, b, extra, f, grad, gelu)
    base, gb = _run(ref_fn, x, index, w, b, extra, f, grad, gelu)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    exact, ge = _run(ref_fn, d(x), index, d(w), d(b), d(extra), d(f), grad, gelu)
    assert out.dtype == dtype and out.shape == exact.shape
    assert_close(out, base, exact, name="out")
    for name, o, bb, e in zip(("x", "weight", "bias", "extra", "fill"), g, gb, ge):
        if e is None:
            continue
        assert_close(o, bb, e, kind="grad", dtype=dtype, name=f"d{name}")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_piece_gelu_strided_rows(backend, device, dtype):
    # LLaVA-NeXT stage 1: 257 kept rows out of a (5, 16, 40) feature view with the CLS column dropped.
    _check(*_case(device, dtype, G=5, T=16, C=40, R=257, P=1, N=48), gelu=True, dtype=dtype)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_four_pieces_with_extra_rows(backend, device, dtype):
    # 4KHD stage 1: 2x2 merge = 4 pieces of C (C not a multiple of BLOCK_K), separator rows from `extra`.
    _check(*_case(device, dtype, G=3, T=16, C=24, R=77, P=4, N=40, E=8, index_dtype=torch.int32),
           gelu=True, dtype=dtype)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fill_rows_without_gelu(backend, device, dtype):
    # LLaVA-NeXT stage 2: every kept row placed, newline (fill) rows interleaved; 2-D contiguous x.
    x, index, w, b, _, f = _case(device, dtype, G=1, T=130, C=32, R=150, P=1, N=136, fill=True, sliced=False)
    _check(x[0], index, w, b, None, f, gelu=False, dtype=dtype)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("R", [1, 0])
def test_single_and_zero_rows(backend, device, R):
    x, index, w, b, extra, _ = _case(device, torch.float32, G=2, T=4, C=16, R=R, P=4, N=24, E=8)
    _check(x, index, w, b, extra, None, gelu=True, dtype=torch.float32)
    assert gather_linear(x, index, w, b, extra=extra).shape == (R, 24)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_no_bias(backend, device):
    x, index, w, _, _, f = _case(device, torch.float32, G=2, T=8, C=16, R=20, P=1, N=24, fill=True)
    out = gather_linear(x, index, w, None, fill=f)
    assert_close(out, reference.gather_linear(x, index, w, None, fill=f),
                 reference.gather_linear(x.double(), index, w.double(), None, fill=f.double()))


def test_reference_backend_is_default_on_cpu_without_interpreter(monkeypatch):
    from vlmkern.ops.projector import GATHER_LINEAR
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    x, index, w, *_ = _case("cpu", torch.float32, G=1, T=4, C=8, R=3, P=1, N=8)
    assert GATHER_LINEAR.select(x, index, w) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gather_linear(x, index, w)


def test_opcheck(device):
    x, index, w, b, extra, f = _case(device, torch.float32, G=2, T=4, C=8, R=11, P=2, N=16, E=4, fill=True)
    for t in (x, w, b, extra, f):
        t.requires_grad_(True)
    op = torch.ops.vlmkern.gather_linear.default
    torch.library.opcheck(op, (x, index.clamp_min(0), w, b, extra, None, True, True))
    torch.library.opcheck(op, (x, index, w, b, extra, f, False, False))
    torch.library.opcheck(op, (x.detach(), index.clamp(0, 7), w.detach(), None, None, None, True, False))


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_compile_fullgraph_forward_backward(backend, device):
    torch._dynamo.reset()
    x, index, w, b, extra, f = _case(device, torch.float32, G=2, T=8, C=16, R=19, P=2, N=16, E=4)
    for t in (x, w, extra):
        t.requires_grad_(True)

    def fn(x, w, extra):
        return gather_linear_gelu(x, index, w, b, extra=extra).square().sum()

    torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, extra).backward()
    got = [t.grad.clone() for t in (x, w, extra)]
    for t in (x, w, extra):
        t.grad = None
    fn(x, w, extra).backward()
    for g, t in zip(got, (x, w, extra)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)


def _bad_args():
    x = torch.zeros(2, 4, 8)
    return dict(x=x, index=torch.zeros(3, 2, dtype=torch.int64), weight=torch.zeros(6, 16), bias=None, extra=None,
                fill=None)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(x=torch.zeros(8)), ValueError, "x must have at least 2 dims"),
    (dict(x=torch.zeros(2, 4, 8, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(index=torch.zeros(3, 2, dtype=torch.float32)), TypeError, "index must have dtype"),
    (dict(index=torch.zeros(3, dtype=torch.int64)), ValueError, "index must be 2-D"),
    (dict(weight=torch.zeros(6, 8)), ValueError, "weight must have pieces\\*C = 2\\*8 = 16"),
    (dict(weight=torch.zeros(6, 16, dtype=torch.float16)), TypeError, "weight dtype"),
    (dict(bias=torch.zeros(5)), ValueError, "bias must have out_features=6"),
    (dict(extra=torch.zeros(2, 7)), ValueError, "extra must have x's width C=8"),
    (dict(fill=torch.zeros(5)), ValueError, "fill must have out_features=6"),
    (dict(index=torch.tensor([[0, 8]])), ValueError, "out of range: entries must lie in \\[0, 8\\)"),
    (dict(index=torch.tensor([[0, 10]]), extra=torch.zeros(2, 8)), ValueError, "\\[0, 10\\)"),
    (dict(index=torch.tensor([[-1, 0]])), ValueError, "needs fill="),
    (dict(index=torch.tensor([[1, -1]]), fill=torch.zeros(6)), ValueError, "out of range"),
    (dict(fill=torch.zeros(6, device="meta")), ValueError, "fill is on meta"),
])
def test_bad_input_names_the_argument(bad, exc, match):
    args = _bad_args()
    args.update(bad)
    with pytest.raises(exc, match=match):
        gather_linear(args["x"], args["index"], args["weight"], args["bias"], extra=args["extra"], fill=args["fill"])


def test_fill_row_ignores_its_other_pieces():
    x = torch.randn(4, 8)
    w = torch.randn(6, 16)
    f = torch.randn(6)
    out = gather_linear(x, torch.tensor([[-1, 99], [1, 2]]), w, fill=f)
    torch.testing.assert_close(out[0], f)
