"""The projector and patch_embed launchers pass, from their memoised launch plans, exactly the arguments their
argument builders give for the same inputs (the ones the offline build check compiles), and a plan is re-made
when anything it depends on changes (a stride, a dtype, a flag) on otherwise equal shapes."""
import pytest
import torch

from vlmkern.ops import dispatch
from vlmkern.ops.launch import cdiv, triton_type
from vlmkern.ops.patch_embed import _triton as pe
from vlmkern.ops.projector import _triton as pj


def _launches(monkeypatch, module) -> list:
    """Every launch ``module``'s launchers make, as (kernel, grid, all keyword arguments), run nowhere."""
    calls = []
    monkeypatch.setattr(module, "launch", lambda kernel, grid, args, rest: calls.append((kernel, grid,
                                                                                          {**args, **rest})))
    return calls


def _comparable(kwargs: dict) -> dict:
    """A tensor by its address and Triton type, anything else by its Python type (int, float, bool) and value."""
    return {k: (triton_type(v), v.data_ptr()) if isinstance(v, torch.Tensor) else (type(v).__name__, v)
            for k, v in kwargs.items()}


def _assert_launch(call, kernel, grid, args: dict, constexprs: dict) -> None:
    got_kernel, got_grid, got = call
    assert got_kernel is kernel and got_grid == grid
    assert _comparable(got) == _comparable({**args, **constexprs})


def _host(dtype) -> dict:
    return dict(UPCAST=dispatch.triton_interpreting(), INPUT_PRECISION=dispatch.dot_precision(dtype))


def _layouts(*shape, dtype=torch.float32):
    """The same logical shape twice: contiguous, then a strided view (every other column of a wider tensor)."""
    dense = torch.randn(*shape).to(dtype)
    wide = torch.randn(*shape[:-1], 2 * shape[-1]).to(dtype)[..., ::2]
    return [dense, wide]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("save_pre", [False, True])
def test_linear_gelu_launch_is_the_builders(monkeypatch, dtype, save_pre):
    calls = _launches(monkeypatch, pj)
    w, b = torch.randn(40, 24).to(dtype), torch.randn(40).to(dtype)
    cfg = pj.LINEAR_GELU_CONFIG[dtype.itemsize]
    for x in _layouts(70, 24, dtype=dtype):
        for bias in (b, None):
            out, pre = pj.linear_gelu(x, w, bias, save_pre)
            _assert_launch(calls.pop(), pj._linear_gelu_fwd_kernel,
                           (cdiv(70, cfg["BLOCK_M"]) * cdiv(40, cfg["BLOCK_N"]),),
                           pj._linear_gelu_args(x, w, bias, out, pre if save_pre else out),
                           dict(HAS_BIAS=bias is not None, SAVE_PRE=save_pre, **_host(dtype), **cfg))


def test_gelu_backward_launch_is_the_builders(monkeypatch):
    calls = _launches(monkeypatch, pj)
    for n in (5, 3000):
        grad, pre = torch.randn(n), torch.randn(n)
        dpre = pj.gelu_backward(grad, pre)
        _assert_launch(calls.pop(), pj._gelu_bwd_kernel, (cdiv(n, pj.GELU_BWD_CONFIG["BLOCK"]),),
                       pj._gelu_bwd_args(grad, pre, dpre), pj.GELU_BWD_CONFIG)


@pytest.mark.parametrize("x_dims", [2, 3, 4])
@pytest.mark.parametrize("flags", [(True, False, False, True), (True, True, False, False),
                                   (False, False, True, False)])
def test_gather_linear_launch_is_the_builders(monkeypatch, x_dims, flags):
    gelu, has_extra, has_fill, save_pre = flags
    calls = _launches(monkeypatch, pj)
    shape = {2: (12, 8), 3: (3, 4, 8), 4: (3, 2, 2, 8)}[x_dims]
    index = torch.randint(0, 12, (5, 2))
    w, b = torch.randn(6, 16), torch.randn(6)
    extra = torch.randn(2, 8) if has_extra else None
    fill = torch.randn(6) if has_fill else None
    cfg = pj.GATHER_LINEAR_CONFIGS[4]
    # a 4-D strided x cannot be grouped by a view: the launcher's reshape copies, read through the copy's strides
    for x in _layouts(*shape) + ([torch.randn(*shape).transpose(0, 1)] if x_dims == 4 else []):
        out, pre = pj.gather_linear(x, index, w, b, extra, fill, gelu, save_pre)
        call = calls.pop()
        expected = pj._gather_linear_args(pj.as_groups(x), index, w, b, extra, fill, out, pre if save_pre else out)
        if not pj.as_groups(x)._is_view():                     # a copy: its address is the launch's own
            expected["x_ptr"] = call[2]["x_ptr"]
            expected["e_ptr"] = extra if has_extra else call[2]["x_ptr"]
        _assert_launch(call, pj._gather_linear_fwd_kernel, (cdiv(5, cfg["BLOCK_M"]) * cdiv(6, cfg["BLOCK_N"]),),
                       expected, dict(HAS_BIAS=True, HAS_EXTRA=has_extra, HAS_FILL=has_fill, GELU=gelu,
                                      SAVE_PRE=save_pre, **_host(torch.float32), **cfg))


def _pixels(layout: str, dtype=torch.uint8) -> torch.Tensor:
    pixels = torch.randint(0, 256, (2, 3, 21, 17), dtype=torch.uint8).to(dtype)
    if layout == "channels_last":
        return pixels.contiguous(memory_format=torch.channels_last)
    return pixels


@pytest.mark.parametrize("pix_dtype", [torch.uint8, torch.float32])
def test_patchify_launch_is_the_builders(monkeypatch, pix_dtype):
    calls = _launches(monkeypatch, pe)
    p, mean, std = 5, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4]
    for layout in ("contiguous", "channels_last"):
        for pad_value in (1.0, 3.0):
            pixels = _pixels(layout, pix_dtype)
            out = pe.patchify(pixels, p, pad_value, 1 / 255, mean, std, torch.float16)
            B, nP, K = out.shape
            buf = out.as_strided((B * nP, cdiv(K, pe.K_ALIGN) * pe.K_ALIGN), (out.stride(1), 1))
            scale, shift = pe._scale_shift(1 / 255, mean, std, pixels.device)
            cfg = pe.PATCHIFY_CONFIG
            _assert_launch(calls.pop(), pe._patchify_kernel,
                           (cdiv(B * nP, cfg["BLOCK_M"]), cdiv(buf.shape[1], cfg["BLOCK_K"])),
                           pe._patchify_args(pixels, buf, scale, shift, p, pad_value), pe._patchify_constexprs(3, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_patch_embed_backward_launches_are_the_builders(monkeypatch, dtype):
    calls = _launches(monkeypatch, pe)
    p, mean, std = 5, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4]
    w = torch.randn(7, 75).to(dtype)
    size = dtype.itemsize
    dots = dict(upcast=dispatch.triton_interpreting(), precision=dispatch.dot_precision(dtype))
    for layout, grad in zip(("contiguous", "channels_last"), _layouts(2, 20, 7, dtype=dtype)):
        pixels = _pixels(layout, torch.float32)
        dw = pe.grad_weight(grad, pixels, w, p, 1.0, 1 / 255, mean, std)
        scale, shift = pe._scale_shift(1 / 255, mean, std, pixels.device)
        cfg = pe.BWD_WEIGHT_CONFIG[size]
        _assert_launch(calls.pop(), pe._patch_embed_bwd_weight_kernel,
                       (cdiv(7, cfg["BLOCK_N"]), cdiv(75, cfg["BLOCK_K"])),
                       pe._bwd_weight_args(pixels, grad.reshape(-1, 7), dw, scale, shift, p, 1.0),
                       pe._constexprs(3, p, cfg, **dots))
        dpix = pe.grad_pixels(grad, pixels, w, p, 1 / 255, std)
        scale, _ = pe._scale_shift(1 / 255, [0.0] * 3, std, pixels.device)
        cfg = pe.BWD_PIXELS_CONFIG[size]
        _assert_launch(calls.pop(), pe._patch_embed_bwd_pixels_kernel,
                       (cdiv(40, cfg["BLOCK_M"]), cdiv(75, cfg["BLOCK_K"])),
                       pe._bwd_pixels_args(grad.reshape(-1, 7), w, dpix, scale, p),
                       pe._constexprs(3, p, cfg, **dots))
