"""Triton ``@jit`` kernels only: no launch logic, no argument checks (those live in ``vlmkern.ops``)."""
