"""Q-Former self-attention with its three masks, and query->image cross-attention, in plain PyTorch.

Computed the way the originals compute (``q @ k^T * scale``, an additive mask, softmax, ``@ v``, all in the
input dtype), with the Q-Former mask built in its smallest broadcast shape. Masked keys are excluded (``-inf``)
rather than pushed down by the originals' additive ``-10000``: the two agree to the input precision
except for a row whose keys are all masked, where the originals' ``-10000`` (the same on every key) cancels in
the softmax, leaving the unmasked softmax over every key, and which here (as in ``vlmkern.ops``) returns zeros.

Attention-probability dropout (:func:`dropout_keep_mask`) draws its keep mask from a counter-based generator
keyed by a ``(seed, offset)`` pair, bit for bit the mask the Triton kernels regenerate in their backward.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch import Tensor

from vlmkern.masks import QFormerMode, qformer_visible


def qformer_mask_broadcast(num_query: int, mode: str | QFormerMode, text_mask: Tensor | None, *, q_len: int,
                           k_len: int, device=None) -> Tensor:
    """The Q-Former mask in its smallest broadcastable shape: ``(1|B, 1, 1|q_len, k_len)`` bool, True = attend.

    :func:`vlmkern.masks.qformer_visible` of the row positions (the last ``q_len`` of the sequence) and keys,
    and the text keys' padding. Bidirectional depends on the keys only (``(B, 1, 1, k_len)``, or
    ``(1, 1, 1, k_len)`` all True without a ``text_mask``); the other modes add a row structure
    ``(1, 1, q_len, k_len)``.
    """
    mode = QFormerMode.parse(mode)
    device = text_mask.device if text_mask is not None else device
    nq = num_query
    pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]       # absolute row positions
    key = torch.arange(k_len, device=device)[None, :]
    m = qformer_visible(mode, nq, pos, key)[None, None]
    if text_mask is not None:
        real = torch.cat([torch.ones(text_mask.shape[0], nq, dtype=torch.bool, device=device),
                          text_mask != 0], dim=1)
        m = m & real[:, None, None, :]
    return m


def qformer_attention_mask(num_query: int, mode: str | QFormerMode, text_mask: Tensor | None, *, q_len: int,
                           k_len: int, batch: int = 1, device=None) -> Tensor:
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
    return qformer_attention_mask(0, QFormerMode.BIDIRECTIONAL, key_padding_mask, q_len=q_len, k_len=k_len,
                                  batch=batch, device=device)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``0`` where ``mask`` (bool, True = attend) is set, ``-inf`` elsewhere, in ``mask``'s (broadcast) shape."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None,
                     dropout: Tensor | None = None) -> Tensor:
    """``softmax(q k^T * scale, masked) v`` in the input dtype; rows with no visible key return zeros.

    ``q`` ``(B, H, Lq, d)``, ``k``/``v`` ``(B, H, Lk, d)``, ``mask`` bool broadcastable to ``(B, H, Lq, Lk)``.
    The mask is applied as an additive ``-inf`` bias of the mask's own (broadcast) shape, the way the
    originals add theirs: pass it unexpanded and no ``(B, 1, Lq, Lk)`` tensor is touched for a key-only mask.
    ``dropout``: multiplier of the probabilities (``keep / (1 - p)``, :func:`dropout_multiplier`), applied
    after the softmax as the originals' ``nn.Dropout`` is.
    """
    if q.shape[-1] == 0:      # no features: the empty (B, H, Lq, 0) result, as F.scaled_dot_product_attention
        return q.new_zeros(q.shape)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bool(mask.all()):                                   # nothing masked: plain softmax
        probs = torch.softmax(scores, dim=-1)
    else:
        scores = scores + additive_mask(mask, scores.dtype)
        has_key = mask.any(dim=-1, keepdim=True)
        if bool(has_key.all()):
            probs = torch.softmax(scores, dim=-1)
        else:
            # A row with no visible key gets finite scores so that softmax (and its gradient) stays finite;
            # its probabilities are then zeroed.
            scores = torch.where(has_key, scores, scores.new_zeros(()))
            probs = torch.where(mask, torch.softmax(scores, dim=-1), scores.new_zeros(()))
    if dropout is not None:
        probs = probs * dropout
    return torch.matmul(probs, v)


def _dropout(q: Tensor, k: Tensor, dropout_p: float, dropout_rng: Tensor | None) -> Tensor | None:
    if dropout_p <= 0.0:
        return None
    if dropout_rng is None:
        raise ValueError("dropout_rng (the (seed, offset) int64 pair) must be given when dropout_p > 0")
    return dropout_multiplier(dropout_rng, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p, q.dtype)


def qformer_attention(q: Tensor, k: Tensor, v: Tensor, *, num_query: int, mode: str | QFormerMode,
                      text_mask: Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
                      dropout_rng: Tensor | None = None) -> Tensor:
    """Q-Former self-attention over ``[num_query queries ; T text]`` with the mask of ``mode`` (as LAVIS).

    ``q`` ``(B, H, Lq, d)`` with ``Lq = num_query + T`` or ``Lq = T`` (text rows only); ``k``, ``v``
    ``(B, H, num_query + T, d)``; ``text_mask`` ``(B, T)``. Returns ``(B, H, Lq, d)``. With ``dropout_p > 0``
    the probabilities are dropped with the keep mask of :func:`dropout_keep_mask` for ``dropout_rng``.
    """
    mask = qformer_mask_broadcast(num_query, mode, text_mask, q_len=q.shape[-2], k_len=k.shape[-2],
                                  device=q.device)
    return masked_attention(q, k, v, mask, scale, _dropout(q, k, dropout_p, dropout_rng))


def cross_attention(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None,
                    scale: float | None = None, dropout_p: float = 0.0, dropout_rng: Tensor | None = None) -> Tensor:
    """Queries ``(B, H, Lq, d)`` attending to keys/values ``(B, H, Lk, d)``; ``key_padding_mask`` ``(B, Lk)``
    nonzero = real key; dropout as in :func:`qformer_attention`."""
    mask = qformer_mask_broadcast(0, QFormerMode.BIDIRECTIONAL, key_padding_mask, q_len=q.shape[-2], k_len=k.shape[-2],
                                  device=q.device)
    return masked_attention(q, k, v, mask, scale, _dropout(q, k, dropout_p, dropout_rng))


# ------------------------------------------------------------------------ attention-probability dropout
# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): the round and key
# constants of the paper, which are also those of Triton's ``tl.philox`` for 32-bit counters.
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)
_M32 = 0xFFFFFFFF
_HI = 1 if sys.byteorder == "little" else 0     # index of a uint64's high word in its uint32 view
DROPOUT_MAX_SCORES = 2 ** 31 - 1        # the kernels index a (batch, head)'s scores with int32


def philox4x32(seed: int, c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray,
               rounds: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32 of the uint32 counters ``(c0, c1, c2, c3)`` (equal shapes) under the 64-bit key ``seed``
    (its low and high 32-bit words, two's complement for a negative int64), the way ``tl.philox`` computes it.
    NumPy rather than torch: a 32x32->64-bit product is one uint64 op here, while torch's int64 multiply is
    not vectorized on the CPU (measured ~25x slower for a cross-attention-sized mask); the product's high and
    low words are read as uint32 views, not shifted and masked copies."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    a, b = np.uint64(_PHILOX_ROUND[0]), np.uint64(_PHILOX_ROUND[1])
    for _ in range(rounds):
        pa = np.multiply(c0, a, dtype=np.uint64).view(np.uint32)
        pb = np.multiply(c2, b, dtype=np.uint64).view(np.uint32)
        c0 = np.bitwise_xor(pb[..., _HI::2], c1)
        c0 ^= np.uint32(k0)
        c2 = np.bitwise_xor(pa[..., _HI::2], c3)
        c2 ^= np.uint32(k1)
        c1, c3 = pb[..., 1 - _HI::2], pa[..., 1 - _HI::2]
        k0, k1 = (k0 + _PHILOX_KEY_STEP[0]) & _M32, (k1 + _PHILOX_KEY_STEP[1]) & _M32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """A probability is kept when its 31-bit random draw is ``>= floor(p * 2^31)``: keep rate ``1 - p`` to
    within ``2^-31`` (``p = 1`` keeps draws of ``2^31 - 1`` only, which the scale 0 then zeroes)."""
    return min(int(dropout_p * 2 ** 31), 2 ** 31 - 1)


def dropout_scale(dropout_p: float) -> float:
    """Kept probabilities are scaled by ``1 / (1 - p)`` as ``nn.Dropout`` does (0 for ``p = 1``)."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def dropout_keep_mask(dropout_rng: Tensor, shape: tuple[int, int, int, int], dropout_p: float) -> Tensor:
    """Keep mask ``(B, H, Lq, Lk)`` bool (on ``dropout_rng``'s device) of attention-probability dropout.

    ``dropout_rng``: int64 ``(2,)`` = ``(seed, offset)``. The probability of query row ``i`` and key ``j`` of
    batch ``b``, head ``h`` draws ``n = i * Lk + j`` as counter::

        (r0, r1, r2, r3) = Philox4x32-10(key = seed, counter = (n >> 2, b * H + h, offset lo, offset hi))
        keep = (r_{n & 3} >> 1) >= dropout_threshold(p)

    so each Philox call serves four neighbouring scores, every (b, h) has its own counter stream and a
    different offset moves to fresh streams under one seed. ``i`` counts ``q``'s rows (not sequence positions).
    """
    B, H, Lq, Lk = shape
    if Lq * Lk > DROPOUT_MAX_SCORES:
        raise ValueError(f"attention dropout takes at most {DROPOUT_MAX_SCORES} scores per (batch, head), got "
                         f"Lq * Lk = {Lq} * {Lk}")
    seed, offset = (int(x) for x in dropout_rng.tolist())
    n = Lq * Lk
    calls = -(-n // 4)
    c0 = np.broadcast_to(np.arange(calls, dtype=np.uint32)[None, :], (B * H, calls))
    c1 = np.broadcast_to(np.arange(B * H, dtype=np.uint32)[:, None], (B * H, calls))
    c2 = np.full((B * H, calls), offset & _M32, dtype=np.uint32)
    c3 = np.full((B * H, calls), (offset >> 32) & _M32, dtype=np.uint32)
    least = np.uint32(2 * dropout_threshold(dropout_p))                 # (r >> 1) >= t  <=>  r >= 2 t
    keep = np.stack([w >= least for w in philox4x32(seed, c0, c1, c2, c3)], axis=-1)
    return torch.from_numpy(keep.reshape(B * H, calls * 4)[:, :n]).reshape(B, H, Lq, Lk).to(dropout_rng.device)


def dropout_multiplier(dropout_rng: Tensor, shape: tuple[int, int, int, int], dropout_p: float,
                       dtype: torch.dtype) -> Tensor:
    """``keep / (1 - p)`` in ``dtype``, ``(B, H, Lq, Lk)``: what the probabilities are multiplied by."""
    return dropout_keep_mask(dropout_rng, shape, dropout_p).to(dtype).mul_(dropout_scale(dropout_p))
