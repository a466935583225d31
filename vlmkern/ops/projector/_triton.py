"""Triton backend of the projector family: ``linear_gelu``, ``gelu_backward`` and ``gather_linear``.

Each launch's runtime arguments are written once, in an argument builder (``*_args``) that both the launcher and
the offline build check (``_builds``, called with meta tensors) read. The launchers call it once per launch key
(a memoised :class:`LaunchPlan`), not per call.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from vlmkern.kernels.packing import _gather_linear_fwd_kernel
from vlmkern.kernels.projector import _gelu_bwd_kernel, _linear_gelu_fwd_kernel
from vlmkern.ops.launch import (KernelBuild, LaunchPlan, build_from_args, cdiv, host_dots, launch, layout,
                                meta_from, meta_tensor, plan_from_args, register_builds)

# Per element size (fp32: FMA units unless TF32 is allowed, small tile to stay in registers); spill-free on sm_80
# and sm_90 by the build check.
LINEAR_GELU_CONFIG = {2: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
                      4: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)}
GELU_BWD_CONFIG = dict(BLOCK=1024, num_warps=4, num_stages=1)
GATHER_LINEAR_CONFIGS = {
    2: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    4: dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
}
# (GELU, HAS_EXTRA, HAS_FILL, SAVE_PRE) combinations the models launch: the first projector GEMM (with or
# without separator rows, with or without a saved pre-activation) and LLaVA-NeXT's second GEMM with the newline.
SHIPPED_GATHER_FLAGS = [(True, False, False, False), (True, False, False, True), (True, True, False, False),
                        (True, True, False, True), (False, False, True, False)]


# Launch plans (vlmkern.ops.launch.LaunchPlan): computed once per launch key by the argument builders on meta
# tensors; per call only the outputs are allocated and the pointers passed.
_PLANS = 256       # plans kept per launcher (an LRU: a model launches a handful of shapes)


# ------------------------------------------------------------------------------------------ linear_gelu
def _linear_gelu_args(x2: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, pre: Tensor) -> dict:
    M, K = x2.shape
    return dict(x_ptr=x2, w_ptr=weight, b_ptr=bias if bias is not None else weight, out_ptr=out, pre_ptr=pre,
                M=M, N=weight.shape[0], K=K, s_xm=x2.stride(0), s_xk=x2.stride(1), s_wn=weight.stride(0),
                s_wk=weight.stride(1), s_om=out.stride(0), s_on=out.stride(1))


def linear_gelu(x2: Tensor, weight: Tensor, bias: Tensor | None, save_pre: bool) -> tuple[Tensor, Tensor]:
    """``x2 (M, K)``, ``weight (N, K)`` -> ``(out, pre)`` ``(M, N)`` (``pre`` ``(0,)`` unless ``save_pre``)."""
    M, N = x2.shape[0], weight.shape[0]
    out = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    pre = torch.empty((M, N) if save_pre else (0,), device=x2.device, dtype=x2.dtype)
    if M * N:
        plan = _linear_gelu_plan(x2.shape, x2.stride(), weight.shape, weight.stride(), bias is not None, save_pre,
                                 x2.dtype, *host_dots(x2.dtype))
        launch(_linear_gelu_fwd_kernel, plan.grid,
               dict(x_ptr=x2, w_ptr=weight, b_ptr=bias.contiguous() if bias is not None else weight, out_ptr=out,
                    pre_ptr=pre if save_pre else out), plan.static)
    return out, pre


@functools.lru_cache(maxsize=_PLANS)
def _linear_gelu_plan(x_shape, x_stride, w_shape, w_stride, has_bias: bool, save_pre: bool, dtype: torch.dtype,
                      upcast: bool, precision: str) -> LaunchPlan:
    cfg = LINEAR_GELU_CONFIG[dtype.itemsize]
    w = meta_tensor(w_shape, w_stride, dtype)
    out = meta_tensor((x_shape[0], w_shape[0]), dtype=dtype)
    args = _linear_gelu_args(meta_tensor(x_shape, x_stride, dtype), w, w if has_bias else None, out, out)
    grid = (cdiv(args["M"], cfg["BLOCK_M"]) * cdiv(args["N"], cfg["BLOCK_N"]),)
    return plan_from_args(grid, args, dict(HAS_BIAS=has_bias, SAVE_PRE=save_pre, UPCAST=upcast,
                                           INPUT_PRECISION=precision, **cfg))


def _gelu_bwd_args(grad: Tensor, pre: Tensor, dpre: Tensor) -> dict:
    return dict(grad_ptr=grad, pre_ptr=pre, dpre_ptr=dpre, numel=pre.numel())


def gelu_backward(grad: Tensor, pre: Tensor) -> Tensor:
    """``grad · gelu'(pre)`` for contiguous ``grad`` / ``pre`` of one shape."""
    dpre = torch.empty_like(pre)
    numel = pre.numel()
    if numel:
        plan = _gelu_bwd_plan(numel)
        launch(_gelu_bwd_kernel, plan.grid, dict(grad_ptr=grad, pre_ptr=pre, dpre_ptr=dpre), plan.static)
    return dpre


@functools.lru_cache(maxsize=_PLANS)
def _gelu_bwd_plan(numel: int) -> LaunchPlan:
    t = meta_tensor((numel,))
    return plan_from_args((cdiv(numel, GELU_BWD_CONFIG["BLOCK"]),), _gelu_bwd_args(t, t, t), GELU_BWD_CONFIG)


# ---------------------------------------------------------------------------------------- gather_linear
def _gather_linear_args(x3: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None, extra: Tensor | None,
                        fill: Tensor | None, out: Tensor, pre: Tensor) -> dict:
    G, T, C = x3.shape
    R, P = index.shape
    M = G * T
    e = extra if extra is not None else x3
    return dict(x_ptr=x3, e_ptr=e, idx_ptr=index, w_ptr=weight, b_ptr=bias if bias is not None else weight,
                fill_ptr=fill if fill is not None else weight, out_ptr=out, pre_ptr=pre,
                R=R, N=weight.shape[0], C=C, P=P, T=max(T, 1), M=M,
                ME=M + (0 if extra is None else extra.shape[0]),
                s_xg=x3.stride(0), s_xt=x3.stride(1), s_xc=x3.stride(2),
                s_em=e.stride(0) if extra is not None else 0, s_ec=e.stride(1) if extra is not None else 0,
                s_ir=index.stride(0), s_ip=index.stride(1), s_wn=weight.stride(0), s_wk=weight.stride(1),
                s_om=out.stride(0), s_on=out.stride(1))


def as_groups(x: Tensor) -> Tensor:
    """``x (..., T, C)`` -> a ``(G, T, C)`` view (``(1, M, C)`` for 2-D): rows ``g·T + t`` in logical order."""
    return x.unsqueeze(0) if x.dim() == 2 else x.reshape(math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1])


def gather_linear(x: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None, extra: Tensor | None,
                  fill: Tensor | None, gelu: bool, save_pre: bool) -> tuple[Tensor, Tensor]:
    """``x (..., T, C)`` (any strides; rows in logical order, :func:`as_groups`), ``index (R, P)`` -> ``(out,
    pre)`` ``(R, N)``."""
    R, N = index.shape[0], weight.shape[0]
    out = torch.empty((R, N), device=x.device, dtype=x.dtype)
    pre = torch.empty((R, N) if save_pre else (0,), device=x.device, dtype=x.dtype)
    if R * N:
        plan = _gather_linear_plan(x.shape, x.stride(), index.shape, index.stride(), weight.shape, weight.stride(),
                                   layout(extra), bias is not None, fill is not None, gelu, save_pre, x.dtype,
                                   *host_dots(x.dtype))
        # A 2-D or 3-D x is its own group view's storage at its own offset: the kernel reads the same bytes
        # through the plan's strides; more dims take the (G, T, C) view (or copy, which reshape may make).
        x3 = x if x.dim() <= 3 else as_groups(x)
        launch(_gather_linear_fwd_kernel, plan.grid,
               dict(x_ptr=x3, e_ptr=extra if extra is not None else x3, idx_ptr=index, w_ptr=weight,
                    b_ptr=bias.contiguous() if bias is not None else weight,
                    fill_ptr=fill.contiguous() if fill is not None else weight, out_ptr=out,
                    pre_ptr=pre if save_pre else out), plan.static)
    return out, pre


@functools.lru_cache(maxsize=_PLANS)
def _gather_linear_plan(x_shape, x_stride, i_shape, i_stride, w_shape, w_stride, extra: tuple | None,
                        has_bias: bool, has_fill: bool, gelu: bool, save_pre: bool, dtype: torch.dtype,
                        upcast: bool, precision: str) -> LaunchPlan:
    cfg = GATHER_LINEAR_CONFIGS[dtype.itemsize]
    w = meta_tensor(w_shape, w_stride, dtype)
    out = meta_tensor((i_shape[0], w_shape[0]), dtype=dtype)
    x3, index = as_groups(meta_tensor(x_shape, x_stride, dtype)), meta_tensor(i_shape, i_stride, torch.int64)
    args = _gather_linear_args(x3, index, w, w if has_bias else None,
                               meta_from(extra, dtype), w if has_fill else None, out, out)
    grid = (cdiv(args["R"], cfg["BLOCK_M"]) * cdiv(args["N"], cfg["BLOCK_N"]),)
    return plan_from_args(grid, args, dict(HAS_BIAS=has_bias, HAS_EXTRA=extra is not None, HAS_FILL=has_fill,
                                           GELU=gelu, SAVE_PRE=save_pre, UPCAST=upcast, INPUT_PRECISION=precision,
                                           **cfg))


# ------------------------------------------------------------------------------------- shipped builds
_INDEX_NAME = {torch.int32: "i32", torch.int64: "i64"}


def _builds() -> list[KernelBuild]:
    """What the models launch: contiguous row-major operands (unit innermost strides, specialised to 1 by
    Triton at launch), 16-aligned pointers, widths and row strides."""
    out = []
    compiled = dict(UPCAST=False)
    for dt, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        size = dt.itemsize
        precision = "ieee" if size == 4 else "tf32"
        cfg = LINEAR_GELU_CONFIG[size]
        x2, w, o = (meta_tensor((64, 64), dtype=dt) for _ in range(3))
        b = meta_tensor((64,), dtype=dt)
        for save in (False, True):
            out.append(build_from_args(
                f"linear_gelu_fwd[{name},save_pre={save}]", _linear_gelu_fwd_kernel,
                _linear_gelu_args(x2, w, b, o, o), dict(HAS_BIAS=True, SAVE_PRE=save, INPUT_PRECISION=precision,
                                                        **compiled, **cfg),
                cfg, unit=("s_xk", "s_wk", "s_on"), div16=("N", "K", "s_xm", "s_wn", "s_om")))
        out.append(build_from_args(f"gelu_bwd[{name}]", _gelu_bwd_kernel, _gelu_bwd_args(o, o, o),
                                   {"BLOCK": GELU_BWD_CONFIG["BLOCK"]}, GELU_BWD_CONFIG))
        cfg = GATHER_LINEAR_CONFIGS[size]
        aligned = ("C", "N", "s_xg", "s_xt", "s_em", "s_wn", "s_om")
        for it in (torch.int32, torch.int64):
            for gelu, extra, fill, save in SHIPPED_GATHER_FLAGS:
                x3, idx = meta_tensor((2, 64, 64), dtype=dt), meta_tensor((64, 1), dtype=it)
                ones = ("s_xc", "s_ec", "s_wk", "s_on", "s_ip") + (() if extra else ("s_ir",))
                args = _gather_linear_args(x3, idx, w, b, meta_tensor((4, 64), dtype=dt) if extra else None,
                                           b if fill else None, o, o)
                out.append(build_from_args(
                    f"gather_linear_fwd[{name},{_INDEX_NAME[it]},gelu={gelu},extra={extra},fill={fill},save_pre={save}]",
                    _gather_linear_fwd_kernel, args,
                    dict(HAS_BIAS=True, HAS_EXTRA=extra, HAS_FILL=fill, GELU=gelu, SAVE_PRE=save,
                         INPUT_PRECISION=precision, **compiled, **cfg),
                    cfg, unit=ones, div16=aligned))
    return out


register_builds(*_builds())
