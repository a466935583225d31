"""Attention-probability dropout as every backend draws it: the keep rule both backends must agree on.

The keep mask is a function of a ``(seed, offset)`` int64 pair. The probability of q row ``i`` and key ``j`` of
program ``bh = b * H + h`` draws word ``n & 3`` (``n = i * Lk + j``) of Philox4x32-10 (Salmon et al., SC 2011;
Triton's ``tl.philox``) with key ``seed`` and counter ``(n >> 2, bh, offset lo, offset hi)``, and is kept when
that word's top 31 bits are ``>= threshold(p)``. The Triton kernels regenerate it tile by tile
(``vlmkern.kernels.attention._dropout_keep``); :func:`keep_mask` is the PyTorch backend's (NumPy) copy.
Tests check both against the oracle's generator (``vlmkern.reference.attention.dropout_keep_mask``).
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch import Tensor

MAX_SCORES = 2 ** 31 - 1        # the kernels index a (batch, head)'s scores in int32
_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_HIGH_FIRST = sys.byteorder == "big"


def threshold(dropout_p: float) -> int:
    """Draws (31-bit) below ``floor(p * 2^31)`` are dropped: keep rate ``1 - p`` to within ``2^-31``."""
    return min(int(dropout_p * 2 ** 31), 2 ** 31 - 1)


def scale(dropout_p: float) -> float:
    """Kept probabilities are multiplied by ``1 / (1 - p)``, as ``nn.Dropout``'s; ``p = 1`` gives 0."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def _mulhilo(a: np.ndarray, multiplier: int) -> tuple[np.ndarray, np.ndarray]:
    """High and low 32-bit words of ``a * multiplier`` (uint32 operands): views of one uint64 product, since
    torch's CPU int64 multiply is not vectorized and a shift-and-mask copies twice."""
    words = np.multiply(a, np.uint64(multiplier), dtype=np.uint64)[..., None].view(np.uint32)
    return (words[..., 0], words[..., 1]) if _HIGH_FIRST else (words[..., 1], words[..., 0])


def keep_mask(dropout_rng: Tensor, shape: tuple[int, int, int, int], dropout_p: float) -> Tensor:
    """``(B, H, Lq, Lk)`` bool keep mask for the ``(seed, offset)`` pair ``dropout_rng``, on its device."""
    B, H, Lq, Lk = shape
    seed, offset = (int(x) for x in dropout_rng.tolist())
    scores, programs = Lq * Lk, B * H
    groups = -(-scores // 4)            # one Philox call serves four neighbouring scores
    x0 = np.arange(groups, dtype=np.uint32)[None, :]
    x1 = np.arange(programs, dtype=np.uint32)[:, None]
    x2 = np.full((1, 1), offset & _MASK32, dtype=np.uint32)
    x3 = np.full((1, 1), (offset >> 32) & _MASK32, dtype=np.uint32)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(x0, _MULTIPLIERS[0])
        hi2, lo2 = _mulhilo(x2, _MULTIPLIERS[1])
        x0, x1, x2, x3 = hi2 ^ x1 ^ np.uint32(k0), lo2, hi0 ^ x3 ^ np.uint32(k1), lo0
        k0, k1 = (k0 + _KEY_STEPS[0]) & _MASK32, (k1 + _KEY_STEPS[1]) & _MASK32
    words = np.stack(np.broadcast_arrays(x0, x1, x2, x3), axis=-1).reshape(programs, groups * 4)[:, :scores]
    keep = torch.from_numpy((words >> 1) >= threshold(dropout_p))
    return keep.reshape(B, H, Lq, Lk).to(dropout_rng.device)


def multiplier(dropout_rng: Tensor, shape: tuple[int, int, int, int], dropout_p: float,
               dtype: torch.dtype) -> Tensor:
    """``keep / (1 - p)`` ``(B, H, Lq, Lk)`` in ``dtype``: what the probabilities are multiplied by."""
    return keep_mask(dropout_rng, shape, dropout_p).to(dtype).mul_(scale(dropout_p))
