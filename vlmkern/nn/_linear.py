"""When a module's submodules (``nn.Linear``, ``nn.LayerNorm``, ...) may be read as weights instead of called."""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module


def has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` itself has forward, forward-pre or backward hooks (a call of it runs them)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def global_hooks() -> bool:
    """Whether module hooks registered for every module (``nn.modules.module.register_module_*_hook``) are set."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def plain_module(m: nn.Module, cls: type) -> bool:
    """Whether ``m`` is a ``cls`` itself (not a subclass, nor a wrapper standing in its place) with no hook of its
    own or global ones: then calling it is exactly ``cls.forward`` on its own tensors, and a fused op that reads
    those tensors may stand in for the call. Any other module must be called, or what it adds would be skipped."""
    return type(m) is cls and not has_hooks(m) and not global_hooks()


def plain_linear(m: nn.Module) -> bool:
    """Whether calling ``m`` is exactly ``F.linear(x, m.weight, m.bias)``: an ``nn.Linear`` itself (not a subclass
    such as a quantised linear, nor a wrapper such as PEFT's ``lora.Linear``, whose ``weight`` is its base layer's)
    with no hook of its own or global ones. A fused op that reads the weights may stand in for such a module only;
    any other must be called, or the adapter's term, the quantisation or the hook would be skipped silently."""
    return plain_module(m, nn.Linear)
