"""Registry of every shipped Triton kernel configuration, for the offline GPU build check.

Each kernels module registers the exact (signature, constexprs, attrs, num_warps, num_stages) combinations its
launcher uses, so ``python -m vlmkern.tools.gpu_build_check`` compiles precisely what ships.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass(frozen=True)
class KernelBuild:
    label: str                       # e.g. "patch_embed_fwd[u8->bf16]"
    kernel: Any                      # triton JITFunction
    signature: dict[str, str]        # argument name -> triton type ('*bf16', 'i32', 'fp32', 'constexpr')
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    attrs: dict[str, Any] = field(default_factory=dict)   # argument name -> "D" (16-divisible)


SHIPPED: list[KernelBuild] = []


def register_builds(*builds: KernelBuild) -> None:
    SHIPPED.extend(builds)


def launched(label: str, kernel: Any, types: dict[str, str], constexprs: dict[str, Any], cfg: dict[str, Any], *,
             unit: Iterable[str] = (), div16: Iterable[str] = ()) -> KernelBuild:
    """The variant Triton's JIT compiles for the common runtime case, not a generic one that never runs.

    At launch Triton turns an int argument equal to 1 into a constant and marks 16-divisible pointers and
    ints; registers and spills depend on both. ``types`` gives every runtime argument; ``constexprs`` the
    ``tl.constexpr`` values plus launch-only keys (``num_warps``/``num_stages`` come from ``cfg``); names in
    ``unit`` are strides that are 1 at runtime; pointers and names in ``div16`` are 16-divisible.
    """
    consts = {k: v for k, v in constexprs.items() if k not in ("num_warps", "num_stages")}
    sig, attrs = {}, {}
    unit, div16 = set(unit), set(div16)
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in unit:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = types[name]
            if types[name].startswith("*") or name in div16:
                attrs[name] = "D"
    return KernelBuild(label, kernel, sig, consts, cfg["num_warps"], cfg["num_stages"], attrs)
