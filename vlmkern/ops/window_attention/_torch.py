"""The 'reference' backend of ``vlmkern::window_attention``: pure PyTorch, any device; the oracle
(``vlmkern.reference.window_attention``) checks it and is never imported here.

Token ``n = i*PN + j`` of a ``PN x PN`` grid owns the ``M x M`` block ``h[b, :, i*M:(i+1)*M, j*M:(j+1)*M]`` of the
HR map ``h (B, C, PN·M, PN·M)``, window position ``w = r*M + c``. Computed in fp32 (fp64 for fp64 maps).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(h: Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def window_sides(u: Tensor, h: Tensor) -> tuple[int, int]:
    """``(PN, M)`` of validated inputs: ``u (B, PN², C)``, ``h (B, C, PN·M, PN·M)``."""
    pn = math.isqrt(u.shape[1])
    return pn, h.shape[-1] // pn


def _windows(h: Tensor, pn: int, m: int) -> Tensor:
    """``(B, C, PN·M, PN·M)`` -> ``(B, PN², M², C)`` in the compute dtype."""
    B, C = h.shape[:2]
    x = h.to(compute_dtype(h)).unflatten(3, (pn, m)).unflatten(2, (pn, m))     # (B, C, PN, M, PN, M)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, pn * pn, m * m, C)


def forward(u: Tensor, h: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``s (B, N, C)`` and the rows the backward needs, ``mean, rstd, p, logit`` ``(B, N, M²)``."""
    pn, m = window_sides(u, h)
    hw = _windows(h, pn, m)
    mean = hw.mean(-1)
    rstd = torch.rsqrt(hw.var(-1, unbiased=False) + eps)
    hhat = (hw - mean[..., None]) * rstd[..., None]
    logit = (hhat @ u.to(hw.dtype).unsqueeze(-1)).squeeze(-1)
    p = logit.nan_to_num().softmax(-1)
    return (p.unsqueeze(-2) @ hhat).squeeze(-2), mean, rstd, p, logit


def backward(ds: Tensor, u: Tensor, h: Tensor, mean: Tensor, rstd: Tensor, p: Tensor, logit: Tensor
             ) -> tuple[Tensor, Tensor]:
    """``(du (B, N, C)`` in the compute dtype, ``dh`` like ``h``, dense``)`` for ``ds (B, N, C)``."""
    pn, m = window_sides(u, h)
    hhat = (_windows(h, pn, m) - mean[..., None]) * rstd[..., None]
    ds, uc = ds.to(hhat.dtype), u.to(hhat.dtype)
    da = (hhat @ ds.unsqueeze(-1)).squeeze(-1)
    dl = p * (da - (p * da).sum(-1, keepdim=True))
    dl = torch.where(torch.isfinite(logit), dl, 0.0)                 # nan_to_num: finite logits only
    du = (dl.unsqueeze(-2) @ hhat).squeeze(-2)
    dhat = p[..., None] * ds[:, :, None, :] + dl[..., None] * uc[:, :, None, :]
    dhw = rstd[..., None] * (dhat - dhat.mean(-1, keepdim=True) - hhat * (dhat * hhat).mean(-1, keepdim=True))
    B, C = h.shape[:2]
    dh = dhw.reshape(B, pn, pn, m, m, C).permute(0, 5, 1, 3, 2, 4).reshape(h.shape)   # back to the map layout
    return du, dh.to(h.dtype)
