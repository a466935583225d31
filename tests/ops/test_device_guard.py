"""Kernels launch on their tensors' GPU: Triton launches on the *current* CUDA device and stream, and a Python
custom op gets no device guard from the dispatcher, so every op makes its input's device current around its
kernel (``dispatch.on_device``). A model split over GPUs calls layers on ``cuda:1`` while ``cuda:0`` is current."""
import contextlib

import pytest
import torch

from vlmkern import ops
from vlmkern.ops import dispatch


class _FakeCuda:
    """``torch.cuda.current_device`` / ``torch.cuda.device`` stand-ins that record which device was made current."""

    def __init__(self, current: int):
        self.current, self.entered, self.seen = current, [], []

    def current_device(self) -> int:
        return self.current

    @contextlib.contextmanager
    def device(self, index):
        before, self.current = self.current, index
        self.entered.append(index)
        try:
            yield
        finally:
            self.current = before


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    return fake


@pytest.mark.parametrize("index, entered", [(1, [1]), (0, [])])
def test_a_cuda_implementation_runs_with_its_device_current(fake_cuda, index, entered):
    def impl(*args):
        fake_cuda.seen.append(fake_cuda.current)
        return args

    out = dispatch.on_device(impl, torch.device("cuda", index))("a", 2)
    assert out == ("a", 2)
    assert fake_cuda.seen == [index]          # the launch saw the tensors' device as current
    assert fake_cuda.entered == entered       # a guard only when another device was current
    assert fake_cuda.current == 0             # and the caller's device restored


def test_other_devices_get_the_implementation_itself():
    def impl(*args):
        return args
    assert dispatch.on_device(impl, torch.device("cpu")) is impl
    assert dispatch.on_device(impl, torch.device("meta")) is impl


def test_the_eager_path_wraps_the_chosen_implementation(monkeypatch):
    seen = []
    real = dispatch.on_device

    def record(impl, device):
        seen.append(device)
        return real(impl, device)
    monkeypatch.setattr(dispatch, "on_device", record)
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")      # interpreted on CPU tensors (conftest)
    dispatch.forget_selections()     # the eager path keeps the wrapped implementation per signature
    try:
        x, w = torch.randn(4, 16), torch.randn(16, 16)
        ops.linear_gelu(x, w)
        assert seen == [x.device]
    finally:
        dispatch.forget_selections()


def test_the_custom_ops_cuda_kernel_runs_through_the_guard(monkeypatch):
    """The kernel registered for CUDA (what torch.compile, modes and subclasses reach) passes its first tensor's
    device index; called here on CPU tensors, with the guard recorded."""
    import vlmkern.ops.projector as projector
    calls = []

    def record(impl, index, *args):
        calls.append(index)
        return impl(*args)
    monkeypatch.setattr(dispatch, "_run_on_cuda", record)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    out = projector._linear_gelu_op._backend_fns["cuda"](x, w, None, False)[0]
    assert calls == [x.device.index]
    torch.testing.assert_close(out, torch.nn.functional.gelu(x @ w.t()))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_an_op_on_the_second_gpu_matches_the_reference_while_the_first_is_current():
    from vlmkern.reference import projector as ref
    torch.cuda.set_device(0)
    x = torch.randn(64, 128, device="cuda:1", dtype=torch.bfloat16)
    w = torch.randn(96, 128, device="cuda:1", dtype=torch.bfloat16)
    b = torch.randn(96, device="cuda:1", dtype=torch.bfloat16)
    out = ops.linear_gelu(x, w, b)
    compiled = torch.ops.vlmkern.linear_gelu(x, w, b, False)[0]
    want = ref.linear_gelu(x.float(), w.float(), b.float())
    assert out.device == x.device and torch.cuda.current_device() == 0
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(compiled, out)
