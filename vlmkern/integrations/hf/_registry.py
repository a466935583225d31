"""The registry behind ``vlmkern.integrations.hf.apply``: one ``Family`` per model family, each a list of swaps.

A ``Swap`` says: in every module whose class is one of ``owners`` (any module when empty), the child called
``attribute`` whose class is exactly ``original`` becomes ``convert(child)``. Classes are named by import path
(``"transformers.models.fuyu.modeling_fuyu:FuyuModel"``) and resolved lazily, so a transformers version that
lacks a class only disables the swaps that need it. ``convert`` returns ``None`` (with a reason) when this
particular child cannot be swapped (e.g. a non-GELU projector); the module is then left as it is.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from vlmkern.nn._linear import has_hooks


class Replaced(NamedTuple):
    """One swapped submodule: qualified name in the patched model, original and new class names."""

    qualified_name: str
    original_class_name: str
    new_class_name: str


class Skipped(NamedTuple):
    qualified_name: str
    original_class_name: str
    reason: str


Converter = Callable[[nn.Module], "nn.Module | str"]


@dataclass(frozen=True)
class Swap:
    attribute: str
    original: str
    convert: Converter
    owners: tuple[str, ...] = ()
    # Called as ``on_parent(parent, new)`` after the swap, for drop-ins that also reroute a method of the
    # module that owns them (LLaVA-NeXT: the projector's work moves into the pack step).
    on_parent: Optional[Callable[[nn.Module, nn.Module], None]] = None


@dataclass
class Family:
    name: str
    swaps: list[Swap] = field(default_factory=list)
    doc: str = ""


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in REGISTRY:
        raise ValueError(f"integration family {family.name!r} is registered twice")
    REGISTRY[family.name] = family
    return family


def resolve(path: str) -> Optional[type]:
    """The class at ``"module:Qualname"``, or ``None`` if this environment does not have it."""
    module, _, name = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def twin(original: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` loaded with ``original``'s weights (strict), on its device/dtype, with its ``requires_grad``
    flags and train/eval mode."""
    params = dict(original.named_parameters())
    ref = next(iter(params.values()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(original.state_dict(), strict=True)
    for name, p in new.named_parameters():
        if name in params:
            p.requires_grad_(params[name].requires_grad)
    return new.train(original.training)


def copy_dropout(original: nn.Module, new: nn.Module) -> nn.Module:
    """Carry dropout probabilities set on ``original``'s modules (not in any state dict) over to ``new``'s
    same-named modules: ``nn.Dropout.p``, and the ``attention_dropout`` probability transformers' attention
    modules keep as a float (the Q-Formers' attention-probability dropout)."""
    old = dict(original.named_modules())
    for name, m in new.named_modules():
        o = old.get(name)
        if isinstance(m, nn.Dropout) and isinstance(o, nn.Dropout):
            m.p = o.p
        elif isinstance(getattr(m, "attention_dropout", None), float) and \
                isinstance(getattr(o, "attention_dropout", None), (int, float)):
            m.attention_dropout = float(o.attention_dropout)
    return new


def hooked_modules(module: nn.Module) -> list[str]:
    """Names of ``module``'s submodules (``""``: itself) with forward, forward-pre or backward hooks."""
    return [name for name, m in module.named_modules() if has_hooks(m)]


def convert(swap: "Swap", child: nn.Module) -> "nn.Module | str":
    """``swap.convert(child)``, or why ``child`` stays: it has hooks (a new module would silently drop them), or
    its weights do not load into the drop-in (modules added to it, e.g. adapters: their weights would be lost)."""
    hooked = hooked_modules(child)
    if hooked:
        names = ", ".join(repr(n or "(the module itself)") for n in hooked[:3])
        return f"hooks are registered on {names}: a drop-in would not run them"
    try:
        return swap.convert(child)
    except RuntimeError as exc:
        if "state_dict" not in str(exc):
            raise
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:240]     # the first line only names the class
        return f"its weights do not load into the drop-in (modules added to it, e.g. adapters?): {detail}"


def meta_init(cls, *args, **kwargs) -> nn.Module:
    """Construct ``cls`` on the meta device (no random init of weights that are about to be overwritten)."""
    with torch.device("meta"):
        return cls(*args, **kwargs)


def load_into_empty(original: nn.Module, new: nn.Module) -> nn.Module:
    """Materialise a meta-built ``new`` on ``original``'s device and fill it with ``twin``."""
    ref = next(original.parameters())
    new = new.to_empty(device=ref.device)
    if hasattr(new, "reset_buffers"):
        new.reset_buffers()
    return twin(original, new)


class ModelHook:
    """``model.<name>`` overridden by the module-level ``function(model, ...)``.

    Set on the instance (``model.<name> = ModelHook(model, name, function)``); it holds the model itself, not a
    bound method or a closure, so ``copy.deepcopy`` gives the copy a hook on the copy (its own weights) and
    ``pickle`` / ``torch.save`` of the whole model work. Its signature is the class method's: ``generate()``
    reads it to route its kwargs.
    """

    def __init__(self, model: nn.Module, name: str, function) -> None:
        self.model, self.name, self.function = model, name, function
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        return self.function(self.model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(getattr(type(self.model), self.name).__get__(self.model))

    def __repr__(self) -> str:
        return f"<vlmkern hook {type(self.model).__name__}.{self.name} -> {self.function.__qualname__}>"

