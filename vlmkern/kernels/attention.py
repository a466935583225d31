"""Masked attention with the mask computed in the kernel: Q-Former self-attention and query->image cross-attention.

Flash-attention style (online softmax, fp32 accumulation), forward and FA2 backward. Tensors are
``(B, H, L, d)`` with explicit strides (views of a fused QKV projection work). The visibility of key ``j``
from query row ``r`` is :func:`vlmkern.masks.qformer_visible` of ``MODE`` (``int`` of a
:class:`vlmkern.masks.QFormerMode`), ``NQ`` (number of learned queries), the row's absolute position
``p = r + row_off`` and ``j``, and-ed with the key padding mask ``kpm[b, j - NQ]`` (1 = real token) that
covers the keys ``j >= NQ`` (LAVIS ``blip2_qformer.py``)::

    BIDIRECTIONAL      (ITM / cross)      every non-pad key
    UNIMODAL           (ITC as one pass)  (p < NQ) == (j < NQ), and non-pad
    MULTIMODAL_CAUSAL  (ITG)              j < NQ  or  (j <= p and non-pad)

Cross-attention is ``BIDIRECTIONAL`` with ``NQ = 0`` (the padding mask covers every key). Key blocks that no
row of a block can see are never visited (unimodal query rows skip the text keys, causal rows stop at the
diagonal). A row that sees no key returns zeros and ``lse = +inf``, which makes its gradients zero.

Attention-probability dropout (``DROPOUT``): ``O = (P * Z / (1 - p)) V`` with the keep mask ``Z`` drawn by
Philox from the ``(seed, offset)`` int64 pair at ``rng_ptr`` (a tensor, so CUDA graphs replay fresh draws)
and regenerated tile by tile in the backward, never stored; its bit layout is that of
``vlmkern.ops.attention._dropout`` (oracle: ``vlmkern.reference.attention.dropout_keep_mask``). ``lse`` stays
that of the undropped ``P``, and the softmax backward's row term ``rowsum(P * dP)`` with
``dP = (dO V^T) * Z / (1 - p)`` equals ``rowsum(dO * O)`` with the dropped ``O``, so ``delta`` is unchanged
(FlashAttention's derivation).

Launch configs, argument builders and the shipped builds: ``vlmkern.ops.attention._triton``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vlmkern.kernels._common import dot
from vlmkern.masks import QFormerMode

# The MODE values the kernels branch on (BIDIRECTIONAL adds no condition): the enum's, as constexprs.
UNIMODAL = tl.constexpr(int(QFormerMode.UNIMODAL))
MULTIMODAL_CAUSAL = tl.constexpr(int(QFormerMode.MULTIMODAL_CAUSAL))


@triton.jit
def _visible(rows, cols, b, row_end, Lk, NQ, kpm_ptr, s_mb, s_mt, MODE: tl.constexpr, HAS_KPM: tl.constexpr):
    """Which (row position, key) pairs attend: :func:`vlmkern.masks.qformer_visible` of ``MODE`` and the key
    padding, within the rows and keys that exist; ``rows``/``cols`` are broadcastable 2-D index tensors."""
    keep = (cols < Lk) & (rows < row_end)
    if HAS_KPM:
        is_text = (cols >= NQ) & (cols < Lk)
        t = tl.where(is_text, cols - NQ, 0)
        real = tl.load(kpm_ptr + b.to(tl.int64) * s_mb + t * s_mt, mask=is_text, other=1)
        keep = keep & (real != 0)
    if MODE == UNIMODAL:
        keep = keep & ((rows < NQ) == (cols < NQ))
    elif MODE == MULTIMODAL_CAUSAL:
        keep = keep & ((cols < NQ) | (cols <= rows))
    return keep


@triton.jit
def _dropout_keep(seed, offset, bh, rows, cols, Lk, thresh):
    """Dropout keep mask of q rows ``rows`` x keys ``cols`` (broadcastable 2-D int32) of program ``bh``
    (= b * H + h): Philox4x32-10 of counter ``(n >> 2, bh, offset lo, offset hi)``, ``n = row * Lk + col``,
    word ``n & 3``, kept when its top 31 bits are ``>= thresh``."""
    n = rows * Lk + cols
    zero = (n * 0).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, (n >> 2).to(tl.uint32), zero + bh.to(tl.uint32), zero + offset.to(tl.uint32),
                               zero + (offset >> 32).to(tl.uint32))
    word = n & 3
    r = tl.where(word < 2, tl.where(word == 0, r0, r1), tl.where(word == 2, r2, r3))
    return (r >> 1).to(tl.int32, bitcast=True) >= thresh


@triton.jit
def _dropout_mask_kernel(rng_ptr, keep_ptr, Lq, Lk, thresh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask ``(B*H, Lq, Lk)`` uint8 as the attention kernels draw it, for tests against the
    reference generator. Compiled and interpreted ``tl.philox`` are assumed to be the same Philox4x32-10 (the
    interpreter runs Triton's own source of it on NumPy): the interpreted one is checked on every test run,
    the compiled one by the ``cuda`` tests of tests/ops/test_attention_dropout.py."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(rng_ptr)
    offset = tl.load(rng_ptr + 1)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, offset, bh, rows[:, None], cols[None, :], Lk, thresh)
        tl.store(keep_ptr + bh.to(tl.int64) * Lq * Lk + rows[:, None] * Lk + cols[None, :], keep.to(tl.uint8),
                 mask=(rows[:, None] < Lq) & (cols[None, :] < Lk))


@triton.jit
def _key_range(row_lo, row_hi, Lk, NQ, MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[lo, hi)`` that rows at positions ``[row_lo, row_hi)`` may see; ``lo`` is block-aligned."""
    lo = row_lo * 0
    hi = lo + Lk
    if MODE == UNIMODAL:
        hi = tl.where(row_hi <= NQ, lo + NQ, hi)
        lo = tl.where(row_lo >= NQ, (NQ // BLOCK_N) * BLOCK_N, lo)
    elif MODE == MULTIMODAL_CAUSAL:
        hi = tl.minimum(hi, tl.maximum(lo + NQ, row_hi))
    return lo, hi


@triton.jit
def _row_range(col_lo, col_hi, row_off, Lq, NQ, MODE: tl.constexpr):
    """Query rows (indices into q, not positions) ``[lo, hi)`` that may see keys ``[col_lo, col_hi)``."""
    pos_lo = col_lo * 0
    pos_hi = pos_lo + row_off + Lq
    if MODE == UNIMODAL:
        pos_hi = tl.where(col_hi <= NQ, pos_lo + NQ, pos_hi)
        pos_lo = tl.where(col_lo >= NQ, pos_lo + NQ, pos_lo)
    elif MODE == MULTIMODAL_CAUSAL:
        pos_lo = tl.where(col_lo >= NQ, col_lo, pos_lo)
    lo = tl.maximum(pos_lo - row_off, 0)
    hi = tl.minimum(pos_hi - row_off, Lq)
    return lo, hi


@triton.jit
def _masked_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kpm_ptr, rng_ptr,
    H, Lq, Lk, NQ, row_off, qk_scale, drop_thresh, drop_scale,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od, s_mb, s_mt,
    HEAD_DIM: tl.constexpr, MODE: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """o = softmax(scale * q k^T, masked) v for one (batch*head, block of BLOCK_M rows); lse in natural log.

    ``qk_scale`` = scale * log2(e) (the softmax runs in base 2). ``lse`` is ``(B*H, Lq)`` fp32, contiguous.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    row_ok = offs_m < Lq
    q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=row_ok[:, None], other=0.0)
    rows = offs_m + row_off
    row_end = Lq + row_off
    if DROPOUT:
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1)

    lo, hi = _key_range(pid_m * BLOCK_M + row_off, tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq) + row_off,
                        Lk, NQ, MODE, BLOCK_N)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :] * s_kd, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :] * s_vd, mask=col_ok[:, None], other=0.0)
        s = dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        keep = _visible(rows[:, None], cols[None, :], b, row_end, Lk, NQ, kpm_ptr, s_mb, s_mt, MODE, HAS_KPM)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)        # the normalizer sums the undropped probabilities
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, offset, bh, offs_m[:, None], cols[None, :], Lk, drop_thresh), p, 0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * drop_scale
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    o_base = o_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
    tl.store(o_base + offs_m[:, None] * s_om + offs_d[None, :] * s_od, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _masked_attn_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, H, Lq,
    s_ob, s_oh, s_om, s_od, s_gb, s_gh, s_gm, s_gd,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[bh, r] = sum_d dO * O (fp32), the softmax-backward row term; ``delta`` is ``(B*H, Lq)``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_m < Lq)[:, None]
    o = tl.load(o_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + offs_m[:, None] * s_om
                + offs_d[None, :] * s_od, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b.to(tl.int64) * s_gb + h.to(tl.int64) * s_gh + offs_m[:, None] * s_gm
                 + offs_d[None, :] * s_gd, mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _masked_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, kpm_ptr, rng_ptr,
    H, Lq, Lk, NQ, row_off, qk_scale, sm_scale, drop_thresh, drop_scale,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gm, s_gd, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd, s_mb, s_mt,
    HEAD_DIM: tl.constexpr, MODE: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV for one (batch*head, block of BLOCK_N keys), looping over the query rows that see it.

    Works transposed (keys x rows) so that no probability tile needs a transpose:
    ``dV = P^T dO``, ``dS^T = P^T * (V dO^T - delta)``, ``dK = scale * dS^T Q``; with dropout ``P^T`` in
    ``dV`` and ``V dO^T`` are both multiplied by ``Z^T / (1 - p)``.
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < Lk
    k = tl.load(k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + cols[:, None] * s_kn
                + offs_d[None, :] * s_kd, mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh + cols[:, None] * s_vn
                + offs_d[None, :] * s_vd, mask=col_ok[:, None], other=0.0)
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    do_base = do_ptr + b.to(tl.int64) * s_gb + h.to(tl.int64) * s_gh
    row_end = Lq + row_off
    if DROPOUT:
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1)

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    lo, hi = _row_range(pid_n * BLOCK_N, tl.minimum(pid_n * BLOCK_N + BLOCK_N, Lk), row_off, Lq, NQ, MODE)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < Lq
        q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * s_gm + offs_d[None, :] * s_gd, mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_ptr + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
        s_t = dot(k, tl.trans(q), UPCAST, PRECISION) * qk_scale
        keep_t = _visible((offs_m + row_off)[None, :], cols[:, None], b, row_end, Lk, NQ, kpm_ptr, s_mb, s_mt,
                          MODE, HAS_KPM)
        p_t = tl.where(keep_t, tl.math.exp2(s_t - lse2[None, :]), 0.0)
        if DROPOUT:
            z_t = _dropout_keep(seed, offset, bh, offs_m[None, :], cols[:, None], Lk, drop_thresh)
            dv += dot(tl.where(z_t, p_t * drop_scale, 0.0).to(do.dtype), do, UPCAST, PRECISION)
            dp_t = tl.where(z_t, dot(v, tl.trans(do), UPCAST, PRECISION) * drop_scale, 0.0)
        else:
            dv += dot(p_t.to(do.dtype), do, UPCAST, PRECISION)
            dp_t = dot(v, tl.trans(do), UPCAST, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += dot(ds_t.to(q.dtype), q, UPCAST, PRECISION)

    dk = dk * sm_scale
    dk_base = dk_ptr + b.to(tl.int64) * s_dkb + h.to(tl.int64) * s_dkh
    dv_base = dv_ptr + b.to(tl.int64) * s_dvb + h.to(tl.int64) * s_dvh
    tl.store(dk_base + cols[:, None] * s_dkn + offs_d[None, :] * s_dkd, dk.to(dk_ptr.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(dv_base + cols[:, None] * s_dvn + offs_d[None, :] * s_dvd, dv.to(dv_ptr.dtype.element_ty),
             mask=col_ok[:, None])


@triton.jit
def _masked_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kpm_ptr, rng_ptr,
    H, Lq, Lk, NQ, row_off, qk_scale, sm_scale, drop_thresh, drop_scale,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gm, s_gd, s_dqb, s_dqh, s_dqm, s_dqd, s_mb, s_mt,
    HEAD_DIM: tl.constexpr, MODE: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ = scale * dS K for one (batch*head, block of BLOCK_M rows), over the same keys as the forward."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + offs_m[:, None] * s_qm
                + offs_d[None, :] * s_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + b.to(tl.int64) * s_gb + h.to(tl.int64) * s_gh + offs_m[:, None] * s_gm
                 + offs_d[None, :] * s_gd, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    rows = offs_m + row_off
    row_end = Lq + row_off
    if DROPOUT:
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1)

    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    lo, hi = _key_range(pid_m * BLOCK_M + row_off, tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq) + row_off,
                        Lk, NQ, MODE, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :] * s_kd, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :] * s_vd, mask=col_ok[:, None], other=0.0)
        s = dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
        keep = _visible(rows[:, None], cols[None, :], b, row_end, Lk, NQ, kpm_ptr, s_mb, s_mt, MODE, HAS_KPM)
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = dot(do, tl.trans(v), UPCAST, PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed, offset, bh, offs_m[:, None], cols[None, :], Lk, drop_thresh),
                          dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, UPCAST, PRECISION)

    dq = dq * sm_scale
    tl.store(dq_ptr + b.to(tl.int64) * s_dqb + h.to(tl.int64) * s_dqh + offs_m[:, None] * s_dqm
             + offs_d[None, :] * s_dqd, dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])
