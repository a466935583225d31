"""``vlmkern::gather_linear``: the gather-GEMM behind dynamic-resolution packing (LLaVA-NeXT AnyRes,
InternLM-XComposer2-4KHD), with the first projector GEMM's bias + exact GELU in the epilogue.

``out[r] = act(concat_q src[index[r, q]] Wᵀ + b)``, rows with ``index[r, 0] < 0`` set to ``fill``.

Shapes: ``x (..., C)`` (any strides; rows in logical order, so ``hidden_states[:, 1:]`` is read in place),
``index (R, P)`` int32/int64, ``weight (N, P·C)``, ``bias (N,)``, ``extra (E, C)`` (source rows ``M .. M+E-1``
after the ``M = x.numel() // C`` rows of ``x``), ``fill (N,)`` -> ``(R, N)`` in ``x.dtype``.

Backward: ``dpre`` from the GELU backward (zeroed on fill rows), ``dW = dpreᵀ · A`` and ``db`` with torch over
the re-gathered ``A``, ``dx``/``dextra`` by a float32 ``index_add_`` of ``dpre · W`` through the same index (a
row used several times, e.g. a separator, accumulates), ``dfill`` = the fill rows' gradient summed. No host sync.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vlmkern.reference import packing as _reference
from vlmkern.ops import dispatch as _dispatch
from vlmkern.ops.checks import (MAX_BLOCK, autocast_inputs, check_same_device, check_tensor, float64_reason,
                                 int32_offset_reasons, is_meta, rows_2d)
from vlmkern.ops.dispatch import OpDispatch, register
from vlmkern.ops.projector import _gelu_backward_op

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: reference backend only
_INDEX = (torch.int32, torch.int64)
_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# --------------------------------------------------------------------------------------------- checks
def _check_gather_linear(x, index, weight, bias, extra, fill, *, validate_values: bool) -> None:
    check_tensor(x, "x", dtypes=_FLOATS)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (rows..., C), got shape {tuple(x.shape)}")
    check_tensor(index, "index", ndim=2, dtypes=_INDEX, shape_doc="(rows, pieces)")
    check_tensor(weight, "weight", ndim=2, dtypes=_FLOATS, shape_doc="(out_features, pieces*C)")
    C = x.shape[-1]
    R, P = index.shape
    if P < 1:
        raise ValueError(f"index must have at least one piece per row, got shape {tuple(index.shape)}")
    if weight.shape[1] != P * C:
        raise ValueError(f"weight must have pieces*C = {P}*{C} = {P * C} in_features (index has {P} pieces of "
                         f"x's width C={C}), got {weight.shape[1]}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype}")
    N = weight.shape[0]
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=(x.dtype,), shape_doc="(out_features,)")
        if bias.shape[0] != N:
            raise ValueError(f"bias must have out_features={N} elements, got {bias.shape[0]}")
    if extra is not None:
        check_tensor(extra, "extra", ndim=2, dtypes=(x.dtype,), shape_doc="(E, C)")
        if extra.shape[1] != C:
            raise ValueError(f"extra must have x's width C={C} columns, got shape {tuple(extra.shape)}")
    if fill is not None:
        check_tensor(fill, "fill", ndim=1, dtypes=(x.dtype,), shape_doc="(out_features,)")
        if fill.shape[0] != N:
            raise ValueError(f"fill must have out_features={N} elements, got {fill.shape[0]}")
    check_same_device(x=x, index=index, weight=weight, bias=bias, extra=extra, fill=fill)
    if validate_values and R and not torch.compiler.is_compiling() and not is_meta(x, index):
        total = math.prod(x.shape[:-1]) + (0 if extra is None else extra.shape[0])
        is_fill = index[:, 0] < 0
        if fill is None and bool(is_fill.any()):
            raise ValueError("index has negative entries: -1 marks a fill row, which needs fill=")
        bad = ~is_fill[:, None] & ((index < 0) | (index >= total))
        if bool(bad.any()):
            r = int(bad.any(1).nonzero()[0, 0])
            raise ValueError(f"index row {r} = {index[r].tolist()} is out of range: entries must lie in [0, {total}) "
                             f"(x rows then extra rows), or index[r, 0] = -1 for a fill row")


# ------------------------------------------------------------------------------------------- dispatch
def _triton_reasons(x, index=None, weight=None, extra=None, *_, **__) -> list[str]:
    reasons = _dispatch.triton_env_reasons(x.device) + float64_reason(x)
    if x.dim() >= 2:  # x's rows and tokens are offset in 64-bit, its channels in 32-bit
        x_rows = torch.empty_strided(x.shape[-2:], x.stride()[-2:], device="meta")
        reasons += int32_offset_reasons(margin=MAX_BLOCK, x=x_rows, index=index, weight=weight, extra=extra)
    return reasons


GATHER_LINEAR = register(OpDispatch("gather_linear", {
    "triton": _triton_reasons,
    "reference": lambda *a, **k: [],
}))


def _as_groups(x: Tensor) -> Tensor:
    """``x (..., T, C)`` -> a ``(G, T, C)`` view (``(1, M, C)`` for 2-D): rows ``g·T + t`` in logical order."""
    return x.unsqueeze(0) if x.dim() == 2 else x.reshape(math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1])


def _triton_gather_linear(x, index, weight, bias, extra, fill, gelu: bool, save_pre: bool) -> tuple[Tensor, Tensor]:
    import triton
    from vlmkern.kernels.packing import GATHER_LINEAR_CONFIGS, _gather_linear_fwd_kernel

    x3 = _as_groups(x)
    G, T, C = x3.shape
    R, P = index.shape
    N = weight.shape[0]
    M = G * T
    E = 0 if extra is None else extra.shape[0]
    out = torch.empty((R, N), device=x.device, dtype=x.dtype)
    pre = torch.empty((R, N) if save_pre else (0,), device=x.device, dtype=x.dtype)
    cfg = GATHER_LINEAR_CONFIGS[_TRITON_TYPE[x.dtype]]
    grid = (triton.cdiv(R, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    if R * N:
        e = extra if extra is not None else x3
        _gather_linear_fwd_kernel[grid](
            x3, e, index, weight, bias.contiguous() if bias is not None else weight,
            fill.contiguous() if fill is not None else weight,
            out, pre if save_pre else out,
            R, N, C, P, max(T, 1), M, M + E,
            *x3.stride(), e.stride(0) if extra is not None else 0, e.stride(1) if extra is not None else 0,
            *index.stride(), *weight.stride(), *out.stride(),
            HAS_BIAS=bias is not None, HAS_EXTRA=extra is not None, HAS_FILL=fill is not None, GELU=gelu,
            SAVE_PRE=save_pre, UPCAST=_dispatch.triton_interpreting(), INPUT_PRECISION=_dispatch.dot_precision(x.dtype), **cfg)
    return out, pre


# ------------------------------------------------------------------------------------ custom op
@torch.library.custom_op("vlmkern::gather_linear", mutates_args=())
def _gather_linear_op(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor], extra: Optional[Tensor],
                      fill: Optional[Tensor], gelu: bool, save_pre: bool) -> tuple[Tensor, Tensor]:
    save_pre = save_pre and gelu
    if GATHER_LINEAR.select(x, index, weight, extra) == "triton":
        return _triton_gather_linear(x, index, weight, bias, extra, fill, gelu, save_pre)
    pre = _reference.gather_linear(x, index, weight, bias, extra=extra)
    out = torch.nn.functional.gelu(pre) if gelu else pre
    if fill is not None:
        if out.device.type == "cpu":
            out[index[:, 0] < 0] = fill           # only the fill rows (a CPU mask costs no sync); out is ours
        else:
            out = torch.where(index[:, :1] < 0, fill[None, :], out)
    return out, pre if save_pre else pre.new_empty((0,))


@_gather_linear_op.register_fake
def _(x, index, weight, bias, extra, fill, gelu, save_pre):
    shape = (index.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if (save_pre and gelu) else (0,))


def _setup_context(ctx, inputs, output):
    x, index, weight, bias, extra, fill, gelu, save_pre = inputs
    if gelu and not save_pre and any(ctx.needs_input_grad[i] for i in (0, 2, 3, 4)):
        raise RuntimeError("vlmkern::gather_linear was called with save_pre=False on inputs that need gradients")
    ctx.save_for_backward(x, index, weight, extra, output[1] if gelu else None)
    ctx.has_bias = bias is not None
    ctx.has_fill = fill is not None
    ctx.gelu = gelu


def _backward(ctx, grad_out, _grad_pre):
    x, index, weight, extra, pre = ctx.saved_tensors
    need_x, _, need_w, need_b, need_e, need_f = ctx.needs_input_grad[:6]
    dpre = _gelu_backward_op(grad_out, pre) if ctx.gelu else grad_out
    idx = index.long()
    dfill = None
    src = idx
    if ctx.has_fill:
        kept = (idx[:, 0] >= 0)[:, None]
        if need_f:
            dfill = grad_out.masked_fill(kept, 0).sum(0, dtype=torch.float32).to(grad_out.dtype)
        dpre = dpre.masked_fill(~kept, 0)
        src = idx.masked_fill(~kept, 0)  # a fill row reads nothing; its other entries are ignored
    R, P = idx.shape
    C = x.shape[-1]
    M = math.prod(x.shape[:-1])
    dx = dw = db = dextra = None
    if need_x or need_e:
        da = dpre.matmul(weight).reshape(R * P, C)
        E = 0 if extra is None else extra.shape[0]
        acc = torch.zeros((M + E, C), device=x.device, dtype=torch.float32)
        acc.index_add_(0, src.reshape(-1), da.float())
        if need_x:
            dx = acc[:M].to(x.dtype).reshape(x.shape)
        if need_e:
            dextra = acc[M:].to(extra.dtype)
    if need_w:
        rows = rows_2d(x)
        if extra is not None:
            rows = torch.cat([rows, extra])
        dw = dpre.t().matmul(rows[src].reshape(R, P * C))
    if ctx.has_bias and need_b:
        db = dpre.sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, None, dw, db, dextra, dfill, None, None


_gather_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ public API
def _gather_linear(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                   extra: Optional[Tensor] = None, fill: Optional[Tensor] = None, gelu: bool = False,
                   validate_values: bool = True) -> Tensor:
    x, weight, bias, extra, fill = autocast_inputs(x, weight, bias, extra, fill)
    _check_gather_linear(x, index, weight, bias, extra, fill, validate_values=validate_values)
    save_pre = gelu and _dispatch.needs_grad(x, weight, bias, extra)
    return _gather_linear_op(x, index, weight, bias, extra, fill, gelu, save_pre)[0]


def gather_linear(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                  extra: Optional[Tensor] = None, fill: Optional[Tensor] = None) -> Tensor:
    """``concat_q src[index[:, q]] Wᵀ + b`` with rows ``index[:, 0] == -1`` set to ``fill``; one kernel.

    ``x (..., C)``, ``index (R, P)``, ``weight (N, P·C)``, ``bias``/``fill (N,)``, ``extra (E, C)`` -> ``(R, N)``.
    Index values are checked (one host sync on a GPU index); out-of-range entries raise ``ValueError``.
    """
    return _gather_linear(x, index, weight, bias, extra=extra, fill=fill, gelu=False)


def gather_linear_gelu(x: Tensor, index: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                       extra: Optional[Tensor] = None) -> Tensor:
    """``gelu(concat_q src[index[:, q]] Wᵀ + b)`` (exact GELU): a projector's first GEMM on gathered rows only.

    ``x (..., C)``, ``index (R, P)``, ``weight (N, P·C)``, ``bias (N,)``, ``extra (E, C)`` -> ``(R, N)``.
    """
    return _gather_linear(x, index, weight, bias, extra=extra, gelu=True)


__all__ = ["gather_linear", "gather_linear_gelu"]
