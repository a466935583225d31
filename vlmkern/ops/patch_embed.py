"""``vlmkern::patch_embed``: fused Fuyu patch embedding (the data-loader patchify is in ``ops/patchify.py``).

Shapes: ``pixels (B, C, H, W)`` uint8 or float in raw units; ``weight (out, C*p*p)``; ``bias (out,)``;
result ``(B, ceil(H/p)*ceil(W/p), out)`` in ``weight.dtype``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from vlmkern import reference
from vlmkern.ops import dispatch as _dispatch
from vlmkern.ops.dispatch import OpDispatch, register
from vlmkern.ops.checks import autocast_inputs, check_finite_scalar, check_same_device, check_tensor, int32_offset_reasons, INT32_MAX

_FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32)
_PIXEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------- checks
def _norm_list(value, name: str, channels: int) -> list[float]:
    if isinstance(value, Tensor):
        if value.device.type == "meta":
            raise ValueError(f"{name} must hold values (a float, a sequence or a tensor with data), got a meta tensor")
        value = value.detach().cpu().reshape(-1).tolist()
    vals = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ValueError(f"{name} must be a float or a sequence of {channels} floats (one per channel), got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be finite, got {vals}")
    return vals


def check_pixels(pixels, patch_size) -> None:
    """``pixels (B, C, H, W)`` with at least one non-empty image, and a positive int ``patch_size``."""
    check_tensor(pixels, "pixels", ndim=4, dtypes=_PIXEL_DTYPES, shape_doc="(B, C, H, W)")
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    B, C, H, W = pixels.shape
    if B == 0 or H == 0 or W == 0:
        raise ValueError(f"pixels must hold at least one non-empty image, got shape {tuple(pixels.shape)}")
    if C == 0:
        raise ValueError("pixels must have at least one channel")


def check_scalars(pad_value, rescale) -> None:
    """``pad_value`` and ``rescale`` are finite floats (TypeError naming the argument)."""
    check_finite_scalar(pad_value, "pad_value")
    check_finite_scalar(rescale, "rescale")


def _check_patch_embed(pixels, weight, bias, patch_size) -> None:
    check_pixels(pixels, patch_size)
    check_tensor(weight, "weight", ndim=2, dtypes=_FLOAT_WEIGHTS, shape_doc="(out_features, C*patch_size**2)")
    B, C, H, W = pixels.shape
    if weight.shape[1] != C * patch_size * patch_size:
        expected = weight.shape[1] / (patch_size * patch_size)
        raise ValueError(
            f"pixels has C={C} channels, so weight must have C*patch_size**2 = {C * patch_size ** 2} columns; "
            f"weight has {weight.shape[1]} (= {expected:g} channels of {patch_size}x{patch_size})")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=_FLOAT_WEIGHTS, shape_doc="(out_features,)")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have out_features={weight.shape[0]} elements, got {bias.shape[0]}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
    check_same_device(pixels=pixels, weight=weight, bias=bias)


def _grid_shape(pixels: Tensor, patch_size: int) -> tuple[int, int, int, int, int]:
    B, C, H, W = pixels.shape
    return B, C, H, W, -(-W // patch_size)


# ------------------------------------------------------------------------------------------- dispatch
def _triton_reasons(pixels, weight, *_, **__) -> list[str]:
    why = _dispatch.triton_env_reasons(pixels.device)
    if weight.dtype not in _TRITON_WEIGHTS:
        why.append(f"weight dtype {weight.dtype} (the kernels take float16, bfloat16, float32; float64 is not "
                   f"supported by the kernels)")
    # Image and patch-row bases are 64-bit; channel, in-patch row/column and column offsets 32-bit, as are the
    # weight's column offsets and the pixel gradient's (contiguous) per-image offsets.
    B, C, H, W = pixels.shape
    if C * H * W > INT32_MAX:
        why.append(f"one image holds {C * H * W} elements (the pixel gradient is offset in int32 per image)")
    return why + int32_offset_reasons((1, 2, 3), pixels=pixels) + int32_offset_reasons((1,), weight=weight)


PATCH_EMBED = register(OpDispatch("patch_embed", {
    "triton": _triton_reasons,
    "reference": lambda *a, **k: [],
}))


def _scale_shift(rescale, mean, std, device) -> tuple[Tensor, Tensor]:
    scale = torch.tensor([rescale / s for s in std], dtype=torch.float32)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
    return scale.to(device, non_blocking=True), shift.to(device, non_blocking=True)


def _launch_params(weight_dtype: torch.dtype) -> tuple[bool, str]:
    # The interpreter's low-precision dot is not trustworthy (bf16): upcast there.
    return _dispatch.triton_interpreting(), _dispatch.dot_precision(weight_dtype)


# ------------------------------------------------------------------------------------- triton launches
def _triton_forward(pixels, weight, bias, p, pad_value, rescale, mean, std) -> Tensor:
    import triton
    from vlmkern.kernels.patch_embed import FWD_CONFIG, _patch_embed_fwd_kernel

    B, C, H, W = pixels.shape
    nH, nW = -(-H // p), -(-W // p)
    nP, N, K = nH * nW, weight.shape[0], weight.shape[1]
    M = B * nP
    out = torch.empty((B, nP, N), device=pixels.device, dtype=weight.dtype)
    if out.numel() == 0:                                   # no out_features: nothing to launch
        return out
    scale, shift = _scale_shift(rescale, mean, std, pixels.device)
    upcast, precision = _launch_params(weight.dtype)
    cfg = FWD_CONFIG[weight.element_size()]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    out2 = out.view(M, N)
    _patch_embed_fwd_kernel[grid](
        # the kernel reads bias densely (no stride argument)
        pixels, weight, bias.contiguous() if bias is not None else weight, out2, scale, shift,
        M, N, K, H, W, nW, nP, float(pad_value),
        *pixels.stride(), *weight.stride(), *out2.stride(),
        C=C, P=p, HAS_BIAS=bias is not None, UPCAST=upcast, INPUT_PRECISION=precision, **cfg)
    return out


def _triton_grad_weight(grad, pixels, weight, p, pad_value, rescale, mean, std) -> Tensor:
    import triton
    from vlmkern.kernels.patch_embed import BWD_WEIGHT_CONFIG, _patch_embed_bwd_weight_kernel

    B, C, H, W = pixels.shape
    nW = -(-W // p)
    N, K = weight.shape
    g = grad.reshape(-1, N)
    M, nP = g.shape[0], grad.shape[1]
    dw = torch.empty((N, K), device=weight.device, dtype=weight.dtype)
    if N == 0:
        return dw
    scale, shift = _scale_shift(rescale, mean, std, pixels.device)
    upcast, precision = _launch_params(weight.dtype)
    cfg = BWD_WEIGHT_CONFIG[weight.element_size()]
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]))
    _patch_embed_bwd_weight_kernel[grid](
        pixels, g, dw, scale, shift, M, N, K, H, W, nW, nP, float(pad_value),
        *pixels.stride(), *g.stride(), *dw.stride(),
        C=C, P=p, UPCAST=upcast, INPUT_PRECISION=precision, **cfg)
    return dw


def _triton_grad_pixels(grad, pixels, weight, p, rescale, std) -> Tensor:
    import triton
    from vlmkern.kernels.patch_embed import BWD_PIXELS_CONFIG, _patch_embed_bwd_pixels_kernel

    B, C, H, W = pixels.shape
    nW = -(-W // p)
    N, K = weight.shape
    g = grad.reshape(-1, N)
    M, nP = g.shape[0], grad.shape[1]
    dpix = torch.empty((B, C, H, W), device=pixels.device, dtype=pixels.dtype)
    if N == 0:                                             # no out_features: no gradient reaches the pixels
        return dpix.zero_()
    scale, _ = _scale_shift(rescale, [0.0] * C, std, pixels.device)
    upcast, precision = _launch_params(weight.dtype)
    cfg = BWD_PIXELS_CONFIG[weight.element_size()]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))
    _patch_embed_bwd_pixels_kernel[grid](
        g, weight, dpix, scale, M, N, K, H, W, nW, nP,
        *g.stride(), *weight.stride(), *dpix.stride(),
        C=C, P=p, UPCAST=upcast, INPUT_PRECISION=precision, **cfg)
    return dpix


# ------------------------------------------------------------------------------- reference backward
def _patches(pixels, p, pad_value, rescale, mean, std, dtype) -> Tensor:
    """Normalised patches for the non-Triton path: the C++ patchify where it can run (CPU), else torch."""
    from vlmkern.ops.patchify import PATCHIFY, _patchify_op  # patchify.py imports this module

    if PATCHIFY.select(pixels, p, dtype) == "cpp":
        return _patchify_op(pixels, p, pad_value, rescale, mean, std, dtype)
    return reference.patchify(pixels, p, pad_value=pad_value, rescale=rescale, mean=mean, std=std, out_dtype=dtype)


def _reference_forward(pixels, weight, bias, p, pad_value, rescale, mean, std) -> Tensor:
    return torch.nn.functional.linear(_patches(pixels, p, pad_value, rescale, mean, std, weight.dtype), weight, bias)


def _reference_grad_weight(grad, pixels, weight, p, pad_value, rescale, mean, std) -> Tensor:
    patches = _patches(pixels, p, pad_value, rescale, mean, std, weight.dtype)
    N, K = weight.shape
    return grad.reshape(-1, N).t().matmul(patches.reshape(-1, K))


def _reference_grad_pixels(grad, pixels, weight, p, rescale, std) -> Tensor:
    B, C, H, W = pixels.shape
    nH, nW = -(-H // p), -(-W // p)
    ct = torch.float64 if torch.float64 in (weight.dtype, pixels.dtype) else torch.float32
    dpatch = grad.matmul(weight).to(ct)                                # (B, nP, p*p*C)
    d = dpatch.reshape(B, nH, nW, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, nH * p, nW * p)
    d = d[:, :, :H, :W] * (rescale / torch.tensor(std, dtype=ct, device=d.device))[:, None, None]
    return d.to(pixels.dtype)


# ------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("vlmkern::patch_embed", mutates_args=())
def _patch_embed_op(pixels: Tensor, weight: Tensor, bias: Optional[Tensor], patch_size: int,
                    pad_value: float, rescale: float, mean: list[float], std: list[float]) -> Tensor:
    if PATCH_EMBED.select(pixels, weight) == "triton":
        return _triton_forward(pixels, weight, bias, patch_size, pad_value, rescale, mean, std)
    return _reference_forward(pixels, weight, bias, patch_size, pad_value, rescale, mean, std)


@_patch_embed_op.register_fake
def _(pixels, weight, bias, patch_size, pad_value, rescale, mean, std):
    B, _, H, W = pixels.shape
    nP = -(-H // patch_size) * -(-W // patch_size)
    return pixels.new_empty((B, nP, weight.shape[0]), dtype=weight.dtype)


@torch.library.custom_op("vlmkern::patch_embed_grad_weight", mutates_args=())
def _patch_embed_grad_weight_op(grad: Tensor, pixels: Tensor, weight: Tensor, patch_size: int,
                                pad_value: float, rescale: float, mean: list[float], std: list[float]) -> Tensor:
    grad = grad.to(weight.dtype)
    if PATCH_EMBED.select(pixels, weight) == "triton":
        return _triton_grad_weight(grad, pixels, weight, patch_size, pad_value, rescale, mean, std)
    return _reference_grad_weight(grad, pixels, weight, patch_size, pad_value, rescale, mean, std)


@_patch_embed_grad_weight_op.register_fake
def _(grad, pixels, weight, patch_size, pad_value, rescale, mean, std):
    return torch.empty_like(weight)


@torch.library.custom_op("vlmkern::patch_embed_grad_pixels", mutates_args=())
def _patch_embed_grad_pixels_op(grad: Tensor, pixels: Tensor, weight: Tensor, patch_size: int,
                                rescale: float, std: list[float]) -> Tensor:
    grad = grad.to(weight.dtype)
    if PATCH_EMBED.select(pixels, weight) == "triton":
        return _triton_grad_pixels(grad, pixels, weight, patch_size, rescale, std)
    return _reference_grad_pixels(grad, pixels, weight, patch_size, rescale, std)


@_patch_embed_grad_pixels_op.register_fake
def _(grad, pixels, weight, patch_size, rescale, std):
    return torch.empty_like(pixels, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pixels, weight, bias, patch_size, pad_value, rescale, mean, std = inputs
    ctx.save_for_backward(pixels, weight)
    ctx.args = (patch_size, pad_value, rescale, mean, std)


def _backward(ctx, grad):
    pixels, weight = ctx.saved_tensors
    patch_size, pad_value, rescale, mean, std = ctx.args
    d_pixels = d_weight = d_bias = None
    if ctx.needs_input_grad[0]:
        d_pixels = _patch_embed_grad_pixels_op(grad, pixels, weight, patch_size, rescale, std)
    if ctx.needs_input_grad[1]:
        d_weight = _patch_embed_grad_weight_op(grad, pixels, weight, patch_size, pad_value, rescale, mean, std)
    if ctx.needs_input_grad[2]:
        d_bias = grad.sum(dim=(0, 1), dtype=torch.float32).to(weight.dtype)
    return d_pixels, d_weight, d_bias, None, None, None, None, None


_patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ public API
def patch_embed(pixels: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, patch_size: int = 30,
                pad_value: float = 1.0, rescale: float = 1 / 255, mean: float | Sequence[float] = 0.5,
                std: float | Sequence[float] = 0.5) -> Tensor:
    """Fuyu patch embedding from raw pixels in one fused pass.

    Args:
        pixels: ``(B, C, H, W)`` uint8 or float, raw pixel units (0..255), any H and W (already resized).
        weight: ``(out, C*patch_size**2)`` in Fuyu's (row, col, channel) patch order; ``bias``: ``(out,)``.
        pad_value: raw-unit value of the bottom/right padding (Fuyu: 1.0), applied before normalising.
        rescale, mean, std: ``x_norm = (x * rescale - mean) / std``; mean/std per channel or scalar; all
            finite (``std`` non-zero), as ``patchify`` requires.

    Returns:
        ``(B, ceil(H/p)*ceil(W/p), out)`` in ``weight.dtype``, patches row-major. Differentiable in
        ``weight``, ``bias`` and float ``pixels``. A float64 ``weight`` runs the reference (fp64 patches). Under
        ``torch.autocast`` weight and bias are cast to the autocast dtype first, as ``F.linear`` casts them.
    """
    _check_patch_embed(pixels, weight, bias, patch_size)
    check_scalars(pad_value, rescale)
    _, weight, bias = autocast_inputs(pixels, weight, bias)   # the Linear runs as F.linear would
    C = pixels.shape[1]
    mean_l, std_l = _norm_list(mean, "mean", C), _norm_list(std, "std", C)
    if any(s == 0 for s in std_l):
        raise ValueError(f"std must be non-zero, got {std_l}")
    return _patch_embed_op(pixels, weight, bias, patch_size, float(pad_value), float(rescale), mean_l, std_l)
