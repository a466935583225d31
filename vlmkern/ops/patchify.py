"""``vlmkern::patchify``: Fuyu's data-loader patchify (``FuyuImageProcessor``) -- pad, rescale, normalise and cut into
patches in one pass, in C++ on the CPU (``vlmkern._C``) or CUDA (``vlmkern._cuda``), else the reference.

Shapes: ``pixels (B, C, H, W)`` uint8 or float in raw units -> ``(B, ceil(H/p)*ceil(W/p), p*p*C)`` in
``out_dtype`` (float32 by default), ``P[b, i*nW + j, (r*p + c)*C + ch] = norm(pixels[b, ch, p*i + r, p*j + c])``.
Not differentiable (a preprocessing step; ``vlmkern.ops.patch_embed`` is the differentiable fused path).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from vlmkern import _ext, reference
from vlmkern.ops import dispatch as _dispatch
from vlmkern.ops.dispatch import OpDispatch, register
from vlmkern.ops.patch_embed import _norm_list, check_pixels, check_scalars

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_PIXELS = (torch.uint8, torch.float32)          # what the C++ and CUDA kernels read
_KERNEL_OUT = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_MAX_PADDED_HEIGHT = 65535                         # the CUDA kernel puts padded rows on grid.y


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------- checks
def _check_patchify(pixels, patch_size, pad_value, rescale, out_dtype) -> None:
    check_pixels(pixels, patch_size)
    check_scalars(pad_value, rescale)
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in _OUT_DTYPES:
        names = ", ".join(_dtype_name(d) for d in _OUT_DTYPES)
        raise TypeError(f"out_dtype must be one of ({names}), got {out_dtype!r}")


# ------------------------------------------------------------------------------------------- dispatch
def _kernel_reasons(pixels: Tensor, out_dtype: torch.dtype, which: str) -> list[str]:
    why = []
    if pixels.dtype not in _KERNEL_PIXELS:
        why.append(f"the {which} kernel reads uint8 or float32 pixels, got {_dtype_name(pixels.dtype)}")
    if out_dtype not in _KERNEL_OUT:
        why.append(f"the {which} kernel writes float32, float16 or bfloat16, got out_dtype {_dtype_name(out_dtype)}")
    return why


def _cuda_reasons(pixels, patch_size, out_dtype, *_, **__) -> list[str]:
    why = _dispatch.cuda_env_reasons(pixels.device) + _kernel_reasons(pixels, out_dtype, "CUDA")
    ext = _ext.cuda_ext()
    max_channels = getattr(ext, "PATCHIFY_MAX_CHANNELS", None)
    if max_channels is not None and pixels.shape[1] > max_channels:
        why.append(f"the CUDA kernel takes at most {max_channels} channels, got {pixels.shape[1]}")
    padded_h = -(-pixels.shape[2] // patch_size) * patch_size
    if padded_h > _CUDA_MAX_PADDED_HEIGHT:
        why.append(f"the CUDA kernel takes a padded height up to {_CUDA_MAX_PADDED_HEIGHT}, got {padded_h}")
    return why


def _cpp_reasons(pixels, patch_size, out_dtype, *_, **__) -> list[str]:
    return _dispatch.cpu_ext_reasons(pixels.device) + _kernel_reasons(pixels, out_dtype, "C++")


PATCHIFY = register(OpDispatch("patchify", {
    "cuda": _cuda_reasons,
    "cpp": _cpp_reasons,
    "reference": lambda *a, **k: [],
}))


# ------------------------------------------------------------------------------------- custom op
@torch.library.custom_op("vlmkern::patchify", mutates_args=())
def _patchify_op(pixels: Tensor, patch_size: int, pad_value: float, rescale: float, mean: list[float],
                 std: list[float], out_dtype: torch.dtype) -> Tensor:
    backend = PATCHIFY.select(pixels, patch_size, out_dtype)
    if backend == "cuda":
        return _ext.cuda_ext().patchify(pixels, patch_size, pad_value, rescale, mean, std, out_dtype)
    if backend == "cpp":
        return _ext.cpu_ext().patchify(pixels, patch_size, pad_value, rescale, mean, std, out_dtype)
    return reference.patchify(pixels, patch_size, pad_value=pad_value, rescale=rescale, mean=mean, std=std,
                              out_dtype=out_dtype)


@_patchify_op.register_fake
def _(pixels, patch_size, pad_value, rescale, mean, std, out_dtype):
    B, C, H, W = pixels.shape
    nP = -(-H // patch_size) * -(-W // patch_size)
    return pixels.new_empty((B, nP, patch_size * patch_size * C), dtype=out_dtype)


# ------------------------------------------------------------------------------------ public API
def patchify(pixels: Tensor, patch_size: int = 30, *, pad_value: float = 1.0, rescale: float = 1 / 255,
             mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5,
             out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Fuyu's normalised patches from already-resized raw pixels.

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
    C = pixels.shape[1]
    mean_l, std_l = _norm_list(mean, "mean", C), _norm_list(std, "std", C)
    if any(s == 0 for s in std_l):
        raise ValueError(f"std must be non-zero, got {std_l}")
    return _patchify_op(pixels, patch_size, float(pad_value), float(rescale), mean_l, std_l, out_dtype)
