"""``dispatch.argument_key``: the key an op's argument check and backend selection are remembered under. The
extension's (C++) key and the Python fallback must split calls into the same classes: a coarser key would give
one input another input's check outcome, backend or launch plan."""
import itertools
import warnings

import pytest
import torch

from vlmkern import _ext
from vlmkern.ops import dispatch

native = getattr(_ext.cpu_ext(), "argument_key", None)
needs_native = pytest.mark.skipif(native is None, reason="vlmkern._C not built (the Python key is in use)")


def _values():
    x = torch.randn(3, 4)
    return [
        (x,), (torch.randn(3, 4),), (x.t(),), (x.double(),), (torch.randn(3, 4, dtype=torch.float16),),
        (torch.randn(4, 3),), (torch.randn(12)[:12:1].view(3, 4),), (torch.randn(3, 8)[:, ::2],),
        (torch.randn(3, 4, device="meta"),), (torch.nn.Parameter(torch.randn(3, 4)),),
        (torch.randn(0, 4),), (torch.tensor(1.0),), (torch.empty(3, 4).as_strided((3, 4), (0, 1)),),
        (1,), (True,), (1.0,), (None,), ("bidirectional",), (torch.float16,), (torch.bfloat16,),
        ([x, x],), ((x, x),), ([x],), ([1.0, 2.0],), ((1.0, 2.0),), ([1, 2],), ([],), ((),),
        ([[1, 2], [3]],), ([[1, 2, 3]],), (x, 1.0), (1.0, x), (x, None), (x, x.t()),
    ]


@needs_native
def test_the_native_key_splits_calls_as_the_python_key_does():
    values = _values()
    for a, b in itertools.product(values, repeat=2):
        py_equal = dispatch._argument_key_py(a) == dispatch._argument_key_py(b)
        assert (native(a) == native(b)) == py_equal, (a, b)


@needs_native
def test_the_native_key_is_the_one_in_use_and_hashable():
    assert dispatch.argument_key is native
    for v in _values():
        hash(native(v))
    assert native([torch.randn(2)]) == native((torch.randn(2),))    # a list or a tuple of arguments alike


@pytest.mark.parametrize("key", [dispatch._argument_key_py, native], ids=["python", "native"])
def test_a_tensor_without_strides_is_an_error_or_a_key_of_its_own(key):
    """Nested tensors have no strides (RuntimeError: the check then runs every call); a sparse tensor's Python
    strides are zeros, so its key must still differ from an expanded dense tensor's (the C++ key refuses it)."""
    if key is None:
        pytest.skip("vlmkern._C not built")
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("ignore")    # "nested tensors are a prototype"
        key((torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)]),))
    sparse, expanded = torch.randn(3, 4).to_sparse(), torch.randn(1, 1).expand(3, 4)
    assert expanded.stride() == sparse.stride() == (0, 0)
    try:
        assert key((sparse,)) != key((expanded,))
    except RuntimeError:
        assert key is native
    with pytest.raises(TypeError):
        hash(key(({"a": 1},)))             # unhashable values fail on hashing


@needs_native
def test_the_native_key_refuses_what_is_not_a_sequence():
    with pytest.raises(TypeError, match="tuple or list"):
        native(1)
