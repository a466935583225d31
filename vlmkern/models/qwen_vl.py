"""Qwen-VL position-aware vision-language adapter (``visual.py``: ``Resampler``, ``get_abs_pos``,
``get_2d_sincos_pos_embed``).

``Resampler`` is a drop-in for the original: same constructor, parameter names (``query``, ``pos_embed``,
``kv_proj``, ``attn.in_proj_weight/bias``, ``attn.out_proj``, ``ln_q``, ``ln_kv``) and ``forward(x, attn_mask=None)``.
Without a mask it runs (per call, ``X (N, L, kv_dim)``, ``P16`` the stored table, ``P_L`` its bicubic resize)::

    q  = (LN_q(query) + P16) W_q + b_q                 once per call, shared by every image (stride-0 batch)
    k  = LN_kv(X W_kv) W_k + (P_L W_k + b_k)           P_L W_k cached per (L, table version, W_k version)
    v  = LN_kv(X W_kv) W_v + b_v
    O  = attention(q, k, v) W_o + b_o                  vlmkern.ops.cross_attention, no weights materialised

so neither the ``(L, N, D)`` copy ``x + pos`` nor the ``(256, N, D)`` repeated queries nor the ``(N, 256, L)``
attention weights exist, and ``F.interpolate`` runs once per grid and table version instead of every call.
When ``pos_embed`` or ``attn.in_proj_weight`` need gradients (training), ``k = (LN_kv(X W_kv) + P_L) W_k + b_k``
as the original (the add costs less than recomputing ``P_L W_k`` every step; ``P_L`` stays cached while
``pos_embed`` is frozen, and every gradient reaches its parameter).
With an ``attn_mask`` the original computation runs (``nn.MultiheadAttention``).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkern.ops.attention import cross_attention


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> Tensor:
    """MAE 2-D sin-cos table ``(grid_size², embed_dim)`` float32 (``visual.py``): token ``t = h*G + w``; channels
    ``[0, D/2)`` encode the column ``w``, ``[D/2, D)`` the row ``h``; each half ``[sin(p ω_i)] ++ [cos(p ω_i)]``,
    ``ω_i = 10000^{-i/(D/4)}``."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos table, got {embed_dim}")
    omega = torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0)
    omega = 1.0 / 10000 ** omega
    coords = torch.arange(grid_size, dtype=torch.float64)
    w = coords.repeat(grid_size)                      # t = h*G + w
    h = coords.repeat_interleave(grid_size)

    def one_d(pos):
        out = pos[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_d(w), one_d(h)], dim=1).float()


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


def _version_key(t: Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, t.device)


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
        if x.shape[-1] != self.kv_dim:
            raise ValueError(f"x has last dim {x.shape[-1]} but the resampler was built for kv_dim={self.kv_dim}")
        L = x.shape[1]
        side = math.isqrt(L)
        if L == 0 or side * side != L:
            raise ValueError(f"x must hold a square grid of image tokens (L = side²), got L = {L}")
        return L

    # --------------------------------------------------------------------------------- position term
    def _cached(self, kind: str, L: int, versions: tuple, make: Callable[[], Tensor]) -> Tensor:
        """``make()`` cached under ``(kind, L, *versions)``; an entry of the same kind and ``L`` with other
        versions (the parameters changed) is dropped."""
        key = (kind, L, *versions)
        value = self._cache.get(key)
        if value is None:
            self._cache = {k: v for k, v in self._cache.items() if k[:2] != (kind, L)}
            value = self._cache[key] = make()
        return value

    def _position_table(self, L: int) -> Tensor:
        """``P_L`` ``(L, D)``: ``pos_embed`` resized to ``L`` keys; cached unless ``pos_embed`` needs a gradient."""
        if (self.pos_embed.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            # The cache keys on data_ptr/_version, which a traced graph cannot see: compiled graphs recompute.
            return get_abs_pos(self.pos_embed, L)
        return self._cached("table", L, _version_key(self.pos_embed),
                            lambda: get_abs_pos(self.pos_embed.detach(), L))

    def _cached_key_bias(self, L: int, w_k: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
        """``P_L W_kᵀ`` ``(L, D)`` in ``dtype`` (computed in fp32, fp64 for fp64), cached per (L, table and weight
        versions); None when ``pos_embed`` or ``w_k`` needs a gradient or under ``torch.compile``."""
        if (torch.is_grad_enabled() and (self.pos_embed.requires_grad or w_k.requires_grad)
                or torch.compiler.is_compiling()):
            return None
        ct = torch.float64 if dtype == torch.float64 else torch.float32

        @torch.no_grad()
        def make() -> Tensor:
            return F.linear(self._position_table(L).to(ct), w_k.detach().to(ct)).to(dtype)
        return self._cached("bias", L, (*_version_key(self.pos_embed), *_version_key(self.attn.in_proj_weight),
                                        dtype), make)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        L = self._check(x)
        if attn_mask is not None:
            return self.forward_original(x, attn_mask)
        N = x.shape[0]
        D, H = self.embed_dim, self.num_heads
        d = D // H
        x = self.ln_kv(self.kv_proj(x))                                       # (N, L, D)
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        w_q, w_k, w_v = w.split(D)              # one split: its backward writes each block once, no zero fills
        b_q, b_k, b_v = b.split(D) if b is not None else (None, None, None)
        q = F.linear(self.ln_q(self.query) + self.pos_embed, w_q, b_q)        # (Q, D), once per call
        bias = self._cached_key_bias(L, w_k, x.dtype)
        if bias is not None:
            # Frozen position term: one [k | v] GEMM plus the cached P_L W_kᵀ, no x + pos copy.
            kv = F.linear(x, w[D:], b[D:] if b is not None else None)         # (N, L, 2D)
            kv[..., :D] += bias
            k, v = kv[..., :D], kv[..., D:]
        else:
            # Training the position term or W_k: (x + P_L) W_kᵀ as the original (an add is cheaper than the
            # extra L x D x D GEMM of P_L W_kᵀ, and both gradients follow), the table still not re-interpolated.
            k = F.linear(x + self._position_table(L).to(x.dtype), w_k, b_k)
            v = F.linear(x, w_v, b_v)
        k = k.unflatten(-1, (H, d)).transpose(1, 2)                            # (N, H, L, d) views
        v = v.unflatten(-1, (H, d)).transpose(1, 2)
        qh = q.unflatten(-1, (H, d)).transpose(0, 1).unsqueeze(0).expand(N, H, self.num_queries, d)
        out = cross_attention(qh, k, v)                                      # (N, H, Q, d)
        out = out.transpose(1, 2).reshape(N, self.num_queries, D)
        return F.linear(out, self.attn.out_proj.weight, self.attn.out_proj.bias)

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
