"""``vlmkern::qformer_attention`` and ``vlmkern::cross_attention``: attention with the mask built in the kernel.

Shapes: ``q`` ``(B, H, Lq, d)``, ``k``/``v`` ``(B, H, Lk, d)``, result ``(B, H, Lq, d)`` in the input dtype.
Both ops share one forward kernel family (``vlmkern.kernels.attention``) and one backward op; no
``(B, 1, Lq, Lk)`` mask tensor exists on the Triton path.

Attention-probability dropout (``dropout_p > 0``): the keep mask is a function of ``(seed, offset)``, an int64
``(2,)`` tensor drawn from torch's default generator of the inputs' device unless given
(``vlmkern.reference.attention.dropout_keep_mask``); the kernels regenerate it in the backward and never store
it, and the reference paths build the same mask, so both backends drop the same probabilities.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmkern.reference import attention as ref_attention
from vlmkern.reference.attention import additive_mask as _additive
from vlmkern.ops import dispatch as _dispatch
from vlmkern.ops.checks import (check_dropout_p, INT32_MAX, autocast_inputs, check_same_device, check_tensor,
                                 int32_offset_reasons)
from vlmkern.ops.dispatch import OpDispatch, register

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_TRITON_HEAD_DIMS = (32, 64, 128)
MODES = {"bidirectional": 0, "unimodal": 1, "multimodal_causal": 2}   # = kernels.attention.MODE_*
_MODE_NAMES = {v: k for k, v in MODES.items()}


# --------------------------------------------------------------------------------------------- checks
def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=4, dtypes=_FLOATS, shape_doc="(batch, heads, length, head_dim)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    layout = "q, k and v must be laid out (B, H, L, d); pass a (B, L, H, d) projection as .transpose(1, 2)"
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k/v have batch {k.shape[0]} ({layout})")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads (dim 1) but k/v have {k.shape[1]}: heads must match; {layout}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q has head_dim {q.shape[3]} but k/v have head_dim {k.shape[3]} ({layout})")


def _check_key_mask(mask, name: str, batch: int, length: int, q: Tensor) -> None:
    if mask is None:
        return
    check_tensor(mask, name, ndim=2, dtypes=_MASK_DTYPES, shape_doc=f"(batch, {length}) of 1 = real / 0 = pad")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape (batch, {length}) = ({batch}, {length}), got {tuple(mask.shape)}")
    check_same_device(q=q, **{name: mask})


def _check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")


def _as_bool(mask: Tensor | None) -> Tensor | None:
    return mask if mask is None or mask.dtype == torch.bool else mask != 0


# -------------------------------------------------------------------------------------------- dropout
def _dropout_args(q: Tensor, k: Tensor, dropout_p, dropout_rng: Optional[Tensor]) -> tuple[float, Optional[Tensor]]:
    """Checked ``(dropout_p, rng)``: ``(0.0, None)`` without dropout (no random draw), else the given
    ``(seed, offset)`` or a fresh one from torch's generator of ``q``'s device. ``torch.randint`` on that device
    keeps it reproducible under ``torch.manual_seed`` and, on CUDA, valid under graph capture: the draw is a
    kernel of the graph, so every replay gets a new pair."""
    check_dropout_p(dropout_p)
    if dropout_rng is not None:
        check_tensor(dropout_rng, "dropout_rng", ndim=1, dtypes=(torch.int64,), shape_doc="(2,) = (seed, offset)")
        if dropout_rng.shape != (2,):
            raise ValueError(f"dropout_rng must have shape (2,) = (seed, offset), got {tuple(dropout_rng.shape)}")
        check_same_device(q=q, dropout_rng=dropout_rng)
    if dropout_p == 0.0:
        return 0.0, None
    if q.shape[2] * k.shape[2] > ref_attention.DROPOUT_MAX_SCORES:
        raise ValueError(f"dropout needs Lq * Lk <= {ref_attention.DROPOUT_MAX_SCORES} (scores per batch and head), "
                         f"got {q.shape[2]} * {k.shape[2]}")
    if dropout_rng is None:
        dropout_rng = torch.randint(2 ** 63 - 1, (2,), dtype=torch.int64, device=q.device)
    return float(dropout_p), dropout_rng


def _dropout_launch(dropout_p: float, rng: Optional[Tensor], ref: Tensor) -> tuple[Tensor, int, float]:
    """(rng pointer, threshold, scale) kernel arguments; a never-read int64 placeholder without dropout."""
    if dropout_p == 0.0:
        return torch.empty(0, dtype=torch.int64, device=ref.device), 0, 1.0
    return rng, ref_attention.dropout_threshold(dropout_p), ref_attention.dropout_scale(dropout_p)


def _dropout_multiplier(q: Tensor, k: Tensor, dropout_p: float, rng: Optional[Tensor], dtype) -> Optional[Tensor]:
    if dropout_p == 0.0:
        return None
    return ref_attention.dropout_multiplier(rng, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p, dtype)


def dropout_keep_mask_triton(dropout_rng: Tensor, shape: tuple[int, int, int, int], dropout_p: float) -> Tensor:
    """The keep mask ``(B, H, Lq, Lk)`` bool as the Triton kernels draw it (compiled, or interpreted on CPU
    tensors), for checking them against ``vlmkern.reference.attention.dropout_keep_mask``."""
    import triton
    from vlmkern.kernels.attention import DROPOUT_MASK_CONFIG, _dropout_mask_kernel

    B, H, Lq, Lk = shape
    keep = torch.empty((B * H, Lq, Lk), dtype=torch.uint8, device=dropout_rng.device)
    if keep.numel():
        cfg = DROPOUT_MASK_CONFIG
        _dropout_mask_kernel[(triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)](
            dropout_rng, keep, Lq, Lk, ref_attention.dropout_threshold(dropout_p), **cfg)
    return keep.view(B, H, Lq, Lk).bool()


# ------------------------------------------------------------------------------------------- dispatch
def _triton_reasons(q, k, v=None, key_mask=None, *_, **__) -> list[str]:
    why = _dispatch.triton_env_reasons(q.device)
    if q.dtype not in _TRITON_DTYPES:
        why.append(f"dtype {q.dtype} (the kernels take float16, bfloat16, float32; float64 is not supported by "
                   f"the kernels)")
    if q.shape[-1] not in _TRITON_HEAD_DIMS:
        why.append(f"head_dim {q.shape[-1]} (the kernels are built for {_TRITON_HEAD_DIMS})")
    # (b, h) bases are 64-bit in the kernels; offsets inside one (b, h) slice and along a mask row are 32-bit.
    rows = max(q.shape[2], k.shape[2]) * q.shape[3]
    if rows > INT32_MAX:      # the contiguous out/dq/dk/dv slices, whatever q/k/v's strides
        why.append(f"a (batch, head) slice of the result or gradients holds {rows} elements (offset in int32)")
    return why + int32_offset_reasons((2, 3), q=q, k=k, v=v) + int32_offset_reasons((1,), key_mask=key_mask)


QFORMER_ATTENTION = register(OpDispatch("qformer_attention", {
    "triton": _triton_reasons,
    "reference": lambda *a, **k: [],
}))
CROSS_ATTENTION = register(OpDispatch("cross_attention", {
    "triton": _triton_reasons,
    "reference": lambda *a, **k: [],
}))


def _launch_params(dtype: torch.dtype) -> tuple[bool, str, str]:
    """(UPCAST, dot precision, config family). fp32 follows torch's TF32 switch, as ``torch.matmul`` does;
    the interpreter's low-precision dot is not trustworthy (bf16), so it computes in fp32 there."""
    from vlmkern.kernels.attention import config_family

    precision = "tf32"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        precision = "ieee"
    family = config_family(dtype.itemsize, precision)
    if _dispatch.triton_interpreting():
        return True, "ieee", family
    return False, precision, family


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _kpm_args(kpm: Tensor | None, ref: Tensor) -> tuple[Tensor, int, int]:
    if kpm is None:  # never read (HAS_KPM=False); uint8 keeps the kernel signature that was build-checked
        return torch.empty(0, dtype=torch.uint8, device=ref.device), 0, 1
    kpm = _as_bool(kpm).view(torch.uint8)
    return kpm, kpm.stride(0), kpm.stride(1)


# ------------------------------------------------------------------------------------- triton launches
def _row_offset(q: Tensor, k: Tensor, num_query: int) -> int:
    """Sequence position of q's first row: the rows are the last Lq positions of [queries ; text]
    (0 when q holds every row, num_query for the ITG text-only rows; always 0 for cross-attention,
    which has num_query = 0 and no notion of position)."""
    return k.shape[2] - q.shape[2] if num_query else 0


def _triton_forward(q, k, v, kpm, num_query, mode, scale, dropout_p, rng) -> tuple[Tensor, Tensor]:
    import triton
    from vlmkern.kernels.attention import LOG2E, _masked_attn_fwd_kernel, attention_config

    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    mask, s_mb, s_mt = _kpm_args(kpm, q)
    rng, thresh, drop_scale = _dropout_launch(dropout_p, rng, q)
    upcast, precision, family = _launch_params(q.dtype)
    cfg = attention_config("fwd", family, d, dropout_p > 0)
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    _masked_attn_fwd_kernel[grid](
        q, k, v, out, lse, mask, rng, H, Lq, Lk, num_query, _row_offset(q, k, num_query), scale * LOG2E,
        thresh, drop_scale, *q.stride(), *k.stride(), *v.stride(), *out.stride(), s_mb, s_mt,
        HEAD_DIM=d, MODE=mode, HAS_KPM=kpm is not None, DROPOUT=dropout_p > 0, UPCAST=upcast,
        PRECISION=precision, **cfg)
    return out, lse


def _triton_backward(grad, q, k, v, out, lse, kpm, num_query, mode, scale, dropout_p,
                     rng) -> tuple[Tensor, Tensor, Tensor]:
    import triton
    from vlmkern.kernels.attention import (DELTA_CONFIG, LOG2E, _masked_attn_bwd_delta_kernel,
                                           _masked_attn_bwd_dkdv_kernel, _masked_attn_bwd_dq_kernel,
                                           attention_config)

    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    row_off = _row_offset(q, k, num_query)
    grad = grad.to(q.dtype)
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    dq = torch.empty((B, H, Lq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, Lk, d), device=q.device, dtype=q.dtype)
    dv = torch.empty((B, H, Lk, d), device=q.device, dtype=q.dtype)
    if dq.numel() == 0:  # no rows: nothing flows to the keys
        return dq, dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    mask, s_mb, s_mt = _kpm_args(kpm, q)
    rng, thresh, drop_scale = _dropout_launch(dropout_p, rng, q)
    upcast, precision, family = _launch_params(q.dtype)
    meta = dict(HEAD_DIM=d, MODE=mode, HAS_KPM=kpm is not None, DROPOUT=dropout_p > 0, UPCAST=upcast,
                PRECISION=precision)

    _masked_attn_bwd_delta_kernel[(triton.cdiv(Lq, DELTA_CONFIG["BLOCK_M"]), B * H)](
        out, grad, delta, H, Lq, *out.stride(), *grad.stride(), HEAD_DIM=d, **DELTA_CONFIG)
    if Lk > 0:
        cfg = attention_config("dkdv", family, d, dropout_p > 0)
        _masked_attn_bwd_dkdv_kernel[(triton.cdiv(Lk, cfg["BLOCK_N"]), B * H)](
            q, k, v, grad, lse, delta, dk, dv, mask, rng, H, Lq, Lk, num_query, row_off, scale * LOG2E, scale,
            thresh, drop_scale, *q.stride(), *k.stride(), *v.stride(), *grad.stride(), *dk.stride(), *dv.stride(),
            s_mb, s_mt, **meta, **cfg)
    cfg = attention_config("dq", family, d, dropout_p > 0)
    _masked_attn_bwd_dq_kernel[(triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)](
        q, k, v, grad, lse, delta, dq, mask, rng, H, Lq, Lk, num_query, row_off, scale * LOG2E, scale,
        thresh, drop_scale, *q.stride(), *k.stride(), *v.stride(), *grad.stride(), *dq.stride(), s_mb, s_mt,
        **meta, **cfg)
    return dq, dk, dv


# ------------------------------------------------------------------------------------ reference paths
def _reference_mask(q, k, kpm, num_query, mode) -> Tensor:
    """The Q-Former mask of ``mode`` in its smallest broadcast shape (no ``(B, 1, Lq, Lk)`` tensor)."""
    return ref_attention.qformer_mask_broadcast(num_query, _MODE_NAMES[mode], kpm, q_len=q.shape[2],
                                                k_len=k.shape[2], device=q.device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_flash(q: Tensor, k: Tensor) -> bool:
    """Whether the reference path can use torch's fused CPU flash kernels (one pass for out and lse, a fused
    backward): about 2x faster than explicit softmax on the CPU, and accumulating in fp32 for bf16."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.shape[2] > 0
            and k.shape[2] > 0 and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


# Eager CPU attention runs torch's fused flash kernel (with the mask as an additive -inf bias of its broadcast
# shape) instead of the explicit matmul-softmax-matmul, except for contiguous q/k/v with fewer score entries per
# head than this. Measured on the 2-core CI CPU, fp32, explicit vs flash, ms: strided views of the projections
# (as the models pass them) Q-Former cross 4x12 heads x 32x257 keys fwd 2.92 vs 1.55, fwd+bwd 8.4 vs 5.7;
# 32x12 x 32x677 fwd+bwd 295 vs 187; masked self-attention 64x12 x 64x64 fwd+bwd 66.7 vs 47.0. Contiguous:
# 16x12 x 32x257 fwd+bwd 14.3 vs 17.4 (explicit wins), 32 heads x 128x1600 34.8 vs 37.8, 512x6400 1119 vs 501.
_CPU_FLASH_MIN_SCORES = 1 << 17


def _eager_cpu_attention(q: Tensor, k: Tensor, v: Tensor, num_query: int, mode: str, key_mask: Optional[Tensor],
                         scale: float) -> Optional[Tensor]:
    """Eager CPU attention through ``F.scaled_dot_product_attention`` (the flash CPU kernel), or None where the
    reference math is faster (small contiguous inputs) or needed (a row with no visible key returns zeros)."""
    if not _cpu_flash(q, k):
        return None
    if all(t.is_contiguous() for t in (q, k, v)) and q.shape[2] * k.shape[2] < _CPU_FLASH_MIN_SCORES:
        return None
    mask = _reference_mask(q, k, key_mask, num_query, MODES[mode])
    if bool(mask.all()):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if not bool(mask.any(-1).all()):
        return None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_additive(mask, q.dtype), scale=scale)


def _reference_forward(q, k, v, kpm, num_query, mode, scale, dropout_p, rng) -> tuple[Tensor, Tensor]:
    mask = _reference_mask(q, k, kpm, num_query, mode)
    empty = ~mask.any(-1)                                      # rows with no key: zeros and lse = +inf
    if _cpu_flash(q, k) and dropout_p == 0.0:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=_additive(mask, q.dtype), scale=scale)
        return out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("inf"))
    out = ref_attention.masked_attention(q, k, v, mask, scale, _dropout_multiplier(q, k, dropout_p, rng, q.dtype))
    scores = torch.matmul(q, k.transpose(-1, -2)).to(_compute_dtype(q.dtype)) * scale
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    lse = lse.masked_fill(empty, float("inf")).to(torch.float32)
    return out, lse


def _reference_backward(grad, q, k, v, out, lse, kpm, num_query, mode, scale, dropout_p,
                        rng) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax-attention gradients in fp32 (fp64 for fp64), recomputing the probabilities (or torch's fused
    CPU flash backward, from the forward's ``out`` and natural-log ``lse``; +inf rows get zero gradients).
    Dropout multiplies ``P`` in ``dV`` and ``dO V^T`` by the regenerated ``keep / (1 - p)``; the row term
    ``rowsum(P * dP)`` then is that of the dropped output."""
    mask = _reference_mask(q, k, kpm, num_query, mode)
    if _cpu_flash(q, k) and dropout_p == 0.0:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.contiguous(), q, k, v, out, lse, 0.0, False, attn_mask=_additive(mask, q.dtype), scale=scale)
        return dq, dk, dv
    ct = _compute_dtype(q.dtype)
    qc, kc, vc, g = q.to(ct), k.to(ct), v.to(ct), grad.to(ct)
    has_key = mask.any(-1, keepdim=True)
    scores = torch.where(has_key, (qc @ kc.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")), 0.0)
    p = torch.where(mask, torch.softmax(scores, dim=-1), 0.0)
    drop = _dropout_multiplier(q, k, dropout_p, rng, ct)
    dv = (p if drop is None else p * drop).transpose(-1, -2) @ g
    dp = g @ vc.transpose(-1, -2)
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = ds @ kc * scale
    dk = ds.transpose(-1, -2) @ qc * scale
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


# ------------------------------------------------------------------------------------ custom ops
def _forward(dispatch, q, k, v, kpm, num_query, mode, scale, dropout_p, rng):
    if dispatch.select(q, k, v, kpm) == "triton":
        return _triton_forward(q, k, v, kpm, num_query, mode, scale, dropout_p, rng)
    return _reference_forward(q, k, v, kpm, num_query, mode, scale, dropout_p, rng)


def _fake_forward(q):
    B, H, Lq, d = q.shape
    return q.new_empty((B, H, Lq, d)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("vlmkern::qformer_attention", mutates_args=())
def _qformer_attention_op(q: Tensor, k: Tensor, v: Tensor, text_mask: Optional[Tensor], num_query: int,
                          mode: int, scale: float, dropout_p: float,
                          dropout_rng: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _forward(QFORMER_ATTENTION, q, k, v, text_mask, num_query, mode, scale, dropout_p, dropout_rng)


@_qformer_attention_op.register_fake
def _(q, k, v, text_mask, num_query, mode, scale, dropout_p, dropout_rng):
    return _fake_forward(q)


@torch.library.custom_op("vlmkern::cross_attention", mutates_args=())
def _cross_attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: float,
                        dropout_p: float, dropout_rng: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _forward(CROSS_ATTENTION, q, k, v, key_padding_mask, 0, MODES["bidirectional"], scale, dropout_p,
                    dropout_rng)


@_cross_attention_op.register_fake
def _(q, k, v, key_padding_mask, scale, dropout_p, dropout_rng):
    return _fake_forward(q)


@torch.library.custom_op("vlmkern::masked_attention_backward", mutates_args=())
def _masked_attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  key_mask: Optional[Tensor], num_query: int, mode: int, scale: float,
                                  op_name: str, dropout_p: float,
                                  dropout_rng: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    args = (grad, q, k, v, out, lse, key_mask, num_query, mode, scale, dropout_p, dropout_rng)
    if _dispatch.REGISTRY[op_name].select(q, k, v, key_mask) == "triton":
        return _triton_backward(*args)
    return _reference_backward(*args)


@_masked_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, key_mask, num_query, mode, scale, op_name, dropout_p, dropout_rng):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, key_mask, dropout_rng = ctx.saved_tensors
    num_query, mode, scale, op_name, dropout_p = ctx.args
    dq, dk, dv = _masked_attention_backward_op(grad, q, k, v, out, lse, key_mask, num_query, mode, scale,
                                               op_name, dropout_p, dropout_rng)
    return dq, dk, dv, *([None] * ctx.n_nondiff)


def _setup_qformer(ctx, inputs, output):
    q, k, v, text_mask, num_query, mode, scale, dropout_p, dropout_rng = inputs
    ctx.save_for_backward(q, k, v, *output, text_mask, dropout_rng)   # the keep mask is regenerated, not kept
    ctx.mark_non_differentiable(output[1])
    ctx.args = (num_query, mode, scale, QFORMER_ATTENTION.name, dropout_p)
    ctx.n_nondiff = 6


def _setup_cross(ctx, inputs, output):
    q, k, v, key_padding_mask, scale, dropout_p, dropout_rng = inputs
    ctx.save_for_backward(q, k, v, *output, key_padding_mask, dropout_rng)
    ctx.mark_non_differentiable(output[1])
    ctx.args = (0, MODES["bidirectional"], scale, CROSS_ATTENTION.name, dropout_p)
    ctx.n_nondiff = 4


_qformer_attention_op.register_autograd(_backward, setup_context=_setup_qformer)
_cross_attention_op.register_autograd(_backward, setup_context=_setup_cross)


# ------------------------------------------------------------------------------------ public API
def _empty_head_dim(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``head_dim == 0``: the ``(B, H, Lq, 0)`` result ``F.scaled_dot_product_attention`` gives (no launch), still
    connected to ``q``, ``k``, ``v`` for autograd (their gradients are empty)."""
    return q + (k.sum() + v.sum()).to(q.dtype)


def qformer_attention(q: Tensor, k: Tensor, v: Tensor, *, num_query: int, mode: str,
                      text_mask: Optional[Tensor] = None, scale: Optional[float] = None, dropout_p: float = 0.0,
                      dropout_rng: Optional[Tensor] = None) -> Tensor:
    """Q-Former self-attention over ``[num_query learned queries ; T text tokens]`` with the mask of ``mode``.

    Args:
        q: ``(B, H, Lq, d)``: every row (``Lq = num_query + T``) or only the text rows (``Lq = T``, the ITG
            training pass whose keys/values are the queries' cached ones followed by the text's).
        k, v: ``(B, H, num_query + T, d)``, same dtype (float16, bfloat16, float32; float64 runs the
            reference) and device as ``q``. Any strides (e.g. views of a fused QKV projection).
        num_query: number of learned queries at the front of the key sequence (0 for a text-only pass).
        mode: the BLIP-2 objective's mask (LAVIS ``blip2_qformer.py``), rows/keys in positions of ``[queries ; text]``:
            ``"bidirectional"`` (ITM, InstructBLIP): every row sees every non-pad key;
            ``"unimodal"`` (ITC in one pass): query rows see queries only, text rows see non-pad text;
            ``"multimodal_causal"`` (ITG): query rows see queries only, text row ``t`` sees every query and
            the non-pad text keys ``j <= t``.
        text_mask: ``(B, T)`` bool or integer, nonzero = real token. Applies to keys only: padded rows are
            still computed.
        scale: score scale, default ``1/sqrt(d)``.
        dropout_p: attention-probability dropout, applied whenever ``> 0`` (pass ``p if training else 0``,
            as to ``F.scaled_dot_product_attention``): kept probabilities are scaled by ``1 / (1 - p)``;
            ``p = 1`` gives zeros.
        dropout_rng: int64 ``(2,)`` ``(seed, offset)`` of the keep mask, on ``q``'s device; default: drawn
            from torch's generator (reproducible under ``torch.manual_seed``). The same pair gives the same
            mask on every backend.

    Returns:
        ``(B, H, Lq, d)`` in the input dtype, contiguous; differentiable in ``q``, ``k``, ``v``.

    Edge cases: ``head_dim == 0`` returns the empty ``(B, H, Lq, 0)`` result, as
    ``F.scaled_dot_product_attention`` does; under ``torch.autocast`` q/k/v are cast to the autocast dtype (as
    SDPA is); non-finite q/k/v propagate NaN to the affected rows as in the originals. Masked keys never
    contribute to a row, and the padded rows' values never leak into other rows.

    Masked keys are excluded exactly; the originals add ``-10000`` instead, which gives the same result to
    the input precision unless a row has no visible key. Such a row (e.g. a text row whose text is all
    padding in ``"unimodal"``) returns zeros with zero gradients here, where the originals would return the
    uniform average of the values.
    """
    _check_qkv(q, k, v)
    if isinstance(num_query, bool) or not isinstance(num_query, int):
        raise TypeError(f"num_query must be an int, got {type(num_query).__name__}")
    B, H, Lq, _ = q.shape
    L = k.shape[2]
    if not 0 <= num_query <= L:
        raise ValueError(f"num_query must be in [0, L] where L = k.shape[2] = {L} (queries + text), got {num_query}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    T = L - num_query
    if Lq not in (L, T):
        raise ValueError(f"q must hold every row (Lq = num_query + T = {L}) or only the text rows (Lq = T = {T}), "
                         f"got Lq = {Lq}")
    _check_key_mask(text_mask, "text_mask", B, T, q)
    _check_scale(scale)
    dropout_p, rng = _dropout_args(q, k, dropout_p, dropout_rng)
    q, k, v = autocast_inputs(q, k, v)
    if q.shape[-1] == 0:
        return _empty_head_dim(q, k, v)
    # With Lq == T the rows are the text positions num_query.. ; with Lq == L == T (num_query 0) both agree.
    if _dispatch.eager_cpu_reference(QFORMER_ATTENTION, q, k):
        out = None if dropout_p else _eager_cpu_attention(q, k, v, num_query, mode, text_mask, _scale(q, scale))
        if out is not None:
            return out
        return ref_attention.qformer_attention(q, k, v, num_query=num_query, mode=mode, text_mask=text_mask,
                                               scale=_scale(q, scale), dropout_p=dropout_p, dropout_rng=rng)
    out, _ = _qformer_attention_op(q, k, v, _as_bool(text_mask), num_query, MODES[mode], _scale(q, scale),
                                   dropout_p, rng)
    return out


def cross_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                    scale: Optional[float] = None, dropout_p: float = 0.0,
                    dropout_rng: Optional[Tensor] = None) -> Tensor:
    """Queries attending to image tokens (Q-Former cross-attention), with optional key padding.

    Args:
        q: ``(B, H, Lq, d)`` (``Lq`` 32 or 64 in the models); k, v: ``(B, H, Lk, d)`` (``Lk`` 257, 677, ...),
            same dtype and device; any strides.
        key_padding_mask: ``(B, Lk)`` bool or integer, nonzero = real key, 0 = padding (the HF
            ``encoder_attention_mask`` convention, *not* ``nn.MultiheadAttention``'s True = ignore).
        scale: score scale, default ``1/sqrt(d)``.
        dropout_p, dropout_rng: attention-probability dropout, as in :func:`qformer_attention`.

    Returns:
        ``(B, H, Lq, d)`` in the input dtype. A batch whose keys are all padding returns zeros.
        ``head_dim == 0`` gives the empty result (as SDPA); under ``torch.autocast`` q/k/v are cast to the
        autocast dtype first (as SDPA is).
    """
    _check_qkv(q, k, v)
    _check_key_mask(key_padding_mask, "key_padding_mask", q.shape[0], k.shape[2], q)
    _check_scale(scale)
    dropout_p, rng = _dropout_args(q, k, dropout_p, dropout_rng)
    q, k, v = autocast_inputs(q, k, v)
    if q.shape[-1] == 0:
        return _empty_head_dim(q, k, v)
    if _dispatch.eager_cpu_reference(CROSS_ATTENTION, q, k):
        out = None if dropout_p else _eager_cpu_attention(q, k, v, 0, "bidirectional", key_padding_mask,
                                                          _scale(q, scale))
        if out is not None:
            return out
        return ref_attention.cross_attention(q, k, v, key_padding_mask=key_padding_mask, scale=_scale(q, scale),
                                             dropout_p=dropout_p, dropout_rng=rng)
    out, _ = _cross_attention_op(q, k, v, _as_bool(key_padding_mask), _scale(q, scale), dropout_p, rng)
    return out
