"""The 'reference' backend of ``vlmkern::patchify`` and ``vlmkern::patch_embed``: pure PyTorch, any device.

Patch layout (Fuyu's): ``P[b, i*nW + j, (r*p + c)*C + ch] = norm(pixels[b, ch, p*i + r, p*j + c])`` with
``norm(x) = (x * rescale - mean[ch]) / std[ch]``; the bottom/right border holds ``pad_value`` (raw units) before
``norm``. The oracle (``vlmkern.reference.patch_embed``) checks these functions; they never import it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmkern.ops.dispatch import transformed


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Patches are normalised in float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(values: list[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)[:, None, None]


def patchify(pixels: Tensor, patch_size: int, pad_value: float, rescale: float, mean: list[float],
             std: list[float], out_dtype: torch.dtype) -> Tensor:
    """``pixels (B, C, H, W)`` -> ``(B, nH*nW, p*p*C)`` in ``out_dtype``, ``nH = ceil(H/p)``, ``nW = ceil(W/p)``.

    One padded canvas in the compute dtype, normalised in place (the same float ops, in the same order, as the
    C++/CUDA kernels: bit-identical), then one strided copy into the patch layout that also casts."""
    B, C, H, W = pixels.shape
    p = patch_size
    nH, nW = -(-H // p), -(-W // p)
    if transformed():   # out of place (same float ops, same values): a transform does not track in-place writes
        canvas = F.pad(pixels.to(compute_dtype(pixels.dtype)), (0, nW * p - W, 0, nH * p - H), value=pad_value)
        canvas = (canvas * rescale - _per_channel(mean, canvas)) / _per_channel(std, canvas)
        patches = canvas.view(B, C, nH, p, nW, p).permute(0, 2, 4, 3, 5, 1).to(out_dtype)
        return patches.reshape(B, nH * nW, p * p * C)
    canvas = torch.full((B, C, nH * p, nW * p), pad_value, dtype=compute_dtype(pixels.dtype), device=pixels.device)
    canvas[:, :, :H, :W] = pixels
    canvas.mul_(rescale).sub_(_per_channel(mean, canvas)).div_(_per_channel(std, canvas))
    out = torch.empty((B, nH, nW, p, p, C), dtype=out_dtype, device=pixels.device)
    out.copy_(canvas.view(B, C, nH, p, nW, p).permute(0, 2, 4, 3, 5, 1))
    return out.view(B, nH * nW, p * p * C)


def grad_weight(grad: Tensor, patches: Tensor) -> Tensor:
    """``dW (N, K) = gradᵀ @ patches`` for ``grad (B, nP, N)`` and ``patches (B, nP, K)``."""
    return grad.reshape(-1, grad.shape[-1]).t().matmul(patches.reshape(-1, patches.shape[-1]))


def grad_pixels(grad: Tensor, pixels: Tensor, weight: Tensor, patch_size: int, rescale: float,
                std: list[float]) -> Tensor:
    """``d pixels (B, C, H, W)`` in ``pixels.dtype`` from ``grad (B, nP, N)``: ``grad @ W`` back through the
    patch layout (border padding dropped) times ``rescale / std[ch]``."""
    B, C, H, W = pixels.shape
    p = patch_size
    nH, nW = -(-H // p), -(-W // p)
    ct = torch.float64 if torch.float64 in (weight.dtype, pixels.dtype) else torch.float32
    dpatch = grad.matmul(weight).to(ct)                                # (B, nP, p*p*C)
    d = dpatch.reshape(B, nH, nW, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, nH * p, nW * p)
    d = d[:, :, :H, :W] * (rescale / torch.tensor(std, dtype=ct, device=d.device))[:, None, None]
    return d.to(pixels.dtype)
