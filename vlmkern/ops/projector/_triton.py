"""Triton backend of the projector family: ``linear_gelu``, ``gelu_backward`` and ``gather_linear``.

Each launch's runtime arguments are written once, in an argument builder (``*_args``) that both the launcher and
the offline build check (``_builds``, called with meta tensors) read.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vlmkern.kernels.packing import _gather_linear_fwd_kernel
from vlmkern.kernels.projector import _gelu_bwd_kernel, _linear_gelu_fwd_kernel
from vlmkern.ops.dispatch import dot_precision, triton_interpreting
from vlmkern.ops.launch import KernelBuild, build_from_args, cdiv, launch, register_builds

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


def _precision(dtype: torch.dtype) -> dict:
    return dict(UPCAST=triton_interpreting(), INPUT_PRECISION=dot_precision(dtype))


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
    cfg = LINEAR_GELU_CONFIG[x2.element_size()]
    if M * N:
        args = _linear_gelu_args(x2, weight, bias.contiguous() if bias is not None else None, out,
                                 pre if save_pre else out)
        launch(_linear_gelu_fwd_kernel, (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),), args,
               dict(HAS_BIAS=bias is not None, SAVE_PRE=save_pre, **_precision(x2.dtype), **cfg))
    return out, pre


def _gelu_bwd_args(grad: Tensor, pre: Tensor, dpre: Tensor) -> dict:
    return dict(grad_ptr=grad, pre_ptr=pre, dpre_ptr=dpre, numel=pre.numel())


def gelu_backward(grad: Tensor, pre: Tensor) -> Tensor:
    """``grad · gelu'(pre)`` for contiguous ``grad`` / ``pre`` of one shape."""
    dpre = torch.empty_like(pre)
    if pre.numel():
        launch(_gelu_bwd_kernel, (cdiv(pre.numel(), GELU_BWD_CONFIG["BLOCK"]),), _gelu_bwd_args(grad, pre, dpre),
               GELU_BWD_CONFIG)
    return dpre


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


def gather_linear(x3: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None, extra: Tensor | None,
                  fill: Tensor | None, gelu: bool, save_pre: bool) -> tuple[Tensor, Tensor]:
    """``x3 (G, T, C)`` rows in logical order, ``index (R, P)`` -> ``(out, pre)`` ``(R, N)``."""
    R, N = index.shape[0], weight.shape[0]
    out = torch.empty((R, N), device=x3.device, dtype=x3.dtype)
    pre = torch.empty((R, N) if save_pre else (0,), device=x3.device, dtype=x3.dtype)
    cfg = GATHER_LINEAR_CONFIGS[x3.element_size()]
    if R * N:
        args = _gather_linear_args(x3, index, weight, bias.contiguous() if bias is not None else None, extra,
                                   fill.contiguous() if fill is not None else None, out, pre if save_pre else out)
        launch(_gather_linear_fwd_kernel, (cdiv(R, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),), args,
               dict(HAS_BIAS=bias is not None, HAS_EXTRA=extra is not None, HAS_FILL=fill is not None, GELU=gelu,
                    SAVE_PRE=save_pre, **_precision(x3.dtype), **cfg))
    return out, pre


# ------------------------------------------------------------------------------------- shipped builds
_INDEX_NAME = {torch.int32: "i32", torch.int64: "i64"}


def _meta(*shape, dtype=torch.float16) -> Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _builds() -> list[KernelBuild]:
    """What the models launch: contiguous row-major operands (unit innermost strides, specialised to 1 by
    Triton at launch), 16-aligned pointers, widths and row strides."""
    out = []
    compiled = dict(UPCAST=False)
    for dt, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        size = dt.itemsize
        precision = "ieee" if size == 4 else "tf32"
        cfg = LINEAR_GELU_CONFIG[size]
        x2, w, b, o = _meta(64, 64, dtype=dt), _meta(64, 64, dtype=dt), _meta(64, dtype=dt), _meta(64, 64, dtype=dt)
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
                x3, idx = _meta(2, 64, 64, dtype=dt), _meta(64, 1, dtype=it)
                ones = ("s_xc", "s_ec", "s_wk", "s_on", "s_ip") + (() if extra else ("s_ir",))
                args = _gather_linear_args(x3, idx, w, b, _meta(4, 64, dtype=dt) if extra else None,
                                           b if fill else None, o, o)
                out.append(build_from_args(
                    f"gather_linear_fwd[{name},{_INDEX_NAME[it]},gelu={gelu},extra={extra},fill={fill},save_pre={save}]",
                    _gather_linear_fwd_kernel, args,
                    dict(HAS_BIAS=True, HAS_EXTRA=extra, HAS_FILL=fill, GELU=gelu, SAVE_PRE=save,
                         INPUT_PRECISION=precision, **compiled, **cfg),
                    cfg, unit=ones, div16=aligned))
    return out


register_builds(*_builds())
