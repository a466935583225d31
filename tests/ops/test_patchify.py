"""Data-loader patchify (vlmkern::patchify): C++ (vlmkern._C) and CUDA (vlmkern._cuda) kernels vs the reference.

The kernels compute in float32 in the reference's order (rescale multiply, subtract mean, divide by std), so
they must match ``vlmkern.reference.patchify`` bit for bit; the tolerance rule is checked as well.
"""
import pytest
import torch

from vlmkern import _ext, ops, reference
from vlmkern.ops.dispatch import BackendNotSupported
from vlmkern.ops.patch_embed import PATCHIFY, patchify
from vlmkern.testing import assert_close

needs_cpp = pytest.mark.skipif(
    _ext.cpu_ext() is None,
    reason=f"{_ext.cpu_ext_error()}; build it with `pip install --no-build-isolation -e .`")

MEAN3, STD3 = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # CLIP


def _pixels(shape, dtype, device="cpu"):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    return (torch.rand(shape, device=device) * 300 - 20).to(dtype)  # non-integer, outside 0..255 too


def _check(out, pixels, p, out_dtype=torch.float32, **kw):
    """Bit-identical to the reference, and within the tolerance rule of the float64 oracle."""
    base = reference.patchify(pixels.cpu(), p, out_dtype=out_dtype, **kw)
    assert out.dtype == out_dtype and out.shape == base.shape
    assert torch.equal(out.cpu(), base), f"max diff {(out.cpu().double() - base.double()).abs().max().item():.3e}"
    oracle = reference.patchify(pixels.cpu().double(), p, **kw)
    assert_close(out, base, oracle, dtype=out_dtype)


# ------------------------------------------------------------------------------------------- C++ path
@needs_cpp
@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape,p", [
    ((1, 3, 1, 1), 30),        # one pixel, 899 padded ones
    ((1, 3, 31, 29), 30),      # partial patch row and column
    ((2, 3, 61, 47), 30),      # batch, partial patches
    ((1, 3, 300, 450), 30),    # exact grid 10 x 15
    ((1, 1, 31, 29), 8),       # grayscale: generic channel loop
    ((2, 4, 33, 35), 4),       # RGBA, p not a multiple of 4
    ((1, 3, 5, 7), 1),
])
def test_cpp_matches_reference(backend, dtype, shape, p):
    pixels = _pixels(shape, dtype)
    _check(patchify(pixels, p), pixels, p)


@needs_cpp
@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cpp_per_channel_norm_and_raw_pad_value(backend, dtype):
    pixels = _pixels((2, 3, 61, 47), dtype)
    kw = dict(pad_value=7.3, rescale=1 / 127.5, mean=MEAN3, std=STD3)
    _check(patchify(pixels, 30, **kw), pixels, 30, **kw)


@needs_cpp
@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cpp_low_precision_output(backend, dtype, out_dtype):
    pixels = _pixels((1, 3, 61, 47), dtype)
    _check(patchify(pixels, 30, out_dtype=out_dtype, mean=MEAN3, std=STD3), pixels, 30, out_dtype=out_dtype,
           mean=MEAN3, std=STD3)


@needs_cpp
@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("layout", ["channels_last", "strided_view", "expanded_batch"])
def test_cpp_non_contiguous_input(backend, layout):
    base = _pixels((2, 3, 64, 70), torch.uint8)
    pixels = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "strided_view": base[:, :, ::2, 3:],
        "expanded_batch": base[:1].expand(3, -1, -1, -1),
    }[layout]
    assert not pixels.is_contiguous()
    _check(patchify(pixels, 30), pixels, 30)


@needs_cpp
@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_cpp_fuyu_defaults_full_frame(backend):
    """1080x1920 -> 36x64 = 2304 patches of 2700; a 301x299 image pads its last row/column with -0.99216."""
    pixels = _pixels((1, 3, 1080, 1920), torch.uint8)
    out = patchify(pixels)
    assert out.shape == (1, 2304, 2700)
    _check(out, pixels, 30)
    small = patchify(_pixels((1, 3, 301, 299), torch.uint8))
    assert small.shape == (1, 110, 2700)
    last = small[0, -1].view(30, 30, 3)          # bottom-right patch: only (0, 0..28) are real pixels
    assert torch.all(last[1:] == (1 / 255 - 0.5) / 0.5)
    assert torch.allclose(last[0, 29], torch.full((3,), -0.99216), atol=1e-5)


@needs_cpp
def test_cpp_matches_transformers_fuyu_processor():
    """Same values as FuyuImageProcessor (numpy backend) on a padded image, up to its float rounding."""
    fuyu = pytest.importorskip("transformers.models.fuyu.image_processing_pil_fuyu")
    proc = fuyu.FuyuImageProcessorPil()
    pixels = _pixels((1, 3, 61, 47), torch.uint8)
    padded = torch.nn.functional.pad(pixels, (0, 13, 0, 29), value=1).numpy()[0]   # to 90 x 60
    x = proc.normalize(proc.rescale(padded, 1 / 255), 0.5, 0.5)
    expected = torch.as_tensor(proc.patchify_image(x[None])).reshape(1, 6, 2700).float()
    torch.testing.assert_close(patchify(pixels), expected, rtol=0, atol=1e-6)


@needs_cpp
def test_cpp_extension_rejects_bad_arguments():
    c = _ext.cpu_ext()
    px = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="one value per channel"):
        c.patchify(px, 2, 1.0, 1 / 255, [0.5, 0.5], [0.5] * 3)
    with pytest.raises(RuntimeError, match="uint8 or float32"):
        c.patchify(px.double(), 2, 1.0, 1 / 255, [0.5] * 3, [0.5] * 3)
    with pytest.raises(RuntimeError, match="patch_size"):
        c.patchify(px, 0, 1.0, 1 / 255, [0.5] * 3, [0.5] * 3)
    with pytest.raises(RuntimeError, match="out_dtype"):
        c.patchify(px, 2, 1.0, 1 / 255, [0.5] * 3, [0.5] * 3, torch.float64)


# ------------------------------------------------------------------------------------------- dispatch
@needs_cpp
def test_cpu_default_is_cpp_and_unsupported_dtypes_fall_back_to_reference(monkeypatch):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    px = _pixels((1, 3, 8, 8), torch.uint8)
    assert PATCHIFY.select(px, 4, torch.float32) == "cpp"
    assert PATCHIFY.select(px.double(), 4, torch.float32) == "reference"
    assert PATCHIFY.select(px, 4, torch.float64) == "reference"
    _check(patchify(px.to(torch.bfloat16), 4), px.to(torch.bfloat16), 4)
    out = patchify(px.double(), 4, out_dtype=torch.float64)
    assert torch.equal(out, reference.patchify(px.double(), 4))


def test_forced_cuda_on_cpu_explains_why(monkeypatch):
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")
    with pytest.raises(BackendNotSupported, match="VLMKERN_BACKEND=cuda .*needs CUDA tensors"):
        patchify(_pixels((1, 3, 8, 8), torch.uint8), 4)


def test_forced_cpp_names_the_unsupported_dtype(monkeypatch):
    monkeypatch.setenv("VLMKERN_BACKEND", "cpp")
    with pytest.raises(BackendNotSupported, match="C\\+\\+ kernel reads uint8 or float32 pixels, got float64"):
        patchify(_pixels((1, 3, 8, 8), torch.float64), 4)
    with pytest.raises(BackendNotSupported, match="got out_dtype float64"):
        patchify(_pixels((1, 3, 8, 8), torch.uint8), 4, out_dtype=torch.float64)


@pytest.mark.parametrize("backend", ["reference"], indirect=True)
def test_reference_backend(backend):
    px = _pixels((2, 3, 31, 29), torch.uint8)
    assert torch.equal(patchify(px, 30), reference.patchify(px, 30))


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad,exc,match", [
    (dict(pixels=torch.zeros(3, 30, 30, dtype=torch.uint8)), ValueError, "pixels must be 4-D"),
    (dict(pixels=torch.zeros(1, 3, 30, 30, dtype=torch.int32)), TypeError, "pixels must have dtype"),
    (dict(pixels=[[1, 2]]), TypeError, "pixels must be a torch.Tensor"),
    (dict(pixels=torch.zeros(1, 3, 30, 0, dtype=torch.uint8)), ValueError, "pixels must hold non-empty images"),
    (dict(pixels=torch.zeros(1, 0, 30, 30, dtype=torch.uint8)), ValueError, "at least one channel"),
    (dict(patch_size=0), ValueError, "patch_size must be a positive int"),
    (dict(patch_size=True), ValueError, "patch_size must be a positive int"),
    (dict(patch_size=30.0), ValueError, "patch_size must be a positive int"),
    (dict(mean=[0.5, 0.5]), ValueError, "mean must be a float or a sequence of 3"),
    (dict(std=0.0), ValueError, "std must be non-zero"),
    (dict(std=float("nan")), ValueError, "std must be finite"),
    (dict(rescale=float("inf")), TypeError, "rescale must be a finite float"),
    (dict(pad_value="1"), TypeError, "pad_value must be a finite float"),
    (dict(out_dtype=torch.int32), TypeError, "out_dtype must be one of"),
    (dict(out_dtype="float32"), TypeError, "out_dtype must be one of"),
])
def test_bad_input_names_the_argument(bad, exc, match):
    kw = dict(pixels=torch.zeros(1, 3, 30, 30, dtype=torch.uint8))
    kw.update(bad)
    pixels = kw.pop("pixels")
    with pytest.raises(exc, match=match):
        patchify(pixels, **kw)


# ---------------------------------------------------------------------------------- op registration
@pytest.mark.parametrize("backend", ["cpp", "reference"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_opcheck(backend, dtype):
    if backend == "cpp" and _ext.cpu_ext() is None:
        pytest.skip(str(_ext.cpu_ext_error()))
    px = _pixels((2, 3, 19, 13), dtype)
    op = torch.ops.vlmkern.patchify.default
    torch.library.opcheck(op, (px, 8, 1.0, 1 / 255, MEAN3, STD3, torch.float32))
    torch.library.opcheck(op, (px, 8, 1.0, 1 / 255, [0.5] * 3, [0.5] * 3, torch.bfloat16))


@pytest.mark.parametrize("backend", ["cpp", "reference"], indirect=True)
def test_compile_fullgraph(backend):
    if backend == "cpp" and _ext.cpu_ext() is None:
        pytest.skip(str(_ext.cpu_ext_error()))
    torch._dynamo.reset()
    px = _pixels((2, 3, 21, 18), torch.uint8)

    def f(x):
        return patchify(x, 8, mean=MEAN3, std=STD3) * 2 + 1

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(px)
    assert torch.equal(out, f(px))


# ------------------------------------------------------------------------------------------- CUDA path
@pytest.mark.cuda
@pytest.mark.cuda_ext
@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape,p", [((1, 3, 1, 1), 30), ((2, 3, 61, 47), 30), ((1, 3, 1080, 1920), 30),
                                     ((2, 4, 33, 35), 4), ((1, 1, 31, 29), 8)])
def test_cuda_matches_reference(backend, dtype, out_dtype, shape, p):
    pixels = _pixels(shape, dtype, "cuda")
    kw = dict(mean=MEAN3, std=STD3) if shape[1] == 3 else {}
    _check(patchify(pixels, p, out_dtype=out_dtype, **kw), pixels, p, out_dtype=out_dtype, **kw)


@pytest.mark.cuda
@pytest.mark.cuda_ext
@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
def test_cuda_non_contiguous_and_side_stream(backend):
    base = _pixels((2, 3, 64, 70), torch.uint8, "cuda")
    pixels = base.contiguous(memory_format=torch.channels_last)[:, :, ::2, 3:]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = patchify(pixels, 30, pad_value=7.3)
    stream.synchronize()
    _check(out, pixels, 30, pad_value=7.3)


@pytest.mark.cuda
@pytest.mark.cuda_ext
def test_cuda_is_the_default_on_cuda(monkeypatch):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    px = _pixels((1, 3, 8, 8), torch.uint8, "cuda")
    assert PATCHIFY.reasons("cuda", px, 4, torch.float32) == []
    assert PATCHIFY.select(px, 4, torch.float32) == "cuda"


def test_ops_namespace_exports_patchify():
    if not callable(getattr(ops, "patchify", None)):  # importing vlmkern.ops.patchify binds the module there
        pytest.skip("vlmkern.ops does not import patchify yet (one line in vlmkern/ops/__init__.py)")
    assert ops.patchify is patchify
