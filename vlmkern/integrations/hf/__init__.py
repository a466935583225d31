"""Patch a loaded ``transformers`` model in place so that its components run on vlmkern ops.

>>> from vlmkern.integrations import hf
>>> replaced = hf.apply(model)          # [(qualified_name, original_class_name, new_class_name), ...]

Submodules are swapped for their vlmkern drop-ins (same state-dict keys, loaded strictly from the original,
same device, dtype, ``requires_grad`` and train/eval mode); the model's own forward and ``generate`` are
untouched. One registry entry per family, in its own module:

* ``blip2`` (``blip2.py``): ``Blip2Model``, ``Blip2ForConditionalGeneration``, ``Blip2ForImageTextRetrieval``, ...:
  ``qformer`` -> ``vlmkern.models.blip2.Blip2QFormerModel``
* ``instructblip`` (``blip2.py``): ``InstructBlipModel``, ``InstructBlipForConditionalGeneration``:
  ``qformer`` -> ``vlmkern.models.instructblip.InstructBlipQFormerModel``
* ``fuyu`` (``fuyu.py``): ``FuyuModel``: ``vision_embed_tokens`` (``nn.Linear``) -> ``fuyu.FuyuPatchEmbed`` (a
  ``vlmkern.nn.PatchEmbedLinear`` that also embeds the uint8 images of ``fuyu.fused_processor(processor)`` in
  one ``ops.patch_embed``)
* ``llava`` (``llava.py``): ``LlavaModel``: ``multi_modal_projector`` -> ``vlmkern.nn.MLPProjector``
* ``llava_next`` (``llava_next.py``): ``LlavaNextModel``: ``multi_modal_projector`` -> a ``vlmkern.nn.MLPProjector``
  whose work moves into ``pack_image_features`` (fused ``project_and_pack``: only the rows unpadding keeps are
  projected, newline rows written in the same pass)

``apply`` is idempotent (a second call replaces nothing). Patched models deep-copy, pickle and materialise
from the meta device (``to_empty`` + ``init_weights``) like unpatched ones. ``skipped(model)`` lists what
matched a registered class but could not be swapped, and why (e.g. a projector whose activation is not exact
GELU, a module with hooks registered, or one whose weights do not load into the drop-in: adapters added before
``apply``). Dropout probabilities set on the original modules carry over. A layer wrapped by an adapter or
hooked after ``apply`` (e.g. PEFT LoRA on a projector or Q-Former linear) is called as a module, not fused.
"""
from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from vlmkern.integrations.hf import blip2, fuyu, llava, llava_next  # noqa: F401  (each registers its family)
from vlmkern.integrations.hf._registry import REGISTRY, Family, Replaced, Skipped, Swap, convert, register, resolve


def _families(families: Optional[Iterable[str]]) -> list[Family]:
    if families is None:
        return list(REGISTRY.values())
    if isinstance(families, str):
        families = [families]
    names = list(families)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"families: unknown {unknown}; registered: {sorted(REGISTRY)}")
    return [REGISTRY[n] for n in names]


def _matches(model: nn.Module, families: list[Family]):
    """``(qualified_name, parent, attribute, child, swap)`` for every swappable child, outermost first."""
    swaps = []
    for fam in families:
        for swap in fam.swaps:
            original = resolve(swap.original)
            owners = tuple(c for c in (resolve(o) for o in swap.owners) if c is not None)
            if original is None or (swap.owners and not owners):
                continue  # this transformers version has no such class
            swaps.append((swap, original, owners))
    for name, parent in model.named_modules():
        for swap, original, owners in swaps:
            if owners and type(parent) not in owners:
                continue
            child = parent._modules.get(swap.attribute)
            if child is not None and type(child) is original:
                yield (f"{name}.{swap.attribute}" if name else swap.attribute), parent, child, swap


def apply(model: nn.Module, families: Optional[Iterable[str]] = None) -> list[Replaced]:
    """Swap every registered transformers component inside ``model`` for its vlmkern drop-in, in place.

    Args:
        model: a loaded transformers model (or any module containing one).
        families: restrict to these registry names (default: all; see ``REGISTRY``).

    Returns:
        ``[(qualified_name, original_class_name, new_class_name), ...]`` of what was replaced (``Replaced``
        named tuples), in module order; empty when nothing matched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    done = []
    for qname, parent, child, swap in list(_matches(model, _families(families))):
        new = convert(swap, child)
        if isinstance(new, nn.Module):
            setattr(parent, swap.attribute, new)
            if swap.on_parent is not None:
                swap.on_parent(parent, new)
            done.append(Replaced(qname, type(child).__name__, type(new).__name__))
    return done


def skipped(model: nn.Module, families: Optional[Iterable[str]] = None) -> list[Skipped]:
    """What ``apply`` would leave unpatched although its class is registered, with the reason."""
    out = []
    for qname, _, child, swap in _matches(model, _families(families)):
        new = convert(swap, child)
        if not isinstance(new, nn.Module):
            out.append(Skipped(qname, type(child).__name__, str(new)))
    return out


__all__ = ["REGISTRY", "Family", "Replaced", "Skipped", "Swap", "apply", "register", "skipped"]
