"""BLIP-2 and InstructBLIP: the Q-Former (``.qformer``) becomes vlmkern's fused-mask Q-Former.

``transformers.Blip2QFormerModel`` -> ``vlmkern.models.blip2.Blip2QFormerModel`` and
``transformers.InstructBlipQFormerModel`` -> ``vlmkern.models.instructblip.InstructBlipQFormerModel``, built from
the same config on the meta device and loaded strictly from the original (``from_transformers``). Covers every
transformers class that holds a ``qformer``: ``Blip2Model``, ``Blip2ForConditionalGeneration``,
``Blip2ForImageTextRetrieval``, ``Blip2TextModelWithProjection``, ``Blip2VisionModelWithProjection``,
``InstructBlipModel``, ``InstructBlipForConditionalGeneration``.
"""
from __future__ import annotations

from torch import nn

from vlmkern.integrations.hf._registry import Family, Swap, copy_dropout, register


def _finish(original: nn.Module, new: nn.Module) -> nn.Module:
    """Dropout probabilities and gradient checkpointing (with its checkpoint function, which holds e.g.
    ``use_reentrant``) carry over (neither is in the state dict)."""
    encoder = getattr(original, "encoder", None)
    if getattr(encoder, "gradient_checkpointing", False):
        new.gradient_checkpointing_enable()
        func = getattr(encoder, "_gradient_checkpointing_func", None)
        if callable(func):
            new.encoder._gradient_checkpointing_func = func
    return copy_dropout(original, new)


def _blip2_qformer(original: nn.Module):
    try:
        from vlmkern.models.blip2 import Blip2QFormerModel
    except Exception as exc:  # the Q-Former port is optional at import time
        return f"vlmkern.models.blip2 is not importable: {exc}"
    return _finish(original, Blip2QFormerModel.from_transformers(original))


def _instructblip_qformer(original: nn.Module):
    try:
        from vlmkern.models.instructblip import InstructBlipQFormerModel
    except Exception as exc:
        return f"vlmkern.models.instructblip is not importable: {exc}"
    return _finish(original, InstructBlipQFormerModel.from_transformers(original))


FAMILY = register(Family("blip2", [
    Swap("qformer", "transformers.models.blip_2.modeling_blip_2:Blip2QFormerModel", _blip2_qformer),
], doc=__doc__))
INSTRUCTBLIP = register(Family("instructblip", [
    Swap("qformer", "transformers.models.instructblip.modeling_instructblip:InstructBlipQFormerModel",
         _instructblip_qformer),
], doc=__doc__))
