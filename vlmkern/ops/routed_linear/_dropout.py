"""The adapter-input dropout of partial LoRA: the keep mask, drawn as bools and kept bit-packed.

The mask is drawn exactly as the oracle draws it (``torch.empty(x.shape, bool).bernoulli_(1 - p)``: same random
stream) and packed at once, so that the autograd graph saves 1 bit per element of ``x`` instead of a byte.

Packed layout, a uint8 ``(..., packed_width(n))`` tensor for a bool ``(..., n)`` mask: bit ``j & 7`` of byte
``j >> 3`` is column ``j`` (little-endian bit order), padding bits are 0. Each row is padded to a multiple of
:data:`ROW_ALIGN` bytes, so that the kernels' row loads stay 16-byte aligned (asynchronous copies) and a
column tile of up to ``8 * ROW_ALIGN`` columns never reads past a row (no column mask needed). Pure torch
ops, no host sync: CPU, CUDA, fake tensors and ``torch.compile`` alike.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ROW_ALIGN = 16          # bytes per packed row: a multiple of this
MAX_TILE = 8 * ROW_ALIGN  # widest column tile a kernel may read from a packed row without a column mask


def packed_width(n: int) -> int:
    """Bytes per packed row of an ``n``-column mask: ``ceil(n / 8)`` rounded up to a multiple of ROW_ALIGN."""
    return -(-n // MAX_TILE) * ROW_ALIGN


def _bit_weights(device) -> Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_keep(keep: Tensor) -> Tensor:
    """bool ``(..., n)`` -> uint8 ``(..., packed_width(n))``, contiguous (layout in the module docstring)."""
    n = keep.shape[-1]
    pad = packed_width(n) * 8 - n
    bits = keep.view(torch.uint8)       # same bytes (0 / 1), no copy
    if pad:
        bits = torch.constant_pad_nd(bits, (0, pad))
    bits = bits.unflatten(-1, (-1, 8)) << _bit_weights(keep.device)
    return bits.sum(-1, dtype=torch.uint8)


def unpack_keep(packed: Tensor, n: int) -> Tensor:
    """uint8 ``(..., packed_width(n))`` -> bool ``(..., n)``: the mask :func:`pack_keep` packed."""
    bits = (packed.unsqueeze(-1) >> _bit_weights(packed.device)) & 1
    return bits.flatten(-2)[..., :n].bool()


def check_packed(keep: Optional[Tensor], rows: int, n: int) -> Optional[Tensor]:
    """``keep`` itself after checking that it is None or a packed ``(rows, packed_width(n))`` uint8 mask with
    byte-contiguous rows (the kernels read whole padded rows of it: a narrower one would be read out of bounds,
    a bool one misread); a ValueError naming ``keep`` otherwise."""
    if keep is not None and (keep.dtype != torch.uint8 or tuple(keep.shape) != (rows, packed_width(n))
                             or keep.stride(1) != 1):
        raise ValueError(f"keep must be the packed dropout mask: uint8 ({rows}, {packed_width(n)}) with contiguous "
                         f"rows, got {str(keep.dtype).replace('torch.', '')} {tuple(keep.shape)} strides "
                         f"{keep.stride()}")
    return keep


def draw_keep(x: Tensor, dropout_p: float, training: bool) -> tuple[Optional[Tensor], float]:
    """``(keep, keep_scale)`` with keep the bool mask of ``x.shape`` drawn as the oracle draws it (None without
    dropout, i.e. unless ``training and dropout_p > 0``); the adapter sees ``x * keep * keep_scale``."""
    if training and dropout_p > 0.0:
        keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device)   # contiguous, whatever x's strides:
        return keep.bernoulli_(1.0 - dropout_p), keep_scale                # the draws follow the memory order
    return None, 1.0
