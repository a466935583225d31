"""The eager path (``dispatch.EagerOp``): same kernels, outputs and gradients as the custom op through the
dispatcher; the dispatcher whenever a mode, a transform, a subclass or ``torch.compile`` needs it; selections
remembered per signature without missing a change of environment."""
import importlib
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlmkern import ops
from vlmkern.ops import dispatch
from vlmkern.ops import projector as ops_projector
from vlmkern.ops import routed_linear as ops_routed


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _leaves(*shapes, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


def _grads(fn, leaves):
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    grads = [t.grad.clone() if t.grad is not None else None for t in leaves]
    for t in leaves:
        t.grad = None
    return out.detach(), grads


CASES = {
    "linear_gelu": ((lambda x, w, b: ops_projector._linear_gelu(x, w, b, True)[0]),
                    (lambda x, w, b: torch.ops.vlmkern.linear_gelu(x, w, b, True)[0]),
                    ((5, 24), (40, 24), (40,))),
    "partial_lora": ((lambda x, w, b, a, bl: ops_routed._partial_lora(
                        x, w, b, a, bl, torch.arange(6) % 2 == 0, None, 2.0, 1.0)[0]),
                     (lambda x, w, b, a, bl: torch.ops.vlmkern.partial_lora_linear(
                        x, w, b, a, bl, torch.arange(6) % 2 == 0, None, 2.0, 1.0)[0]),
                     ((6, 24), (20, 24), (20,), (4, 24), (20, 4))),
    "qformer_attention": ((lambda q, k, v: ops.attention._qformer_attention(q, k, v, None, 3, 1, 0.3, 0.0, None)[0]),
                          (lambda q, k, v: torch.ops.vlmkern.qformer_attention(q, k, v, None, 3, 1, 0.3, 0.0,
                                                                               None)[0]),
                          ((1, 2, 7, 32), (1, 2, 7, 32), (1, 2, 7, 32))),
}


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_path_gives_the_custom_ops_outputs_and_gradients(backend, case):
    eager, through_op, shapes = CASES[case]
    leaves = _leaves(*shapes)
    out_e, grads_e = _grads(eager, leaves)
    out_o, grads_o = _grads(through_op, leaves)
    assert torch.equal(out_e, out_o)
    for ge, go in zip(grads_e, grads_o):
        assert (ge is None and go is None) or torch.equal(ge, go)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_list_arguments_get_their_gradients_on_the_eager_path(backend):
    """``expert_linear``'s weights are a list: flattened for the autograd.Function, each gets its gradient, and
    the op's backward sees ``needs_input_grad`` per argument (x does not need one here)."""
    x = torch.randn(9, 16)
    w0, w1 = _leaves((12, 16), (12, 16))
    ids = (torch.arange(9) % 3 == 0).to(torch.int32)
    y = ops_routed._expert_linear(x, [w0, w1], ids)
    assert y.grad_fn is not None and "Eager" in type(y.grad_fn).__name__
    g = torch.randn(9, 12)
    y.backward(g)
    dw_e = (w0.grad.clone(), w1.grad.clone())
    w0.grad = w1.grad = None
    torch.ops.vlmkern.expert_linear(x, [w0, w1], ids).backward(g)
    assert torch.equal(dw_e[0], w0.grad) and torch.equal(dw_e[1], w1.grad)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
@pytest.mark.parametrize("case", ["linear_gelu", "window_attention"])
def test_the_eager_backward_allocates_no_zero_gradient_for_unused_outputs(backend, case):
    """The outputs a backward does not read (a saved pre-activation; the window statistics and probabilities)
    get no zero-filled gradient tensor each: the engine would allocate and fill one per output per backward."""
    if case == "linear_gelu":
        x, w = _leaves((5, 24), (40, 24))
        out = ops_projector._linear_gelu(x, w, None, True)[0]
    else:
        u, h = _leaves((1, 4, 16), (1, 16, 4, 4))
        out = importlib.import_module("vlmkern.ops.window_attention")._window_attention(u, h, 1e-5)[0]
    assert "Eager" in type(out.grad_fn).__name__
    with _RecordOps() as mode:
        out.backward(torch.ones_like(out))
    assert not [f for f in mode.seen if "zeros" in f], mode.seen


def test_a_backward_without_the_first_outputs_gradient_passes_none_on():
    """Only a non-differentiable second output used: no gradient reaches the inputs (none is computed)."""
    x, w = _leaves((5, 24), (40, 24))
    out, pre = ops_projector._linear_gelu(x, w, None, True)
    assert pre.requires_grad       # pre is an ordinary output; its gradient is not what the op computes
    node = out.grad_fn
    assert node._forward_cls.backward(node, None, torch.ones_like(pre)) == (None,) * 5


def test_no_grad_calls_run_the_kernel_without_autograd():
    x, w = torch.randn(4, 8), torch.randn(6, 8, requires_grad=True)
    with torch.no_grad():
        out = ops.linear_gelu(x, w)
    assert out.grad_fn is None and not out.requires_grad


def test_a_dispatch_mode_sees_the_custom_op():
    """Under a TorchDispatchMode (FlopCounterMode, make_fx, a memory tracker ...) the op is dispatched, so the
    mode sees ``vlmkern::`` ops, not their insides."""
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with _RecordOps() as mode:
        ops.gather_linear(x, torch.tensor([[0], [3]]), w)
    assert "vlmkern.gather_linear.default" in mode.seen


def test_eager_call_conditions():
    x, p = torch.randn(2), torch.nn.Parameter(torch.randn(2))
    assert dispatch.eager_call(x, p, None, 3, [x, p])
    with _RecordOps():
        assert not dispatch.eager_call(x)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as fake:
        assert not dispatch.eager_call(fake.from_tensor(x))
    with torch.device("cpu"):          # a TorchFunctionMode
        assert not dispatch.eager_call(x)
    assert torch.func.vmap(lambda t: torch.tensor(dispatch.eager_call(t)))(torch.randn(3, 2)).eq(0).all()
    seen = []
    torch.jit.trace(lambda t: seen.append(dispatch.eager_call(t)) or t * 2, (x,), check_trace=False)
    assert seen == [False]

    class Sub(torch.Tensor):
        pass
    assert not dispatch.eager_call(x.as_subclass(Sub))
    assert not dispatch.eager_call(x, [x.as_subclass(Sub)])


def test_a_subclass_takes_the_custom_op_after_a_plain_call_of_its_layout():
    """The eager path remembers its choice per signature: a tensor's type is part of it, so a subclass with the
    layout of an earlier plain call still goes through the dispatcher (its ``__torch_function__`` sees the op)."""
    class Seen(torch.Tensor):
        calls: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    for arg in (0, 1):
        ops_projector._linear_gelu(x, w, b, True)           # remembered for plain tensors of these layouts
        args = [x, w, b]
        args[arg] = args[arg].as_subclass(Seen)
        Seen.calls.clear()
        ops_projector._linear_gelu(*args, True)
        assert "vlmkern.linear_gelu.default" in Seen.calls


def test_fake_tensors_take_the_ops_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = ops.linear_gelu(torch.empty(3, 8), torch.empty(5, 8))
    assert out.shape == (3, 5)


def test_selection_is_remembered_but_follows_the_environment(monkeypatch):
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    sel = ops_projector.LINEAR_GELU
    sel.forget()
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    assert sel.select(x, w) == "reference"
    assert len(sel._chosen) == 1
    assert sel.select(x, w) == "reference" and len(sel._chosen) == 1        # looked up
    assert sel.select(torch.randn(5, 8), w) == "reference" and len(sel._chosen) == 2   # a new shape: computed
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    if not dispatch.triton_env_reasons(x.device):
        assert sel.select(x, w) == "triton"
    monkeypatch.setenv("VLMKERN_BACKEND", "reference")
    assert sel.select(x, w) == "reference"


def test_a_refusal_is_not_remembered(monkeypatch):
    """A forced backend that can't run raises every time (nothing stored), and the next call that can run works."""
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    sel = ops_projector.LINEAR_GELU
    x64 = torch.randn(3, 4, dtype=torch.float64)
    for _ in range(2):
        with pytest.raises(dispatch.BackendNotSupported, match="float64"):
            sel.select(x64, x64)


def test_debug_logging_explains_every_call(monkeypatch, caplog):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with caplog.at_level(logging.DEBUG, logger="vlmkern"):
        ops_projector.LINEAR_GELU.select(x, w)
        ops_projector.LINEAR_GELU.select(x, w)
    assert sum("vlmkern::linear_gelu -> reference" in r.getMessage() for r in caplog.records) == 2


def test_a_first_call_under_compile_traces_the_custom_op():
    """An EagerOp never called eagerly before is compiled without a graph break (nothing of the eager path is
    traced), and the graph holds the custom op."""
    fresh = dispatch.EagerOp(ops_projector._linear_gelu_op)
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm
    out = torch.compile(lambda a, b: fresh(a, b, None, False)[0], fullgraph=True, backend=backend)(x, w)
    assert fresh._kernels is None and any("vlmkern.linear_gelu" in t for t in seen)
    torch.testing.assert_close(out, torch.nn.functional.gelu(x @ w.t()))


def test_forget_selections_clears_every_remembered_choice():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    ops_projector._linear_gelu(x, w, None, False)
    ops_projector.LINEAR_GELU.select(x, w)
    assert ops_projector._linear_gelu._chosen and ops_projector.LINEAR_GELU._chosen
    dispatch.forget_selections()
    assert not ops_projector._linear_gelu._chosen and not ops_projector.LINEAR_GELU._chosen


def _forward_ad_cases():
    from vlmkern import reference
    g = torch.Generator().manual_seed(3)
    w, b, idx = torch.randn(6, 8, generator=g), torch.randn(6, generator=g), torch.tensor([[0], [3]])
    a, lb, m = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), torch.arange(5) < 3
    kv = torch.randn(1, 2, 7, 32, generator=g)
    ids, pw, hr = (torch.arange(5) % 2).to(torch.int32), torch.randn(6, 8, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    return {
        "gather_linear": ((lambda x: ops.gather_linear(x, idx, w, b)), (lambda x: reference.gather_linear(x, idx, w, b)),
                          torch.randn(5, 8, generator=g)),
        "linear_gelu": ((lambda x: ops.linear_gelu(x, w, b)), (lambda x: reference.linear_gelu(x, w, b)),
                        torch.randn(5, 8, generator=g)),
        "partial_lora_linear": ((lambda x: ops.partial_lora_linear(x, w, b, a, lb, m, 2.0)),
                                (lambda x: reference.partial_lora_linear(x, w, b, a, lb, m, 2.0)),
                                torch.randn(5, 8, generator=g)),
        "cross_attention": ((lambda q: ops.cross_attention(q, kv, kv)), (lambda q: reference.cross_attention(q, kv, kv)),
                            torch.randn(1, 2, 4, 32, generator=g)),
        "expert_linear": ((lambda x: ops.expert_linear(x, [w, 2 * w], ids)),
                          (lambda x: reference.expert_linear(x, [w, 2 * w], ids)), torch.randn(5, 8, generator=g)),
        "patch_embed": ((lambda px: ops.patch_embed(px, pw, b, patch_size=2)),
                        (lambda px: reference.patch_embed(px, pw, b, patch_size=2)),
                        torch.rand(1, 2, 3, 5, generator=g) * 255),
        "window_attention": ((lambda u: ops.window_attention(u, hr)[0]), (lambda u: reference.window_attention(u, hr)[0]),
                             torch.randn(1, 4, 16, generator=g)),
    }


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
@pytest.mark.parametrize("case", ["gather_linear", "linear_gelu", "partial_lora_linear", "cross_attention",
                                  "expert_linear", "patch_embed", "window_attention"])
@pytest.mark.parametrize("how", ["jvp", "dual", "grad", "vmap"])
def test_functorch_and_forward_ad_give_the_reference_results(backend, case, how):
    """The custom ops have reverse-mode formulas only (the dispatcher gives a custom op without a forward-mode one
    a zero tangent, silently), no batching rule and an autograd functorch's grad refuses: under a transform or
    with forward-AD tangents the reference math runs, and the results are the reference's."""
    import torch.autograd.forward_ad as fwad
    fn, ref, x = _forward_ad_cases()[case]
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    if how in ("jvp", "dual"):
        expected = torch.func.jvp(ref, (x,), (t,))[1]
        try:
            if how == "jvp":
                got = torch.func.jvp(fn, (x,), (t,))[1]
            else:
                with fwad.dual_level():
                    got = fwad.unpack_dual(fn(fwad.make_dual(x, t))).tangent
        except NotImplementedError as e:   # torch's own refusal, e.g. SDPA's CPU flash kernel: clear, not silent
            assert "forward AD" in str(e)
            return
    elif how == "grad":
        got = torch.func.grad(lambda v: fn(v).square().sum())(x)
        expected = torch.func.grad(lambda v: ref(v).square().sum())(x)
    else:
        xs = torch.stack([x, t, x - t])
        got, expected = torch.func.vmap(fn)(xs), torch.stack([ref(v) for v in xs])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
@pytest.mark.parametrize("case", ["gather_linear", "linear_gelu", "partial_lora_linear", "cross_attention",
                                  "expert_linear", "window_attention"])
def test_double_backward_is_right_or_refused(backend, case):
    """A second derivative through an op either matches the reference's or raises naming the op: the ops'
    backwards read tensors the forward saved without a graph (a GELU pre-activation, softmax statistics), so
    running their own ops' reference math under create_graph would give wrong second derivatives, silently
    (tests/ops/test_double_backward.py covers every op and input)."""
    fn, ref, x = _forward_ad_cases()[case]
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))

    def second(f):
        v = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((f(v) ** 2).sum(), v, create_graph=True)
        return torch.autograd.grad((g * t).sum(), v)[0]
    expected = second(ref)
    try:
        got = second(fn)
    except RuntimeError as e:
        assert f"vlmkern::{case}: double backward" in str(e), e
        return
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
