"""``vlmkern::qformer_attention`` and ``vlmkern::cross_attention``: attention with the mask built in the kernel.

Shapes: ``q`` ``(B, H, Lq, d)``, ``k``/``v`` ``(B, H, Lk, d)``, result ``(B, H, Lq, d)`` in the input dtype, laid out
``(B, Lq, H, d)`` in memory (a ``.transpose(1, 2)`` of a dense tensor, as torch's fused attention gives): merging the
heads back, ``out.transpose(1, 2).reshape(B, Lq, H * d)``, is then a view, so the output projection saves the
storage the op saves for its backward instead of a copy of it.
Both ops share one forward kernel family (``vlmkern.kernels.attention``) and one backward op; no
``(B, 1, Lq, Lk)`` mask tensor exists on the Triton path. The Q-Former masks are
:func:`vlmkern.masks.qformer_visible` of a :class:`vlmkern.masks.QFormerMode`; the custom ops take the mode as
``int(mode)``.

This module is the contract (checks, schemas, fake and autograd registrations, dispatch); the backends are
``_triton.py`` (imported only when Triton runs) and ``_torch.py`` (the 'reference' backend, any device).

Attention-probability dropout (``dropout_p > 0``): the keep mask is a function of ``(seed, offset)``, an int64
``(2,)`` tensor drawn from torch's default generator of the inputs' device unless given (the rule:
``vlmkern.ops.attention._dropout``); the kernels regenerate it in the backward and never store it, and the
PyTorch backend builds the same mask, so both backends drop the same probabilities.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vlmkern.masks import QFormerMode
from vlmkern.ops import dispatch
from vlmkern.ops.attention import _dropout, _torch
from vlmkern.ops.checks import (FLOATS, INT32_MAX, MASK_DTYPES, autocast_inputs, check_dropout_p, check_same_device,
                                check_tensor, finite_number, grid_axis_reasons, int32_offset_reasons, once_per_key)
from vlmkern.ops.dispatch import Capabilities, OpDispatch, register

TRITON = Capabilities(dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=(32, 64, 128))
_BIDIRECTIONAL = int(QFormerMode.BIDIRECTIONAL)     # cross-attention's mask mode, as the custom ops take it


# --------------------------------------------------------------------------------------------- checks
@once_per_key
def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=4, dtypes=FLOATS, shape_doc="(batch, heads, length, head_dim)")
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
    check_tensor(mask, name, ndim=2, dtypes=MASK_DTYPES, shape_doc=f"(batch, {length}) of 1 = real / 0 = pad")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape (batch, {length}) = ({batch}, {length}), got {tuple(mask.shape)}")
    check_same_device(q=q, **{name: mask})


def _check_scale(scale) -> None:
    if scale is None:
        return
    if not finite_number(scale):
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
    if q.shape[2] * k.shape[2] > _dropout.MAX_SCORES:
        raise ValueError(f"dropout needs Lq * Lk <= {_dropout.MAX_SCORES} (scores per batch and head), "
                         f"got {q.shape[2]} * {k.shape[2]}")
    if dropout_rng is None:
        dropout_rng = torch.randint(2 ** 63 - 1, (2,), dtype=torch.int64, device=q.device)
    return float(dropout_p), dropout_rng


def dropout_keep_mask_triton(dropout_rng: Tensor, shape: tuple[int, int, int, int], dropout_p: float) -> Tensor:
    """The keep mask ``(B, H, Lq, Lk)`` bool as the Triton kernels draw it (compiled, or interpreted on CPU
    tensors), for checking them against ``vlmkern.reference.attention.dropout_keep_mask``."""
    return dispatch.on_device(_triton_keep_mask, dropout_rng.device)(dropout_rng, shape, dropout_p)


# ------------------------------------------------------------------------------------------- dispatch
def _triton_reasons(q, k, v=None, key_mask=None, *_, **__) -> list[str]:
    why = dispatch.triton_env_reasons(q.device) + TRITON.reasons(q.dtype, head_dim=q.shape[-1])
    # (b, h) bases are 64-bit in the kernels; offsets inside one (b, h) slice and along a mask row are 32-bit.
    # out's (b, h) slice spans its (Lq, H, d) block (heads interleaved); dq/dk/dv's are contiguous (L, d) slices
    rows = max(q.shape[2] * q.shape[1], k.shape[2]) * q.shape[3]
    if rows > INT32_MAX:      # whatever q/k/v's strides
        why.append(f"a (batch, head) slice of the result or gradients holds {rows} elements (offset in int32)")
    # the grid is (row blocks, B * H): a third grid axis, or a folded one, costs the tuned configs a register
    why += grid_axis_reasons(**{"batch * heads": q.shape[0] * q.shape[1]})
    return why + int32_offset_reasons((2, 3), q=q, k=k, v=v) + int32_offset_reasons((1,), key_mask=key_mask)


QFORMER_ATTENTION = register(OpDispatch("qformer_attention", {"triton": _triton_reasons,
                                                                     "reference": dispatch.never_refuses}))
CROSS_ATTENTION = register(OpDispatch("cross_attention", {"triton": _triton_reasons,
                                                                 "reference": dispatch.never_refuses}))
# Shared by both ops' gradients; the same reasons as their forwards, so it picks the forward's backend.
MASKED_ATTENTION_BACKWARD = OpDispatch("masked_attention_backward", {"triton": _triton_reasons,
                                                                     "reference": dispatch.never_refuses})


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ------------------------------------------------------------------------------------------ custom ops
def _fake_forward(q):
    B, H, Lq, d = q.shape
    return q.new_empty((B, Lq, H, d)).transpose(1, 2), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("vlmkern::qformer_attention", mutates_args=())
def _qformer_attention_op(q: Tensor, k: Tensor, v: Tensor, text_mask: Optional[Tensor], num_query: int,
                          mode: int, scale: float, dropout_p: float,
                          dropout_rng: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _torch.forward(q, k, v, text_mask, num_query, mode, scale, dropout_p, dropout_rng)


@_qformer_attention_op.register_fake
def _(q, k, v, text_mask, num_query, mode, scale, dropout_p, dropout_rng):
    return _fake_forward(q)


def _as_cross(forward):
    """A backend's masked forward as cross-attention: no learned queries, every non-pad key visible."""
    def cross(q, k, v, key_padding_mask, scale, dropout_p, dropout_rng):
        return forward(q, k, v, key_padding_mask, 0, _BIDIRECTIONAL, scale, dropout_p, dropout_rng)
    return cross


@torch.library.custom_op("vlmkern::cross_attention", mutates_args=())
def _cross_attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: float,
                        dropout_p: float, dropout_rng: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _as_cross(_torch.forward)(q, k, v, key_padding_mask, scale, dropout_p, dropout_rng)


@_cross_attention_op.register_fake
def _(q, k, v, key_padding_mask, scale, dropout_p, dropout_rng):
    return _fake_forward(q)


@torch.library.custom_op("vlmkern::masked_attention_backward", mutates_args=())
def _masked_attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  key_mask: Optional[Tensor], num_query: int, mode: int, scale: float,
                                  dropout_p: float, dropout_rng: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _torch.backward(grad, q, k, v, out, lse, key_mask, num_query, mode, scale, dropout_p, dropout_rng)


@_masked_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, key_mask, num_query, mode, scale, dropout_p, dropout_rng):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _qkv_mask(q, k, v, mask, *_):
    """What backend selection reads of a forward's arguments."""
    return q, k, v, mask


_triton_forward = dispatch.lazy(f"{__name__}._triton", "forward")
_triton_gradients = dispatch.lazy(f"{__name__}._triton", "backward")
_triton_keep_mask = dispatch.lazy(f"{__name__}._triton", "dropout_keep_mask_triton")


dispatch.implement(_qformer_attention_op, QFORMER_ATTENTION, {"triton": _triton_forward, "reference": _torch.forward},
                   probe=_qkv_mask)
dispatch.implement(_cross_attention_op, CROSS_ATTENTION,
                   {"triton": _as_cross(_triton_forward), "reference": _as_cross(_torch.forward)}, probe=_qkv_mask)
dispatch.implement(_masked_attention_backward_op, MASKED_ATTENTION_BACKWARD,
                   {"triton": _triton_gradients, "reference": _torch.backward},
                   probe=lambda grad, q, k, v, out, lse, key_mask, *_: (q, k, v, key_mask))


# The gradients of the non-tensor / mask / rng inputs after q, k, v: None each (tuples made once, not per call).
_QFORMER_NONDIFF, _CROSS_NONDIFF = (None,) * 6, (None,) * 4


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, key_mask, dropout_rng = ctx.saved_tensors
    dq, dk, dv = _masked_attention_backward(grad, q, k, v, out, lse, key_mask, *ctx.args, dropout_rng)
    return (dq, dk, dv, *ctx.nondiff)


def _setup_qformer(ctx, inputs, output):
    q, k, v, text_mask, num_query, mode, scale, dropout_p, dropout_rng = inputs
    ctx.save_for_backward(q, k, v, *output, text_mask, dropout_rng)   # the keep mask is regenerated, not kept
    ctx.mark_non_differentiable(output[1])
    ctx.args = (num_query, mode, scale, dropout_p)
    ctx.nondiff = _QFORMER_NONDIFF


def _setup_cross(ctx, inputs, output):
    q, k, v, key_padding_mask, scale, dropout_p, dropout_rng = inputs
    ctx.save_for_backward(q, k, v, *output, key_padding_mask, dropout_rng)
    ctx.mark_non_differentiable(output[1])
    ctx.args = (0, _BIDIRECTIONAL, scale, dropout_p)
    ctx.nondiff = _CROSS_NONDIFF


dispatch.register_autograd(_qformer_attention_op, _backward, _setup_qformer)
dispatch.register_autograd(_cross_attention_op, _backward, _setup_cross)


# Eager calls run the kernels without the dispatcher (dispatch.EagerOp); compiled ones see the ops.
_qformer_attention = dispatch.EagerOp(_qformer_attention_op)
_cross_attention = dispatch.EagerOp(_cross_attention_op)
_masked_attention_backward = dispatch.BackwardOp(_masked_attention_backward_op)


# ------------------------------------------------------------------------------------ public API
def _empty_head_dim(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``head_dim == 0``: the ``(B, H, Lq, 0)`` result ``F.scaled_dot_product_attention`` gives (no launch), still
    connected to ``q``, ``k``, ``v`` for autograd (their gradients are empty)."""
    return q + (k.sum() + v.sum()).to(q.dtype)


def _attend(op: OpDispatch, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_query: int,
            mode: QFormerMode, scale, dropout_p, dropout_rng) -> Tensor:
    """Both public functions after their shape checks: the scalar checks, then the eager CPU path or ``op``'s
    custom op (cross-attention is the bidirectional mask without queries)."""
    _check_scale(scale)
    if dropout_rng is None and dropout_p == 0 and type(dropout_p) in (float, int):   # no dropout, nothing to check
        dropout_p, rng = 0.0, None
    else:
        dropout_p, rng = _dropout_args(q, k, dropout_p, dropout_rng)
    q, k, v = autocast_inputs(q, k, v)
    if q.shape[-1] == 0:
        return _empty_head_dim(q, k, v)
    scale = _scale(q, scale)
    if dispatch.eager_cpu_reference(op, q, k):
        return _torch.eager_cpu_attention(q, k, v, key_mask, num_query, mode, scale, dropout_p, rng)
    key_mask = _as_bool(key_mask)
    if op is CROSS_ATTENTION:
        return _cross_attention(q, k, v, key_mask, scale, dropout_p, rng)[0]
    return _qformer_attention(q, k, v, key_mask, num_query, int(mode), scale, dropout_p, rng)[0]


def qformer_attention(q: Tensor, k: Tensor, v: Tensor, *, num_query: int, mode: str | QFormerMode,
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
            the non-pad text keys ``j <= t``. Or the :class:`vlmkern.masks.QFormerMode` of that name.
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
    padding in ``"unimodal"``) returns zeros with zero gradients here, where the originals' ``-10000``, added
    to every key of the row alike, cancels in the softmax: they return the row's unmasked softmax over all keys
    (padding included) times the values (transformers' masks of ``finfo.min`` give the uniform average).
    """
    _check_qkv(q, k, v)
    if isinstance(num_query, bool) or not isinstance(num_query, int):
        raise TypeError(f"num_query must be an int, got {type(num_query).__name__}")
    B, H, Lq, _ = q.shape
    L = k.shape[2]
    if not 0 <= num_query <= L:
        raise ValueError(f"num_query must be in [0, L] where L = k.shape[2] = {L} (queries + text), got {num_query}")
    mode = QFormerMode.parse(mode)
    T = L - num_query
    if Lq not in (L, T):
        raise ValueError(f"q must hold every row (Lq = num_query + T = {L}) or only the text rows (Lq = T = {T}), "
                         f"got Lq = {Lq}")
    _check_key_mask(text_mask, "text_mask", B, T, q)
    # With Lq == T the rows are the text positions num_query.. ; with Lq == L == T (num_query 0) both agree.
    return _attend(QFORMER_ATTENTION, q, k, v, text_mask, num_query, mode, scale, dropout_p, dropout_rng)


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
    return _attend(CROSS_ATTENTION, q, k, v, key_padding_mask, 0, QFormerMode.BIDIRECTIONAL, scale, dropout_p,
                   dropout_rng)
