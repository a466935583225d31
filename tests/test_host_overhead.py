"""benchmarks/host_overhead.py: the launch stub, a tiny measurement (a few calls, no figures checked), and what a
warm call still runs: nothing that depends only on the input signature (checks, backend selection, launch plans)."""
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
    assert lin["fwd_us_median"] >= lin["fwd_us"] and lin["fwd_bwd_us_median"] >= lin["fwd_bwd_us"]
    assert 0 < lin["fwd_vlmkern"] < lin["fwd_py"] and lin["fwd_bwd_vlmkern"] > lin["fwd_vlmkern"]
    assert ids["fwd_us"] > 0 and ids["fwd_bwd_us"] is None      # integer op: no backward
    table = host.format_rows(rows)
    assert "expert_linear" in table and ("met" in table or "MISSED" in table)


def test_cuda_rounds_count_work_done_on_another_thread():
    """A CUDA backward runs on autograd's device thread while the caller waits: the CUDA clock must count what
    another thread does for the call, the CPU clock (calling thread only) must not."""
    import threading

    def step():   # the caller waits (no CPU time) while another thread works
        t = threading.Thread(target=lambda: sum(i * i for i in range(20_000)))
        t.start()
        t.join()
    own = min(host._timed_round(step, 3, "cpu") for _ in range(3))
    every = min(host._timed_round(step, 3, "cuda") for _ in range(3))
    assert every > 5 * own


def test_a_leaf_gradient_is_stored_not_accumulated():
    """Each measured backward starts from ``.grad = None`` (as after ``zero_grad()``): no accumulation add."""
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    step = host._steps(lambda train: (lambda: torch.nn.functional.linear(x, w), [x, w]), train=True)
    step()
    first = [x.grad.clone(), w.grad.clone()]
    step()
    assert torch.equal(x.grad, first[0]) and torch.equal(w.grad, first[1])


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


def test_count_calls_counts_python_frames():
    def inner():
        return None

    def step():
        inner()
        inner()
    assert host.count_calls(step) == (3, 0)          # step and two inner calls, none in vlmkern's files


# What depends only on the input signature (dtypes, shapes, strides, device, scalars) and so must not run again
# on a warm call: argument checks, backend selection and its reasons, launch parameters.
ONCE_PER_SIGNATURE = {"check_tensor", "check_same_device", "_select", "select_among", "_chooser", "choose",
                      "int32_offset_reasons", "int32_count_reasons", "triton_env_reasons", "reasons",
                      "attention_config", "config", "config_family", "_constexprs", "_launch_params", "_precision",
                      "_dot_flags", "_strides", "cdiv"}
OPS = [name for name in host._cases() if name not in host.YARDSTICKS]


@pytest.mark.parametrize("train", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", OPS)
def test_a_warm_call_recomputes_nothing_of_its_signature(name, train):
    trace = host.repeat_call_trace(name, train)
    again = sorted({f for f in trace if f.rsplit(":", 1)[1] in ONCE_PER_SIGNATURE or f.endswith("_reasons")})
    assert not again, f"{name}: a warm call recomputes {again}"
    assert trace or (train and name == "cogvlm_expert_ids")


def test_each_op_is_measured_beside_its_contract_floor():
    rows = host.measure(calls=2, rounds=1, only="expert")
    lin, ids = rows
    assert lin["fwd_floor_us"] > 0 and lin["fwd_bwd_floor_us"] > 0
    assert ids["fwd_floor_us"] is None and ids["fwd_bwd_floor_us"] is None  # torch ops only: no custom op call
    sdpa = host.measure(calls=1, rounds=1, only="sdpa")[0]
    assert sdpa["fwd_floor_us"] is None and sdpa["fwd_bwd_floor_us"] is None   # yardsticks have none


@pytest.mark.parametrize("name", ["qformer_attention", "expert_linear", "partial_lora_linear"])
def test_the_floor_makes_the_ops_autograd_call(name):
    """The floor takes the recorded eager call's inputs (an expert's weight list flattened) and gives every
    leaf a gradient of its shape, as the op does; its output has the op's first output's shape."""
    with host.stubbed_launches():
        call, leaves = host._cases()[name](True)
        recorded = host._recorded_op_call(call)
        assert recorded is not None
        floor = host._floor_call(recorded)
        out = floor()
        first = recorded[2][0] if isinstance(recorded[2], tuple) else recorded[2]
        assert out.shape == first.shape and out.requires_grad
        torch.autograd.backward(out, torch.ones_like(out))
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape


def test_verdict_names_what_is_missed_and_a_floor_above_its_target():
    row = dict(yardstick=False, fwd_us=30.0, fwd_bwd_us=100.0, fwd_floor_us=5.0, fwd_bwd_floor_us=60.0)
    assert host.verdict(row) == "met"
    row.update(fwd_us=41.0, fwd_bwd_us=200.0)
    assert host.verdict(row) == "MISSED fwd, fwd+bwd"
    row.update(fwd_bwd_floor_us=130.0)
    assert host.verdict(row) == "MISSED fwd, fwd+bwd (floor 130.0 > 120)"
    assert host.verdict(dict(row, yardstick=True)) == "yardstick"


def test_real_launches_are_for_cuda_only(capsys):
    with pytest.raises(ValueError, match="CUDA only"):
        with host.stubbed_launches("cpu", stub=False):
            pass
    with pytest.raises(SystemExit):
        host.main(["--launches", "real", "--calls", "1", "--rounds", "1"])
    assert "--launches real needs --device cuda" in capsys.readouterr().err
