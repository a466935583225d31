"""``checks.once_per_key``: a check runs once per argument key (dtype, shape, strides, device; type and value of
anything else); a failing key raises every time."""
import pytest
import torch

from vlmkern.ops.checks import argument_key, once_per_key


def _counting_check():
    calls = []

    @once_per_key
    def check(x, scale, flag=False):
        calls.append(1)
        if isinstance(scale, bool):
            raise TypeError("scale must be a float")
        if x.dim() != 2:
            raise ValueError("x must be 2-D")
    return check, calls


def test_a_passing_key_is_checked_once():
    check, calls = _counting_check()
    x = torch.randn(3, 4)
    check(x, 1.0)
    check(torch.randn(3, 4), 1.0)            # other values, same key
    assert len(calls) == 1
    check(x.t(), 1.0)                        # other strides and shape: a new key
    check(x, 1.0, flag=True)                 # another keyword value
    check(x.double(), 1.0)                   # another dtype
    assert len(calls) == 4


def test_a_failing_key_raises_every_time():
    check, calls = _counting_check()
    for _ in range(2):
        with pytest.raises(ValueError, match="2-D"):
            check(torch.randn(3), 1.0)
    assert len(calls) == 2


def test_scalars_of_another_type_are_another_key():
    check, _ = _counting_check()
    x = torch.randn(3, 4)
    check(x, 1)                               # an int passes
    with pytest.raises(TypeError, match="scale"):
        check(x, True)                        # True == 1 but is a bool: checked, refused
    assert argument_key((1,)) != argument_key((True,)) != argument_key((1.0,))


def test_unhashable_arguments_are_checked_every_time():
    check, calls = _counting_check()
    x = torch.randn(3, 4)
    check(x, 1.0, flag={"a": 1})
    check(x, 1.0, flag={"a": 1})
    assert len(calls) == 2


def test_under_compile_the_check_runs_as_written():
    check, _ = _counting_check()

    def f(x):
        check(x, 1.0)
        return x + 1
    out = torch.compile(f, fullgraph=True, backend="eager")(torch.randn(3, 4))
    assert out.shape == (3, 4)
    with pytest.raises(Exception, match="2-D"):
        torch.compile(f, fullgraph=True, backend="eager")(torch.randn(5))


def test_every_ops_shape_check_is_remembered_per_key():
    """Each public op's argument check is the memoised one (a refactor that drops the decorator costs ~10 us and
    a dozen Python calls per call of the op, with every test still green)."""
    import importlib
    attention, patch_embed, projector, routed_linear, window_attention = (
        importlib.import_module(f"vlmkern.ops.{name}")      # the packages (vlmkern.ops also exports functions)
        for name in ("attention", "patch_embed", "projector", "routed_linear", "window_attention"))
    checks = [attention._check_qkv, projector._check_linear, projector._check_gather_linear,
              patch_embed._check_patch_embed, routed_linear._check_partial_lora, routed_linear._check_expert_linear,
              routed_linear._check_token_types, window_attention._check_window_inputs]
    assert [c.__name__ for c in checks if not hasattr(c, "forget")] == []
