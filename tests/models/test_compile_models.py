"""Every vlmkern model part compiles as one graph: ``torch._dynamo.explain`` finds zero graph breaks in the
forward, and ``torch.compile(fullgraph=True, backend="aot_eager")`` runs forward + backward with the eager
result. CPU (reference backend); the GPU path is the same custom ops with another kernel behind them."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlmkern.models import cogagent, cogvlm, internlm_xcomposer2, internlm_xcomposer2_hd, llava_next, mini_gemini
from vlmkern.models import fuyu, qwen_vl
from vlmkern.nn import MLPProjector, PatchEmbedLinear, PLoRA

QFORMER = SimpleNamespace(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          layer_norm_eps=1e-12, cross_attention_frequency=2, encoder_hidden_size=24,
                          initializer_range=0.02, max_position_embeddings=32, pad_token_id=0, vocab_size=64,
                          use_qformer_text_input=True)
COGVLM = SimpleNamespace(hidden_size=64, intermediate_size=96, num_attention_heads=4, hidden_act="silu",
                         max_position_embeddings=2048)
COGAGENT = SimpleNamespace(hidden_size=64, cross_hidden_size=64, cross_compute_hidden_size=64, num_attention_heads=2,
                           max_position_embeddings=2048)
INTERNLM2 = SimpleNamespace(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                            rms_norm_eps=1e-6, bias=False, hidden_act="silu", rope_theta=10000,
                            max_position_embeddings=128)


def _causal(B, L):
    return torch.full((L, L), torch.finfo(torch.float32).min).triu(1)[None, None].expand(B, 1, L, L)


def _blip2():
    from vlmkern.models.blip2 import Blip2QFormerModel
    m = Blip2QFormerModel(QFORMER)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, -2:] = 0
    return m, (torch.randn(2, 11, 32),), dict(query_length=8, attention_mask=mask,
                                              encoder_hidden_states=torch.randn(2, 17, 24))


def _instructblip():
    from vlmkern.models.instructblip import InstructBlipQFormerModel
    m = InstructBlipQFormerModel(QFORMER)
    mask = torch.ones(2, 8 + 5, dtype=torch.long)
    mask[0, -1:] = 0
    return m, (torch.randint(0, 64, (2, 5)),), dict(attention_mask=mask, query_embeds=torch.randn(2, 8, 32),
                                                    encoder_hidden_states=torch.randn(2, 17, 24))


def _cogvlm_attention():
    types = torch.zeros(2, 13, dtype=torch.long)
    types[:, 1:8] = 1
    pos = torch.arange(13)[None].expand(2, -1)
    return cogvlm.VisionExpertAttention(COGVLM), (torch.randn(2, 13, 64), types, pos), dict(
        attention_mask=_causal(2, 13))


def _internlm2_layer():
    im = torch.zeros(2, 12, dtype=torch.bool)
    im[:, 2:9] = True
    layer = internlm_xcomposer2.InternLM2DecoderLayer(INTERNLM2, lora_r=8, lora_alpha=8, lora_dropout=0.0)
    return layer, (torch.randn(2, 12, 32), _causal(2, 12), torch.arange(12)[None].expand(2, -1)), dict(im_mask=im)


class _ForwardImages(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = PatchEmbedLinear(3 * 14 * 14, 32)

    def forward(self, pixels):
        return self.inner.forward_images(pixels, patch_size=14)


def _llava_next():
    pins, tile, patch = [[28, 56], [56, 28], [56, 56]], 28, 14
    packer = llava_next.LlavaNextImagePacker(24, 32, pins, tile, patch)
    sizes = [(40, 50), (30, 20)]
    n = sum(llava_next.num_tiles(s, pins, tile) for s in sizes)
    return packer, (torch.randn(n, 4, 24), sizes), {}


def _xcomposer_hd():
    packer = internlm_xcomposer2_hd.InternLMXComposer2HDImagePacker(vit_hidden_size=8, hidden_size=32)
    grids = [(1, 2)]
    side = 4   # tokens per view side before the 2x2 merge
    n_views = 1 + 1 * 2
    return packer, (torch.randn(n_views, side * side, 8), grids), {}


PARTS = {
    "MLPProjector": lambda: (MLPProjector(24, 32, 32), (torch.randn(2, 9, 24),), {}),
    "PatchEmbedLinear": lambda: (PatchEmbedLinear(2700, 32), (torch.randn(2, 5, 2700),), {}),
    "PatchEmbedLinear.forward_images": lambda: (_ForwardImages(), (torch.randint(0, 256, (2, 3, 40, 30)).float(),),
                                                {}),
    "PLoRA": lambda: (PLoRA(32, 48, lora_r=8, lora_dropout=0.0), (torch.randn(2, 9, 32),),
                      dict(im_mask=torch.arange(9).expand(2, -1) < 4)),
    "Blip2QFormerModel": _blip2,
    "InstructBlipQFormerModel": _instructblip,
    "qwen_vl.Resampler": lambda: (qwen_vl.Resampler(4, 32, 4, 24), (torch.randn(2, 36, 24),), {}),
    "cogvlm.VisionExpertMLP": lambda: (cogvlm.VisionExpertMLP(COGVLM), (
        torch.randn(2, 13, 64), (torch.arange(13) % 3 == 0).long().expand(2, -1)), {}),
    "cogvlm.VisionExpertAttention": _cogvlm_attention,
    "cogagent.CrossAttention": lambda: (cogagent.CrossAttention(COGAGENT), (torch.randn(2, 7, 64),
                                                                             torch.randn(2, 33, 64)), {}),
    "mini_gemini.PatchInfoMining": lambda: (mini_gemini.PatchInfoMining(32, 24), (
        torch.randn(2, 16, 32), torch.randn(2, 24, 16, 16)), {}),
    "internlm_xcomposer2.InternLM2DecoderLayer": _internlm2_layer,
    "llava_next.LlavaNextImagePacker": _llava_next,
    "internlm_xcomposer2_hd.InternLMXComposer2HDImagePacker": _xcomposer_hd,
    "fuyu.FuyuImageEmbedder": lambda: (fuyu.FuyuImageEmbedder(32, max_size=None), (
        torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8),), {}),
}


# Known breaks in parts owned elsewhere: strict xfail, so the test fails (and must be un-marked) once fixed.
XFAIL: dict[str, str] = {}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.xfail(reason=XFAIL[n], strict=True)) if n in XFAIL else n
            for n in names]


def _tensors(out):
    """Every floating tensor in a (nested) output."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", _params(PARTS))
def test_forward_has_no_graph_break(name):
    module, args, kwargs = PARTS[name]()
    explanation = torch._dynamo.explain(module)(*args, **kwargs)
    assert explanation.graph_break_count == 0, (name, [str(b.reason) for b in explanation.break_reasons])
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", _params(PARTS))
def test_fullgraph_forward_backward(name):
    module, args, kwargs = PARTS[name]()
    params = [p for p in module.parameters() if p.requires_grad]
    eager = _tensors(module(*args, **kwargs))
    torch.manual_seed(0)
    weights = [torch.randn_like(t) for t in eager]
    ref = torch.autograd.grad(sum((t * w).sum() for t, w in zip(eager, weights)), params, allow_unused=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = _tensors(compiled(*args, **kwargs))
    assert len(out) == len(eager)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(sum((t * w).sum() for t, w in zip(out, weights)), params, allow_unused=True)
    for (n, _), g, r in zip(module.named_parameters(), got, ref):
        if r is None:
            assert g is None or not g.any(), n
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} grad {n}: {m}")


@pytest.mark.parametrize("name", _params(PARTS))
def test_dynamic_fullgraph_forward(name):
    """``dynamic=True`` makes every size and float default symbolic, as ``torch.compile``'s default does for a
    size that changed between calls (a new image resolution): the checks must trace them in one graph."""
    module, args, kwargs = PARTS[name]()
    eager = _tensors(module(*args, **kwargs))
    out = _tensors(torch.compile(module, dynamic=True, fullgraph=True, backend="aot_eager")(*args, **kwargs))
    assert len(out) == len(eager)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_new_resolution_recompiles_in_one_graph():
    """The resampler's second resolution under ``fullgraph=True`` (the default ``dynamic=None`` marks the token
    count dynamic on the second size)."""
    module = qwen_vl.Resampler(4, 32, 4, 24)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for L in (36, 64, 100):
        x = torch.randn(2, L, 24)
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", _params(PARTS))
def test_torch_export_gives_the_eager_result(name):
    """Exported first, so that every cache a part keeps is first reached inside the trace (with fake tensors):
    the eager calls after it must neither get those fakes nor see a different result."""
    from vlmkern.models import internlm_xcomposer2_hd as hd, llava_next as nxt
    for cache in (hd._plan, hd._batch_index, nxt._plan, nxt._batch_index):
        cache.cache_clear()
    module, args, kwargs = PARTS[name]()
    module.eval()
    exported = torch.export.export(module, args, kwargs).module()
    out, eager = _tensors(exported(*args, **kwargs)), _tensors(module(*args, **kwargs))
    assert len(out) == len(eager)
    for a, b in zip(out, eager):
        assert not isinstance(b, torch._subclasses.FakeTensor)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_qformer_exports_in_a_process_that_never_imported_transformers_outputs():
    """transformers registers its output classes as pytree nodes on import; an import first made inside the
    export trace came too late for the export to flatten the output (the model imports it when built)."""
    import subprocess
    import sys
    code = (
        "import sys, torch\n"
        "from types import SimpleNamespace\n"
        "from vlmkern.models.blip2 import Blip2QFormerModel\n"
        "assert 'transformers.modeling_outputs' not in sys.modules\n"
        f"m = Blip2QFormerModel(SimpleNamespace(**{vars(QFORMER)!r})).eval()\n"
        "x, enc = torch.randn(2, 8, 32), torch.randn(2, 17, 24)\n"
        "kw = dict(query_length=8, encoder_hidden_states=enc)\n"
        "out = torch.export.export(m, (x,), kw).module()(x, **kw).last_hidden_state\n"
        "torch.testing.assert_close(out, m(x, **kw).last_hidden_state)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", _params(PARTS))
def test_fake_tensor_mode_gives_the_eager_shapes(name):
    """Under FakeTensorMode (what shape inference and meta tools use) no part reads values: the eager-only paths
    (repeated-image detection, value checks, the CPU attention path's mask reads) step aside."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    module, args, kwargs = PARTS[name]()
    eager = _tensors(module(*args, **kwargs))
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = _tensors(module(*args, **kwargs))
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in eager]


def test_qformer_functorch_grad_with_repeated_frozen_images():
    """torch.func.grad through a batch whose frozen images repeat (the eager path's repeated-image detection
    reads values, which a functorch transform does not have) gives autograd's gradient."""
    module, args, kwargs = _blip2()
    images = kwargs["encoder_hidden_states"]
    kwargs = dict(kwargs, encoder_hidden_states=images[:1].expand_as(images).contiguous())
    x = args[0]
    got = torch.func.grad(lambda q: module(q, **kwargs).last_hidden_state.square().sum())(x)
    leaf = x.clone().requires_grad_(True)
    module(leaf, **kwargs).last_hidden_state.square().sum().backward()
    torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-6)


def test_jit_trace_over_weights_that_require_grad_raises_torchs_error():
    """torch's own refusal (a tensor requiring grad as a trace constant), not a crash: once_per_key used to catch
    the tracer's error and run the check again on the broken trace (the process died)."""
    import subprocess
    import sys
    code = ("import torch\nfrom vlmkern import ops\n"
            "w = torch.randn(6, 8, requires_grad=True)\n"
            "try:\n    torch.jit.trace(lambda x: ops.linear_gelu(x, w), (torch.randn(4, 8),))\n"
            "except RuntimeError as e:\n    assert 'requires grad' in str(e), e\n    print('refused')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "refused" in done.stdout, (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("name", ["llava_next.LlavaNextImagePacker",
                                  "internlm_xcomposer2_hd.InternLMXComposer2HDImagePacker"])
def test_packers_run_under_flop_counter_with_the_same_result(name):
    """FlopCounterMode adds global module hooks: the packers then call their projector (the hooks run) instead of
    refusing it, with the fused path's result."""
    from torch.utils.flop_counter import FlopCounterMode
    module, args, kwargs = PARTS[name]()
    eager = _tensors(module(*args, **kwargs))
    with FlopCounterMode(display=False) as counter:
        hooked = _tensors(module(*args, **kwargs))
    assert counter.get_total_flops() > 0
    for a, b in zip(hooked, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
