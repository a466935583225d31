"""Every public op under ``torch.compile(dynamic=True, fullgraph=True)`` with its default arguments: dynamic
compilation makes a float default argument and every size symbolic, which the argument checks must take without
a graph break (``math.isfinite`` / ``math.isqrt`` / ``hasattr`` of a symbolic value are not traceable)."""
import pytest
import torch

from vlmkern import ops


def _t(*shape, grad=False):
    return torch.randn(*shape, generator=_GEN).requires_grad_(grad)


_GEN = torch.Generator().manual_seed(0)


def _mining_params(c_in, c_out):
    return (torch.ones(c_in), torch.zeros(c_in), _t(c_out, c_in), _t(c_out))


def _cases():
    """op name -> (function, inputs); the inputs that require grad get a backward too."""
    x, w, b = _t(2, 7, 32, grad=True), _t(48, 32, grad=True), _t(48)
    pix = torch.randint(0, 256, (1, 3, 17, 23), dtype=torch.uint8, generator=_GEN)
    q, k = _t(2, 2, 9, 32, grad=True), _t(2, 2, 13, 32, grad=True)
    u, hr = _t(1, 4, 16, grad=True), _t(1, 16, 4, 4, grad=True)
    mining = [_mining_params(16, 16), _mining_params(16, 16), _mining_params(16, 16)]
    lora_a, lora_b = _t(4, 32), _t(48, 4)
    return {
        "cogvlm_expert_ids": (ops.cogvlm_expert_ids, (torch.randint(0, 2, (2, 9), generator=_GEN),)),
        "cross_attention": (lambda q, k: ops.cross_attention(q, k, k), (q, k)),
        "expert_linear": (lambda x, m: ops.expert_linear(x, [w, 2 * w], m), (x, torch.rand(2, 7, generator=_GEN) > .5)),
        "gather_linear": (lambda x: ops.gather_linear(x, torch.tensor([[0], [3]]), w, b), (_t(5, 32, grad=True),)),
        "gather_linear_gelu": (lambda x: ops.gather_linear_gelu(x, torch.tensor([[1], [4]]), w, b),
                               (_t(5, 32, grad=True),)),
        "linear_gelu": (lambda x: ops.linear_gelu(x, w, b), (x,)),
        "partial_lora_linear": (lambda x, m: ops.partial_lora_linear(x, w, b, lora_a, lora_b, m, 2.0),
                                (x, torch.rand(2, 7, generator=_GEN) > .5)),
        "patch_embed": (lambda p: ops.patch_embed(p, _W_PATCH, None, patch_size=4), (pix,)),
        "patch_info_mining": (lambda i, a: ops.patch_info_mining(i, a, *mining), (_t(1, 4, 16), hr)),
        "patchify": (lambda p: ops.patchify(p, 4), (pix,)),
        "qformer_attention": (lambda q: ops.qformer_attention(q, q, q, num_query=4, mode="bidirectional"), (q,)),
        "window_attention": (lambda u, h: ops.window_attention(u, h)[0], (u, hr)),
    }


_W_PATCH = torch.randn(16, 48, generator=_GEN)
CASES = _cases()


def test_every_public_op_has_a_case():
    assert sorted(CASES) == sorted(ops.__all__)


@pytest.mark.parametrize("backend,name", [(b, n) for n in sorted(CASES) for b in ("triton", "reference")
                                          if (b, n) != ("triton", "patchify")],       # patchify: no Triton backend
                         indirect=["backend"])
def test_dynamic_fullgraph_compile_gives_the_eager_result(backend, name):
    torch._dynamo.reset()
    fn, inputs = CASES[name]
    expected = fn(*inputs)
    got = torch.compile(fn, dynamic=True, fullgraph=True, backend="aot_eager")(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    leaves = [t for t in inputs if t.requires_grad]
    if leaves:
        g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(torch.autograd.grad(got, leaves, g), torch.autograd.grad(expected, leaves, g),
                                   rtol=1e-5, atol=1e-5)
