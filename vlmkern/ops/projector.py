"""``vlmkern::linear_gelu``: ``gelu(x Wᵀ + b)`` with bias and exact GELU in the GEMM epilogue.

Shapes: ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` -> ``(..., out)`` in ``x.dtype``.
Backward keeps the GEMM's pre-activation (one ``(..., out)`` tensor, saved only when a gradient is needed);
``gelu'`` is one elementwise kernel and the two backward GEMMs go to the vendor BLAS, which has nothing to fuse.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


from vlmkern.ops import dispatch as _dispatch
from vlmkern.ops.checks import (MAX_BLOCK, autocast_inputs, check_same_device, check_tensor, float64_reason,
                                 int32_offset_reasons, rows_2d)
from vlmkern.ops.dispatch import OpDispatch, register

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: reference backend only


def _check_linear(x, weight, bias, name_x="x") -> None:
    check_tensor(x, name_x, dtypes=_FLOATS)
    if x.dim() < 1:
        raise ValueError(f"{name_x} must have at least 1 dimension (..., in_features), got a scalar")
    check_tensor(weight, "weight", ndim=2, dtypes=_FLOATS, shape_doc="(out_features, in_features)")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has in_features={weight.shape[1]} but {name_x} has last dim {x.shape[-1]}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match {name_x} dtype {x.dtype}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=(x.dtype,), shape_doc="(out_features,)")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have out_features={weight.shape[0]} elements, got {bias.shape[0]}")
    check_same_device(**{name_x: x, "weight": weight, "bias": bias})


def _triton_reasons(x, weight=None, *_, **__) -> list[str]:
    x2 = rows_2d(x) if x.dim() else x
    return (_dispatch.triton_env_reasons(x.device) + float64_reason(x)
            + int32_offset_reasons(margin=MAX_BLOCK, x=x2, weight=weight))


LINEAR_GELU = register(OpDispatch("linear_gelu", {
    "triton": _triton_reasons,
    "reference": lambda *a, **k: [],
}))


def _triton_linear_gelu(x2, weight, bias, save_pre: bool) -> tuple[Tensor, Tensor]:
    import triton
    from vlmkern.kernels.projector import LINEAR_GELU_CONFIG, _linear_gelu_fwd_kernel

    M, K = x2.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    pre = torch.empty((M, N) if save_pre else (0,), device=x2.device, dtype=x2.dtype)
    cfg = LINEAR_GELU_CONFIG[x2.element_size()]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    if M * N:
        _linear_gelu_fwd_kernel[grid](
            x2, weight, bias.contiguous() if bias is not None else weight, out, pre if save_pre else out,
            M, N, K, *x2.stride(), *weight.stride(), *out.stride(),
            HAS_BIAS=bias is not None, SAVE_PRE=save_pre, UPCAST=_dispatch.triton_interpreting(),
            INPUT_PRECISION=_dispatch.dot_precision(x2.dtype), **cfg)
    return out, pre


@torch.library.custom_op("vlmkern::linear_gelu", mutates_args=())
def _linear_gelu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], save_pre: bool) -> tuple[Tensor, Tensor]:
    x2 = rows_2d(x)
    if LINEAR_GELU.select(x, weight) == "triton":
        out, pre = _triton_linear_gelu(x2, weight, bias, save_pre)
    else:
        pre_full = torch.nn.functional.linear(x2, weight, bias)
        out = torch.nn.functional.gelu(pre_full)
        pre = pre_full if save_pre else pre_full.new_empty((0,))
    shape = (*x.shape[:-1], weight.shape[0])
    return out.reshape(shape), pre.reshape(shape) if save_pre else pre


@_linear_gelu_op.register_fake
def _(x, weight, bias, save_pre):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_pre else (0,))


@torch.library.custom_op("vlmkern::gelu_backward", mutates_args=())
def _gelu_backward_op(grad: Tensor, pre: Tensor) -> Tensor:
    grad = grad.contiguous()
    pre = pre.contiguous()
    if LINEAR_GELU.select(pre, None) == "triton":
        import triton
        from vlmkern.kernels.projector import GELU_BWD_CONFIG, _gelu_bwd_kernel

        dpre = torch.empty_like(pre)
        n = pre.numel()
        if n:
            _gelu_bwd_kernel[(triton.cdiv(n, GELU_BWD_CONFIG["BLOCK"]),)](grad, pre, dpre, n, **GELU_BWD_CONFIG)
        return dpre
    return torch.ops.aten.gelu_backward(grad, pre)


@_gelu_backward_op.register_fake
def _(grad, pre):
    return torch.empty_like(pre, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, bias, save_pre = inputs
    if not save_pre and any(ctx.needs_input_grad[:3]):
        raise RuntimeError("vlmkern::linear_gelu was called with save_pre=False on inputs that need gradients")
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out, _grad_pre):
    x, weight, pre = ctx.saved_tensors
    dpre = _gelu_backward_op(grad_out, pre)
    d2 = rows_2d(dpre)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = d2.matmul(weight).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        dw = d2.t().matmul(rows_2d(x))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = d2.sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dw, db, None


_linear_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``gelu(x Wᵀ + b)`` (exact GELU) in one kernel. ``x (..., in)``, ``weight (out, in)`` -> ``(..., out)``.

    fp16 / bf16 / fp32 (float64 runs the reference); under ``torch.autocast`` the inputs are cast to the
    autocast dtype first, as ``F.linear`` does. ``in == 0`` gives ``gelu(b)`` (zeros' GELU without bias).
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check_linear(x, weight, bias)
    if _dispatch.eager_cpu_reference(LINEAR_GELU, x, weight):
        return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))
    return _linear_gelu_op(x, weight, bias, _dispatch.needs_grad(x, weight, bias))[0]


__all__ = ["linear_gelu"]

