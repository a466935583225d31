"""LLaVA-NeXT (1.6): ``LlavaNextModel.multi_modal_projector`` -> ``PackingProjector`` (an ``MLPProjector``, same keys),
and the model's projector + pack steps become one fused ``vlmkern.models.llava_next.project_and_pack``.

transformers' ``get_image_features`` runs the projector on every tile, then ``pack_image_features`` unpads and
drops rows. After ``apply``, inside ``get_image_features`` the projector passes the vision features through and
``pack_image_features`` projects only the rows that unpadding keeps and writes the newline rows in the same pass.
Whatever the fused path cannot take (``vision_feature_select_strategy="full"``, features of another width, a
projector layer wrapped by an adapter or hooked) is projected and packed by transformers' own code, and a direct
call of the projector always projects.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkern.integrations.hf._projector import mlp_projector
from vlmkern.integrations.hf._registry import Family, ModelHook, Swap, register
from vlmkern.models import llava_next as packing
from vlmkern.nn import MLPProjector
from vlmkern.nn._linear import plain_linear


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


def _fused_get_image_features(model: nn.Module, *args, **kwargs):
    """The class's ``get_image_features`` with the projector deferred to the pack step."""
    projector = model.multi_modal_projector
    # not if the projector was replaced after apply, nor if a layer of it was wrapped or hooked (it then runs
    # once over all tiles, as in transformers, instead of per image in the pack step)
    deferring = (isinstance(projector, PackingProjector) and plain_linear(projector.linear_1)
                 and plain_linear(projector.linear_2))
    if deferring:
        projector.deferred = True
    try:
        return type(model).get_image_features(model, *args, **kwargs)
    finally:
        if deferring:
            projector.deferred = False


def _fused_pack_image_features(model: nn.Module, image_features, image_sizes, vision_feature_select_strategy,
                               image_newline=None):
    """``project_and_pack`` when the projector was deferred and the features fit it, else the class's pack."""
    projector, config = model.multi_modal_projector, model.config
    feats = list(image_features)
    if isinstance(projector, PackingProjector) and projector.deferred:
        projector.deferred = False
        if vision_feature_select_strategy == "default" and all(   # deferred: both layers were plain (above)
                f.dim() == 3 and f.shape[-1] == projector.linear_1.in_features for f in feats):
            return packing.project_and_pack(
                feats, image_sizes, projector, image_newline, image_grid_pinpoints=config.image_grid_pinpoints,
                tile_size=config.vision_config.image_size, patch_size=config.vision_config.patch_size)
        feats = [projector(f) for f in feats]
    return type(model).pack_image_features(model, feats, image_sizes, vision_feature_select_strategy,
                                           image_newline=image_newline)


def _reroute(model: nn.Module, projector: PackingProjector) -> None:
    for name, function in (("get_image_features", _fused_get_image_features),
                           ("pack_image_features", _fused_pack_image_features)):
        setattr(model, name, ModelHook(model, name, function))


FAMILY = register(Family("llava_next", [
    Swap("multi_modal_projector",
         "transformers.models.llava_next.modeling_llava_next:LlavaNextMultiModalProjector", _packing_projector,
         owners=("transformers.models.llava_next.modeling_llava_next:LlavaNextModel",), on_parent=_reroute),
], doc=__doc__))
