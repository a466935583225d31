"""``vlmkern::patch_embed`` (fused Fuyu patch embedding) and ``vlmkern::patchify`` (Fuyu's data-loader patchify):
the contract of both ops.

Shapes: ``pixels (B, C, H, W)`` uint8 or float in raw units; ``patchify`` -> ``(B, nH*nW, p*p*C)`` in
``out_dtype``; ``patch_embed`` with ``weight (out, C*p*p)``, ``bias (out,)`` -> ``(B, nH*nW, out)`` in
``weight.dtype``; ``nH = ceil(H/p)``, ``nW = ceil(W/p)``, patch layout
``P[b, i*nW + j, (r*p + c)*C + ch] = norm(pixels[b, ch, p*i + r, p*j + c])``.

Backends: ``patch_embed``: ``triton`` (``_triton.py``) or ``reference``; ``patchify``: ``cuda`` / ``cpp`` (the
compiled extensions, ``_cpp.py``) or ``reference``. The reference backends are ``_torch.py``; the reference
``patch_embed`` takes its patches from ``vlmkern::patchify``, so it cuts them with the C++ kernel where built.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmkern import _ext
from vlmkern.ops import dispatch
from vlmkern.ops.checks import (CUDA_GRID_YZ_MAX, FLOATS, accumulate_dtype, as_dtype, autocast_inputs, check_finite_scalar,
                                check_same_device, check_tensor, int32_count_reasons, int32_offset_reasons,
                                is_finite, once_per_key)
from vlmkern.ops.dispatch import Capabilities, OpDispatch, register
from vlmkern.ops.patch_embed import _cpp, _torch

PIXEL_DTYPES = (torch.uint8, *FLOATS)
PATCHIFY_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# What the compiled kernels take. Triton: the weight's dtype (pixels: any of PIXEL_DTYPES but float64, which
# comes with a float64 weight). Extensions: uint8 / float32 pixels in, 16/32-bit floats out.
TRITON = Capabilities(dtypes=(torch.float16, torch.bfloat16, torch.float32))
EXT_PIXELS = (torch.uint8, torch.float32)
EXT_OUT = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_PADDED_HEIGHT = CUDA_GRID_YZ_MAX             # the CUDA patchify puts padded rows on grid.y


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------- checks
def _real(v) -> bool:
    """A real number that is not a bool (numpy scalars included)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _norm_list(value, name: str, channels: int) -> list[float]:
    if isinstance(value, Tensor):
        if value.device.type == "meta":
            raise ValueError(f"{name} must hold values (a float, a sequence or a tensor with data), got a meta tensor")
        value = value.detach().cpu().reshape(-1).tolist()
    if _real(value):      # first: under torch.compile(dynamic=True) a float default is symbolic, without hasattr
        items = [value]
    elif hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):   # a sequence, an array
        items = list(value)
    else:
        items = None
    if items is None or not all(_real(v) for v in items):
        raise TypeError(f"{name} must be a float, a sequence of floats or a tensor, got {value!r}")
    vals = [float(v) for v in items]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ValueError(f"{name} must be a float or a sequence of {channels} floats (one per channel), got {len(vals)}")
    if not all(is_finite(v) for v in vals):
        raise ValueError(f"{name} must be finite, got {vals}")
    return vals


def _norm_lists(mean, std, channels: int) -> tuple[list[float], list[float]]:
    """``mean`` and ``std`` as per-channel float lists (checked); the lists of scalar arguments (every model
    call passes the same pair) are kept, the kernels and the backward only read them."""
    if type(mean) in _SCALARS and type(std) in _SCALARS and not _is_compiling():
        # 0.0 and -0.0 are one key to the cache but give different lists: their signs are key parts (a traced call
        # runs once per graph: no cache, and a symbolic float default has no math.copysign)
        return _scalar_norm_lists(mean, std, channels, math.copysign(1.0, mean), math.copysign(1.0, std))
    return _checked_norm_lists(mean, std, channels)


_SCALARS = (float, int)     # not bool (True is no mean); 1 and 1.0 give the same lists
# Lists of plain floats are cached in any mode (fake tensors, make_fx, jit.trace read the same floats); only
# Dynamo must not trace the cache (it would warn and trace the wrapped function on every compile).
_is_compiling = torch.compiler.is_compiling


@functools.lru_cache(maxsize=64)
def _scalar_norm_lists(mean, std, channels: int, *_signs) -> tuple[list[float], list[float]]:
    return _checked_norm_lists(mean, std, channels)


def _checked_norm_lists(mean, std, channels: int) -> tuple[list[float], list[float]]:
    mean_l, std_l = _norm_list(mean, "mean", channels), _norm_list(std, "std", channels)
    if any(s == 0 for s in std_l):
        raise ValueError(f"std must be non-zero, got {std_l}")
    return mean_l, std_l


def check_pixels(pixels, patch_size) -> None:
    """``pixels (B, C, H, W)`` with non-empty images (B may be 0: an empty batch), and a positive int
    ``patch_size``."""
    check_tensor(pixels, "pixels", ndim=4, dtypes=PIXEL_DTYPES, shape_doc="(B, C, H, W)")
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    B, C, H, W = pixels.shape
    if H == 0 or W == 0:
        raise ValueError(f"pixels must hold non-empty images (H, W > 0), got shape {tuple(pixels.shape)}")
    if C == 0:
        raise ValueError("pixels must have at least one channel")


def check_scalars(pad_value, rescale) -> None:
    """``pad_value`` and ``rescale`` are finite floats (TypeError naming the argument)."""
    check_finite_scalar(pad_value, "pad_value")
    check_finite_scalar(rescale, "rescale")


@once_per_key       # the scalars' values are part of the key: a finite pair is checked once
def _check_patch_embed(pixels, weight, bias, patch_size, pad_value, rescale) -> None:
    check_pixels(pixels, patch_size)
    check_tensor(weight, "weight", ndim=2, dtypes=FLOATS, shape_doc="(out_features, C*patch_size**2)")
    B, C, H, W = pixels.shape
    if weight.shape[1] != C * patch_size * patch_size:
        expected = weight.shape[1] / (patch_size * patch_size)
        raise ValueError(
            f"pixels has C={C} channels, so weight must have C*patch_size**2 = {C * patch_size ** 2} columns; "
            f"weight has {weight.shape[1]} (= {expected:g} channels of {patch_size}x{patch_size})")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=FLOATS, shape_doc="(out_features,)")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have out_features={weight.shape[0]} elements, got {bias.shape[0]}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
    check_same_device(pixels=pixels, weight=weight, bias=bias)
    check_scalars(pad_value, rescale)


@once_per_key
def _check_patchify(pixels, patch_size, pad_value, rescale, out_dtype) -> None:
    check_pixels(pixels, patch_size)
    check_scalars(pad_value, rescale)
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in PATCHIFY_OUT_DTYPES:
        names = ", ".join(_dtype_name(d) for d in PATCHIFY_OUT_DTYPES)
        raise TypeError(f"out_dtype must be one of ({names}), got {out_dtype!r}")


def _n_patches(pixels, patch_size: int) -> int:
    H, W = pixels.shape[2:]
    return -(-H // patch_size) * -(-W // patch_size)


# ------------------------------------------------------------------------------------------- dispatch
def _patch_embed_triton_reasons(pixels, weight, *_, **__) -> list[str]:
    why = dispatch.triton_env_reasons(pixels.device) + TRITON.reasons(weight.dtype)
    # Image and patch-row bases are 64-bit; channel, in-patch row/column and column offsets 32-bit, as are the
    # weight's column offsets and the (dense) pixel gradient's offsets inside one image.
    return (why + int32_count_reasons(pixels, 1, "one image of the pixel gradient")
            + int32_offset_reasons((1, 2, 3), pixels=pixels) + int32_offset_reasons((1,), weight=weight))


def _ext_reasons(pixels: Tensor, out_dtype: torch.dtype, which: str) -> list[str]:
    why = []
    if pixels.dtype not in EXT_PIXELS:
        why.append(f"the {which} kernel reads uint8 or float32 pixels, got {_dtype_name(pixels.dtype)}")
    if out_dtype not in EXT_OUT:
        why.append(f"the {which} kernel writes float32, float16 or bfloat16, got out_dtype {_dtype_name(out_dtype)}")
    return why


def _patchify_cuda_reasons(pixels, patch_size, out_dtype, *_, **__) -> list[str]:
    why = dispatch.cuda_env_reasons(pixels.device) + _ext_reasons(pixels, out_dtype, "CUDA")
    max_channels = getattr(_ext.cuda_ext(), "PATCHIFY_MAX_CHANNELS", None)
    if max_channels is not None and pixels.shape[1] > max_channels:
        why.append(f"the CUDA kernel takes at most {max_channels} channels, got {pixels.shape[1]}")
    padded_h = -(-pixels.shape[2] // patch_size) * patch_size
    if padded_h > CUDA_MAX_PADDED_HEIGHT:
        why.append(f"the CUDA kernel takes a padded height up to {CUDA_MAX_PADDED_HEIGHT}, got {padded_h}")
    return why


def _patchify_cpp_reasons(pixels, patch_size, out_dtype, *_, **__) -> list[str]:
    return dispatch.cpu_ext_reasons(pixels.device) + _ext_reasons(pixels, out_dtype, "C++")


PATCH_EMBED = register(OpDispatch("patch_embed", {
    "triton": _patch_embed_triton_reasons,
    "reference": dispatch.never_refuses,
}))

PATCHIFY = register(OpDispatch("patchify", {
    "cuda": _patchify_cuda_reasons,
    "cpp": _patchify_cpp_reasons,
    "reference": dispatch.never_refuses,
}))


# ------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("vlmkern::patchify", mutates_args=())
def _patchify_op(pixels: Tensor, patch_size: int, pad_value: float, rescale: float, mean: list[float],
                 std: list[float], out_dtype: torch.dtype) -> Tensor:
    return _torch.patchify(pixels, patch_size, pad_value, rescale, mean, std, out_dtype)


@_patchify_op.register_fake
def _(pixels, patch_size, pad_value, rescale, mean, std, out_dtype):
    B, C = pixels.shape[:2]
    return pixels.new_empty((B, _n_patches(pixels, patch_size), patch_size * patch_size * C), dtype=out_dtype)


def _reference_forward(pixels, weight, bias, patch_size, pad_value, rescale, mean, std) -> Tensor:
    return F.linear(_patchify(pixels, patch_size, pad_value, rescale, mean, std, weight.dtype), weight, bias)


def _reference_grad_weight(grad, pixels, weight, patch_size, pad_value, rescale, mean, std) -> Tensor:
    return _torch.grad_weight(grad, _patchify(pixels, patch_size, pad_value, rescale, mean, std, weight.dtype))


@torch.library.custom_op("vlmkern::patch_embed", mutates_args=())
def _patch_embed_op(pixels: Tensor, weight: Tensor, bias: Optional[Tensor], patch_size: int,
                    pad_value: float, rescale: float, mean: list[float], std: list[float]) -> Tensor:
    return _reference_forward(pixels, weight, bias, patch_size, pad_value, rescale, mean, std)


@_patch_embed_op.register_fake
def _(pixels, weight, bias, patch_size, pad_value, rescale, mean, std):
    return pixels.new_empty((pixels.shape[0], _n_patches(pixels, patch_size), weight.shape[0]), dtype=weight.dtype)


@torch.library.custom_op("vlmkern::patch_embed_grad_weight", mutates_args=())
def _patch_embed_grad_weight_op(grad: Tensor, pixels: Tensor, weight: Tensor, patch_size: int,
                                pad_value: float, rescale: float, mean: list[float], std: list[float]) -> Tensor:
    """``grad (B, nP, N)`` in ``weight.dtype`` -> ``d weight (N, K)``."""
    return _reference_grad_weight(grad, pixels, weight, patch_size, pad_value, rescale, mean, std)


@_patch_embed_grad_weight_op.register_fake
def _(grad, pixels, weight, patch_size, pad_value, rescale, mean, std):
    return torch.empty_like(weight)


@torch.library.custom_op("vlmkern::patch_embed_grad_pixels", mutates_args=())
def _patch_embed_grad_pixels_op(grad: Tensor, pixels: Tensor, weight: Tensor, patch_size: int,
                                rescale: float, std: list[float]) -> Tensor:
    """``grad (B, nP, N)`` in ``weight.dtype`` -> ``d pixels (B, C, H, W)`` (dense)."""
    return _torch.grad_pixels(grad, pixels, weight, patch_size, rescale, std)


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
    grad = as_dtype(grad, weight.dtype)
    d_pixels = d_weight = d_bias = None
    if ctx.needs_input_grad[0]:
        d_pixels = _patch_embed_grad_pixels(grad, pixels, weight, patch_size, rescale, std)
    if ctx.needs_input_grad[1]:
        d_weight = _patch_embed_grad_weight(grad, pixels, weight, patch_size, pad_value, rescale, mean, std)
    if ctx.needs_input_grad[2]:
        d_bias = grad.sum(dim=(0, 1), dtype=accumulate_dtype(weight.dtype))
        d_bias = as_dtype(d_bias, weight.dtype)
    return d_pixels, d_weight, d_bias, None, None, None, None, None


dispatch.register_autograd(_patch_embed_op, _backward, _setup_context)


def _on_triton(name: str):
    return dispatch.lazy(f"{__name__}._triton", name)

dispatch.implement(_patchify_op, PATCHIFY,
                   {"cuda": _cpp.patchify_cuda, "cpp": _cpp.patchify_cpu, "reference": _torch.patchify},
                   probe=lambda pixels, patch_size, *args: (pixels, patch_size, args[-1]))
dispatch.implement(_patch_embed_op, PATCH_EMBED, {"triton": _on_triton("forward"), "reference": _reference_forward},
                   probe=lambda pixels, weight, *_: (pixels, weight))
dispatch.implement(_patch_embed_grad_weight_op, PATCH_EMBED,
                   {"triton": _on_triton("grad_weight"), "reference": _reference_grad_weight},
                   probe=lambda grad, pixels, weight, *_: (pixels, weight))
dispatch.implement(_patch_embed_grad_pixels_op, PATCH_EMBED,
                   {"triton": _on_triton("grad_pixels"), "reference": _torch.grad_pixels},
                   probe=lambda grad, pixels, weight, *_: (pixels, weight))


# Eager calls run the kernels without the dispatcher (dispatch.EagerOp); compiled ones see the ops.
_patchify = dispatch.EagerOp(_patchify_op)
_patch_embed = dispatch.EagerOp(_patch_embed_op)
_patch_embed_grad_weight = dispatch.BackwardOp(_patch_embed_grad_weight_op)
_patch_embed_grad_pixels = dispatch.BackwardOp(_patch_embed_grad_pixels_op)


# ------------------------------------------------------------------------------------ public API
def patchify(pixels: Tensor, patch_size: int = 30, *, pad_value: float = 1.0, rescale: float = 1 / 255,
             mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5,
             out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Fuyu's normalised patches from already-resized raw pixels (``FuyuImageProcessor``'s pad, rescale,
    normalise and patchify in one pass). Not differentiable: a preprocessing step (``patch_embed`` is the
    differentiable fused path).

    Args:
        pixels: ``(B, C, H, W)`` uint8 or float in raw units (0..255), any H and W, any strides.
        patch_size: square patch side ``p`` (Fuyu: 30).
        pad_value: raw-unit value of the bottom/right padding up to a multiple of ``p`` (Fuyu: 1.0, which
            normalises to -0.99216), applied before rescale and normalise as FuyuImageProcessor does.
        rescale, mean, std: ``x_norm = (x * rescale - mean) / std`` in float32, in that order; mean/std
            per channel or scalar.
        out_dtype: float32 (default), float16, bfloat16 or float64.

    Returns:
        ``(B, ceil(H/p)*ceil(W/p), p*p*C)`` in ``out_dtype``, patches row-major, ``(row, col, channel)``
        inside a patch. The C++ and CUDA kernels are bit-identical to ``vlmkern.reference.patchify``.
    """
    _check_patchify(pixels, patch_size, pad_value, rescale, out_dtype)
    mean_l, std_l = _norm_lists(mean, std, pixels.shape[1])
    if pixels.shape[0] == 0:          # an empty batch: no launch (a zero-size grid is an error)
        return _empty_patches(pixels, patch_size).to(out_dtype)
    return _patchify(pixels, patch_size, float(pad_value), float(rescale), mean_l, std_l, out_dtype)


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
    _check_patch_embed(pixels, weight, bias, patch_size, pad_value, rescale)
    _, weight, bias = autocast_inputs(pixels, weight, bias)   # the Linear runs as F.linear would
    mean_l, std_l = _norm_lists(mean, std, pixels.shape[1])
    if pixels.shape[0] == 0:          # an empty batch: nn.Linear on no patches (weight and bias get zero grads)
        return F.linear(_empty_patches(pixels, patch_size).to(weight.dtype), weight, bias)
    return _patch_embed(pixels, weight, bias, patch_size, float(pad_value), float(rescale), mean_l, std_l)


def _empty_patches(pixels: Tensor, patch_size: int) -> Tensor:
    """The ``(0, nP, C*p*p)`` patches of an empty batch, a view of ``pixels`` (which holds no element)."""
    return pixels.reshape(0, _n_patches(pixels, patch_size), pixels.shape[1] * patch_size * patch_size)


__all__ = ["PATCH_EMBED", "PATCHIFY", "check_pixels", "check_scalars", "patch_embed", "patchify"]
