"""LLaVA-NeXT (1.6): ``LlavaNextModel.multi_modal_projector`` -> ``PackingProjector`` (an ``MLPProjector``, same keys),
and the model's projector + pack steps become one fused ``vlmkern.models.llava_next.project_and_pack``.

transformers' ``get_image_features`` runs the projector on every tile, then ``pack_image_features`` unpads and
drops rows. After ``apply``, inside ``get_image_features`` the projector passes the vision features through and
``pack_image_features`` projects only the rows that unpadding keeps and writes the newline rows in the same pass.
Whatever the fused path cannot take (``vision_feature_select_strategy="full"``, features of another width) is
projected and packed by transformers' own code, and a direct call of the projector always projects.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from vlmkern.integrations.hf._projector import mlp_projector
from vlmkern.integrations.hf._registry import Family, Swap, register
from vlmkern.models import llava_next as packing
from vlmkern.nn import MLPProjector


class PackingProjector(MLPProjector):
    """``MLPProjector`` that lets the owning model's pack step do its projection while ``deferred`` is set."""

    deferred = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.deferred else super().forward(x)


def _packing_projector(original: nn.Module):
    new = mlp_projector(original)
    if isinstance(new, MLPProjector):
        new.__class__ = PackingProjector  # same parameters and keys; only forward differs
    return new


def _reroute(model: nn.Module, projector: PackingProjector) -> None:
    get_image_features, pack_image_features = model.get_image_features, model.pack_image_features
    config = model.config

    # functools.wraps keeps the original signature visible: generate() reads it to route its kwargs.
    @functools.wraps(get_image_features)
    def fused_get_image_features(*args, **kwargs):
        projector.deferred = True
        try:
            return get_image_features(*args, **kwargs)
        finally:
            projector.deferred = False

    @functools.wraps(pack_image_features)
    def fused_pack_image_features(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        feats = list(image_features)
        if projector.deferred:
            projector.deferred = False
            if vision_feature_select_strategy == "default" and all(
                    f.dim() == 3 and f.shape[-1] == projector.linear_1.in_features for f in feats):
                return packing.project_and_pack(
                    feats, image_sizes, projector, image_newline, image_grid_pinpoints=config.image_grid_pinpoints,
                    tile_size=config.vision_config.image_size, patch_size=config.vision_config.patch_size)
            feats = [projector(f) for f in feats]
        return pack_image_features(feats, image_sizes, vision_feature_select_strategy, image_newline=image_newline)

    model.get_image_features = fused_get_image_features
    model.pack_image_features = fused_pack_image_features


FAMILY = register(Family("llava_next", [
    Swap("multi_modal_projector",
         "transformers.models.llava_next.modeling_llava_next:LlavaNextMultiModalProjector", _packing_projector,
         owners=("transformers.models.llava_next.modeling_llava_next:LlavaNextModel",), on_parent=_reroute),
], doc=__doc__))
