"""Token-routed GEMMs: InternLM-XComposer2 Partial LoRA and the CogVLM visual expert, forward and backward.

Routing is read per row tile inside the kernels (no host sync, no gather, no dynamic shapes):

* Partial LoRA (IXC2 PLoRA): ``y = x Wᵀ + b + m ⊙ s·(drop(x) Aᵀ) Bᵀ``. ``_lora_down_kernel`` writes the rank-r
  activations ``U = m ⊙ s·(drop(x) Aᵀ)`` (exactly 0 on text rows; text-only row tiles skip the GEMM) and
  ``_lora_up_kernel`` runs ``x Wᵀ + U Bᵀ + b`` as one GEMM over the concatenated K dimension ``[U | x]``, the
  low-rank K loop skipped on text-only row tiles. Both take arbitrary strides, so the backward reuses them
  with transposed operands: ``G = m ⊙ s·(dY B)`` (down) and ``dX = dY W + keep ⊙ (G A)`` (up).
* Visual expert (CogVLM): ``_expert_gemm_kernel`` computes ``y[t] = W[e(t)] x[t]``; a row tile runs one
  K loop per expert present in it (one for the homogeneous tiles inside a text or image run) and stores
  that expert's rows only.

Row isolation: a non-finite value in one expert's or the adapter's weights reaches only the rows routed to
it (rows a GEMM loads as 0 meet that weight as ``0 · inf = NaN`` and are never stored or are reset to 0).
* ``_routed_tn_kernel``: ``out[g] = Σ_{t: sel[t] = g + base} p[t]ᵀ q[t]`` for weight gradients (dA, dB of
  the adapter with ``sel`` = image mask; dW per expert with ``sel`` = expert id); each group reduces over
  the span from its first to its last selected row only (a prologue scan), with pipelined masked loads.

``UPCAST`` computes dots in fp32 (set under the Triton interpreter, whose bf16 dot is wrong). Launch
configurations, launchers and the shipped builds: ``vlmkern.ops.routed_linear._triton``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vlmkern.kernels._common import dot, grouped_tile


@triton.jit
def _keep_ptrs(keep_ptr, rows, col_block, s_km, s_kb, BLOCK_C: tl.constexpr):
    """Pointers ``(len(rows), BLOCK_C // 8)`` to the packed keep bytes of ``rows`` and columns
    ``col_block * BLOCK_C + [0, BLOCK_C)``: the bytes of a row are contiguous when ``s_kb == 1`` (the byte
    offset is formed as a multiple of ``BLOCK_C // 8``, which keeps its alignment visible to the compiler)."""
    tl.static_assert(BLOCK_C % 8 == 0, "a block along the packed keep axis must be a multiple of 8 columns")
    tl.static_assert(BLOCK_C <= 128, "a packed keep row is padded to 16 bytes only: blocks of at most 128")
    cols = col_block * (BLOCK_C // 8) + tl.arange(0, BLOCK_C // 8)
    return keep_ptr + rows[:, None].to(tl.int64) * s_km + cols[None, :] * s_kb


@triton.jit
def _keep_tile(k_ptrs, row_ok, keep_scale, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 ``(BLOCK_M, BLOCK_C)`` ``keep · keep_scale`` from the packed bytes at ``k_ptrs`` (:func:`_keep_ptrs`):
    column ``j`` is bit ``j & 7`` of byte ``j >> 3``; rows where ``row_ok`` is False read as 0.

    The load is masked by rows only (constant along a row, so it vectorises; the 16-bit builds' main loops load
    it with cp.async, see ``python -m vlmkern.tools.perf_report``): a packed
    row is padded to a multiple of 16 bytes (``vlmkern.ops.routed_linear._dropout``), so a tile of at most 128
    columns starting at a multiple of its width never reads past it; its columns past the mask's width are
    padding bits (0), which meet operands loaded as 0 or outputs never stored."""
    bytes_ = tl.load(k_ptrs, mask=row_ok[:, None], other=0).to(tl.int32)
    bits = (bytes_[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_C)).to(tl.float32) * keep_scale


@triton.jit
def _lora_down_kernel(
    a_ptr, b_ptr, mask_ptr, keep_ptr, out_ptr,
    M, R, K, scale, keep_scale,
    s_am, s_ak, s_br, s_bk, s_km, s_kb, s_om, s_or,
    HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, j] = scale * Σ_k drop(a)[m, k] b[j, k] where mask[m] != 0, exactly 0 elsewhere; out is (M, R).

    ``drop(a) = a * keep * keep_scale`` when HAS_KEEP, keep the packed ``(M, K)`` bit mask (bytes: strides
    ``s_km``, ``s_kb``; see :func:`_keep_tile`). Text rows are never loaded, so an overflow on them
    cannot leak into the result (the original's ``× 0`` turns it into NaN).
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    routed = tl.load(mask_ptr + rm, mask=rm < M, other=0) != 0
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * s_am + rk[None, :] * s_ak
    b_ptrs = b_ptr + rr[None, :].to(tl.int64) * s_br + rk[:, None] * s_bk
    if HAS_KEEP:
        k_ptrs = _keep_ptrs(keep_ptr, rm, 0, s_km, s_kb, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if tl.max(routed.to(tl.int32), axis=0) > 0:  # text-only row tiles write zeros and skip the GEMM
        for k0 in range(0, K, BLOCK_K):
            a_mask = routed[:, None] & (rk < K - k0)[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            if HAS_KEEP:
                a = a.to(tl.float32) * _keep_tile(k_ptrs, routed, keep_scale, BLOCK_M, BLOCK_K)
                k_ptrs += (BLOCK_K // 8) * s_kb
            b = tl.load(b_ptrs, mask=(rr < R)[None, :] & (rk < K - k0)[:, None], other=0.0)
            acc = acc + dot(a.to(b.dtype), b, UPCAST, INPUT_PRECISION)
            a_ptrs += BLOCK_K * s_ak
            b_ptrs += BLOCK_K * s_bk
    acc = tl.where(routed[:, None], acc * scale, 0.0)  # text rows of a mixed tile hold 0 · b: NaN if b has an inf
    offs = rm[:, None].to(tl.int64) * s_om + rr[None, :] * s_or
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rr < R)[None, :])


@triton.jit
def _lora_up_kernel(
    a_ptr, w_ptr, u_ptr, v_ptr, bias_ptr, mask_ptr, keep_ptr, out_ptr,
    M, N, K, R, keep_scale,
    s_am, s_ak, s_wn, s_wk, s_um, s_ur, s_vn, s_vr, s_km, s_kb, s_om, s_on,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[m, n] = Σ_k a[m, k] w[n, k] + [mask[m]] (Σ_j u[m, j] v[n, j]) · keep[m, n]·keep_scale + bias[n].

    One accumulator over the concatenated K dimension ``[u | a]``; the low-rank loop runs only on row
    tiles that hold a routed row, and loads only routed rows of ``u``. Forward: (x, W, U, B). Input
    gradient: (dY, Wᵀ, G, Aᵀ) with the dropout ``keep`` mask of x, packed ``(M, N)`` bits (bytes: strides
    ``s_km``, ``s_kb``; see :func:`_keep_tile`).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The low-rank term first, alone in the accumulator: its text rows (u loaded as 0) hold 0 · v, NaN if v
    # has an inf, and are reset to 0 before the base GEMM accumulates on top (row isolation).
    routed = tl.load(mask_ptr + rm, mask=rm < M, other=0) != 0
    if tl.max(routed.to(tl.int32), axis=0) > 0:  # text-only row tiles skip the low-rank K loop
        u_ptrs = u_ptr + rm[:, None].to(tl.int64) * s_um + rk[None, :] * s_ur
        v_ptrs = v_ptr + rn[None, :].to(tl.int64) * s_vn + rk[:, None] * s_vr
        for j0 in range(0, R, BLOCK_K):
            u = tl.load(u_ptrs, mask=routed[:, None] & (rk < R - j0)[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=(rn < N)[None, :] & (rk < R - j0)[:, None], other=0.0)
            acc = acc + dot(u.to(v.dtype), v, UPCAST, INPUT_PRECISION)
            u_ptrs += BLOCK_K * s_ur
            v_ptrs += BLOCK_K * s_vr
        if HAS_KEEP:  # the dropout mask multiplies the low-rank term only
            k_ptrs = _keep_ptrs(keep_ptr, rm, pid_n, s_km, s_kb, BLOCK_N)
            acc = acc * _keep_tile(k_ptrs, routed, keep_scale, BLOCK_M, BLOCK_N)
        acc = tl.where(routed[:, None], acc, 0.0)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * s_am + rk[None, :] * s_ak
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * s_wn + rk[:, None] * s_wk
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & (rk < K - k0)[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=(rn < N)[None, :] & (rk < K - k0)[:, None], other=0.0)
        acc = acc + dot(a.to(w.dtype), w, UPCAST, INPUT_PRECISION)
        a_ptrs += BLOCK_K * s_ak
        w_ptrs += BLOCK_K * s_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    offs = rm[:, None].to(tl.int64) * s_om + rn[None, :] * s_on
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _expert_gemm_kernel(
    a_ptr, w_ptr, w1_ptr, ids_ptr, out_ptr,
    M, N, K, E,
    s_am, s_ak, s_we, s_wn, s_wk, s_om, s_on,
    PAIR: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[m, n] = Σ_k a[m, k] W_{ids[m]}[n, k]; rows whose id is outside [0, E) are written as NaN.

    PAIR: E <= 2 experts given as two separate matrices ``w_ptr`` / ``w1_ptr`` with the same strides (the
    modules' own ``nn.Linear`` weights, never stacked); else one ``(E, N, K)`` tensor with expert stride
    ``s_we``. Each expert present in the row tile runs one K loop over its own rows only (others load as
    0), so each row is computed once, by its expert. Forward: (x, W); input gradient: (dY, Wᵀ).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(ids_ptr + rm, mask=rm < M, other=-1).to(tl.int32)
    rk = tl.arange(0, BLOCK_K)
    a_row = a_ptr + rm[:, None].to(tl.int64) * s_am + rk[None, :] * s_ak
    w_offs = rn[None, :].to(tl.int64) * s_wn + rk[:, None] * s_wk
    for e in range(0, E):
        mine = ids == e
        if tl.max(mine.to(tl.int32), axis=0) > 0:
            # One accumulator per expert, stored on its rows only: the other rows load as 0 and meet this
            # expert's weight as 0 · w (NaN where w is inf), so they must not share the accumulator.
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            a_ptrs = a_row
            if PAIR:
                if e == 0:
                    w_ptrs = w_ptr + w_offs
                else:
                    w_ptrs = w1_ptr + w_offs
            else:
                w_ptrs = w_ptr + e * s_we + w_offs  # int32 e·s_we: the ops layer refuses stacks of >= 2³¹ elements
            for k0 in range(0, K, BLOCK_K):
                a = tl.load(a_ptrs, mask=mine[:, None] & (rk < K - k0)[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=(rn < N)[None, :] & (rk < K - k0)[:, None], other=0.0)
                acc = acc + dot(a.to(w.dtype), w, UPCAST, INPUT_PRECISION)
                a_ptrs += BLOCK_K * s_ak
                w_ptrs += BLOCK_K * s_wk
            # Offsets formed here, not held through the K loop, and no row bound (rows past M have id -1, so
            # `mine` is False there): registers, the fp32 stacked build spilled otherwise.
            offs = rm[:, None].to(tl.int64) * s_om + rn[None, :] * s_on
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mine[:, None] & (rn < N)[None, :])
    invalid = (ids < 0) | (ids >= E)
    if tl.max(invalid.to(tl.int32), axis=0) > 0:
        nan = tl.full((BLOCK_M, BLOCK_N), float("nan"), tl.float32)
        offs = rm[:, None].to(tl.int64) * s_om + rn[None, :] * s_on
        tl.store(out_ptr + offs, nan.to(out_ptr.dtype.element_ty),
                 mask=(invalid & (rm < M))[:, None] & (rn < N)[None, :])


_TN_SCAN = tl.constexpr(1024)   # sel entries per step of the routed TN prologue scan


@triton.jit
def _routed_tn_kernel(
    p_ptr, q_ptr, sel_ptr, keep_ptr, out_ptr,
    M, N, K, sel_base, scale, keep_scale,
    s_pm, s_pn, s_qm, s_qk, s_km, s_kb, s_og, s_on, s_ok,
    HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[g, n, k] = scale * Σ_{m: sel[m] = g + sel_base} p[m, n] drop(q)[m, k]; grid axis 2 is g.

    A vectorised prologue scan of ``sel`` finds the first and last selected row; the reduction runs over that
    span only, so a contiguous run of selected rows (an image block, one expert's tokens) costs its own
    GEMM, and a group with no row writes zeros. Inside the span the loads are unconditional, masked by the
    step's ``sel`` entries (read once per step): the compiler pipelines them (cp.async; unselected rows cause
    no memory traffic) and keeps the dot on the tensor cores every step. Interleaved groups pay the whole
    span in tensor-core time, never in memory traffic. ``keep``: the packed ``(M, K)`` bit mask of q (bytes:
    strides ``s_km``, ``s_kb``; see :func:`_keep_tile`).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2)
    key = g + sel_base
    lo = M
    hi = 0
    for s0 in range(0, M, _TN_SCAN):
        rs = s0 + tl.arange(0, _TN_SCAN)
        hit = tl.load(sel_ptr + rs, mask=rs < M, other=-1).to(tl.int32) == key
        lo = tl.minimum(lo, tl.min(tl.where(hit, rs, M), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(hit, rs + 1, 0), axis=0))
    first = (lo // BLOCK_M) * BLOCK_M
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = first + tl.arange(0, BLOCK_M)
    p_ptrs = p_ptr + rm[None, :].to(tl.int64) * s_pm + rn[:, None] * s_pn
    q_ptrs = q_ptr + rm[:, None].to(tl.int64) * s_qm + rk[None, :] * s_qk
    if HAS_KEEP:
        k_ptrs = _keep_ptrs(keep_ptr, rm, pid_k, s_km, s_kb, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(first, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mine = tl.load(sel_ptr + rows, mask=rows < hi, other=-1).to(tl.int32) == key
        pt = tl.load(p_ptrs, mask=mine[None, :] & (rn < N)[:, None], other=0.0)
        q_mask = mine[:, None] & (rk < K)[None, :]
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        if HAS_KEEP:
            q = (q.to(tl.float32) * _keep_tile(k_ptrs, mine, keep_scale, BLOCK_M, BLOCK_K)).to(q.dtype)
            k_ptrs += BLOCK_M * s_km
        acc = acc + dot(pt.to(q.dtype), q, UPCAST, INPUT_PRECISION)
        p_ptrs += BLOCK_M * s_pm
        q_ptrs += BLOCK_M * s_qm
    offs = g.to(tl.int64) * s_og + rn[:, None].to(tl.int64) * s_on + rk[None, :] * s_ok
    tl.store(out_ptr + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=(rn < N)[:, None] & (rk < K)[None, :])
