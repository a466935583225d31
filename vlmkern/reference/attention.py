"""Q-Former self-attention with its three masks, and query->image cross-attention, in plain PyTorch.

Computed the way the originals compute (``q @ k^T * scale``, an additive mask, softmax, ``@ v``, all in the
input dtype), with the Q-Former mask built in its smallest broadcast shape. Masked keys are excluded (``-inf``)
rather than pushed down by the originals' additive ``-10000``: the two agree to the input precision
except for a row whose keys are all masked, which the originals turn into a uniform average and which
here (as in ``vlmkern.ops``) returns zeros.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MODES = ("bidirectional", "unimodal", "multimodal_causal")


def qformer_mask_broadcast(num_query: int, mode: str, text_mask: Tensor | None, *, q_len: int, k_len: int,
                           device=None) -> Tensor:
    """The Q-Former mask in its smallest broadcastable shape: ``(1|B, 1, 1|q_len, k_len)`` bool, True = attend.

    Bidirectional depends on the keys only (``(B, 1, 1, k_len)``, or ``(1, 1, 1, k_len)`` all True without a
    ``text_mask``); the other modes add a row structure ``(1, 1, q_len, k_len)``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = text_mask.device if text_mask is not None else device
    nq = num_query
    if mode == "bidirectional":
        m = torch.ones(1, k_len, dtype=torch.bool, device=device)
    else:
        pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]       # absolute row positions
        key = torch.arange(k_len, device=device)[None, :]
        m = ((pos < nq) == (key < nq)) if mode == "unimodal" else ((key < nq) | (key <= pos))
    m = m[None, None]
    if text_mask is not None:
        real = torch.cat([torch.ones(text_mask.shape[0], nq, dtype=torch.bool, device=device),
                          text_mask != 0], dim=1)
        m = m & real[:, None, None, :]
    return m


def qformer_attention_mask(num_query: int, mode: str, text_mask: Tensor | None, *, q_len: int, k_len: int,
                           batch: int = 1, device=None) -> Tensor:
    """Boolean ``(B, 1, q_len, k_len)`` mask, True = attend, for keys ``[num_query queries ; T text]``.

    The ``q_len`` rows are the last ``q_len`` positions of the sequence: all of it (``q_len = k_len``) or only
    the text (``q_len = T``, the ITG pass against the queries' cached keys/values). ``text_mask`` ``(B, T)``
    (nonzero = real token) masks text *keys* only; padded rows are still computed.
    """
    m = qformer_mask_broadcast(num_query, mode, text_mask, q_len=q_len, k_len=k_len, device=device)
    return m.expand(max(batch, m.shape[0]), 1, q_len, k_len)


def cross_attention_mask(key_padding_mask: Tensor | None, *, q_len: int, k_len: int, batch: int = 1,
                         device=None) -> Tensor:
    """Boolean ``(B, 1, q_len, k_len)``; ``key_padding_mask`` ``(B, k_len)`` nonzero = real key."""
    return qformer_attention_mask(0, "bidirectional", key_padding_mask, q_len=q_len, k_len=k_len,
                                  batch=batch, device=device)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``0`` where ``mask`` (bool, True = attend) is set, ``-inf`` elsewhere, in ``mask``'s (broadcast) shape."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """``softmax(q k^T * scale, masked) v`` in the input dtype; rows with no visible key return zeros.

    ``q`` ``(B, H, Lq, d)``, ``k``/``v`` ``(B, H, Lk, d)``, ``mask`` bool broadcastable to ``(B, H, Lq, Lk)``.
    The mask is applied as an additive ``-inf`` bias of the mask's own (broadcast) shape, the way the
    originals add theirs: pass it unexpanded and no ``(B, 1, Lq, Lk)`` tensor is touched for a key-only mask.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bool(mask.all()):                                   # nothing masked: plain softmax
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    scores = scores + additive_mask(mask, scores.dtype)
    has_key = mask.any(dim=-1, keepdim=True)
    if bool(has_key.all()):
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    # A row with no visible key gets finite scores so that softmax (and its gradient) stays finite; its
    # probabilities are then zeroed.
    scores = torch.where(has_key, scores, scores.new_zeros(()))
    probs = torch.where(mask, torch.softmax(scores, dim=-1), scores.new_zeros(()))
    return torch.matmul(probs, v)


def qformer_attention(q: Tensor, k: Tensor, v: Tensor, *, num_query: int, mode: str,
                      text_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Q-Former self-attention over ``[num_query queries ; T text]`` with the mask of ``mode`` (as LAVIS).

    ``q`` ``(B, H, Lq, d)`` with ``Lq = num_query + T`` or ``Lq = T`` (text rows only); ``k``, ``v``
    ``(B, H, num_query + T, d)``; ``text_mask`` ``(B, T)``. Returns ``(B, H, Lq, d)``.
    """
    mask = qformer_mask_broadcast(num_query, mode, text_mask, q_len=q.shape[-2], k_len=k.shape[-2],
                                  device=q.device)
    return masked_attention(q, k, v, mask, scale)


def cross_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
                    scale: float | None = None) -> Tensor:
    """Queries ``(B, H, Lq, d)`` attending to keys/values ``(B, H, Lk, d)``; ``key_padding_mask`` ``(B, Lk)``
    nonzero = real key."""
    mask = qformer_mask_broadcast(0, "bidirectional", key_padding_mask, q_len=q.shape[-2], k_len=k.shape[-2],
                                  device=q.device)
    return masked_attention(q, k, v, mask, scale)
