"""``MLPProjector``: LLaVA's ``mlp2x_gelu`` / transformers' ``LlavaMultiModalProjector`` with the GELU fused."""
from __future__ import annotations

import torch
from torch import nn

from vlmkern import ops
from vlmkern.nn._linear import act2fn, plain_gelu, plain_linear

# Submodule names per layout: transformers' LlavaMultiModalProjector (linear_1, act, linear_2) and LLaVA's /
# InternLM-XComposer2's nn.Sequential(Linear, GELU, Linear) (0, 1, 2). The names are the state-dict keys.
_NAMES = {"transformers": ("linear_1", "act", "linear_2"), "llava": ("0", "1", "2")}
_ALIASES = {"linear_1": 0, "act": 1, "linear_2": 2}      # transformers' names, answered in either layout


def _activation(name: str) -> nn.Module:
    """``nn.GELU()`` for "gelu" (exact, LLaVA's own module); any other name: transformers' ``ACT2FN``."""
    return nn.GELU() if name == "gelu" else act2fn(name, "act")


def _sizes_from_config(config) -> tuple[tuple[int, int, int], dict]:
    """``(in, hidden, out)`` and keyword arguments from a transformers ``LlavaConfig`` / ``LlavaNextConfig``
    (``vision_config``, ``text_config``, ``vision_feature_layer``, ``projector_hidden_act``,
    ``multimodal_projector_bias``) or an original LLaVA config (``mm_hidden_size``, ``hidden_size``,
    ``mm_projector_type="mlp2x_gelu"``: LLaVA's layout)."""
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        layers = getattr(config, "vision_feature_layer", -2)
        width = config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
        hidden = config.text_config.hidden_size
        return (width, hidden, hidden), dict(bias=getattr(config, "multimodal_projector_bias", True),
                                             act=getattr(config, "projector_hidden_act", "gelu"))
    if hasattr(config, "mm_hidden_size") and hasattr(config, "hidden_size"):
        kind = getattr(config, "mm_projector_type", "linear")
        if kind != "mlp2x_gelu":
            raise ValueError(f"config.mm_projector_type must be 'mlp2x_gelu' (Linear -> GELU -> Linear), got {kind!r}")
        return (config.mm_hidden_size, config.hidden_size, config.hidden_size), dict(saved_layout="llava")
    raise TypeError(f"in_features must be an int or a LLaVA config (transformers' LlavaConfig, or LLaVA's with "
                    f"mm_hidden_size / hidden_size), got {type(config).__name__}")


class MLPProjector(nn.Module):
    """``Linear(in, hidden) -> act -> Linear(hidden, out)``; with exact GELU (the default, and both originals')
    the first GEMM's epilogue applies bias + GELU.

    Built from sizes, or from a config as the originals are: ``MLPProjector(llava_config)`` (transformers'
    ``LlavaMultiModalProjector(config)``; LLaVA's ``build_vision_projector(config)`` for ``mlp2x_gelu``).

    ``saved_layout`` names the submodules and so the state-dict keys: ``"transformers"`` (``linear_1``, ``act``,
    ``linear_2``) or ``"llava"`` (``0``, ``1``, ``2``, standing in for LLaVA's / InternLM-XComposer2's
    ``nn.Sequential``: indexing, ``len`` and iteration work as on it). Either layout loads both key layouts with
    ``strict=True`` (a state_dict holding both is an error naming the keys), and answers ``linear_1`` / ``act`` /
    ``linear_2``. A Linear that is not a plain ``nn.Linear`` (an adapter such as PEFT LoRA, a quantised one, a hook)
    or an activation that is not a plain exact GELU is called, as in the original. Under ``torch.autocast``,
    ``.double()`` and ``.half()`` it behaves as the original.

    Shapes: ``forward(x (..., in)) -> (..., out)``.
    """

    def __init__(self, in_features, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = True, device=None, dtype=None, *, saved_layout: str | None = None, act: str = "gelu"):
        super().__init__()
        if not isinstance(in_features, int) or isinstance(in_features, bool):
            (in_features, hidden_features, out_features), kw = _sizes_from_config(in_features)
            bias, act = kw.get("bias", bias), kw.get("act", act)
            saved_layout = saved_layout or kw.get("saved_layout")
        elif hidden_features is None:
            raise TypeError("hidden_features is required when in_features is a size (or pass a LLaVA config)")
        saved_layout = saved_layout or "transformers"
        if saved_layout not in _NAMES:
            raise ValueError(f"saved_layout must be one of {tuple(_NAMES)}, got {saved_layout!r}")
        out_features = hidden_features if out_features is None else out_features
        self.saved_layout = saved_layout
        self._names = _NAMES[saved_layout]
        for name, module in zip(self._names, (
                nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype), _activation(act),
                nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype))):
            self._modules[name] = module

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> "MLPProjector":
        """From a transformers ``LlavaConfig`` / ``LlavaNextConfig`` or an original LLaVA config."""
        return cls(config, device=device, dtype=dtype)

    def __getattr__(self, name: str):
        modules = self.__dict__.get("_modules")   # absent while copy / pickle rebuild the module
        if modules is not None and name in modules:     # the common case first: a submodule by its own name
            return modules[name]
        index = _ALIASES.get(name)
        if index is not None and modules is not None and "_names" in self.__dict__:
            return modules[self.__dict__["_names"][index]]
        return super().__getattr__(name)

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[self._names[index]]

    def __len__(self) -> int:
        return 3

    def __iter__(self):
        return iter(self._modules[name] for name in self._names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules, (n1, na, n2) = self._modules, self._names
        first, act, second = modules[n1], modules[na], modules[n2]
        if plain_linear(first) and plain_gelu(act):
            h = ops.linear_gelu(x, first.weight, first.bias)
        else:      # an adapter / hook on the Linear (e.g. PEFT LoRA) or another activation: called, as the original
            h = act(first(x))
        return second(h)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        other = _NAMES["llava" if self.saved_layout == "transformers" else "transformers"]
        renames = {k: prefix + new + k[len(prefix + old):]
                   for old, new in ((other[i] + ".", self._names[i] + ".") for i in (0, 2))
                   for k in state_dict if k.startswith(prefix + old)}
        both = sorted(k for k in renames if renames[k] in state_dict)
        if both:  # which layout is meant is unknowable: say so instead of silently picking one
            mine = sorted(renames[k] for k in both)
            llava, hf = (both, mine) if self.saved_layout == "transformers" else (mine, both)
            error_msgs.append(f"state_dict holds both the LLaVA layout ({', '.join(llava)}) and the transformers "
                              f"layout ({', '.join(hf)}) of the projector: keep one")
        else:
            for key, new_key in renames.items():
                state_dict[new_key] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
