"""Mini-Gemini patch info mining (``mgm/model/mgm_arch.py``: ``initialize_uni_modules`` + ``unified_resampler``).

``PatchInfoMining`` holds the three ``Sequential(LayerNorm, Linear)`` projectors under the original names
(``vlm_uni_{query,aux,val}_projector.{0,1}.*``) and computes ``unified_resampler`` with
``vlmkern.ops.patch_info_mining``: each LR token attends to its own ``M x M`` HR window without the re-arranged
HR copy, the keys or the values ever being written. The op reads the projectors' tensors, so it stands in for them
only while each is the plain module it was built as (a ``Sequential`` of a ``LayerNorm`` and a ``Linear``, none
wrapped, replaced or hooked, and no global hooks); otherwise the projectors are called as the original calls them.
The HD setting (2x2 tiles + global view) is the same call with the five (LR crop, HR tile) pairs stacked along the
batch (``stack_hd_views``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vlmkern.nn._linear import plain_linear, plain_module
from vlmkern.ops.checks import check_tensor
from vlmkern.ops.window_attention import patch_info_mining, window_grid


def _projector(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, c_out))


def _params(seq: nn.Sequential):
    return (seq[0].weight, seq[0].bias, seq[1].weight, seq[1].bias)


def _plain_projector(seq: nn.Module) -> bool:
    """Whether calling ``seq`` is exactly ``linear(layer_norm(x))`` on its own tensors (what the op computes)."""
    if not (plain_module(seq, nn.Sequential) and len(seq) == 2):
        return False
    norm, linear = seq
    return plain_module(norm, nn.LayerNorm) and plain_linear(linear)


class PatchInfoMining(nn.Module):
    """Drop-in for Mini-Gemini's ``vlm_uni_*_projector`` modules + ``unified_resampler``.

    ``forward(images (B, N, C), images_aux (B, C_aux, PN·M, PN·M)) -> (images, embed_feat (B, N, C))``,
    ``N = PN²``; the caller adds ``embed_feat`` to ``images`` (Mini-Gemini's ``encode_images``).
    """

    def __init__(self, mm_hidden_size: int, mm_hidden_size_aux: int):
        super().__init__()
        self.mm_hidden_size = mm_hidden_size
        self.mm_hidden_size_aux = mm_hidden_size_aux
        self.vlm_uni_query_projector = _projector(mm_hidden_size, mm_hidden_size)
        self.vlm_uni_aux_projector = _projector(mm_hidden_size_aux, mm_hidden_size)
        self.vlm_uni_val_projector = _projector(mm_hidden_size_aux, mm_hidden_size)

    def _check(self, images: Tensor, images_aux: Tensor) -> None:
        check_tensor(images, "images", ndim=3, shape_doc="(batch, tokens, mm_hidden_size)")
        check_tensor(images_aux, "images_aux", ndim=4, shape_doc="(batch, mm_hidden_size_aux, Hh, Wh)")
        if images.shape[-1] != self.mm_hidden_size:
            raise ValueError(f"images has {images.shape[-1]} channels but mm_hidden_size is {self.mm_hidden_size}")
        if images_aux.shape[1] != self.mm_hidden_size_aux:
            raise ValueError(f"images_aux has {images_aux.shape[1]} channels but mm_hidden_size_aux is "
                             f"{self.mm_hidden_size_aux}")
        window_grid(images.shape[1], images_aux.shape, tokens_name="images")

    def forward(self, images: Tensor, images_aux: Tensor) -> tuple[Tensor, Tensor]:
        """The original ``unified_resampler(images, images_aux)``.

        Args:
            images: ``(B, N, C)`` low-resolution tokens, ``N = PN²`` (576 = 24² for CLIP ViT-L/14-336),
                ``C = mm_hidden_size``.
            images_aux: ``(B or 1, C_aux, PN·M, PN·M)`` high-resolution feature map, ``C_aux = mm_hidden_size_aux``
                (2880 for ConvNeXt-L at 768 px: a 192² map, ``M = 8``), any strides, same dtype as ``images``.

        Returns:
            ``(images, embed_feat)``: ``images`` unchanged, and ``embed_feat (B, N, C)``, each token's
            single-head attention (scale ``1/sqrt(C)``) over its own ``M x M`` window of ``images_aux``.
        """
        self._check(images, images_aux)
        if images_aux.shape[0] == 1 and images.shape[0] > 1:   # one HR map for every row, as the original broadcasts
            images_aux = images_aux.expand(images.shape[0], *images_aux.shape[1:])
        projectors = (self.vlm_uni_query_projector, self.vlm_uni_aux_projector, self.vlm_uni_val_projector)
        if not all(_plain_projector(p) for p in projectors):
            return images, self.forward_original(images, images_aux)
        embed_feat = patch_info_mining(images, images_aux, *(_params(p) for p in projectors),
                                       eps=tuple(p[0].eps for p in projectors))
        return images, embed_feat

    def forward_original(self, images: Tensor, images_aux: Tensor) -> Tensor:
        """The original ``unified_resampler``'s ``embed_feat (B, N, C)``, calling the three projectors (so their
        hooks fire and a wrapped or replaced layer acts): the window-rearranged HR copy ``(B, N, M², C_aux)``,
        keys and values materialised, softmax in the input dtype. ``images (B, N, C)``, ``images_aux
        (B, C_aux, PN·M, PN·M)``, checked by ``forward``."""
        pn = math.isqrt(images.shape[1])
        m = images_aux.shape[-1] // pn
        hr = images_aux.permute(0, 2, 3, 1).reshape(len(images_aux), pn, m, pn, m, images_aux.shape[1])
        hr = hr.permute(0, 1, 3, 2, 4, 5).reshape(len(images_aux), pn * pn, m * m, images_aux.shape[1]).contiguous()
        query = self.vlm_uni_query_projector(images)
        key = self.vlm_uni_aux_projector(hr)
        value = self.vlm_uni_val_projector(hr)
        att = query[:, :, None] @ (key.transpose(-1, -2) / (key.shape[-1] ** 0.5))
        return (att.nan_to_num().softmax(-1) @ value).mean(2)


def stack_hd_views(global_lr: Tensor, global_hr: Tensor, tiles_lr: Tensor, tiles_hr: Tensor) -> tuple[Tensor, Tensor]:
    """HD setting (MGM-HD): ``global_lr (B, N, C)``, ``global_hr (B, C_aux, S, S)``, ``tiles_lr (B, T, N, C)``,
    ``tiles_hr (B, T, C_aux, S, S)`` (``T = 4`` row-major tiles) -> one batch of ``B·(1+T)`` pairs in the
    original token order ``[global, tile(0,0), tile(0,1), ...]`` per sample, ready for ``PatchInfoMining``."""
    lr = torch.cat([global_lr.unsqueeze(1), tiles_lr], 1).flatten(0, 1)
    hr = torch.cat([global_hr.unsqueeze(1), tiles_hr], 1).flatten(0, 1)
    return lr, hr


__all__ = ["PatchInfoMining", "stack_hd_views"]
