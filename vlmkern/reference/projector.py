"""Reference projector math: ``nn.Linear`` followed by exact ``nn.GELU``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu(x Wᵀ + b)`` (exact erf GELU); ``x (..., in)``, ``weight (out, in)`` -> ``(..., out)``."""
    return F.gelu(F.linear(x, weight, bias))
