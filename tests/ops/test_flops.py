"""FlopCounterMode counts the vlmkern ops as torch counts its own (vlmkern/ops/flops.py): 2 FLOPs per
multiply-add of the matrix products, attention as scaled_dot_product_attention's formulas."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from vlmkern import ops


def _counts(fn) -> dict:
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op).removeprefix("vlmkern."): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_gemm_ops_count_their_products(backend):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    assert _counts(lambda: ops.linear_gelu(x, w, b))["linear_gelu"] == 2 * 15 * 6 * 8
    idx = torch.tensor([[0, 1], [3, 4]])
    w2 = torch.randn(6, 16, generator=g)
    assert _counts(lambda: ops.gather_linear(x.reshape(15, 8), idx, w2))["gather_linear"] == 2 * 2 * 6 * 16
    a, lb, m = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), torch.rand(3, 5, generator=g) > .5
    plora = _counts(lambda: ops.partial_lora_linear(x, w, b, a, lb, m, 2.0))["partial_lora_linear"]
    assert plora == 2 * 15 * (6 * 8 + 4 * 8 + 6 * 4)          # the adapter on every row: shapes, not the mask
    ids = (torch.arange(15) % 2).reshape(3, 5)
    assert _counts(lambda: ops.expert_linear(x, [w, w * 2], ids))["expert_linear"] == 2 * 15 * 6 * 8


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_attention_counts_as_sdpa_forward_and_backward(backend):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 5, 32, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 7, 32, generator=g, requires_grad=True)
    counts = _counts(lambda: ops.cross_attention(q, k, k).sum().backward())
    assert counts["cross_attention"] == sdpa_flop_count(q.shape, k.shape, k.shape)
    assert counts["masked_attention_backward"] == sdpa_backward_flop_count(q.shape, q.shape, k.shape, k.shape)
    counts = _counts(lambda: ops.qformer_attention(k, k, k, num_query=3, mode="bidirectional"))
    assert counts["qformer_attention"] == sdpa_flop_count(k.shape, k.shape, k.shape)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_patch_embed_counts_its_gemm_and_both_gradients(backend):
    g = torch.Generator().manual_seed(2)
    pixels = (torch.rand(1, 3, 9, 7, generator=g) * 255).requires_grad_(True)
    w = torch.randn(5, 48, generator=g, requires_grad=True)
    counts = _counts(lambda: ops.patch_embed(pixels, w, None, patch_size=4).sum().backward())
    gemm = 2 * (3 * 2) * 5 * 48                                 # ceil(9/4) x ceil(7/4) patches of 48 values
    assert counts["patch_embed"] == gemm
    assert counts["patch_embed_grad_weight"] == gemm and counts["patch_embed_grad_pixels"] == gemm
