"""Registry of every shipped Triton kernel configuration, for the offline GPU build check.

Each kernels module registers the exact (signature, constexprs, num_warps, num_stages) combinations its
launcher uses, so ``python -m vlmkern.tools.gpu_build_check`` compiles precisely what ships.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelBuild:
    label: str                       # e.g. "patch_embed_fwd[u8->bf16]"
    kernel: Any                      # triton JITFunction
    signature: dict[str, str]        # argument name -> triton type ('*bf16', 'i32', 'fp32', 'constexpr')
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


SHIPPED: list[KernelBuild] = []


def register_builds(*builds: KernelBuild) -> None:
    SHIPPED.extend(builds)
