"""Double backward (``create_graph=True``, e.g. a gradient penalty) through every differentiable public op of
``vlmkern.ops``: the second derivative equals the pure-PyTorch oracle's (``vlmkern.reference``, plain autograd,
run in float64), or the second backward raises a RuntimeError naming the op and saying double backward is not
supported. Never a silently wrong number.

Each case: first-order gradients of a loss with ``create_graph=True``, then the gradients of a fixed random
combination of them. Two losses: one linear in the op's output (the incoming gradient is a constant, so a
backward piece computed outside autograd shows as a missing term) and one quadratic (the incoming gradient
itself requires grad).
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vlmkern import ops, reference


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _first_order(fn, inputs: list[torch.Tensor], quadratic: bool, target: int | None):
    """``(loss, first-order grads with create_graph=True)`` of ``fn(*inputs)`` (leaves): the gradients of every
    input (``target`` None) or of ``inputs[target]`` alone."""
    out = fn(*inputs)
    weight = _randn(*out.shape, seed=1).to(out.dtype)
    loss = ((out.square() if quadratic else out) * weight).sum()
    wanted = inputs if target is None else [inputs[target]]
    return loss, torch.autograd.grad(loss, wanted, create_graph=True)


def _second_order(loss, first, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of every input of the loss plus a fixed random combination of the first-order grads."""
    combination = loss + sum((g * _randn(*g.shape, seed=2 + i).to(g.dtype)).sum() for i, g in enumerate(first))
    second = torch.autograd.grad(combination, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(second, inputs)]


def _both_orders(fn, inputs, quadratic: bool, target: int | None):
    loss, first = _first_order(fn, inputs, quadratic, target)
    return [g.detach() for g in first], _second_order(loss, first, inputs)


# ------------------------------------------------------------------------------------------------ cases
# name -> (function of the leaves through vlmkern.ops, the oracle's, leaf shapes). Non-leaf arguments (masks,
# ids, index, rng) are built inside, the same on both sides.
def _text_mask():
    return torch.tensor([[1, 1, 0]], dtype=torch.bool)


def _key_mask():
    return torch.tensor([[1, 1, 1, 0, 1]], dtype=torch.bool)


_RNG = (12345, 0)


def _attention_rng():
    return torch.tensor(_RNG, dtype=torch.int64)


def _index():
    return torch.tensor([[0, 3], [5, 1], [2, 2], [4, 0], [1, 5]])


def _fill_index():
    return torch.tensor([[0, 6], [-1, -1], [7, 2], [4, 0], [-1, -1]])


def _im_mask():
    return torch.tensor([True, False, True, True])


def _ids():
    return torch.tensor([0, 1, 1, 0, 1])


def _plora(module, dropout: bool):
    def run(x, w, b, a, bl):
        torch.manual_seed(7)        # the same keep mask on both sides
        return module.partial_lora_linear(x, w, b, a, bl, _im_mask(), 0.5, 0.4 if dropout else 0.0, training=dropout)
    return run


def _pim(module):
    def run(images, images_aux, qw, kw, vw):
        c, c_aux = images.shape[-1], images_aux.shape[1]
        ones = functools.partial(torch.ones, dtype=images.dtype)
        q = (ones(c), 0.1 * ones(c), qw, 0.1 * ones(qw.shape[0]))
        k = (ones(c_aux), 0.2 * ones(c_aux), kw, 0.3 * ones(kw.shape[0]))
        v = (ones(c_aux), 0.1 * ones(c_aux), vw, 0.2 * ones(vw.shape[0]))
        return module.patch_info_mining(images, images_aux, q, k, v)
    return run


def _both(build):
    """``(ops version, oracle version)`` of ``build(module)``."""
    return build(ops), build(reference)


CASES = {
    "qformer_attention": (*_both(lambda m: lambda q, k, v: m.qformer_attention(
        q, k, v, num_query=2, mode="multimodal_causal", text_mask=_text_mask())), ((1, 1, 5, 32),) * 3),
    "cross_attention": (*_both(lambda m: lambda q, k, v: m.cross_attention(q, k, v, key_padding_mask=_key_mask())),
                        ((1, 1, 3, 32), (1, 1, 5, 32), (1, 1, 5, 32))),
    "cross_attention_dropout": (*_both(lambda m: lambda q, k, v: m.cross_attention(
        q, k, v, key_padding_mask=_key_mask(), dropout_p=0.3, dropout_rng=_attention_rng())),
        ((1, 1, 3, 32), (1, 1, 5, 32), (1, 1, 5, 32))),
    "gather_linear": (*_both(lambda m: lambda x, w, b: m.gather_linear(x, _index(), w, b)),
                      ((2, 3, 4), (3, 8), (3,))),
    "gather_linear_gelu": (*_both(lambda m: lambda x, w, b: m.gather_linear_gelu(x, _index(), w, b)),
                           ((2, 3, 4), (3, 8), (3,))),
    "gather_linear_fill_extra": (*_both(lambda m: lambda x, w, b, e, f: m.gather_linear(
        x, _fill_index(), w, b, extra=e, fill=f)), ((2, 3, 4), (3, 8), (3,), (2, 4), (3,))),
    "gather_linear_gelu_fill_extra": (*_both(lambda m: lambda x, w, b, e, f: m.gather_linear(
        x, _fill_index(), w, b, extra=e, fill=f, gelu=True)), ((2, 3, 4), (3, 8), (3,), (2, 4), (3,))),
    "linear_gelu": (*_both(lambda m: m.linear_gelu), ((3, 4), (5, 4), (5,))),
    "partial_lora_linear": (_plora(ops, False), _plora(reference, False), ((4, 6), (5, 6), (5,), (2, 6), (5, 2))),
    "partial_lora_linear_dropout": (_plora(ops, True), _plora(reference, True),
                                    ((4, 6), (5, 6), (5,), (2, 6), (5, 2))),
    "expert_linear": (*_both(lambda m: lambda x, w: m.expert_linear(x, w, _ids())), ((5, 6), (2, 4, 6))),
    "patch_embed": (*_both(lambda m: lambda p, w, b: m.patch_embed(p * 50.0, w, b, patch_size=2)),
                    ((1, 2, 3, 4), (3, 8), (3,))),
    "window_attention": (*_both(lambda m: lambda u, h: m.window_attention(u, h)[0]), ((1, 4, 3), (1, 3, 4, 4))),
    "patch_info_mining": (_pim(ops), _pim(reference), ((1, 4, 3), (1, 3, 4, 4), (2, 3), (2, 3), (2, 3))),
}


def _leaves(case: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The case's inputs in float32 and the same values in float64 (the oracle's), leaves requiring grad."""
    leaves = [_randn(*s, seed=10 + i).requires_grad_() for i, s in enumerate(CASES[case][2])]
    return leaves, [t.detach().double().requires_grad_() for t in leaves]


def _run(case: str, quadratic: bool, target: int | None):
    """``(vlmkern's (first, second), the oracle's)``; the oracle in float64 from the same values."""
    fn, oracle, _ = CASES[case]
    leaves, leaves64 = _leaves(case)
    return _both_orders(fn, leaves, quadratic, target), _both_orders(oracle, leaves64, quadratic, target)


# ------------------------------------------------------------------------------------------------ tests
# What each case's double backward gives. On the CPU the reference backend runs attention and linear_gelu as
# plain autograd (dispatch.eager_cpu_reference): exact there. Elsewhere the op's own backward runs, and its
# pieces without a derivative (dispatch.BackwardOp) refuse a second backward; a first-order gradient computed
# by torch ops alone (weights, biases, fill) differentiates as the oracle's.
PLAIN_AUTOGRAD_ON_REFERENCE = {"qformer_attention", "cross_attention", "cross_attention_dropout", "linear_gelu"}
# case -> the targets (first-order gradient of input i; None: of every input) whose double backward is exact
EXACT_TARGETS = {
    "gather_linear": {None, 0, 1, 2},
    "gather_linear_fill_extra": {None, 0, 1, 2, 3, 4},
    "gather_linear_gelu_fill_extra": {4},                   # d fill: a masked sum of the incoming gradient
    "partial_lora_linear": {1, 2},                          # d weight = dYᵀ X, d bias = Σ dY
    "partial_lora_linear_dropout": {1, 2},
    "expert_linear": {0},                                   # dX: the forward op itself, on (dY, Wᵀ)
    "patch_embed": {2},                                     # d bias
    "patch_info_mining": {4},                               # the value Linear's weight, after window_attention
}
# case -> the op named by its error
REFUSING_OP = {"gather_linear_gelu": "gather_linear", "gather_linear_gelu_fill_extra": "gather_linear",
               "partial_lora_linear_dropout": "partial_lora_linear", "cross_attention_dropout": "cross_attention",
               "patch_info_mining": "window_attention"}


def _variants():
    for case, (_, _, shapes) in CASES.items():
        yield pytest.param(case, True, None, id=f"{case}-quadratic-all")
        yield pytest.param(case, False, None, id=f"{case}-linear-all")
        for i in range(len(shapes)):
            yield pytest.param(case, False, i, id=f"{case}-linear-grad{i}")


def _exact(case: str, backend: str, target: int | None) -> bool:
    return (backend == "reference" and case in PLAIN_AUTOGRAD_ON_REFERENCE) or target in EXACT_TARGETS.get(case, ())


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.double(), e, rtol=2e-3, atol=2e-3, msg=lambda m: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("case, quadratic, target", list(_variants()))
def test_double_backward_is_the_oracles_or_a_clear_error(backend, case, quadratic, target):
    """The first-order gradients under create_graph=True are the oracle's; the second-order ones too, or the
    second backward raises naming the op: never a silently wrong number (a linear loss gives a constant
    incoming gradient, where a backward piece computed outside autograd would just go missing)."""
    fn, oracle, _ = CASES[case]
    leaves, leaves64 = _leaves(case)
    loss, first = _first_order(fn, leaves, quadratic, target)
    loss64, first64 = _first_order(oracle, leaves64, quadratic, target)
    _assert_close([g.detach() for g in first], [g.detach() for g in first64], "first-order gradient")
    if _exact(case, backend, target):
        _assert_close(_second_order(loss, first, leaves), _second_order(loss64, first64, leaves64),
                      "second-order gradient")
    else:
        op = REFUSING_OP.get(case, case)
        with pytest.raises(RuntimeError, match=f"vlmkern::{op}: double backward \\(create_graph=True\\) is not "
                                               "supported"):
            _second_order(loss, first, leaves)


class _NoOpFunctionMode(TorchFunctionMode):
    """Any torch function mode sends the ops' calls through the dispatcher (the torch.library custom ops)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("case, target", [("gather_linear", None), ("partial_lora_linear", 4),
                                          ("qformer_attention", None)])
def test_the_custom_op_path_behaves_alike(backend, case, target):
    """Through the dispatcher (torch.library's autograd, not the eager path's autograd.Function) the same:
    exact, or the clear error (partial LoRA's d lora_b alone: the case that was silently wrong)."""
    with _NoOpFunctionMode():
        if target in EXACT_TARGETS.get(case, ()):
            (first, second), (first_ref, second_ref) = _run(case, False, target)
            _assert_close(second, second_ref, "second-order gradient")
        else:
            with pytest.raises(RuntimeError, match=f"vlmkern::{case}: double backward"):
                _run(case, False, target)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("case, target", [("gather_linear", None), ("partial_lora_linear", 4)])
def test_under_activation_checkpointing(backend, case, target):
    """Non-reentrant checkpointing lets a saved tensor be unpacked once per recompute: the create_graph backward
    reads each op's saved tensors once, and the outcome is the same as without checkpointing."""
    fn, oracle, _ = CASES[case]

    def checkpointed(*leaves):
        return torch.utils.checkpoint.checkpoint(fn, *leaves, use_reentrant=False)

    leaves, leaves64 = _leaves(case)
    loss, first = _first_order(checkpointed, leaves, False, target)
    if target in EXACT_TARGETS.get(case, ()):
        loss64, first64 = _first_order(oracle, leaves64, False, target)
        _assert_close(_second_order(loss, first, leaves), _second_order(loss64, first64, leaves64),
                      "second-order gradient")
    else:
        with pytest.raises(RuntimeError, match=f"vlmkern::{case}: double backward"):
            _second_order(loss, first, leaves)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_an_ordinary_backward_builds_no_graph(backend):
    """Without create_graph the backward ops run as before: plain tensors, no node of their own."""
    fn, _, _ = CASES["partial_lora_linear"]
    leaves, _ = _leaves("partial_lora_linear")
    grads = torch.autograd.grad(fn(*leaves).sum(), leaves)
    assert all(g.grad_fn is None and not g.requires_grad for g in grads)
