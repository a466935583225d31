"""vlmkern: fused GPU kernels for the components vision-language models put around their LLM.

Layers (lower never imports higher):
``kernels`` (Triton ``@jit`` only) -> ``ops`` (checks, launch, ``vlmkern::`` custom ops, autograd,
dispatch) -> ``nn`` (drop-in modules) -> ``models`` -> ``integrations``.
``reference`` holds the pure-PyTorch oracle of every op, with the same signature.

Importing vlmkern never fails because a compiled extension or Triton is missing; see
``python -m vlmkern info`` for what is available and why not.
"""
from vlmkern._version import __version__
from vlmkern import reference, ops, nn

__all__ = ["__version__", "reference", "ops", "nn"]
