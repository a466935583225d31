"""Shared by the LLaVA families: transformers' ``Llava*MultiModalProjector`` -> ``vlmkern.nn.MLPProjector``."""
from __future__ import annotations

from torch import nn

from vlmkern.integrations.hf._registry import load_into_empty, meta_init
from vlmkern.nn import MLPProjector
from vlmkern.nn._linear import exact_gelu


def mlp_projector(original: nn.Module):
    """``MLPProjector`` twin of a ``linear_1 -> act -> linear_2`` projector, or why it cannot be one."""
    l1, l2, act = (getattr(original, n, None) for n in ("linear_1", "linear_2", "act"))
    if type(l1) is not nn.Linear or type(l2) is not nn.Linear:
        return "linear_1/linear_2 are not plain nn.Linear"
    if not exact_gelu(act):
        return f"activation {type(act).__name__} is not exact GELU (MLPProjector fuses exact GELU only)"
    if (l1.bias is None) != (l2.bias is None):
        return "linear_1 and linear_2 disagree on bias"
    if set(original.state_dict()) != {f"linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
                                      if getattr(l1, p) is not None}:
        return "projector has parameters beyond linear_1/linear_2"
    new = meta_init(MLPProjector, l1.in_features, l1.out_features, l2.out_features, bias=l1.bias is not None)
    return load_into_empty(original, new)
