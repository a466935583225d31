"""Test setup: on a machine without a GPU, Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is created, i.e. before vlmkern's
kernels are imported, hence here at conftest import time.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:
    from hypothesis import settings
except ImportError:
    pass
else:
    # Every run draws the same examples, as Hypothesis does by itself under CI (its "ci" profile): a drawn
    # shape is a fixed test case, so a run on a GPU machine or a laptop checks what CI checked.
    settings.register_profile("vlmkern", derandomize=True, database=None)
    settings.load_profile("vlmkern")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the CPU")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where kernels under test run: the GPU if there is one, else the CPU (Triton interpreter)."""
    return DEVICE


@pytest.fixture
def backend(monkeypatch, request):
    """Force a backend for the duration of a test: use with ``@pytest.mark.parametrize('backend', [...], indirect=True)``."""
    name = getattr(request, "param", "triton")
    if name == "triton" and not HAS_CUDA:
        from vlmkern.ops._dispatch import interpreter_version_reason
        too_old = interpreter_version_reason()
        if too_old:
            pytest.skip(too_old)
    monkeypatch.setenv("VLMKERN_BACKEND", name)
    return name


@pytest.fixture
def sdpa_calls(monkeypatch) -> list:
    """Records each call of ``F.scaled_dot_product_attention`` (which eager CPU attention path ran)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    return calls


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
