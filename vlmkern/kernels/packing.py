"""Gather-GEMM for dynamic-resolution packing: the A operand is read through a row index, so only the rows a
model keeps are projected, and rows are placed in their final order by the same pass.

``out[r] = act(concat_q src[index[r, q]] @ Wᵀ + b)`` where ``src`` is the vision features ``x`` (rows
``0 .. M-1``, viewed as ``(G, T, C)`` so a sliced ``hidden_states[:, 1:]`` needs no copy) followed by a few
``extra`` rows (``M .. M+E-1``: learned separator vectors). Piece ``q`` of the K dimension, columns
``[q·C, (q+1)·C)``, comes from source row ``index[r, q]``: one piece for LLaVA-NeXT, four for the 2×2 channel
merge of InternLM-XComposer2-4KHD. With ``HAS_FILL`` a row whose ``index[r, 0] < 0`` is not computed from the
GEMM but set to the ``fill`` vector (LLaVA-NeXT's ``image_newline``, which lives in the output space).
"""
from __future__ import annotations

import triton
import triton.language as tl

from vlmkern.kernels._common import dot, grouped_tile

_SQRT1_2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _gather_linear_fwd_kernel(
    x_ptr, e_ptr, idx_ptr, w_ptr, b_ptr, fill_ptr, out_ptr, pre_ptr,
    R, N, C, P, T, M, ME,
    s_xg, s_xt, s_xc, s_em, s_ec, s_ir, s_ip, s_wn, s_wk, s_om, s_on,
    HAS_BIAS: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_FILL: tl.constexpr, GELU: tl.constexpr,
    SAVE_PRE: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out ``(R, N)``; x row ``s`` (``0 <= s < M``) is ``x[s // T, s % T, :]``; extra row ``s - M`` for ``M <= s < ME``.

    Source rows outside ``[0, ME)`` load as zeros (never out of bounds). 1-D grid in grouped order.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), R, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < R
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q in range(0, P):
        src = tl.load(idx_ptr + rm.to(tl.int64) * s_ir + q * s_ip, mask=m_ok, other=-1).to(tl.int64)
        in_x = (src >= 0) & (src < M)
        xs = tl.where(in_x, src, 0)
        x_row = (xs // T) * s_xg + (xs % T) * s_xt
        if HAS_EXTRA:
            in_e = (src >= M) & (src < ME)
            # No tl.where here: Triton 3.6 miscompiles a second select on `src` (layout mismatch in
            # arith.select). Rows outside [M, ME) never dereference e_row: their loads are masked by in_e.
            e_row = (src - M) * s_em
        for k0 in range(0, C, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < C
            a = tl.load(x_ptr + x_row[:, None] + rk[None, :] * s_xc, mask=in_x[:, None] & k_ok[None, :], other=0.0)
            if HAS_EXTRA:  # the two sources are disjoint per row, so the sum is one of them exactly
                a += tl.load(e_ptr + e_row[:, None] + rk[None, :] * s_ec,
                             mask=in_e[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :].to(tl.int64) * s_wn + (q * C + rk)[:, None].to(tl.int64) * s_wk,
                        mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc += dot(a, w.to(a.dtype), UPCAST, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    offs = rm[:, None].to(tl.int64) * s_om + rn[None, :] * s_on
    mask = m_ok[:, None] & n_ok[None, :]
    # Round the GEMM result to the output dtype before the activation, as nn.Linear then nn.GELU would.
    pre = acc.to(out_ptr.dtype.element_ty)
    if GELU:
        if SAVE_PRE:
            tl.store(pre_ptr + offs, pre, mask=mask)
        z = pre.to(tl.float32)
        y = (0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))).to(out_ptr.dtype.element_ty)
    else:
        y = pre
    if HAS_FILL:
        first = tl.load(idx_ptr + rm.to(tl.int64) * s_ir, mask=m_ok, other=0)
        f = tl.load(fill_ptr + rn, mask=n_ok, other=0.0).to(out_ptr.dtype.element_ty)
        y = tl.where((first < 0)[:, None], f[None, :], y)
    tl.store(out_ptr + offs, y, mask=mask)
