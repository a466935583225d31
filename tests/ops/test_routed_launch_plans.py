"""The routed GEMMs' launch plans (``vlmkern.ops.routed_linear._triton``): per call the launchers pass exactly
what the argument builders return for the call's own tensors, though sizes, strides, scalars and constexprs
come from a plan memoised per key. No kernel runs: ``launch`` is replaced by a recorder."""
import pytest
import torch

from vlmkern.ops.dispatch import dot_precision, triton_interpreting
from vlmkern.ops.routed_linear import _triton as kern
from vlmkern.ops.routed_linear._dropout import pack_keep

M, K, N, R = 5, 24, 16, 3


@pytest.fixture
def launches(monkeypatch):
    """The (grid, args, constexprs) of every launch, in order; the kernels never run."""
    seen = []
    monkeypatch.setattr(kern, "launch", lambda kernel, grid, args, consts: seen.append((grid, args, consts)))
    return seen


def _same(got: dict, want: dict) -> None:
    """Equal argument dicts: the same names, equal scalars, tensors on the same memory with the same layout."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor), name
            assert (g.data_ptr(), g.dtype, g.shape, g.stride()) == (w.data_ptr(), w.dtype, w.shape, w.stride()), name
        else:
            assert type(g) is type(w) and g == w, (name, g, w)


def _consts(family, dtype, **flags) -> dict:
    return dict(**flags, UPCAST=triton_interpreting(), INPUT_PRECISION=dot_precision(dtype),
                **kern.config(family, dtype))


def _t(*shape, transposed=False, dtype=torch.float32):
    """A ``shape`` tensor, contiguous or a transposed view (same shape, other strides)."""
    return torch.randn(*shape[::-1], dtype=dtype).t() if transposed else torch.randn(*shape, dtype=dtype)


def _mask():
    return torch.arange(M) % 2 == 0


def _keep(transposed):
    """A packed keep mask ``(M, packed_width(K))`` uint8: row-major, or with another row stride (a column slice of
    a wider buffer) so that the layouts differ."""
    packed = pack_keep(_t(M, K) > 0)
    return torch.cat([packed, packed], dim=1)[:, :packed.shape[1]] if transposed else packed


# Each case: launcher call on fresh operands -> (output, builder's full args for the same tensors, constexprs).
def _down(transposed, dtype):
    a, b, mask, keep = _t(M, K, dtype=dtype), _t(R, K, transposed=transposed, dtype=dtype), _mask(), _keep(transposed)
    out = kern.lora_down(a, b, mask, keep, 0.5, 1.25)
    return out, kern._down_args(a, b, kern._flat(mask), keep, out, 0.5, 1.25), \
        _consts("down", dtype, HAS_KEEP=True)


def _up(transposed, dtype):
    a, w, u, v = _t(M, K, dtype=dtype), _t(N, K, transposed=transposed, dtype=dtype), _t(M, R, dtype=dtype), \
        _t(N, R, transposed=transposed, dtype=dtype)
    mask, bias = _mask(), torch.randn(N, dtype=dtype)
    out = kern.lora_up(a, w, u, v, mask, None, 1.0, bias)
    return out, kern._up_args(a, w, u, v, bias, kern._flat(mask), None, out, 1.0), \
        _consts("up", dtype, HAS_BIAS=True, HAS_KEEP=False)


def _tn(transposed, dtype):
    p, q, keep = _t(M, R, transposed=transposed, dtype=dtype), _t(M, K, dtype=dtype), _keep(transposed)
    sel = torch.tensor([0, 1, 2, 1, 0], dtype=torch.int32)
    out = kern.routed_tn(p, q, sel, 2, 1, keep, 1.0, 2.0)
    return out, kern._tn_args(p, q, kern._flat(sel), keep, out, 1, 1.0, 2.0), \
        _consts("tn", dtype, HAS_KEEP=True)


def _expert(transposed, dtype):
    ws = [_t(N, K, transposed=transposed, dtype=dtype) for _ in range(3)]
    a, ids = _t(M, K, dtype=dtype), torch.tensor([0, 2, 1, 1, 0], dtype=torch.int32)
    out = kern.expert_linear(a, ws, ids)
    # the stacked operand is made per call: the builder sees the one that was passed
    return out, None, (ws, a, ids, _consts("expert", dtype, PAIR=False))


CASES = {"lora_down": _down, "lora_up": _up, "routed_tn": _tn, "expert_gemm": _expert}
FAMILY = {"lora_down": "down", "lora_up": "up", "routed_tn": "tn", "expert_gemm": "expert"}   # CONFIGS keys


def _expected(case, result, launch_args):
    out, want, consts = result
    if case == "expert_gemm":   # the builder on the very stacked operand the launch got
        ws, a, ids, consts = consts
        w0 = launch_args["w_ptr"]
        want = kern._expert_args(a, w0, launch_args["w1_ptr"], w0.stride(0), kern._flat(ids), out, len(ws))
    return want, consts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_launch_args_are_the_builders_for_every_layout(launches, case, dtype):
    """Same shapes, other strides (transposed operands), then the first layout again: every launch passes
    the builder's arguments for its own tensors (a plan keyed on shapes alone would pass stale strides)."""
    for transposed in (False, True, False):
        result = CASES[case](transposed, dtype)
        grid, args, consts = launches[-1]
        want, want_consts = _expected(case, result, args)
        _same(args, want)
        assert consts == want_consts


@pytest.mark.parametrize("case", CASES)
def test_a_swapped_config_takes_effect(launches, monkeypatch, request, case):
    """Tests swap CONFIGS entries for small tiles: after clear_plans the next launch uses them (grid and
    constexprs)."""
    name = FAMILY[case] + "_fp32"
    CASES[case](False, torch.float32)
    grid_before = launches[-1][0]
    tiny = {k: (2 if k.startswith("BLOCK") else v) for k, v in kern.CONFIGS[name].items()}
    monkeypatch.setitem(kern.CONFIGS, name, tiny)
    kern.clear_plans()
    request.addfinalizer(kern.clear_plans)     # no plan with the tiny config outlives the test
    result = CASES[case](False, torch.float32)
    grid, args, consts = launches[-1]
    assert {k: consts[k] for k in tiny} == tiny
    assert _expected(case, result, args)[1] == consts
    assert grid != grid_before


def test_launch_plan_is_remembered_per_key(launches):
    """The second call with the same layouts reuses the plan (no rebuild); a new stride builds a new one."""
    kern.clear_plans()
    _down(False, torch.float32)
    _down(False, torch.float32)
    info = kern._down_plan.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    _down(True, torch.float32)
    assert kern._down_plan.cache_info().misses == 2
