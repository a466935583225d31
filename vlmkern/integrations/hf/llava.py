"""LLaVA (1.5): ``LlavaModel.multi_modal_projector`` (``LlavaMultiModalProjector``) -> ``vlmkern.nn.MLPProjector``
(exact GELU fused into the first GEMM's epilogue). Projectors with another ``projector_hidden_act`` are left as
they are (see ``vlmkern.integrations.hf.skipped``)."""
from __future__ import annotations

from vlmkern.integrations.hf._projector import mlp_projector
from vlmkern.integrations.hf._registry import Family, Swap, register

FAMILY = register(Family("llava", [
    Swap("multi_modal_projector", "transformers.models.llava.modeling_llava:LlavaMultiModalProjector",
         mlp_projector),
], doc=__doc__))
