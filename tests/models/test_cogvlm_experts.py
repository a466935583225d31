"""vlmkern.models.cogvlm visual-expert MLP / attention vs the faithful ports of HF ``modeling_cogvlm.py``
(:mod:`vlmkern.reference.originals.cogvlm`)."""
from types import SimpleNamespace

import pytest
import torch

from vlmkern.models.cogvlm import VisionExpertAttention, VisionExpertMLP
from vlmkern.ops.routed_linear import expert_linear
from vlmkern.reference.originals import cogvlm as original
from vlmkern.testing import assert_close, assert_no_host_sync

CONFIG = original.tiny_config()


def _pair(cls, orig_cls, dtype, device):
    orig = orig_cls(CONFIG).to(device)
    ours = cls(CONFIG).to(device)
    ours.load_state_dict(orig.state_dict(), strict=True)
    exact = orig_cls(CONFIG).to(device).double()
    exact.load_state_dict(orig.state_dict(), strict=True)
    return ours.to(dtype), orig.to(dtype), exact


def _grads(module, x, grad, *args, **kw):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x, *args, **kw)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(grad.to(y.dtype))
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}, out


def _compare(ours, base, exact, dtype):
    assert_close(ours[0], base[0], exact[0], name="y")
    assert_close(ours[1], base[1], exact[1], kind="grad", dtype=dtype, name="dx")
    assert set(ours[2]) == set(exact[2])
    for name in exact[2]:
        assert_close(ours[2][name], base[2][name], exact[2][name], kind="grad", dtype=dtype, name=f"d{name}")


def test_state_dict_keys_match_original():
    for cls, orig_cls in ((VisionExpertMLP, original.VisionExpertMLP),
                          (VisionExpertAttention, original.VisionExpertAttention)):
        ours, orig = cls(CONFIG), orig_cls(CONFIG)
        assert set(ours.state_dict()) == set(orig.state_dict())
        orig.load_state_dict(ours.state_dict(), strict=True)
    assert {"language_mlp.gate_proj.weight", "vision_mlp.down_proj.weight"} <= set(VisionExpertMLP(CONFIG).state_dict())


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_matches_original(backend, device, dtype):
    ours, orig, exact = _pair(VisionExpertMLP, original.VisionExpertMLP, dtype, device)
    types, _, _ = original.example_inputs(device)
    x = torch.randn(2, 29, 64, device=device)
    grad = torch.randn(2, 29, 64, device=device)
    _compare(_grads(ours, x.to(dtype), grad, types), _grads(orig, x.to(dtype), grad, types),
             _grads(exact, x.double(), grad, types), dtype)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_original(backend, device, dtype):
    ours, orig, exact = _pair(VisionExpertAttention, original.VisionExpertAttention, dtype, device)
    types, pos, mask = original.example_inputs(device)
    assert pos[0, :22].tolist() == [0, 1] + [2] * 17 + [3, 4, 5]  # boi, 17 patches (one position), eoi
    x = torch.randn(2, 29, 64, device=device)
    grad = torch.randn(2, 29, 64, device=device)
    o = _grads(ours, x.to(dtype), grad, types, pos, mask.to(dtype))
    assert o[3][1] is None and o[3][2] is None
    _compare(o, _grads(orig, x.to(dtype), grad, types, pos, mask.to(dtype)),
             _grads(exact, x.double(), grad, types, pos, mask.double()), dtype)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_attention_without_mask_and_with_weights(backend, device):
    ours, orig, exact = _pair(VisionExpertAttention, original.VisionExpertAttention, torch.float32, device)
    types, pos, _ = original.example_inputs(device, B=1, L=9, n_vis=(5,))
    x = torch.randn(1, 9, 64, device=device)
    with torch.no_grad():
        y, w, _ = ours(x, types, pos, None, output_attentions=True)
        yo, wo, _ = orig(x, types, pos, None, output_attentions=True)
    torch.testing.assert_close(y, yo, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w, wo, rtol=1e-4, atol=1e-6)
    with pytest.raises(NotImplementedError, match="past_key_value"):
        ours(x, types, pos, None, past_key_value=object())


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_all_language_tokens_decode_like(backend, device):
    # A single token (q_len = 1) or an all-text sequence takes the language expert everywhere.
    ours, orig, _ = _pair(VisionExpertMLP, original.VisionExpertMLP, torch.float32, device)
    for L in (1, 6):
        types = torch.zeros(2, L, dtype=torch.long, device=device)
        if L == 1:
            types[:] = 1   # even a vision-type token uses the language expert in the last position
        x = torch.randn(2, L, 64, device=device)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, types), orig(x, types), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    ours = VisionExpertMLP(CONFIG).to(device)
    types, _, _ = original.example_inputs(device)
    x = torch.randn(2, 29, 64, device=device)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    compiled(x, types).sum().backward()
    g = ours.vision_mlp.up_proj.weight.grad.clone()
    ours.zero_grad()
    ours(x, types).sum().backward()
    torch.testing.assert_close(g, ours.vision_mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-5)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="hidden_act"):
        VisionExpertMLP(SimpleNamespace(hidden_size=8, intermediate_size=8, num_attention_heads=2,
                                        hidden_act="not_an_act"))
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        VisionExpertAttention(SimpleNamespace(hidden_size=10, intermediate_size=8, num_attention_heads=4))
    mlp = VisionExpertMLP(CONFIG)
    with pytest.raises(ValueError, match="token_type_ids must be 2-D"):
        mlp(torch.randn(2, 5, 64), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_type_ids must have shape \(batch, tokens\) = \(2, 5\)"):
        mlp(torch.randn(2, 5, 64), torch.zeros(2, 6, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_cuda_no_host_sync_mlp_and_attention(backend):
    cfg = SimpleNamespace(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    mlp = VisionExpertMLP(cfg).cuda().bfloat16()
    attn = VisionExpertAttention(cfg).cuda().bfloat16()
    types, pos, mask = original.example_inputs("cuda", B=2, L=300, n_vis=(258, 100))
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        y = mlp(attn(x, types, pos, mask.bfloat16())[0], types)
        y.float().square().mean().backward()

    assert_no_host_sync(step)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_adapted_expert_layers_are_called_as_the_original_calls_them(backend, device):
    """A PEFT-style adapter on an expert Linear (QKV, dense, MLP): the layer is called on its own tokens, so the
    output and the adapter's gradients are the original's (reading its weight would drop the adapter)."""
    from vlmkern.testing import adapt_
    types, pos, mask = original.example_inputs(device)
    x = torch.randn(2, 29, 64, device=device)
    for cls, orig_cls, paths, extra in (
            (VisionExpertMLP, original.VisionExpertMLP, ("vision_mlp.gate_proj", "language_mlp.down_proj"), ()),
            (VisionExpertAttention, original.VisionExpertAttention,
             ("vision_expert_query_key_value", "language_expert_dense"), (pos, mask))):
        ours, orig, _ = _pair(cls, orig_cls, torch.float32, device)
        runs = []
        for m in (ours, orig):
            adapters = [adapt_(m, p) for p in paths]
            out = m(x, types, *extra)
            y = out[0] if isinstance(out, tuple) else out
            y.square().mean().backward()
            runs.append((y.detach(), [a.lora_B.weight.grad for a in adapters]))
        (y, grads), (y_orig, grads_orig) = runs
        torch.testing.assert_close(y, y_orig, atol=1e-5, rtol=1e-5)
        for g, g_orig in zip(grads, grads_orig):
            torch.testing.assert_close(g, g_orig, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------ containers, activations, hooks
def _doubling_hook(module, args, out):
    return out * 2


def _mlp_pair(config=CONFIG):
    torch.manual_seed(0)
    orig = original.VisionExpertMLP(config)
    ours = VisionExpertMLP(config)
    ours.load_state_dict(orig.state_dict(), strict=True)
    return ours, orig


@pytest.mark.parametrize("name", ["language_mlp", "vision_mlp", "language_mlp.act_fn", "vision_mlp.act_fn"])
def test_hook_on_an_expert_container_or_activation_fires_and_acts_as_in_the_original(name):
    """A hook on an expert MLP container (or its activation) fires on that expert's tokens, as in the original,
    and an output-changing one changes the result the same way (the routed path skipped the containers)."""
    ours, orig = _mlp_pair()
    types, _, _ = original.example_inputs("cpu")
    x = torch.randn(2, 29, 64)
    calls = {}
    for key, m in (("orig", orig), ("ours", ours)):
        calls[key] = []
        m.get_submodule(name).register_forward_hook(lambda mod, a, out, c=calls[key]: c.append(tuple(a[0].shape)))
        m.get_submodule(name).register_forward_hook(_doubling_hook)
    with torch.no_grad():
        want, got = orig(x, types), ours(x, types)
    assert calls["ours"] == calls["orig"] and calls["orig"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_global_forward_hooks_fire_as_in_the_original():
    from torch.nn.modules.module import register_module_forward_hook
    ours, orig = _mlp_pair()
    types, _, _ = original.example_inputs("cpu")
    x = torch.randn(2, 29, 64)
    names = {}
    for key, m in (("orig", orig), ("ours", ours)):
        seen = []
        handle = register_module_forward_hook(lambda mod, a, out: seen.append(mod))
        try:
            with torch.no_grad():
                m(x, types)
        finally:
            handle.remove()
        names[key] = sorted(n for n, sub in m.named_modules() if any(s is sub for s in seen))
    assert names["ours"] == names["orig"]
    assert {"language_mlp", "vision_mlp", "vision_mlp.act_fn"} <= set(names["orig"])


def test_each_expert_applies_its_own_activation():
    """A replaced ``vision_mlp.act_fn`` acts on the vision tokens only, as in the original (before, the language
    expert's activation was applied to both)."""
    from torch import nn
    ours, orig = _mlp_pair()
    types, _, _ = original.example_inputs("cpu")
    x = torch.randn(2, 29, 64)
    for m in (orig, ours):
        m.vision_mlp.act_fn = nn.ReLU()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, types), orig(x, types), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hidden_act", ["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu"])
def test_activation_is_transformers_module_and_stays_routed(hidden_act, monkeypatch):
    """``act_fn`` is the original's ``ACT2FN[config.hidden_act]`` module (any ACT2FN name, in named_modules());
    the routed path (three ``expert_linear`` calls, no gather) is kept for two equal plain activations."""
    import vlmkern.models.cogvlm as cog
    from transformers.activations import ACT2FN
    config = SimpleNamespace(**{**vars(CONFIG), "hidden_act": hidden_act})
    ours, orig = _mlp_pair(config)
    for m in (ours, orig):
        assert type(m.language_mlp.act_fn) is type(ACT2FN[hidden_act])
        assert isinstance(m.vision_mlp.act_fn, torch.nn.Module)
    assert {n for n, _ in ours.named_modules()} == {n for n, _ in orig.named_modules()}
    routed = []
    monkeypatch.setattr(cog, "expert_linear", lambda *a, **k: routed.append(1) or expert_linear(*a, **k))
    types, _, _ = original.example_inputs("cpu")
    x = torch.randn(2, 29, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, types), orig(x, types), atol=1e-5, rtol=1e-5)
    assert len(routed) == 3


def test_activation_fallback_without_transformers(monkeypatch):
    """Without transformers the local table gives modules for the names CogVLM uses; other names are refused."""
    import sys
    monkeypatch.setitem(sys.modules, "transformers.activations", None)   # import raises ImportError
    m = VisionExpertMLP(CONFIG)
    assert type(m.language_mlp.act_fn) is torch.nn.SiLU and m._routable()
    with pytest.raises(ValueError, match="config.hidden_act must be one of"):
        VisionExpertMLP(SimpleNamespace(**{**vars(CONFIG), "hidden_act": "gelu_new"}))


def test_mlp_construction_matches_the_original():
    """The original ``MLP`` keeps ``hidden_size``, ``intermediate_size`` and an ``act_fn`` module; the port and the
    drop-in both do (same module names, same attribute values, same activation type)."""
    ours, orig = _mlp_pair()
    for name in ("language_mlp", "vision_mlp"):
        o, m = orig.get_submodule(name), ours.get_submodule(name)
        assert (o.hidden_size, o.intermediate_size) == (CONFIG.hidden_size, CONFIG.intermediate_size)
        assert (m.hidden_size, m.intermediate_size) == (o.hidden_size, o.intermediate_size)
        assert isinstance(o.act_fn, torch.nn.Module) and type(m.act_fn) is type(o.act_fn)
    assert {n for n, _ in ours.named_modules()} == {n for n, _ in orig.named_modules()}
