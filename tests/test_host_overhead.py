"""benchmarks/host_overhead.py: the launch stub and a tiny measurement (a few calls, no figures checked)."""
import pytest
import torch

host = pytest.importorskip("benchmarks.host_overhead")


def test_stub_replaces_and_restores_the_interpreted_launch():
    from triton.runtime.interpreter import InterpretedFunction
    from vlmkern.kernels import projector  # noqa: F401  (kernel modules imported under the interpreter)
    before = InterpretedFunction.__getitem__
    with host.stubbed_launches():
        assert InterpretedFunction.__getitem__ is not before
        from vlmkern import ops
        x, w = torch.randn(4, 32), torch.randn(16, 32)
        out = ops.linear_gelu(x, w)          # kernel not run: an uninitialised buffer of the right shape
        assert out.shape == (4, 16)
    assert InterpretedFunction.__getitem__ is before


def test_measure_reports_forward_and_backward_per_op():
    rows = host.measure(calls=2, rounds=1, only="expert")
    names = [r["op"] for r in rows]
    assert names == ["expert_linear", "cogvlm_expert_ids"]
    lin, ids = rows
    assert lin["fwd_us"] > 0 and lin["fwd_bwd_us"] > 0 and not lin["yardstick"]
    assert ids["fwd_us"] > 0 and ids["fwd_bwd_us"] is None      # integer op: no backward
    table = host.format_rows(rows)
    assert "expert_linear" in table and ("met" in table or "MISSED" in table)


def test_backend_choice_is_restored(monkeypatch):
    import os
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    with host.stubbed_launches():
        assert os.environ["VLMKERN_BACKEND"] == "triton"
    assert "VLMKERN_BACKEND" not in os.environ


def test_cuda_stub_patches_and_restores_the_compiled_launch():
    """``--device cuda`` stubs ``JITFunction``'s launch (inherited from ``KernelInterface``): patched for the
    duration, the inherited one back afterwards."""
    from triton.runtime.jit import JITFunction
    had_own = "__getitem__" in JITFunction.__dict__
    before = JITFunction.__getitem__
    with host.stubbed_launches("cuda"):
        assert JITFunction.__getitem__ is not before
    assert JITFunction.__getitem__ is before and ("__getitem__" in JITFunction.__dict__) == had_own


def test_cuda_device_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        host.main(["--device", "cuda", "--calls", "1", "--rounds", "1"])
    assert "needs a CUDA device" in capsys.readouterr().err


def test_rounds_go_round_robin_over_every_row():
    rows = host.measure(calls=1, rounds=2, only="floor")
    assert [r["op"] for r in rows] == ["floor: empty custom op", "floor: empty autograd.Function"]
    assert all(r["yardstick"] and r["fwd_us"] > 0 and r["fwd_bwd_us"] > 0 for r in rows)
