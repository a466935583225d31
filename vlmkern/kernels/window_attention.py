"""Window-local LayerNorm attention pooling (Mini-Gemini patch info mining, ``mgm_arch.py``), forward and backward.

For low-resolution token ``n`` at grid cell ``(i, j)`` of a ``PN x PN`` grid, its window is the ``M x M`` block
``h[b, :, i*M + r, j*M + c]`` of the high-resolution map (``(B, C, Hh, Wh)``, any strides), read in place by index
arithmetic: window position ``w = r*M + c`` (the original's re-arranged order). With ``ĥ_w`` the affine-free
LayerNorm of ``h_w`` over ``C`` channels and ``u_n`` a ``C``-vector (the query pulled back through the key
projection and key LayerNorm scale, see ``vlmkern.ops.window_attention``)::

    l_w = u_n · ĥ_w                      a = softmax_w(nan_to_num(l))           s_n = Σ_w a_w ĥ_w

One program per (token, batch). The forward reads the window twice (statistics + logits, then the weighted
sum) and writes ``s`` plus four ``(B, N, M²)`` fp32 rows for the backward (mean, rstd, probabilities, raw
logits); no re-arranged copy, no normalised copy, no keys or values.
"""
from __future__ import annotations

import triton
import triton.language as tl


_FMAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _window_offsets(n, PN, M, s_hh, s_hw, BLOCK_MC: tl.constexpr):
    """Offsets (within one batch element, channel 0) of token ``n``'s window positions, their validity mask and
    their index ``r*M + c`` in the saved ``(B, N, M²)`` rows. The tile is ``BLOCK_MC x BLOCK_MC`` positions
    flattened with the column fastest. ``M`` is a launch-time constant (one build per window side), so with a
    power-of-two ``BLOCK_MC == M`` the compiler knows each run of ``M`` columns starts at a multiple of ``M``:
    with a unit column stride and 16-divisible row/channel strides (what Triton sees for an NCHW map whose
    width is a multiple of 16) the loads become 16-byte vectors."""
    i = n // PN
    j = n - i * PN
    w = tl.arange(0, BLOCK_MC * BLOCK_MC)
    r = w // BLOCK_MC
    c = w % BLOCK_MC
    wmask = (r < M) & (c < M)
    # int32 within one batch element (the launcher checks that one element spans < 2**31 elements)
    off = (i * M + r) * s_hh + (j * M + c) * s_hw
    return off, wmask, r * M + c


@triton.jit
def _window_attn_fwd_kernel(
    u_ptr, h_ptr, s_ptr, mean_ptr, rstd_ptr, p_ptr, logit_ptr,
    N, PN, C, M: tl.constexpr, eps,
    s_ub, s_un, s_uc, s_hb, s_hc, s_hh, s_hw, s_sb, s_sn, s_sc,
    BLOCK_MC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    b = tl.program_id(1)
    hoff, wmask, widx = _window_offsets(n, PN, M, s_hh, s_hw, BLOCK_MC)
    h_ptr += b.to(tl.int64) * s_hb
    u_row = u_ptr + b.to(tl.int64) * s_ub + n.to(tl.int64) * s_un
    # Shift by each position's channel 0 so that the one-pass variance does not cancel for large means.
    shift = tl.load(h_ptr + hoff, mask=wmask, other=0.0).to(tl.float32)
    s1 = tl.zeros((BLOCK_MC * BLOCK_MC,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_MC * BLOCK_MC,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_MC * BLOCK_MC,), dtype=tl.float32)
    usum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=3):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        m2 = wmask[:, None] & cmask[None, :]
        h = tl.load(h_ptr + hoff[:, None] + cc[None, :] * s_hc, mask=m2, other=0.0).to(tl.float32)
        u = tl.load(u_row + cc * s_uc, mask=cmask, other=0.0).to(tl.float32)
        x = tl.where(m2, h - shift[:, None], 0.0)
        s1 += tl.sum(x, axis=1)
        s2 += tl.sum(x * x, axis=1)
        dot += tl.sum(x * u[None, :], axis=1)
        usum += u
    u_total = tl.sum(usum, axis=0)
    d_mean = s1 / C
    mean = shift + d_mean
    var = tl.maximum(s2 / C - d_mean * d_mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    logit = rstd * (dot - d_mean * u_total)
    # nan_to_num: NaN -> 0, ±inf -> ±max finite (clamping maps the infinities)
    lg = tl.where(logit != logit, 0.0, logit)
    lg = tl.minimum(tl.maximum(lg, -_FMAX), _FMAX)
    lg = tl.where(wmask, lg, float("-inf"))
    e = tl.exp(lg - tl.max(lg, axis=0))
    p = e / tl.sum(e, axis=0)

    row = (b.to(tl.int64) * N + n) * (M * M)
    tl.store(mean_ptr + row + widx, mean, mask=wmask)
    tl.store(rstd_ptr + row + widx, rstd, mask=wmask)
    tl.store(p_ptr + row + widx, p, mask=wmask)
    tl.store(logit_ptr + row + widx, logit, mask=wmask)

    wgt = p * rstd
    s_row = s_ptr + b.to(tl.int64) * s_sb + n.to(tl.int64) * s_sn
    for c0 in tl.range(0, C, BLOCK_C, num_stages=3):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        m2 = wmask[:, None] & cmask[None, :]
        h = tl.load(h_ptr + hoff[:, None] + cc[None, :] * s_hc, mask=m2, other=0.0).to(tl.float32)
        xhat = tl.where(m2, h - mean[:, None], 0.0)
        tl.store(s_row + cc * s_sc, tl.sum(wgt[:, None] * xhat, axis=0), mask=cmask)


@triton.jit
def _window_attn_bwd_kernel(
    ds_ptr, u_ptr, h_ptr, mean_ptr, rstd_ptr, p_ptr, logit_ptr, du_ptr, dh_ptr,
    N, PN, C, M: tl.constexpr,
    s_gb, s_gn, s_gc, s_ub, s_un, s_uc, s_hb, s_hc, s_hh, s_hw,
    s_dub, s_dun, s_duc, s_db, s_dc, s_dh, s_dw,
    BLOCK_MC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``dĥ_w = a_w ds + dl_w u`` then the affine-free LayerNorm backward; ``du = Σ_w dl_w ĥ_w``.

    Every scalar the LayerNorm backward needs per position (``mean(dĥ)``, ``mean(dĥ ⊙ ĥ)``) follows from
    ``ds·ĥ_w``, ``Σ ds``, ``Σ u`` and the saved logits, so a first pass collects those and a second writes
    ``dh`` (each map element exactly once: windows partition the map) and ``du``.
    """
    n = tl.program_id(0)
    b = tl.program_id(1)
    hoff, wmask, widx = _window_offsets(n, PN, M, s_hh, s_hw, BLOCK_MC)
    doff, _, _ = _window_offsets(n, PN, M, s_dh, s_dw, BLOCK_MC)
    h_ptr += b.to(tl.int64) * s_hb
    dh_ptr += b.to(tl.int64) * s_db
    row = (b.to(tl.int64) * N + n) * (M * M)
    mean = tl.load(mean_ptr + row + widx, mask=wmask, other=0.0)
    rstd = tl.load(rstd_ptr + row + widx, mask=wmask, other=0.0)
    p = tl.load(p_ptr + row + widx, mask=wmask, other=0.0)
    logit = tl.load(logit_ptr + row + widx, mask=wmask, other=0.0)
    g_row = ds_ptr + b.to(tl.int64) * s_gb + n.to(tl.int64) * s_gn
    u_row = u_ptr + b.to(tl.int64) * s_ub + n.to(tl.int64) * s_un

    dsx = tl.zeros((BLOCK_MC * BLOCK_MC,), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    usum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=3):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        m2 = wmask[:, None] & cmask[None, :]
        h = tl.load(h_ptr + hoff[:, None] + cc[None, :] * s_hc, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(g_row + cc * s_gc, mask=cmask, other=0.0).to(tl.float32)
        u = tl.load(u_row + cc * s_uc, mask=cmask, other=0.0).to(tl.float32)
        xhat = tl.where(m2, (h - mean[:, None]) * rstd[:, None], 0.0)
        dsx += tl.sum(xhat * g[None, :], axis=1)
        gsum += g
        usum += u
    g_total = tl.sum(gsum, axis=0)
    u_total = tl.sum(usum, axis=0)
    da = dsx                                           # ds · ĥ_w
    dl = p * (da - tl.sum(p * da, axis=0))
    finite = (logit == logit) & (tl.abs(logit) < float("inf"))
    dl = tl.where(finite & wmask, dl, 0.0)             # nan_to_num passes gradients of finite logits only
    lg = tl.where(finite, logit, 0.0)
    mean_g = (p * g_total + dl * u_total) / C
    mean_gx = (p * da + dl * lg) / C

    du_row = du_ptr + b.to(tl.int64) * s_dub + n.to(tl.int64) * s_dun
    for c0 in tl.range(0, C, BLOCK_C, num_stages=3):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        m2 = wmask[:, None] & cmask[None, :]
        h = tl.load(h_ptr + hoff[:, None] + cc[None, :] * s_hc, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(g_row + cc * s_gc, mask=cmask, other=0.0).to(tl.float32)
        u = tl.load(u_row + cc * s_uc, mask=cmask, other=0.0).to(tl.float32)
        xhat = tl.where(m2, (h - mean[:, None]) * rstd[:, None], 0.0)
        dxhat = p[:, None] * g[None, :] + dl[:, None] * u[None, :]
        dh = rstd[:, None] * (dxhat - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(dh_ptr + doff[:, None] + cc[None, :] * s_dc, dh.to(dh_ptr.dtype.element_ty), mask=m2)
        tl.store(du_row + cc * s_duc, tl.sum(dl[:, None] * xhat, axis=0), mask=cmask)

