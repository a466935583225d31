"""``MLPProjector``: LLaVA's ``mlp2x_gelu`` / transformers' ``LlavaMultiModalProjector`` with the GELU fused."""
from __future__ import annotations

import torch
from torch import nn

from vlmkern import ops
from vlmkern.nn._linear import plain_linear

# LLaVA stores the projector as nn.Sequential(Linear, GELU, Linear): keys "0.*" and "2.*".
_LLAVA_TO_HF = {"0.": "linear_1.", "2.": "linear_2."}
_LAYOUTS = ("transformers", "llava")


def _save_in_layout(module: "MLPProjector", state_dict, prefix: str, local_metadata) -> None:
    """State-dict post hook: the projector's keys in its ``saved_layout`` (order kept)."""
    if getattr(module, "saved_layout", "transformers") != "llava":
        return
    names = {prefix + hf: prefix + llava for llava, hf in _LLAVA_TO_HF.items()}
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        for hf, llava in names.items():
            if key.startswith(hf):
                key = llava + key[len(hf):]
                break
        state_dict[key] = value


class MLPProjector(nn.Module):
    """``Linear(in, hidden) -> exact GELU -> Linear(hidden, out)``; the first GEMM's epilogue applies bias+GELU.

    Loads both the transformers layout (``linear_1.*``, ``linear_2.*``) and LLaVA's ``mm_projector`` layout
    (``0.*``, ``2.*``) with ``strict=True``; a state_dict holding both is an error naming the keys. Saves the
    transformers layout, or LLaVA's with ``saved_layout="llava"`` (standing in for an ``nn.Sequential``). Under
    ``torch.autocast``, ``.double()`` and ``.half()`` it behaves as the original
    ``nn.Sequential(Linear, GELU, Linear)``.

    Shapes: ``forward(x (..., in)) -> (..., out)``.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True,
                 device=None, dtype=None, *, saved_layout: str = "transformers"):
        super().__init__()
        if saved_layout not in _LAYOUTS:
            raise ValueError(f"saved_layout must be one of {_LAYOUTS}, got {saved_layout!r}")
        out_features = hidden_features if out_features is None else out_features
        self.linear_1 = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)
        # "llava": state_dict() writes LLaVA's / InternLM-XComposer2's nn.Sequential keys (0.*, 2.*), so that the
        # original module loads what a drop-in standing in its place saves
        self.saved_layout = saved_layout
        self.register_state_dict_post_hook(_save_in_layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_linear(self.linear_1):
            h = ops.linear_gelu(x, self.linear_1.weight, self.linear_1.bias)
        else:      # an adapter / hook on linear_1 (e.g. PEFT LoRA): called, as the original
            h = torch.nn.functional.gelu(self.linear_1(x))
        return self.linear_2(h)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        renames = {k: prefix + new + k[len(prefix + old):]
                   for old, new in _LLAVA_TO_HF.items() for k in state_dict if k.startswith(prefix + old)}
        both = sorted(k for k in renames if renames[k] in state_dict)
        if both:  # which layout is meant is unknowable: say so instead of silently picking one
            error_msgs.append(f"state_dict holds both the LLaVA layout ({', '.join(both)}) and the transformers "
                              f"layout ({', '.join(renames[k] for k in both)}) of the projector: keep one")
        else:
            for key, new_key in renames.items():
                state_dict[new_key] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
