"""vlmkern: fused GPU kernels for the components vision-language models put around their LLM.

Layers (lower never imports higher):
``kernels`` (Triton ``@jit`` only) -> ``ops`` (checks, launch, ``vlmkern::`` custom ops, autograd,
dispatch) -> ``nn`` (drop-in modules) -> ``models`` -> ``integrations``.
``reference`` holds the pure-PyTorch oracle of every op, with the same signature (loaded on first access: no
production path imports it).

``vlmkern.models``, ``vlmkern.integrations`` and ``vlmkern.reference`` (with ``integrations.hf``) load on first attribute access,
so ``import vlmkern; vlmkern.integrations.hf.apply(model)`` works and ``import vlmkern`` stays light.

Importing vlmkern never fails because a compiled extension or Triton is missing; see
``python -m vlmkern info`` for what is available and why not. The ``vlmkern`` logger (silent by default)
says at debug level which backend each op call took and why the preferred ones could not run.
"""
import importlib
import logging

from vlmkern._version import __version__
from vlmkern import ops, nn

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {"models": "vlmkern.models", "integrations": "vlmkern.integrations.hf", "reference": "vlmkern.reference"}

__all__ = ["__version__", "reference", "ops", "nn", "models", "integrations"]


def __getattr__(name: str):
    if name in _LAZY:
        importlib.import_module(_LAZY[name])  # importing a submodule binds it on its parent package
        return globals()[name]
    raise AttributeError(f"module 'vlmkern' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
