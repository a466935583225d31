"""The projector family's contract: ``vlmkern::linear_gelu``, ``vlmkern::gelu_backward`` and
``vlmkern::gather_linear`` (schema, checks, fakes, autograd, dispatch, public functions).

``linear_gelu``: ``gelu(x Wᵀ + b)`` with bias and exact GELU in the GEMM epilogue. ``x (..., in)``,
``weight (out, in)``, ``bias (out,)`` -> ``(..., out)`` in ``x.dtype``.

``gather_linear``: the gather-GEMM behind dynamic-resolution packing (LLaVA-NeXT AnyRes,
InternLM-XComposer2-4KHD), optionally with the first projector GEMM's exact GELU in the epilogue:
``out[r] = act(concat_q src[index[r, q]] Wᵀ + b)``, rows with ``index[r, 0] < 0`` set to ``fill``. ``x (..., C)``
(any strides; rows in logical order, so ``hidden_states[:, 1:]`` is read in place), ``index (R, P)`` int32/int64,
``weight (N, P·C)``, ``bias (N,)``, ``extra (E, C)`` (source rows ``M .. M+E-1`` after the ``M = x.numel() // C``
rows of ``x``), ``fill (N,)`` -> ``(R, N)`` in ``x.dtype``.

Backward keeps the GEMM's pre-activation (saved only when a gradient is needed); ``gelu'`` is one elementwise
kernel and the backward GEMMs go to the vendor BLAS, which has nothing to fuse. ``gather_linear``'s ``dx`` /
``dextra`` are a float32 ``index_add_`` of ``dpre · W`` through the same index (a row used several times, e.g. a
separator, accumulates), ``dfill`` the fill rows' gradient summed. No host sync.

Backends: ``triton`` (``_triton.py``), ``reference`` (``_torch.py``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vlmkern.ops import dispatch
from vlmkern.ops.checks import (FLOATS, INDEX_DTYPES, MAX_BLOCK, accumulate_dtype, as_dtype, autocast_inputs,
                                check_flag, check_same_device, check_tensor, int32_offset_reasons, once_per_key,
                                rows_2d)
from vlmkern.ops.dispatch import Capabilities, OpDispatch, register
from vlmkern.ops.projector import _torch

TRITON = Capabilities()
_triton_gelu_backward = dispatch.lazy(f"{__name__}._triton", "gelu_backward")
_triton_gather_linear = dispatch.lazy(f"{__name__}._triton", "gather_linear")


# --------------------------------------------------------------------------------------------- checks
@once_per_key
def _check_linear(x, weight, bias) -> None:
    check_tensor(x, "x", dtypes=FLOATS)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    check_tensor(weight, "weight", ndim=2, dtypes=FLOATS, shape_doc="(out_features, in_features)")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has in_features={weight.shape[1]} but x has last dim {x.shape[-1]}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    _check_vector(bias, "bias", x, weight.shape[0])
    check_same_device(x=x, weight=weight, bias=bias)


def _check_vector(t, name: str, x, n: int) -> None:
    if t is None:
        return
    check_tensor(t, name, ndim=1, dtypes=(x.dtype,), shape_doc="(out_features,)")
    if t.shape[0] != n:
        raise ValueError(f"{name} must have out_features={n} elements, got {t.shape[0]}")


@once_per_key
def _check_gather_linear(x, index, weight, bias, extra, fill) -> None:
    check_tensor(x, "x", dtypes=FLOATS)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (rows..., C), got shape {tuple(x.shape)}")
    check_tensor(index, "index", ndim=2, dtypes=INDEX_DTYPES, shape_doc="(rows, pieces)")
    check_tensor(weight, "weight", ndim=2, dtypes=FLOATS, shape_doc="(out_features, pieces*C)")
    C = x.shape[-1]
    R, P = index.shape
    if P < 1:
        raise ValueError(f"index must have at least one piece per row, got shape {tuple(index.shape)}")
    if weight.shape[1] != P * C:
        raise ValueError(f"weight must have pieces*C = {P}*{C} = {P * C} in_features (index has {P} pieces of "
                         f"x's width C={C}), got {weight.shape[1]}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    _check_vector(bias, "bias", x, weight.shape[0])
    if extra is not None:
        check_tensor(extra, "extra", ndim=2, dtypes=(x.dtype,), shape_doc="(E, C)")
        if extra.shape[1] != C:
            raise ValueError(f"extra must have x's width C={C} columns, got shape {tuple(extra.shape)}")
    _check_vector(fill, "fill", x, weight.shape[0])
    check_same_device(x=x, index=index, weight=weight, bias=bias, extra=extra, fill=fill)


def _check_index_values(index, total: int, fill) -> None:
    """Every entry of a non-fill row in ``[0, total)``, and fill rows only with ``fill``: one ``aminmax`` and one
    host read when every entry is in range (no fill row then), the row-by-row check otherwise."""
    low, high = torch.aminmax(index)
    # two scalar reads on the CPU (cheaper than a stack); elsewhere one synchronisation for both
    low, high = (low.item(), high.item()) if index.is_cpu else torch.stack((low, high)).tolist()
    if low >= 0 and high < total:
        return
    _check_index_rows(index, total, fill)


def _check_index_rows(index, total: int, fill) -> None:
    is_fill = index[:, 0] < 0
    if fill is None and bool(is_fill.any()):
        raise ValueError("index has negative entries: -1 marks a fill row, which needs fill=")
    bad = ~is_fill[:, None] & ((index < 0) | (index >= total))
    if bool(bad.any()):
        r = int(bad.any(1).nonzero()[0, 0])
        raise ValueError(f"index row {r} = {index[r].tolist()} is out of range: entries must lie in [0, {total}) "
                         f"(x rows then extra rows), or index[r, 0] = -1 for a fill row")


# ------------------------------------------------------------------------------------------- dispatch
def _linear_triton_reasons(x, weight=None, *_, **__) -> list[str]:
    return (dispatch.triton_env_reasons(x.device) + TRITON.reasons(x.dtype)
            + int32_offset_reasons(margin=MAX_BLOCK, x=rows_2d(x) if x.dim() else x, weight=weight))


def _gather_triton_reasons(x, index=None, weight=None, extra=None, *_, **__) -> list[str]:
    reasons = dispatch.triton_env_reasons(x.device) + TRITON.reasons(x.dtype)
    if x.dim() >= 2:  # x's rows and tokens are offset in 64-bit, its channels in 32-bit
        x_rows = torch.empty_strided(x.shape[-2:], x.stride()[-2:], device="meta")
        reasons += int32_offset_reasons(margin=MAX_BLOCK, x=x_rows, index=index, weight=weight, extra=extra)
    return reasons


LINEAR_GELU = register(OpDispatch("linear_gelu", {"triton": _linear_triton_reasons,
                                                         "reference": dispatch.never_refuses}))
GATHER_LINEAR = register(OpDispatch("gather_linear", {"triton": _gather_triton_reasons,
                                                             "reference": dispatch.never_refuses}))


# ------------------------------------------------------------------------------------ linear_gelu op
def _linear_gelu_impl(backend):
    def impl(x, weight, bias, save_pre):
        out, pre = backend(rows_2d(x), weight, bias, save_pre)
        if x.dim() == 2:
            return out, pre
        shape = (*x.shape[:-1], weight.shape[0])
        return out.reshape(shape), pre.reshape(shape) if save_pre else pre
    return impl


@torch.library.custom_op("vlmkern::linear_gelu", mutates_args=())
def _linear_gelu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], save_pre: bool) -> tuple[Tensor, Tensor]:
    return _linear_gelu_impl(_torch.linear_gelu)(x, weight, bias, save_pre)


dispatch.implement(_linear_gelu_op, LINEAR_GELU, {
    "triton": _linear_gelu_impl(dispatch.lazy(f"{__name__}._triton", "linear_gelu")),
    "reference": _linear_gelu_impl(_torch.linear_gelu),
}, probe=lambda x, weight, bias, save_pre: (x, weight))


@_linear_gelu_op.register_fake
def _(x, weight, bias, save_pre):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_pre else (0,))


@torch.library.custom_op("vlmkern::gelu_backward", mutates_args=())
def _gelu_backward_op(grad: Tensor, pre: Tensor) -> Tensor:
    return _torch.gelu_backward(grad.contiguous(), pre.contiguous())


dispatch.implement(_gelu_backward_op, LINEAR_GELU, {
    "triton": lambda grad, pre: _triton_gelu_backward(grad.contiguous(), pre.contiguous()),
    "reference": lambda grad, pre: _torch.gelu_backward(grad.contiguous(), pre.contiguous()),
}, probe=lambda grad, pre: (pre, None))


@_gelu_backward_op.register_fake
def _(grad, pre):
    return torch.empty_like(pre, memory_format=torch.contiguous_format)


def _linear_gelu_setup(ctx, inputs, output):
    x, weight, bias, save_pre = inputs
    if not save_pre and any(ctx.needs_input_grad[:3]):
        raise RuntimeError("vlmkern::linear_gelu was called with save_pre=False on inputs that need gradients")
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_bias = bias is not None


def _linear_gelu_backward(ctx, grad_out, _grad_pre):
    x, weight, pre = ctx.saved_tensors
    d2 = rows_2d(_gelu_backward(grad_out, pre))
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx = dw = db = None
    if need_x:
        dx = d2.matmul(weight)
        dx = dx if x.dim() == 2 else dx.reshape(x.shape)
    if need_w:
        dw = d2.t().matmul(rows_2d(x))
    if ctx.has_bias and need_b:
        db = as_dtype(d2.sum(0, dtype=accumulate_dtype(weight.dtype)), weight.dtype)
    return dx, dw, db, None


dispatch.register_autograd(_linear_gelu_op, _linear_gelu_backward, _linear_gelu_setup)


# ---------------------------------------------------------------------------------- gather_linear op
@torch.library.custom_op("vlmkern::gather_linear", mutates_args=())
def _gather_linear_op(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor], extra: Optional[Tensor],
                      fill: Optional[Tensor], gelu: bool, save_pre: bool) -> tuple[Tensor, Tensor]:
    return _torch.gather_linear(x, index, weight, bias, extra, fill, gelu, save_pre and gelu)


dispatch.implement(_gather_linear_op, GATHER_LINEAR, {
    "triton": lambda x, index, weight, bias, extra, fill, gelu, save_pre: _triton_gather_linear(
        x, index, weight, bias, extra, fill, gelu, save_pre and gelu),
    "reference": lambda x, index, weight, bias, extra, fill, gelu, save_pre: _torch.gather_linear(
        x, index, weight, bias, extra, fill, gelu, save_pre and gelu),
}, probe=lambda x, index, weight, bias, extra, *_: (x, index, weight, extra))


@_gather_linear_op.register_fake
def _(x, index, weight, bias, extra, fill, gelu, save_pre):
    shape = (index.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if (save_pre and gelu) else (0,))


def _gather_setup(ctx, inputs, output):
    x, index, weight, bias, extra, fill, gelu, save_pre = inputs
    if gelu and not save_pre and any(ctx.needs_input_grad[i] for i in (0, 2, 3, 4)):
        raise RuntimeError("vlmkern::gather_linear was called with save_pre=False on inputs that need gradients")
    ctx.save_for_backward(x, index, weight, extra, output[1] if gelu else None)
    ctx.has_bias = bias is not None
    ctx.has_fill = fill is not None
    ctx.gelu = gelu


def _gather_backward(ctx, grad_out, _grad_pre):
    x, index, weight, extra, pre = ctx.saved_tensors
    need_x, _, need_w, need_b, need_e, need_f = ctx.needs_input_grad[:6]
    dpre = _gelu_backward(grad_out, pre) if ctx.gelu else grad_out
    dfill = None
    if ctx.has_fill:
        is_fill = index[:, :1] < 0
        if need_f:
            dfill = as_dtype(grad_out.masked_fill(~is_fill, 0).sum(0, dtype=accumulate_dtype(grad_out.dtype)),
                             grad_out.dtype)
        dpre = dpre.masked_fill(is_fill, 0)
        src = _torch.source_index(index, is_fill)
    else:  # no fill rows: every entry is a source row (what the value check guarantees)
        src = index.long()
    R, P = index.shape
    C = x.shape[-1]
    M = math.prod(x.shape[:-1])
    dx = dw = db = dextra = None
    if need_x or need_e:
        acc = torch.zeros((M + (0 if extra is None else extra.shape[0]), C), device=x.device,
                          dtype=accumulate_dtype(x.dtype))
        acc.index_add_(0, src.reshape(-1), dpre.matmul(weight).reshape(R * P, C).to(acc.dtype))
        if need_x:
            dx = as_dtype(acc if extra is None else acc[:M], x.dtype)
            dx = dx if x.dim() == 2 else dx.reshape(x.shape)
        dextra = as_dtype(acc[M:], extra.dtype) if need_e else None
    if need_w:
        dw = dpre.t().matmul(_torch.source_rows(x, extra)[src].reshape(R, P * C))
    if ctx.has_bias and need_b:
        db = as_dtype(dpre.sum(0, dtype=accumulate_dtype(weight.dtype)), weight.dtype)
    return dx, None, dw, db, dextra, dfill, None, None


dispatch.register_autograd(_gather_linear_op, _gather_backward, _gather_setup)


# Eager calls run the kernels without the dispatcher (dispatch.EagerOp); compiled ones see the ops.
_linear_gelu = dispatch.EagerOp(_linear_gelu_op)
_gelu_backward = dispatch.BackwardOp(_gelu_backward_op)
_gather_linear = dispatch.EagerOp(_gather_linear_op)


# ------------------------------------------------------------------------------------ public API
def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``gelu(x Wᵀ + b)`` (exact GELU) in one kernel. ``x (..., in)``, ``weight (out, in)`` -> ``(..., out)``.

    fp16 / bf16 / fp32 (float64 runs the reference); under ``torch.autocast`` the inputs are cast to the
    autocast dtype first, as ``F.linear`` does. ``in == 0`` gives ``gelu(b)`` (zeros' GELU without bias).
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check_linear(x, weight, bias)
    if dispatch.eager_cpu_reference(LINEAR_GELU, x, weight):
        return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))
    return _linear_gelu(x, weight, bias, dispatch.needs_grad(x, weight, bias))[0]


def gather_linear(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                  extra: Optional[Tensor] = None, fill: Optional[Tensor] = None, gelu: bool = False,
                  validate_values: bool = True) -> Tensor:
    """``act(concat_q src[index[:, q]] Wᵀ + b)`` with rows ``index[:, 0] == -1`` set to ``fill``; one kernel.

    ``x (..., C)``, ``index (R, P)``, ``weight (N, P·C)``, ``bias``/``fill (N,)``, ``extra (E, C)`` -> ``(R, N)``.
    ``gelu=True`` applies exact GELU (``act``; identity otherwise) in the epilogue, before ``fill``.
    ``validate_values`` checks the index values (one host sync on a GPU index; out-of-range entries raise
    ``ValueError``); a model whose index it built itself passes False. Not under ``torch.compile`` or while a
    CUDA graph is captured, where no value can be read.
    """
    check_flag(gelu, "gelu")
    check_flag(validate_values, "validate_values")
    x, weight, bias, extra, fill = autocast_inputs(x, weight, bias, extra, fill)
    _check_gather_linear(x, index, weight, bias, extra, fill)
    # x and index share a device (checked above): index alone says whether values can be read
    if validate_values and index.shape[0] and dispatch.values_readable(index):
        _check_index_values(index, math.prod(x.shape[:-1]) + (0 if extra is None else extra.shape[0]), fill)
    save_pre = gelu and dispatch.needs_grad(x, weight, bias, extra)
    return _gather_linear(x, index, weight, bias, extra, fill, gelu, save_pre)[0]


def gather_linear_gelu(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                       extra: Optional[Tensor] = None) -> Tensor:
    """``gather_linear(..., gelu=True)``: a projector's first GEMM on the gathered rows only.

    ``x (..., C)``, ``index (R, P)``, ``weight (N, P·C)``, ``bias (N,)``, ``extra (E, C)`` -> ``(R, N)``.
    """
    return gather_linear(x, index, weight, bias, extra=extra, gelu=True)


__all__ = ["gather_linear", "gather_linear_gelu", "linear_gelu"]
