"""LAVIS checkpoint names -> transformers names, for the Q-Formers of BLIP-2 and InstructBLIP.

LAVIS keeps the Q-Former as a BERT under ``Qformer.bert.``; transformers (and vlmkern, which uses the same
names) renames, as ``convert_blip_2_original_to_pytorch.py`` / ``convert_instructblip_original_to_pytorch.py`` do:

================================================  ================================================================
LAVIS                                             transformers
================================================  ================================================================
``Qformer.bert.``                                 ``qformer.``
``….attention.self.*``                            ``….attention.attention.*``
``….crossattention.self.*``                       ``….crossattention.attention.*``
``Qformer.bert.embeddings.LayerNorm.*``           ``qformer.layernorm.*`` (BLIP-2),
                                                  ``qformer.embeddings.layernorm.*`` (InstructBLIP)
``Qformer.bert.embeddings.{word,position}_*``     ``embeddings.*`` (BLIP-2 ITM/retrieval model, outside the
                                                  Q-Former), ``qformer.embeddings.*`` (InstructBLIP)
``Qformer.bert.embeddings.position_ids``          dropped (a buffer)
``Qformer.cls.*`` (stage-1 LM head), ``temp``     dropped (no transformers counterpart)
``query_tokens``                                  ``query_tokens``
``ln_vision.*``                                   ``vision_model.post_layernorm.*``
``opt_proj`` / ``t5_proj`` / ``llm_proj``         ``language_projection``
``vision_proj`` / ``text_proj``                   ``vision_projection`` / ``text_projection``
================================================  ================================================================

:func:`load_lavis_qformer` loads the Q-Former part of a LAVIS state dict into
:class:`vlmkern.models.blip2.Blip2QFormerModel` / :class:`vlmkern.models.instructblip.InstructBlipQFormerModel`
(or the transformers classes: the names are the same).
"""
from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Optional

from torch import Tensor, nn

VARIANTS = ("blip2", "instructblip")
LAVIS_PREFIX = "Qformer.bert."
_TOP_LEVEL = {            # whole-model names outside the Q-Former (prefix match on the first component)
    "query_tokens": "query_tokens",
    "ln_vision.": "vision_model.post_layernorm.",
    "opt_proj.": "language_projection.",
    "t5_proj.": "language_projection.",
    "llm_proj.": "language_projection.",
    "vision_proj.": "vision_projection.",
    "text_proj.": "text_projection.",
    "itm_head.": "itm_head.",
}
_SELF = re.compile(r"(^|\.)(attention|crossattention)\.self\.")
_HF_ATTN = re.compile(r"(^|\.)(attention|crossattention)\.attention\.")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def qformer_key_from_lavis(key: str, variant: str) -> Optional[str]:
    """Name inside the transformers Q-Former module of LAVIS key ``key`` given *relative to*
    ``Qformer.bert.``, or ``None`` when it has no place in the Q-Former module (position-id buffer; for BLIP-2
    the word/position embeddings, which transformers keeps outside the Q-Former)."""
    _check_variant(variant)
    if key.endswith("position_ids"):
        return None
    if key.startswith("embeddings.LayerNorm."):
        rest = key[len("embeddings.LayerNorm."):]
        return ("layernorm." if variant == "blip2" else "embeddings.layernorm.") + rest
    if key.startswith("embeddings."):
        return key if variant == "instructblip" else None
    return _SELF.sub(r"\1\2.attention.", key)


def qformer_key_to_lavis(key: str, variant: str) -> str:
    """Inverse of :func:`qformer_key_from_lavis` for the keys it maps (result relative to ``Qformer.bert.``)."""
    _check_variant(variant)
    if variant == "blip2" and key.startswith("layernorm."):
        return "embeddings.LayerNorm." + key[len("layernorm."):]
    if variant == "instructblip" and key.startswith("embeddings.layernorm."):
        return "embeddings.LayerNorm." + key[len("embeddings.layernorm."):]
    return _HF_ATTN.sub(r"\1\2.self.", key)


def lavis_key_to_hf(key: str, variant: str) -> Optional[str]:
    """Whole-checkpoint name mapping (LAVIS ``Blip2Qformer``/``Blip2OPT``/``Blip2T5``/``Blip2VicunaInstruct``...
    -> transformers ``Blip2*`` / ``InstructBlip*``); ``None`` for keys transformers has no place for. Vision
    tower and LLM keys are returned unchanged (their conversion is the converters' business, not the Q-Former's).
    """
    _check_variant(variant)
    if key.startswith(LAVIS_PREFIX):
        rel = key[len(LAVIS_PREFIX):]
        inner = qformer_key_from_lavis(rel, variant)
        if inner is not None:
            return "qformer." + inner
        if variant == "blip2" and rel.startswith("embeddings.") and not rel.endswith("position_ids"):
            return rel              # Blip2ForImageTextRetrieval.embeddings.{word,position}_embeddings
        return None
    if key.startswith("Qformer.cls.") or key == "temp":
        return None
    for old, new in _TOP_LEVEL.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return key


def qformer_state_dict_from_lavis(state_dict: Mapping[str, Tensor], variant: str,
                                  prefix: str = LAVIS_PREFIX) -> tuple[dict, dict]:
    """Split a LAVIS state dict: ``(qformer, rest)`` with ``qformer`` in the transformers Q-Former's own names
    (what ``Blip2QFormerModel.load_state_dict`` takes) and ``rest`` every other entry under its LAVIS name."""
    _check_variant(variant)
    qformer, rest = {}, {}
    for key, value in state_dict.items():
        inner = qformer_key_from_lavis(key[len(prefix):], variant) if key.startswith(prefix) else None
        if inner is None:
            rest[key] = value
        else:
            qformer[inner] = value
    return qformer, rest


def qformer_state_dict_to_lavis(state_dict: Mapping[str, Tensor], variant: str,
                                prefix: str = LAVIS_PREFIX) -> dict:
    """A transformers Q-Former state dict under LAVIS names (export, and the round-trip tests)."""
    return {prefix + qformer_key_to_lavis(k, variant): v for k, v in state_dict.items()}


class LavisLoadResult(NamedTuple):
    missing_keys: list          # Q-Former parameters the checkpoint did not provide (transformers names)
    unexpected_keys: list       # Qformer.bert.* entries the model has no place for (LAVIS names)
    rest: dict                  # every entry outside the Q-Former (query_tokens, vision, LLM...), LAVIS names


def variant_of(model: nn.Module) -> str:
    """``"instructblip"`` for a Q-Former that owns its text embeddings, else ``"blip2"``."""
    return "instructblip" if hasattr(model, "embeddings") else "blip2"


def load_lavis_qformer(model: nn.Module, state_dict: Mapping[str, Tensor], *, variant: Optional[str] = None,
                       strict: bool = True, prefix: str = LAVIS_PREFIX) -> LavisLoadResult:
    """Load the ``Qformer.bert.*`` entries of a LAVIS checkpoint into a (vlmkern or transformers) Q-Former.

    ``strict``: raise a ``KeyError`` when a Q-Former parameter is missing from the checkpoint or a
    ``Qformer.bert.*`` entry has no place in the model (e.g. a stage-1 checkpoint's text FFN loaded into a
    BLIP-2 Q-Former built without ``use_qformer_text_input``; BLIP-2's word/position embeddings and the
    position-id buffer are not Q-Former entries and go to ``rest``).
    """
    variant = variant or variant_of(model)
    qformer, rest = qformer_state_dict_from_lavis(state_dict, variant, prefix)
    own = model.state_dict()
    unexpected = [prefix + qformer_key_to_lavis(k, variant) for k in qformer if k not in own]
    missing = [k for k in own if k not in qformer]
    if strict and (missing or unexpected):
        raise KeyError(f"LAVIS checkpoint does not match {type(model).__name__}: missing {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                       f"{' ...' if len(unexpected) > 8 else ''}")
    model.load_state_dict({k: v for k, v in qformer.items() if k in own}, strict=False)
    return LavisLoadResult(missing, unexpected, rest)


__all__ = ["LavisLoadResult", "lavis_key_to_hf", "load_lavis_qformer", "qformer_key_from_lavis",
           "qformer_key_to_lavis", "qformer_state_dict_from_lavis", "qformer_state_dict_to_lavis", "variant_of"]
