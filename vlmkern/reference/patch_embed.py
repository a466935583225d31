"""Fuyu encoder-free patch embedding, written the way ``FuyuImageProcessor`` + ``nn.Linear`` compute it.

Pixel layout: ``pixels`` ``(B, C, H, W)``, uint8 or float, in raw pixel units (0..255).
Patch layout (Fuyu's): ``P[b, i*nW + j, (r*p + c)*C + ch] = norm(img[b, ch, p*i + r, p*j + c])``,
channel-last inside a patch, patches row-major; the bottom/right border is padded with ``pad_value`` in raw
units before rescale+normalise, as Fuyu pads before normalising.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _per_channel(value: float | Sequence[float], channels: int, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device).reshape(-1)
    return t.expand(channels) if t.numel() == 1 else t


def patchify(pixels: torch.Tensor, patch_size: int = 30, *, pad_value: float = 1.0, rescale: float = 1 / 255,
             mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(B, C, H, W)`` raw pixels -> normalised patches ``(B, ceil(H/p)*ceil(W/p), p*p*C)``.

    Computed in float32 (float64 for float64 pixels), returned in ``out_dtype`` (default: compute dtype).
    """
    B, C, H, W = pixels.shape
    p = patch_size
    nH, nW = -(-H // p), -(-W // p)
    compute = torch.float64 if pixels.dtype == torch.float64 else torch.float32
    x = pixels.to(compute)
    x = F.pad(x, (0, nW * p - W, 0, nH * p - H), value=float(pad_value))
    x = x * rescale
    m = _per_channel(mean, C, x.device, compute)[:, None, None]
    s = _per_channel(std, C, x.device, compute)[:, None, None]
    x = (x - m) / s
    patches = x.reshape(B, C, nH, p, nW, p).permute(0, 2, 4, 3, 5, 1).reshape(B, nH * nW, p * p * C)
    return patches if out_dtype is None else patches.to(out_dtype)


def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                patch_size: int = 30, pad_value: float = 1.0, rescale: float = 1 / 255,
                mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5) -> torch.Tensor:
    """Raw pixels -> patch embeddings ``(B, nP, out)`` in ``weight.dtype``: ``nn.Linear`` on Fuyu's patches."""
    patches = patchify(pixels, patch_size, pad_value=pad_value, rescale=rescale, mean=mean, std=std,
                       out_dtype=weight.dtype)
    return F.linear(patches, weight, bias)
