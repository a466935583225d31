"""Projector GEMMs: ``Linear -> exact GELU`` with the GELU (and bias) in the GEMM epilogue, and its backward
elementwise step.

``out = gelu(x Wᵀ + b)`` with ``gelu(z) = z/2 · (1 + erf(z/√2))`` (``nn.GELU()``, LLaVA's ``mlp2x_gelu``).
"""
from __future__ import annotations
import triton
import triton.language as tl

from vlmkern.kernels._common import dot, grouped_tile

# tl.constexpr: a plain module float is a NameError inside @jit on a GPU (the interpreter accepts it).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _linear_gelu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, pre_ptr,
    M, N, K, s_xm, s_xk, s_wn, s_wk, s_om, s_on,
    HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[m, n] = gelu(sum_k x[m, k] W[n, k] + b[n]); pre (same strides as out) keeps the argument for backward."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * s_xm + rk[None, :] * s_xk,
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :].to(tl.int64) * s_wn + rk[:, None] * s_wk,
                    mask=(rn < N)[None, :] & (rk < K)[:, None], other=0.0)
        acc += dot(a, w.to(a.dtype), UPCAST, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    offs = rm[:, None].to(tl.int64) * s_om + rn[None, :] * s_on
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    # Round the GEMM result to the output dtype before the activation, as nn.Linear then nn.GELU would.
    pre = acc.to(out_ptr.dtype.element_ty)
    if SAVE_PRE:
        tl.store(pre_ptr + offs, pre, mask=mask)
    z = pre.to(tl.float32)
    y = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(grad_ptr, pre_ptr, dpre_ptr, numel, BLOCK: tl.constexpr):
    """dpre = grad · gelu'(pre), gelu'(z) = Φ(z) + z·φ(z); contiguous 1-D."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    tl.store(dpre_ptr + offs, (g * d).to(dpre_ptr.dtype.element_ty), mask=mask)
