"""Qwen-VL position-aware vision-language adapter (``visual.py``: ``Resampler``, ``get_abs_pos``,
``get_2d_sincos_pos_embed``).

``Resampler`` is a drop-in for the original: same constructor, parameter names (``query``, ``pos_embed``,
``kv_proj``, ``attn.in_proj_weight/bias``, ``attn.out_proj``, ``ln_q``, ``ln_kv``) and ``forward(x, attn_mask=None)``.
Without a mask it runs (per call, ``X (N, L, kv_dim)``, ``P16`` the stored table, ``P_L`` its bicubic resize)::

    q  = (LN_q(query) + P16) W_q + b_q                 once per call, shared by every image (stride-0 batch)
    k  = (LN_kv(X W_kv) + P_L) W_k + b_k                P_L cached per L while pos_embed is unchanged (CPU)
    v  = LN_kv(X W_kv) W_v + b_v
    O  = attention(q, k, v) W_o + b_o                  vlmkern.ops.cross_attention, no weights materialised

so neither the ``(L, N, D)`` sequence-first copy nor the ``(256, N, D)`` repeated queries nor the ``(N, 256, L)``
attention weights exist. On the CPU ``F.interpolate`` runs once per grid and table value instead of every call
(the cache compares ``pos_embed`` with the copy it was built from, so writes through ``.data`` are seen; nothing
that depends on a projection weight is cached); on a GPU it runs every call, where a comparison would sync.
Every gradient reaches its parameter.
With an ``attn_mask``, or when ``attn`` is not a plain ``nn.MultiheadAttention`` as the original builds it (a
hook on it, on its ``out_proj`` or a global one, a wrapper such as PEFT's, another layout, attention dropout while
training), the original computation runs (``forward_original``: ``attn`` is called, so hooks and wrappers act).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from vlmkern.nn._linear import plain_module
from vlmkern.ops.attention import cross_attention
from vlmkern.ops.checks import check_weight_dtype, square_side
from vlmkern.ops.dispatch import values_readable

try:
    import numpy as _np
except ImportError:  # numpy is not a hard dependency of torch: fall back to the same float32 steps in torch
    _np = None


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> Tensor:
    """MAE 2-D sin-cos table ``(grid_size², embed_dim)`` float32 (``visual.py``): token ``t = h*G + w``; channels
    ``[0, D/2)`` encode the column ``w``, ``[D/2, D)`` the row ``h``; each half ``[sin(p ω_i)] ++ [cos(p ω_i)]``,
    ``ω_i = 10000^{-i/(D/4)}``.

    Computed as ``visual.py`` does, in numpy float32 (``ω``, ``p ω``, numpy's sin and cos), so the table is
    bit-identical to the original's: ``pos_embed`` is saved in the state dict. Without numpy the same float32 steps
    run in torch, whose sin and cos may differ from numpy's by an ulp. The tensor is made on the default device
    (``meta`` under ``torch.device("meta")``)."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos table, got {embed_dim}")
    xp = _np if _np is not None else _TorchAsNumpy
    omega = xp.arange(embed_dim // 4, dtype=xp.float32)
    omega /= embed_dim / 4.0                          # in place, as visual.py: stays float32
    omega = 1.0 / 10000 ** omega
    coords = xp.arange(grid_size, dtype=xp.float32)
    w = xp.tile(coords, grid_size)                    # t = h*G + w (visual.py's meshgrid, flattened)
    h = xp.repeat(coords, grid_size)

    def one_d(pos):
        out = xp.einsum("m,d->md", pos, omega)
        return xp.concatenate([xp.sin(out), xp.cos(out)], axis=1)

    return torch.as_tensor(xp.concatenate([one_d(w), one_d(h)], axis=1), dtype=torch.float32)


class _TorchAsNumpy:
    """The numpy functions :func:`get_2d_sincos_pos_embed` uses, in torch on the CPU (when numpy is missing)."""
    float32 = torch.float32
    sin, cos, einsum = staticmethod(torch.sin), staticmethod(torch.cos), staticmethod(torch.einsum)

    @staticmethod
    def arange(n, dtype):
        return torch.arange(n, dtype=dtype, device="cpu")

    @staticmethod
    def tile(t, n):
        return t.repeat(n)

    @staticmethod
    def repeat(t, n):
        return t.repeat_interleave(n)

    @staticmethod
    def concatenate(ts, axis):
        return torch.cat(ts, dim=axis)


def get_abs_pos(abs_pos: Tensor, tgt_size: int) -> Tensor:
    """The original ``get_abs_pos``: bicubic resize (fp32, ``align_corners=False``) of a square ``(S², D)`` table
    to ``(T², D)``, ``T = int(sqrt(tgt_size))``; returned unchanged when ``S == T``."""
    src = int(math.sqrt(abs_pos.size(0)))
    tgt = int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    out = F.interpolate(abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                        mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(dtype=abs_pos.dtype)


class Resampler(nn.Module):
    """Drop-in for Qwen-VL's ``visual.Resampler`` (``attn_pool``): ``(N, L, kv_dim)`` -> ``(N, grid_size², embed_dim)``,
    ``L`` a perfect square."""

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: Optional[int] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.num_queries = grid_size ** 2
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(embed_dim, grid_size)).requires_grad_(False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        if kv_dim is not None and kv_dim != embed_dim:
            self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        else:
            self.kv_proj = nn.Identity()
        self.kv_dim = kv_dim if kv_dim is not None else embed_dim
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = norm_layer(embed_dim)
        self.ln_kv = norm_layer(embed_dim)
        self.apply(self._init_weights)
        self._cache: dict = {}

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------------------------------ checks
    def _check(self, x: Tensor) -> int:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D (batch, L, kv_dim), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        w = self.query  # not attn's weights: a wrapper standing in for attn may not expose them
        if x.is_meta != w.is_meta:
            raise ValueError(f"x is on {x.device} but the resampler's parameters are on {w.device}")
        if x.shape[-1] != self.kv_dim:
            raise ValueError(f"x has last dim {x.shape[-1]} but the resampler was built for kv_dim={self.kv_dim}")
        check_weight_dtype(x, "x", w, "the resampler's parameters")
        L = x.shape[1]
        side = square_side(L)
        if L == 0 or side * side != L:
            raise ValueError(f"x must hold a square grid of image tokens (L = side²), got L = {L}")
        return L

    # --------------------------------------------------------------------------------- position term
    def _position_table(self, L: int) -> Tensor:
        """``P_L`` ``(L, D)``: ``pos_embed`` resized to ``L`` keys; cached unless ``pos_embed`` needs a gradient.

        The cache holds a copy of the table it was computed from and is used only while ``pos_embed`` still
        equals it: ``data_ptr``/``_version`` miss writes through ``.data`` (its own version counter) and hooks
        miss ``.data`` assignment, a comparison misses nothing. Comparing ``Q x D`` values costs less than
        resizing (``16 L x D`` multiply-adds) on a CPU. On any other device the table is recomputed every call:
        the comparison's answer would have to come back to the host (a sync per call that stalls the queue), and
        the resize is a few small kernels there. Under ``torch.compile``, ``torch.export`` or a fake-tensor trace
        the table is recomputed too (no graph break, no fake tensor kept for a later eager call).
        """
        pos = self.pos_embed
        if (pos.device.type != "cpu" or (pos.requires_grad and torch.is_grad_enabled())
                or not values_readable(pos)):
            return get_abs_pos(pos, L)      # an accelerator, traced, fake or meta: no comparison
        entry = self._cache.get(L)
        with torch.no_grad():
            if (entry is None or entry[0].shape != pos.shape or entry[0].dtype != pos.dtype
                    or entry[0].device != pos.device or not torch.equal(entry[0], pos)):
                entry = self._cache[L] = (pos.detach().clone(), get_abs_pos(pos.detach(), L))
        return entry[1]

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        L = self._check(x)
        if attn_mask is not None or not self._plain_attention():
            return self.forward_original(x, attn_mask)
        N = x.shape[0]
        D, H = self.embed_dim, self.num_heads
        d = D // H
        x = self.ln_kv(self.kv_proj(x))                                       # (N, L, D)
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        w_q, w_k, w_v = w.split(D)              # one split: its backward writes each block once, no zero fills
        b_q, b_k, b_v = b.split(D) if b is not None else (None, None, None)
        q = F.linear(self.ln_q(self.query) + self.pos_embed, w_q, b_q)        # (Q, D), once per call
        # (x + P_L) W_kᵀ as the original: both gradients follow; nothing derived from a weight is cached, so a
        # weight changed in any way (in place, through .data, reassigned) is used as it is.
        k = F.linear(x + self._position_table(L).to(x.dtype), w_k, b_k)
        v = F.linear(x, w_v, b_v)
        k = k.unflatten(-1, (H, d)).transpose(1, 2)                            # (N, H, L, d) views
        v = v.unflatten(-1, (H, d)).transpose(1, 2)
        qh = q.unflatten(-1, (H, d)).transpose(0, 1).unsqueeze(0).expand(N, H, self.num_queries, d)
        out = cross_attention(qh, k, v)                                      # (N, H, Q, d)
        out = out.transpose(1, 2).reshape(N, self.num_queries, D)
        return F.linear(out, self.attn.out_proj.weight, self.attn.out_proj.bias)

    def _plain_attention(self) -> bool:
        """Whether the fused path computes exactly what calling ``self.attn`` does: an ``nn.MultiheadAttention``
        itself and its ``out_proj`` of their exact types without hooks (nor global ones), in the layout the
        original builds (packed ``in_proj``, sequence-first, no ``bias_k``/``bias_v``, no zero attention), and no
        attention dropout in play (the fused path has none)."""
        a = self.attn
        return (plain_module(a, nn.MultiheadAttention) and plain_module(a.out_proj, NonDynamicallyQuantizableLinear)
                and a._qkv_same_embed_dim and not a.batch_first and a.bias_k is None and a.bias_v is None
                and not a.add_zero_attn and not (self.training and a.dropout > 0))

    def forward_original(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """The original computation (``nn.MultiheadAttention``, per-call interpolation)."""
        pos_embed = get_abs_pos(self.pos_embed, x.size(1))
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        N = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, N, 1) + self.pos_embed.unsqueeze(1),
                        x + pos_embed.unsqueeze(1), x, attn_mask=attn_mask)[0]
        return out.permute(1, 0, 2)


class VisionTransformerTail(nn.Module):
    """The end of Qwen-VL's ``VisionTransformer.forward`` after ``attn_pool``: ``ln_post`` then ``x @ proj``
    (``proj (D, D)`` stored ``(in, out)``, right-multiplied, no bias)."""

    def __init__(self, output_dim: int, norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.ln_post = norm_layer(output_dim)
        self.proj = nn.Parameter((output_dim ** -0.5) * torch.randn(output_dim, output_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.proj.shape[0]:
            raise ValueError(f"x has last dim {x.shape[-1]} but proj expects {self.proj.shape[0]}")
        return self.ln_post(x) @ self.proj


class VisualAdapter(VisionTransformerTail):
    """``attn_pool`` + ``ln_post`` + ``proj`` under the original names (``transformer.visual.`` minus the ViT):
    ``(N, L, width)`` ViT tokens -> ``(N, n_queries, output_dim)`` LLM image tokens."""

    def __init__(self, width: int = 1664, output_dim: int = 4096, n_queries: int = 256, heads: Optional[int] = None):
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        super().__init__(output_dim, norm_layer)
        self.attn_pool = Resampler(math.isqrt(n_queries), output_dim, heads or output_dim // 128, width, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.attn_pool(x))


__all__ = ["Resampler", "VisionTransformerTail", "VisualAdapter", "get_2d_sincos_pos_embed", "get_abs_pos"]
