"""The ``reference`` backend of the projector family: plain PyTorch on any device (the vendor GEMM, then GELU).

Computes what ``vlmkern.reference`` specifies without importing it: the oracle checks this code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_gelu(x2: Tensor, weight: Tensor, bias: Tensor | None, save_pre: bool) -> tuple[Tensor, Tensor]:
    """``x2 (M, K)``, ``weight (N, K)`` -> ``(gelu(pre), pre)`` (``pre`` ``(0,)`` unless ``save_pre``)."""
    pre = F.linear(x2, weight, bias)
    return F.gelu(pre), pre if save_pre else pre.new_empty((0,))


def gelu_backward(grad: Tensor, pre: Tensor) -> Tensor:
    return torch.ops.aten.gelu_backward(grad, pre)


def source_rows(x: Tensor, extra: Tensor | None) -> Tensor:
    """The gather source ``(M + E, C)``: ``x``'s rows in logical order, then ``extra``'s."""
    rows = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    return rows if extra is None else torch.cat([rows, extra])


def source_index(index: Tensor, is_fill: Tensor | None = None) -> Tensor:
    """``index`` as int64 with every entry of a fill row (``index[r, 0] < 0``; ``is_fill (R, 1)`` when the caller
    has it) pointing at row 0, so a gather through it never reads out of range (the fill row's result is
    replaced)."""
    idx = index.long()
    return idx.masked_fill(idx[:, :1] < 0 if is_fill is None else is_fill, 0)


def _in_order(index: Tensor, rows: int) -> bool:
    """``index (rows, 1)`` is ``0 .. rows-1``: checked on the CPU only, where reading it costs no device sync."""
    return (index.device.type == "cpu" and tuple(index.shape) == (rows, 1)
            and bool(torch.equal(index[:, 0], torch.arange(rows, dtype=index.dtype))))


def gather_linear(x: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None, extra: Tensor | None,
                  fill: Tensor | None, gelu: bool, save_pre: bool) -> tuple[Tensor, Tensor]:
    """``x (..., C)``, ``index (R, P)`` -> ``(out, pre)`` ``(R, N)``; fill rows get ``fill``."""
    src = source_rows(x, extra)
    R, P = index.shape
    a = src if fill is None and _in_order(index, src.shape[0]) else src[source_index(index)]
    pre = F.linear(a.reshape(R, P * x.shape[-1]), weight, bias)
    out = F.gelu(pre) if gelu else pre
    if fill is not None:
        if out.device.type == "cpu":
            out[index[:, 0] < 0] = fill  # fill rows only (a CPU mask costs no sync); pre is kept only with gelu
        else:
            out = torch.where(index[:, :1] < 0, fill[None, :], out)
    return out, pre if save_pre else pre.new_empty((0,))
