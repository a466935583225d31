"""What a patched model does with what users attach to its modules: adapters (PEFT-style wrappers whose ``weight``
is their base layer's), hooks, per-module dropout. A fused op may stand in for a layer only when calling the layer
is exactly ``F.linear`` on its weights; anything else is called, so nothing attached is skipped silently."""
import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from vlmkern.integrations import hf  # noqa: E402
from vlmkern.integrations.hf import tiny  # noqa: E402
from vlmkern.models import llava_next  # noqa: E402
from vlmkern.nn import MLPProjector  # noqa: E402
from vlmkern.nn._linear import plain_linear  # noqa: E402
from vlmkern.testing import AdapterLinear, adapt_  # noqa: E402

# the layers a fused op reads by weight: the projectors' Linears, the Q-Formers' GELU intermediate
FUSED_LAYERS = {"llava": "model.multi_modal_projector.linear_1",
                "llava_next": "model.multi_modal_projector.linear_2",
                "blip2": "qformer.encoder.layer.0.intermediate_query.dense",
                "instructblip": "qformer.encoder.layer.0.intermediate.dense"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("family", ["llava", "blip2", "instructblip"])
def test_an_adapter_added_after_apply_runs_and_trains(family):
    model, inputs = tiny.BUILDERS[family]()
    patched = copy.deepcopy(model)
    hf.apply(patched)
    runs = {}
    for tag, m in (("original", model), ("patched", patched)):
        adapter = adapt_(m, FUSED_LAYERS[family])
        logits = m(**inputs).logits
        logits.float().square().mean().backward()
        runs[tag] = (logits.detach(), adapter.lora_B.weight.grad)
    (want, want_grad), (got, got_grad) = runs["original"], runs["patched"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_grad is not None
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FUSED_LAYERS))
def test_a_hook_registered_after_apply_fires_as_on_the_original(family):
    model, inputs = tiny.BUILDERS[family]()
    patched = copy.deepcopy(model)
    hf.apply(patched)
    fired = {}
    for tag, m in (("original", model), ("patched", patched)):
        calls = []
        handle = m.get_submodule(FUSED_LAYERS[family]).register_forward_hook(lambda mod, i, o: calls.append(o))
        with torch.no_grad():
            m(**inputs)
        handle.remove()
        fired[tag] = calls
    assert len(fired["patched"]) == len(fired["original"]) >= 1
    for a, b in zip(fired["patched"], fired["original"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_module_with_hooks_or_adapters_before_apply_is_left_with_a_reason():
    model, inputs = tiny.BUILDERS["blip2"]()
    handle = model.qformer.layernorm.register_forward_hook(lambda *a: None)
    (skip,) = hf.skipped(model)
    assert skip.qualified_name == "qformer" and "hooks are registered on 'layernorm'" in skip.reason
    assert hf.apply(model) == []
    handle.remove()
    adapt_(model, FUSED_LAYERS["blip2"])
    (skip,) = hf.skipped(model)
    assert "do not load into the drop-in" in skip.reason and "intermediate_query.dense" in skip.reason
    assert hf.apply(model) == []
    with torch.no_grad():
        model(**inputs)                        # the original still runs, untouched


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_attention_dropout_set_on_the_modules_carries_over(family):
    """transformers keeps the Q-Former's attention-probability dropout as a float per attention module; one set
    there (the config left alone) must hold after apply: here 0, so training-mode calls are deterministic."""
    model, inputs = tiny.BUILDERS[family]()
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.0
    assert model.config.qformer_config.attention_probs_dropout_prob > 0
    patched = copy.deepcopy(model)
    hf.apply(patched)
    probs = {m.attention_dropout for m in patched.qformer.modules() if hasattr(m, "attention_dropout")}
    assert probs == {0.0}
    with torch.no_grad():
        torch.testing.assert_close(patched(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_plain_linear_tells_what_a_fused_op_may_read():
    lin = nn.Linear(4, 4)
    assert plain_linear(lin)
    handle = lin.register_forward_pre_hook(lambda *a: None)
    assert not plain_linear(lin)
    handle.remove()
    assert plain_linear(lin) and not plain_linear(AdapterLinear(lin))

    class Quantised(nn.Linear):
        pass
    assert not plain_linear(Quantised(4, 4))
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)   # a global hook counts too
    try:
        assert not plain_linear(lin)
    finally:
        handle.remove()


def test_projector_with_a_wrapped_layer_is_called_or_refused():
    proj = MLPProjector(8, 16, 12)
    x = torch.randn(3, 8)
    adapter = AdapterLinear(proj.linear_1)
    want = proj.linear_2(nn.functional.gelu(adapter(x)))
    proj.linear_1 = adapter
    torch.testing.assert_close(proj(x), want)
    with pytest.raises(TypeError, match="plain nn.Linear without hooks"):
        llava_next.projector_parameters(proj)
