"""Every Triton kernel stays inside its tensors: run on inputs, outputs and scratch buffers placed between
all-ones margins (vlmkern.testing.GuardedMemory), each op's forward and backward must give what the same
backend gives on plain tensors (a read past an input's end would bring NaN in, an output element no kernel
writes would stay NaN) and leave every margin as it was (a write past an allocation's end changes one).

Odd sizes, partial tiles and strided views; on the CPU under Triton's interpreter (which reads and writes by
address, as a GPU does), on a GPU as they are."""
from contextlib import nullcontext

import pytest
import torch

from vlmkern import ops
from vlmkern.ops.dispatch import triton_interpreting
from vlmkern.testing import GuardedMemory, guarded_allocations, interpreter_bounds_check


def _attention_qkv(t, Lq, Lk, d=32, B=2, H=2):
    q = t(B, H, Lq, d, name="q")
    # k, v: views of one fused (B, Lk, 2, H, d) projection, as the models make them (strided, not contiguous)
    kv = t(B, Lk, 2, H, d, name="kv")
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), kv


def _qformer(mode, text_rows_only=False, dropout_p=0.0):
    def build(t, ints):
        nq, T = 5, 14
        q, k, v, kv = _attention_qkv(t, T if text_rows_only else nq + T, nq + T)
        mask = ints((2, T), "text_mask", high=2, dtype=torch.bool)
        mask[:, 0] = True
        rng = ints((2,), "dropout_rng", high=2**31, dtype=torch.int64) if dropout_p else None
        return (lambda: ops.qformer_attention(q, k, v, num_query=nq, mode=mode, text_mask=mask, dropout_p=dropout_p,
                                              dropout_rng=rng)), [q, kv]
    return build


def _cross(t, ints):
    q, k, v, kv = _attention_qkv(t, 7, 70)
    mask = ints((2, 70), "key_padding_mask", high=2, dtype=torch.int64)
    mask[:, 0] = 1
    return (lambda: ops.cross_attention(q, k, v, key_padding_mask=mask)), [q, kv]


def _linear_gelu(t, ints):
    x, w, b = t(9, 40, name="x"), t(23, 40, name="weight"), t(23, name="bias")
    return (lambda: ops.linear_gelu(x, w, b)), [x, w, b]


def _gather_linear(gelu):
    def build(t, ints):
        x, w, b = t(3, 7, 24, name="x"), t(19, 2 * 24, name="weight"), t(19, name="bias")
        extra, fill = t(2, 24, name="extra"), t(19, name="fill")
        index = ints((11, 2), "index", high=23, dtype=torch.int64)
        index[3, 0] = -1                                       # a filled row
        return (lambda: ops.gather_linear(x, index, w, b, extra=extra, fill=fill, gelu=gelu)), [x, w, b, extra]
    return build


def _patch_embed(t, ints):
    pixels = ints((2, 3, 13, 10), "pixels", high=256, dtype=torch.uint8)
    w, b = t(20, 3 * 16, name="weight"), t(20, name="bias")
    return (lambda: ops.patch_embed(pixels, w, b, patch_size=4)), [w, b]


def _partial_lora(dropout_p=0.0, width=40):
    def case(t, ints):
        x, w, b = t(2, 9, width, name="x"), t(23, width, name="weight"), t(23, name="bias")
        a, lb = t(8, width, name="lora_a"), t(23, 8, name="lora_b")
        mask = ints((2, 9), "im_mask", high=2, dtype=torch.bool)

        def call():
            torch.manual_seed(5)    # the same dropout mask in both runs (packed: its rows' padding is read too)
            return ops.partial_lora_linear(x, w, b, a, lb, mask, 2.0, dropout_p=dropout_p, training=dropout_p > 0)
        return call, [x, w, b, a, lb]
    return case


def _expert(t, ints):
    x, w0, w1 = t(2, 9, 40, name="x"), t(23, 40, name="weights[0]"), t(23, 40, name="weights[1]")
    ids = ints((2, 9), "expert_ids", high=2, dtype=torch.int32)
    return (lambda: ops.expert_linear(x, [w0, w1], ids)), [x, w0, w1]


def _window(t, ints):
    u, h = t(2, 9, 12, name="u"), t(2, 12, 6, 6, name="images_aux")     # 3 x 3 windows of 2 x 2
    return (lambda: ops.window_attention(u, h)[0]), [u, h]


def _expert_ids(t, ints):
    types = ints((3, 11), "token_type_ids", high=2, dtype=torch.int64)
    return (lambda: ops.cogvlm_expert_ids(types)), []


CASES = {"qformer_bidirectional": _qformer("bidirectional"), "qformer_unimodal": _qformer("unimodal"),
         "qformer_causal_text_rows": _qformer("multimodal_causal", text_rows_only=True),
         "qformer_dropout": _qformer("bidirectional", dropout_p=0.25), "cross_attention": _cross,
         "linear_gelu": _linear_gelu, "gather_linear": _gather_linear(False),
         "gather_linear_gelu": _gather_linear(True), "patch_embed": _patch_embed,
         "partial_lora_linear": _partial_lora(),
         "partial_lora_dropout": _partial_lora(dropout_p=0.3, width=33), "expert_linear": _expert, "window_attention": _window,
         "cogvlm_expert_ids": _expert_ids}


def _run(name, device, dtype, memory):
    """The case's output and its leaves' gradients; with ``memory``, every input, allocation and the output
    gradient guarded. Under the interpreter every access is checked in both runs."""
    gen = torch.Generator().manual_seed(0)
    place = (lambda x, label: x) if memory is None else memory.place

    def t(*shape, name):
        return place(torch.randn(*shape, generator=gen).to(device=device, dtype=dtype), name).requires_grad_()

    def ints(shape, name, *, high, dtype):
        return place(torch.randint(0, high, shape, generator=gen).to(device=device, dtype=dtype), name)

    call, leaves = CASES[name](t, ints)
    grad_out = None
    # under the interpreter every access is also checked against the launch's tensors, masked-off reads included
    # (in the unguarded run too: a stray store there would write into whatever memory lies next to a tensor)
    # and, in the guarded run, that no two programs of a launch race for an element
    checked = interpreter_bounds_check(races=memory is not None) if triton_interpreting() else nullcontext()
    with guarded_allocations(memory, device) if memory is not None else nullcontext(), checked:
        out = call()
        if leaves:
            grad_out = place(torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype), "grad_output")
            torch.autograd.backward(out, grad_out)
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])   # the launch configs differ per element size
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_stay_inside_their_tensors(name, dtype, backend, device):
    want, want_grads = _run(name, device, dtype, None)
    memory = GuardedMemory()
    got, got_grads = _run(name, device, dtype, memory)
    memory.check()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} output: {m}")
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g is not None and w is not None, f"{name}: leaf {i} got no gradient"
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} gradient {i}: {m}")


def test_the_guard_sees_reads_and_writes_past_the_end(device):
    """The harness itself: a copy that writes one element too many changes a margin; a read of one element too
    many brings a NaN in; an allocation nothing writes reads as NaN."""
    memory = GuardedMemory()
    x = memory.place(torch.arange(10.0, device=device), "x")
    assert torch.isnan(x.as_strided((11,), (1,))[10])                          # the element after x
    memory.check()
    x.as_strided((11,), (1,))[10] = 0.0
    with pytest.raises(AssertionError, match="x: 4 byte"):
        memory.check()
    with guarded_allocations(GuardedMemory(), device):
        assert torch.isnan(torch.empty(3, device=device)).all()
        assert torch.empty(3, device="meta").is_meta                             # other devices as they are


@pytest.mark.skipif(not triton_interpreting(), reason="checks the interpreter's accesses (TRITON_INTERPRET=1)")
def test_the_interpreter_check_sees_a_read_whose_value_is_discarded():
    """A bias read without its mask, as a kernel could write it: the extra lanes' values are masked at the store,
    so no result shows them (GuardedMemory cannot), but the read itself is out of bounds."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_bias(x_ptr, b_ptr, out_ptr, N, MASKED: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        b = tl.load(b_ptr + offs, mask=offs < N) if MASKED else tl.load(b_ptr + offs)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < N) + b, mask=offs < N)

    x, b, out = torch.randn(5), torch.randn(5), torch.empty(5)
    with interpreter_bounds_check():
        add_bias[(1,)](x, b, out, 5, MASKED=True, BLOCK=8)
        torch.testing.assert_close(out, x + b)
        with pytest.raises(Exception, match="add_bias: load of 3 element.*past the end of b_ptr|argument 1"):
            add_bias[(1,)](x, b, out, 5, MASKED=False, BLOCK=8)


@pytest.mark.skipif(not triton_interpreting(), reason="checks the interpreter's accesses (TRITON_INTERPRET=1)")
def test_the_interpreter_check_sees_programs_that_race():
    """Programs that store to one element, or load what another program stores, without an atomic: fine one after
    another under the interpreter, a race on a GPU. Atomics, and a program's own read-modify-write, are fine."""
    import triton
    import triton.language as tl

    @triton.jit
    def blocks(x_ptr, out_ptr, total_ptr, MODE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        if MODE == 0:                                   # each program its own block, plus an atomic total
            tl.store(out_ptr + offs, x + tl.load(out_ptr + offs))
            tl.atomic_add(total_ptr, tl.sum(x, 0))
        elif MODE == 1:                                 # every program stores the total
            tl.store(total_ptr, tl.sum(x, 0))
        else:                                           # program 1 reads the block program 0 writes
            tl.store(out_ptr + offs, x)
            tl.store(x_ptr + offs, tl.load(out_ptr + (offs + BLOCK) % (2 * BLOCK)))

    x, out, total = torch.randn(16), torch.zeros(16), torch.zeros(1)
    with interpreter_bounds_check(races=True):
        blocks[(2,)](x_ptr=x, out_ptr=out, total_ptr=total, MODE=0, BLOCK=8)
        torch.testing.assert_close(total, x.sum().reshape(1))
        with pytest.raises(Exception, match="blocks: race: program .* stores to an element that program .* also "
                                            "stores to .in total_ptr"):
            blocks[(2,)](x_ptr=x, out_ptr=out, total_ptr=total, MODE=1, BLOCK=8)
        with pytest.raises(Exception, match="blocks: race: program .* (loads an element that program .* stores to|"
                                            "stores to an element that program .* loads)"):
            blocks[(2,)](x_ptr=x, out_ptr=out, total_ptr=total, MODE=2, BLOCK=8)
