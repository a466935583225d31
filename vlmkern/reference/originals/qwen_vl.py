"""Port of Qwen-VL's ``Resampler`` (Qwen/Qwen-VL on the model hub, ``visual.py``; revision not pinned): the
MAE numpy sin-cos table, ``get_abs_pos`` (bicubic resize of the key-side table) and ``Resampler`` (which
calls ``nn.MultiheadAttention`` with the attention weights)."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """``pos`` any shape (M positions) -> ``(M, embed_dim)`` float64 numpy ``[sin | cos]``."""
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """``(grid_size², embed_dim)`` numpy table: first half from the width coordinate, second from the height."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0]),
                           get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])], axis=1)


def get_abs_pos(abs_pos, tgt_size):
    """``abs_pos (S², D)`` resized (bicubic, fp32) to ``(tgt_size, D)`` when ``tgt_size != S²``."""
    src_size = int(math.sqrt(abs_pos.size(0)))
    tgt_size = int(math.sqrt(tgt_size))
    dtype = abs_pos.dtype
    if src_size != tgt_size:
        return F.interpolate(abs_pos.float().reshape(1, src_size, src_size, -1).permute(0, 3, 1, 2),
                             size=(tgt_size, tgt_size), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).flatten(0, 2).to(dtype=dtype)
    return abs_pos


class Resampler(nn.Module):
    """``forward(x (N, L, kv_dim), attn_mask=None) -> (N, grid_size², embed_dim)``. ``__init__`` ends with
    ``self.apply(self._init_weights)`` as ``visual.py``'s does (trunc-normal std .02 Linear weights, zero biases,
    LayerNorm 1/0)."""

    def __init__(self, grid_size, embed_dim, num_heads, kv_dim=None, norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_queries = grid_size ** 2
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.pos_embed = nn.Parameter(torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid_size)).float()
                                      ).requires_grad_(False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim is not None and kv_dim != embed_dim \
            else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = norm_layer(embed_dim)
        self.ln_kv = norm_layer(embed_dim)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)  # visual.py: trunc_normal_ from torch.nn.init
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x, attn_mask=None):
        pos_embed = get_abs_pos(self.pos_embed, x.size(1))
        x = self.kv_proj(x)
        x = self.ln_kv(x).permute(1, 0, 2)
        N = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, N, 1) + self.pos_embed.unsqueeze(1), x + pos_embed.unsqueeze(1),
                        x, attn_mask=attn_mask)[0]
        return out.permute(1, 0, 2)
