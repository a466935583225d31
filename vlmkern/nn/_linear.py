"""When a module's submodules (an ``nn.Linear``, a dropout, an attention) may be read as weights instead of called."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module


def has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` itself has forward, forward-pre or backward hooks (a call of it runs them), or a ``forward``
    of its own set on the instance, as accelerate's hooks are (``device_map`` dispatch and offloading: the
    wrapper moves inputs and loads offloaded weights, which are on ``meta`` until it runs)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)


def global_hooks() -> bool:
    """Whether a global module hook is set (``register_module_forward_hook`` & co., e.g. ``FlopCounterMode``'s):
    it runs on every module call, so a module read as weights instead of called would miss it."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


# Without transformers: the activations the originals use, as modules like ACT2FN's.
_LOCAL_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


def act2fn(name, what: str) -> nn.Module:
    """transformers' ``ACT2FN[name]``, the module the originals build (any name transformers knows), or without
    transformers the local table's (``silu`` / ``swish``, ``gelu``, ``relu``). ValueError naming ``what`` (the
    argument or config field) for a name neither knows."""
    try:
        from transformers.activations import ACT2FN
    except ImportError:  # transformers is an optional dependency
        ACT2FN = None
    table = _LOCAL_ACTIVATIONS if ACT2FN is None else ACT2FN
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"{what} must be one of {sorted(table)}, got {name!r}")
    return _LOCAL_ACTIVATIONS[name]() if ACT2FN is None else ACT2FN[name]


def exact_gelu(act: nn.Module) -> bool:
    """Whether module ``act`` is ``F.gelu`` (erf): ``nn.GELU()`` (not tanh) or transformers' ``ACT2FN["gelu"]``
    (``GELUActivation`` with ``F.gelu``, not its Python variant), of that exact type (not a subclass). Recognised
    by name: no transformers import (optional) per call."""
    kind = type(act)
    if kind is nn.GELU:
        return act.approximate == "none"
    if kind.__qualname__ == "GELUActivation" and kind.__module__ == "transformers.activations":
        return act.__dict__.get("act") is F.gelu
    return False


def plain_gelu(act: nn.Module) -> bool:
    """Whether calling ``act`` is exactly ``F.gelu(x)`` with nothing attached: :func:`exact_gelu` without hooks
    of its own or global ones, so a kernel's fused GELU may stand in for it."""
    return exact_gelu(act) and not has_hooks(act) and not global_hooks()


def plain_module(m: nn.Module, *types: type) -> bool:
    """Whether ``m`` is exactly one of ``types`` (not a subclass or a wrapper) with no hook of its own and no global
    one: then calling ``m`` is exactly its class's math, and a fused op may stand in for the call."""
    return type(m) in types and not has_hooks(m) and not global_hooks()


def plain_linear(m: nn.Module) -> bool:
    """Whether calling ``m`` is exactly ``F.linear(x, m.weight, m.bias)``: an ``nn.Linear`` itself (not a subclass
    such as a quantised linear, nor a wrapper such as PEFT's ``lora.Linear``, whose ``weight`` is its base layer's)
    with no hook of its own or global ones. A fused op that reads the weights may stand in for such a module only;
    any other must be called, or the adapter's term, the quantisation or the hook would be skipped silently."""
    return plain_module(m, nn.Linear)
