"""Patch embedding (vlmkern::patch_embed): the Triton backend (patchify kernel + torch GEMM forward, fused
backward kernels) vs the reference, forward and gradients."""
import pytest
import torch

from vlmkern import ops, reference
from vlmkern.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(device, B, C, H, W, N, p, dtype, pix_dtype=torch.uint8, bias=True):
    if pix_dtype == torch.uint8:
        pixels = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, device=device)
    else:
        pixels = (torch.rand(B, C, H, W, device=device) * 255).to(pix_dtype)
    weight = (torch.randn(N, C * p * p, device=device) / (C * p * p) ** 0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return pixels, weight, b


def _ref64(pixels, weight, bias, **kw):
    px = pixels if pixels.dtype == torch.uint8 else pixels.double()
    return reference.patch_embed(px, weight.double(), None if bias is None else bias.double(), **kw)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 30, 30, 16), (2, 3, 61, 47, 20), (1, 3, 1, 1, 24), (1, 3, 29, 95, 130)])
def test_forward_matches_reference(backend, device, dtype, shape):
    B, C, H, W, N = shape
    pixels, weight, bias = _inputs(device, B, C, H, W, N, 30, dtype)
    out = ops.patch_embed(pixels, weight, bias)
    nP = -(-H // 30) * -(-W // 30)
    assert out.shape == (B, nP, N) and out.dtype == dtype
    assert_close(out, reference.patch_embed(pixels, weight, bias), _ref64(pixels, weight, bias), name="out")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_forward_many_tiles(backend, device):
    # 3 images x 15x13 patches = 585 patch rows (19 patchify row tiles, the last partial) x 48 (+0 pad) columns.
    pixels, weight, bias = _inputs(device, 3, 3, 60, 49, 260, 4, torch.float16)
    out = ops.patch_embed(pixels, weight, bias, patch_size=4)
    assert_close(out, reference.patch_embed(pixels, weight, bias, patch_size=4),
                 _ref64(pixels, weight, bias, patch_size=4), name="out")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference(backend, device, dtype):
    kw = dict(patch_size=8, mean=[0.48, 0.46, 0.41], std=[0.27, 0.26, 0.28], pad_value=0.0)
    pixels, weight, bias = _inputs(device, 2, 3, 19, 27, 40, 8, dtype, pix_dtype=torch.float32)
    grad = torch.randn(2, 3 * 4, 40, device=device).to(dtype)

    def grads(fn, px, w, b):
        px, w, b = (t.detach().clone().requires_grad_(True) for t in (px, w, b))
        fn(px, w, b, **kw).backward(grad.to(w.dtype))
        return px.grad, w.grad, b.grad

    ours = grads(ops.patch_embed, pixels, weight, bias)
    base = grads(reference.patch_embed, pixels, weight, bias)
    exact = grads(reference.patch_embed, pixels.double(), weight.double(), bias.double())
    for name, o, b_, e in zip(("pixels", "weight", "bias"), ours, base, exact):
        assert_close(o, b_, e, kind="grad", dtype=dtype, name=f"d{name}")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_float_pixels_non_contiguous_and_per_channel_norm(backend, device):
    pixels = (torch.rand(2, 40, 33, 3, device=device) * 255).permute(0, 3, 1, 2)  # channels-last view
    assert not pixels.is_contiguous()
    weight = torch.randn(48, 3 * 16 * 16, device=device) * 0.05
    kw = dict(patch_size=16, mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7], pad_value=3.0, rescale=0.01)
    out = ops.patch_embed(pixels, weight, **kw)
    assert_close(out, reference.patch_embed(pixels, weight, **kw),
                 reference.patch_embed(pixels.double(), weight.double(), **kw), name="out")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_padding_uses_raw_pad_value(backend, device):
    # A 1x1 image: all but one pixel of the single patch are padding.
    pixels = torch.full((1, 3, 1, 1), 200, dtype=torch.uint8, device=device)
    weight = torch.eye(3 * 4 * 4, device=device)[:48]
    out = ops.patch_embed(pixels, weight, patch_size=4)
    pad_norm = (1.0 / 255 - 0.5) / 0.5
    expected = torch.full((48,), pad_norm, device=device)
    expected[:3] = (200 / 255 - 0.5) / 0.5
    torch.testing.assert_close(out[0, 0], expected)


def _layout(pixels, layout):
    """The same values as ``pixels`` in another memory layout."""
    if layout == "channels_last":
        return pixels.contiguous(memory_format=torch.channels_last)
    if layout == "strided_view":          # every other row, offset columns, of a bigger image
        B, C, H, W = pixels.shape
        big = torch.zeros(B, C, 2 * H, W + 3, dtype=pixels.dtype, device=pixels.device)
        big[:, :, ::2, 3:] = pixels
        return big[:, :, ::2, 3:]
    return pixels


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pix_dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_view"])
def test_triton_patchify_kernel_matches_reference(backend, device, pix_dtype, out_dtype, layout):
    from vlmkern.ops.patch_embed import _triton
    B, C, H, W, p = 2, 3, 31, 47, 10          # 4 x 5 patches, partial last row and column; K = 300 -> 304
    pixels, _, _ = _inputs(device, B, C, H, W, 1, p, out_dtype, pix_dtype=pix_dtype)
    pixels = _layout(pixels, layout)
    kw = dict(pad_value=7.0, rescale=1 / 127.5, mean=[0.48, 0.46, 0.41], std=[0.27, 0.26, 0.28])
    out = _triton.patchify(pixels, p, kw["pad_value"], kw["rescale"], kw["mean"], kw["std"], out_dtype)
    base = reference.patchify(pixels, p, out_dtype=out_dtype, **kw)
    assert out.shape == base.shape == (B, 20, 300) and out.dtype == out_dtype
    assert_close(out, base, reference.patchify(pixels.double(), p, **kw), name="patches")
    # Rows are 304 elements apart (16-element aligned) and the 4 padding columns hold zeros.
    assert out.stride() == (20 * 304, 304, 1)
    padded = out.as_strided((B * 20, 304), (304, 1))
    assert torch.equal(padded[:, 300:], torch.zeros_like(padded[:, 300:]))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_forward_non_contiguous_uint8_pixels(backend, device):
    pixels, weight, bias = _inputs(device, 2, 3, 31, 47, 24, 10, torch.float16)
    pixels = _layout(pixels, "strided_view")
    out = ops.patch_embed(pixels, weight, bias, patch_size=10)
    assert_close(out, reference.patch_embed(pixels, weight, bias, patch_size=10),
                 _ref64(pixels, weight, bias, patch_size=10), name="out")


def test_reference_backend_is_default_on_cpu_without_interpreter(monkeypatch):
    from vlmkern.ops.patch_embed import PATCH_EMBED
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    px, w, _ = _inputs("cpu", 1, 3, 30, 30, 8, 30, torch.float32)
    assert PATCH_EMBED.select(px, w) == "reference"
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.patch_embed(px, w)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_opcheck(backend, device):
    pixels, weight, bias = _inputs(device, 1, 3, 37, 31, 16, 8, torch.float32, pix_dtype=torch.float32)
    pixels.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    op = torch.ops.vlmkern.patch_embed.default
    torch.library.opcheck(op, (pixels, weight, bias, 8, 1.0, 1 / 255, [0.5] * 3, [0.5] * 3))
    torch.library.opcheck(op, (pixels.detach().to(torch.uint8), weight, None, 8, 1.0, 1 / 255, [0.5] * 3, [0.5] * 3))


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_an_empty_batch_gives_what_nn_linear_gives_on_no_patches(backend, device):
    pixels, weight, bias = _inputs(device, 0, 3, 21, 18, 16, 8, torch.float32, pix_dtype=torch.float32)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    out = ops.patch_embed(pixels, weight, bias, patch_size=8)
    assert out.shape == (0, 9, 16) and out.dtype == weight.dtype
    out.sum().backward()             # nn.Linear on no rows: zero gradients, not None
    assert not weight.grad.any() and not bias.grad.any()
    patches = ops.patchify(pixels.to(torch.uint8), 8, out_dtype=torch.float16)
    assert patches.shape == (0, 9, 192) and patches.dtype == torch.float16


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_compile_fullgraph_forward_backward(backend, device):
    torch._dynamo.reset()
    pixels, weight, bias = _inputs(device, 1, 3, 21, 18, 16, 8, torch.float32, pix_dtype=torch.float32)
    weight.requires_grad_(True)
    pixels.requires_grad_(True)

    def f(px, w, b):
        return ops.patch_embed(px, w, b, patch_size=8).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(pixels, weight, bias)
    loss.backward()
    gw, gp = weight.grad.clone(), pixels.grad.clone()
    weight.grad = pixels.grad = None
    f(pixels, weight, bias).backward()
    torch.testing.assert_close(gw, weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gp, pixels.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(pixels=torch.zeros(3, 30, 30, dtype=torch.uint8)), ValueError, "pixels must be 4-D"),
    (dict(pixels=torch.zeros(1, 4, 30, 30, dtype=torch.uint8)), ValueError, "pixels has C=4"),
    (dict(pixels=torch.zeros(1, 3, 30, 30, dtype=torch.int32)), TypeError, "pixels must have dtype"),
    (dict(pixels=torch.zeros(1, 3, 0, 30, dtype=torch.uint8)), ValueError, "pixels must hold non-empty images"),
    (dict(weight=torch.zeros(8, 2701)), ValueError, "weight must have C\\*patch_size\\*\\*2 = 2700"),
    (dict(weight=torch.zeros(8, 2700, dtype=torch.int64)), TypeError, "weight must have dtype"),
    (dict(bias=torch.zeros(9)), ValueError, "bias must have out_features=8"),
    (dict(bias=torch.zeros(8, dtype=torch.float16)), TypeError, "bias dtype"),
    (dict(patch_size=0), ValueError, "patch_size"),
    (dict(mean=[0.5, 0.5]), ValueError, "mean must be"),
    (dict(std=0.0), ValueError, "std must be non-zero"),
    (dict(bias=torch.zeros(8, device="meta")), ValueError, "bias is on meta"),
])
def test_bad_input_names_the_argument(bad, exc, match):
    args = dict(pixels=torch.zeros(1, 3, 30, 30, dtype=torch.uint8), weight=torch.zeros(8, 2700), bias=None)
    kw = {}
    for k, v in bad.items():
        (args if k in args else kw)[k] = v
    with pytest.raises(exc, match=match):
        ops.patch_embed(args["pixels"], args["weight"], args["bias"], **kw)


def test_kept_scalar_normalisation_follows_the_values():
    """Scalar mean / std give per-channel lists kept between calls: each value (0.0 and -0.0 apart) still gets
    its own, and a bad value raises on every call."""
    from vlmkern.ops.patch_embed import _norm_lists
    for mean in (0.0, -0.0, 0.0, 2, 0.5):
        for std in (0.5, -1.0, 3):
            mean_l, std_l = _norm_lists(mean, std, 3)
            assert [(str(m), str(s)) for m, s in zip(mean_l, std_l)] == [(str(float(mean)), str(float(std)))] * 3
    for _ in range(2):
        with pytest.raises(ValueError, match="std must be non-zero"):
            _norm_lists(0.5, 0.0, 3)
        with pytest.raises(ValueError, match="mean must be finite"):
            _norm_lists(float("nan"), 0.5, 3)


@pytest.mark.parametrize("name, bad", [("mean", "x"), ("std", None), ("mean", True), ("std", [0.5, True, 0.5]),
                                       ("mean", [0.5, "a", 0.5])])
def test_mean_and_std_of_another_type_are_named(name, bad):
    """A string, None, a bool (not a mean) or a list holding one: TypeError naming the argument, on both ops."""
    pixels, w = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8), torch.randn(4, 48)
    with pytest.raises(TypeError, match=f"{name} must be a float, a sequence of floats or a tensor"):
        ops.patch_embed(pixels, w, patch_size=4, **{name: bad})
    with pytest.raises(TypeError, match=f"{name} must be a float, a sequence of floats or a tensor"):
        ops.patchify(pixels, patch_size=4, **{name: bad})


def test_mean_and_std_take_arrays_and_numpy_scalars():
    np = pytest.importorskip("numpy")
    pixels, w = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8), torch.randn(4, 48)
    want = ops.patch_embed(pixels, w, patch_size=4, mean=[0.4, 0.5, 0.6], std=0.25)
    got = ops.patch_embed(pixels, w, patch_size=4, mean=np.array([0.4, 0.5, 0.6], dtype=np.float64),
                          std=np.float32(0.25))
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("hw", [(1080, 1920), (480, 640), (301, 299)])
def test_cuda_real_fuyu_shapes_bf16(backend, hw):
    H, W = hw
    pixels, weight, bias = _inputs("cuda", 2, 3, H, W, 4096, 30, torch.bfloat16)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    out = ops.patch_embed(pixels, weight, bias)
    assert_close(out, reference.patch_embed(pixels, weight, bias), _ref64(pixels, weight, bias), name="out")
    grad = torch.randn_like(out)
    out.backward(grad)
    exact_w = weight.detach().double().requires_grad_(True)
    reference.patch_embed(pixels, exact_w, bias.detach().double()).backward(grad.double())
    wb = weight.detach().clone().requires_grad_(True)
    reference.patch_embed(pixels, wb, bias.detach()).backward(grad)
    assert_close(weight.grad, wb.grad, exact_w.grad, kind="grad", dtype=torch.bfloat16, name="dweight")
