"""LLaVA-NeXT (1.6): ``LlavaNextModel.multi_modal_projector`` (``LlavaNextMultiModalProjector``) ->
``vlmkern.nn.MLPProjector``.

Only the projector is swapped: transformers' ``get_image_features`` / ``pack_image_features`` keep running
(projector on every tile, then unpad). The fused path that skips the dropped rows,
``vlmkern.models.llava_next.project_and_pack`` (or ``LlavaNextImagePacker``, which loads
``multi_modal_projector.*`` and ``image_newline``), takes the vision features directly; it is not patched into
transformers' methods because their signatures differ between transformers releases.
"""
from __future__ import annotations

from vlmkern.integrations.hf._projector import mlp_projector
from vlmkern.integrations.hf._registry import Family, Swap, register

FAMILY = register(Family("llava_next", [
    Swap("multi_modal_projector",
         "transformers.models.llava_next.modeling_llava_next:LlavaNextMultiModalProjector", mlp_projector),
], doc=__doc__))
