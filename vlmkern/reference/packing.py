"""Reference gather-GEMM for dynamic-resolution packing, written as plain indexing + ``nn.Linear`` (+ GELU).

Source rows: ``x`` viewed as ``(M, C)`` (``M = x.numel() // C``, rows in ``x``'s logical order), then ``extra``
``(E, C)``. Row ``r`` of the result reads the ``P`` source rows ``index[r, :]`` and concatenates them along
channels (``(R, P·C)``, piece ``q`` = columns ``[q·C, (q+1)·C)``) before the Linear. With ``fill``, a row whose
``index[r, 0] < 0`` is the ``fill`` vector instead (its other entries are ignored).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gather_linear(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  extra: torch.Tensor | None = None, fill: torch.Tensor | None = None,
                  gelu: bool = False) -> torch.Tensor:
    """``act(concat_q src[index[:, q]] Wᵀ + b)`` with rows ``index[:, 0] < 0`` set to ``fill``.

    Shapes: ``x (..., C)``, ``index (R, P)`` int, ``weight (N, P·C)``, ``bias (N,)``, ``extra (E, C)``,
    ``fill (N,)`` -> ``(R, N)`` in ``x.dtype``.
    """
    C = x.shape[-1]
    src = x.reshape(math.prod(x.shape[:-1]), C)  # not reshape(-1, C): ambiguous when C == 0
    if extra is not None:
        src = torch.cat([src, extra.to(src.dtype)])
    R, P = index.shape
    if fill is None and _reads_every_row_in_order(index, src.shape[0]):
        a = src                                           # no gather copy: the rows as they are
    else:
        is_fill = index[:, 0] < 0
        a = src[torch.where(is_fill[:, None], 0, index).long()].reshape(R, P * C)
    y = F.linear(a, weight, bias)
    if gelu:
        y = F.gelu(y)
    if fill is not None:
        y = torch.where(is_fill[:, None], fill.to(y.dtype)[None, :], y)
    return y


def _reads_every_row_in_order(index: torch.Tensor, rows: int) -> bool:
    """Whether ``index (R, 1)`` is ``0..rows-1`` (checked on the CPU only, where reading it costs no sync)."""
    if index.device.type != "cpu" or index.shape != (rows, 1):
        return False
    return bool(torch.equal(index[:, 0], torch.arange(rows, dtype=index.dtype)))


def gather_linear_gelu(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None, *, extra: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu(concat_q src[index[:, q]] Wᵀ + b)`` (exact GELU): the first projector GEMM on the kept rows only."""
    return gather_linear(x, index, weight, bias, extra=extra, gelu=True)
