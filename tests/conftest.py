"""Test setup: on a machine without a GPU, Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is created, i.e. before vlmkern's
kernels are imported, hence here at conftest import time.

Hypothesis profiles (both derandomized: every run draws the same examples):

* ``vlmkern`` (default): each property test's own ``max_examples`` (a few, to keep the default run fast).
* ``slow``: at least ``SLOW_EXAMPLES`` (500) examples per property test. ``python3 -m pytest -m slow`` selects
  the long property tests (marked ``@pytest.mark.slow``) and loads this profile; ``VLMKERN_HYPOTHESIS=slow``
  loads it for any selection. The default run (no ``-m``) runs the same tests with their few examples.

Property tests read their example count from ``examples(default)``, which gives ``default`` under the
``vlmkern`` profile and ``max(default, SLOW_EXAMPLES)`` under ``slow`` (a test's own ``@settings`` would
otherwise override the profile's ``max_examples``).
"""
import contextlib
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
    settings.register_profile("slow", derandomize=True, database=None, max_examples=500, deadline=None)
    settings.load_profile("slow" if os.environ.get("VLMKERN_HYPOTHESIS") == "slow" else "vlmkern")

SLOW_EXAMPLES = 500


def examples(default: int) -> int:
    """A property test's ``max_examples``: ``default``, or at least ``SLOW_EXAMPLES`` under the ``slow`` profile."""
    from hypothesis import settings as _settings
    return max(default, SLOW_EXAMPLES) if _settings.get_current_profile_name() == "slow" else default

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    markexpr = getattr(config.option, "markexpr", "") or ""
    if "slow" in markexpr and "not slow" not in markexpr:  # `-m slow`: the long property runs, 500+ examples
        os.environ["VLMKERN_HYPOTHESIS"] = "slow"
        try:
            from hypothesis import settings as _settings
            _settings.load_profile("slow")
        except ImportError:
            pass
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the CPU")
    config.addinivalue_line("markers", "cuda_ext: needs the built CUDA extension vlmkern._cuda (with 'cuda')")


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise): a test module's
    models then don't stay in the process's resident memory under the next module's."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def pytest_runtest_teardown(item, nextitem):
    if nextitem is None or nextitem.module is not item.module:
        _release_memory()


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
    if (name == "triton" and HAS_CUDA and "device" not in request.fixturenames
            and request.node.get_closest_marker("cuda") is None):
        # a test of CPU tensors: Triton takes them only under the interpreter, which a GPU host's kernels were not
        # built for (TRITON_INTERPRET is read when a kernel is defined); the CPU run covers it
        pytest.skip("forces Triton on CPU tensors (interpreter only); runs on a machine without a GPU")
    if name == "triton" and not HAS_CUDA:
        from vlmkern.ops.dispatch import interpreter_version_reason
        too_old = interpreter_version_reason()
        if too_old:
            pytest.skip(too_old)
    monkeypatch.setenv("VLMKERN_BACKEND", name)
    check = os.environ.get("VLMKERN_BOUNDS_CHECK", "1")
    guard = contextlib.nullcontext()
    if name == "triton" and not HAS_CUDA and check != "0":
        # every load, store and atomic of the interpreted kernels must address one of the launch's tensors
        # (VLMKERN_BOUNDS_CHECK=races: and no two programs of a launch race for an element; slower)
        from vlmkern.testing import interpreter_bounds_check
        guard = interpreter_bounds_check(races=check == "races")
    with guard:
        yield name


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
