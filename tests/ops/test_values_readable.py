"""Value checks (ids, indices, counts) read values only where they exist and a read is allowed: not under
torch.compile / fake tensors / transforms (``eager_mode``), not on meta tensors, and not while a CUDA graph is
captured, where a host read fails the capture that the originals (which read no values) pass."""
import pytest
import torch

from vlmkern import ops
from vlmkern.ops import dispatch


class _CudaLooking(torch.Tensor):
    """A CPU tensor that answers ``is_cuda`` True: the capture branch of ``values_readable`` without a GPU."""

    @property
    def is_cuda(self):
        return True


def test_cpu_tensors_are_readable_meta_and_traced_ones_are_not():
    assert dispatch.values_readable(torch.zeros(3))
    assert not dispatch.values_readable(torch.zeros(3, device="meta"))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert not dispatch.values_readable(torch.zeros(3))


@pytest.mark.parametrize("capturing", [False, True])
def test_a_cuda_tensor_is_not_read_while_a_graph_is_captured(monkeypatch, capturing):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(dispatch, "_HAS_CUDA", True)
    t = torch.Tensor._make_subclass(_CudaLooking, torch.zeros(3))
    assert dispatch.values_readable(t) is not capturing
    assert dispatch.values_readable(torch.zeros(3))      # CPU tensors: no capture to break


@pytest.mark.parametrize("where", ["vlmkern.ops.projector", "vlmkern.models.blip2", "vlmkern.models.fuyu"])
def test_the_value_checks_ask_before_reading(monkeypatch, where):
    """Each default-on value check goes through ``values_readable`` (False: nothing read, no error)."""
    import importlib
    module = importlib.import_module(where)
    asked = []
    monkeypatch.setattr(module if where != "vlmkern.ops.projector" else dispatch, "values_readable",
                        lambda t: asked.append(tuple(t.shape)) or False)
    if where == "vlmkern.ops.projector":
        x, w = torch.randn(4, 3), torch.randn(5, 6)
        ops.gather_linear(x, torch.tensor([[0, 1], [2, 3]]), w)
    elif where == "vlmkern.models.blip2":
        module.check_ids(torch.tensor([7]), "input_ids", 5, "config.vocab_size")   # out of range, not read
    else:
        embeds, ids = torch.zeros(1, 3, 4), torch.tensor([[9, 1, 9]])
        module.scatter_image_embeddings(embeds, ids, torch.ones(3, 4), image_token_id=9)  # 2 placeholders, 3 rows
    assert asked


@pytest.mark.cuda
def test_ops_and_value_checks_capture_in_a_cuda_graph():
    x = torch.randn(16, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, 16, (8, 2), device="cuda")

    def step():
        return ops.gather_linear_gelu(x, index, w)      # validate_values defaults to True
    want = step()
    static = torch.cuda.Stream()
    static.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(static):
        step()
    torch.cuda.current_stream().wait_stream(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.testing.assert_close(out, want)


def test_cached_device_tensors_a_captured_graph_reads_are_never_freed(monkeypatch):
    """A captured CUDA graph reads cached tensors by address on every replay: what a cache hands out while a
    capture runs stays alive after the cache evicts it (an LRU of index tensors, a size-capped dict)."""
    from vlmkern.ops.patch_embed import _triton as pe_triton
    monkeypatch.setattr(dispatch, "_HAS_CUDA", True)
    monkeypatch.setattr(dispatch, "_GRAPH_KEPT", [])
    calls = []

    @dispatch.eager_cache(maxsize=1)
    def table(n):
        calls.append(n)
        return torch.arange(n)

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    table(3)
    assert dispatch._GRAPH_KEPT == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = table(3)
    pair = pe_triton._scale_shift(1 / 255, [0.5] * 3, [0.5] * 3, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    table(4)                                                  # evicts n=3 from the LRU
    pe_triton._SCALE_SHIFT.clear()
    assert any(v is captured for v in dispatch._GRAPH_KEPT)
    assert not any(v is pair for v in dispatch._GRAPH_KEPT)  # CPU tensors: no graph reads them, nothing kept
    assert calls == [3, 4]


@pytest.mark.cuda
def test_scale_shift_handed_to_a_capture_is_kept(monkeypatch):
    from vlmkern.ops.patch_embed import _triton as pe_triton
    monkeypatch.setattr(dispatch, "_GRAPH_KEPT", [])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    pair = pe_triton._scale_shift(1 / 255, [0.25] * 3, [0.5] * 3, torch.device("cuda"))
    assert any(v is pair for v in dispatch._GRAPH_KEPT)
