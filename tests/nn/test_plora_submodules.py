"""nn.PLoRA with hooked or wrapped adapter modules: ``Plora_A``, ``Plora_B`` and ``lora_dropout`` must act as in the
original ``build_mlp.PLoRA`` (which calls them on ``x[im_mask]``) whenever they are not plain, and the fused op
must still serve the plain case."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from vlmkern.nn.plora import PLoRA
from vlmkern.reference.originals.internlm_xcomposer2 import PLoRA as OriginalPLoRA
from vlmkern.testing import assert_same_run, run_module

IN, OUT, R = 24, 20, 4


def _pair(dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    ours = PLoRA(IN, OUT, lora_r=R, lora_alpha=8, lora_dropout=dropout)
    with torch.no_grad():  # B is random in the original too: make the adapter matter
        ours.Plora_B.weight.normal_(0, 0.3)
    orig = OriginalPLoRA(IN, OUT, lora_r=R, lora_alpha=8, lora_dropout=dropout)
    orig.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(dtype).eval(), orig.to(dtype).eval()


def _inputs(kind):
    x = torch.randn(2, 5, IN)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    return x, mask if kind == "some" else torch.zeros_like(mask)


class LoraWrapped(nn.Module):
    """A PEFT ``lora.Linear`` look-alike: a base layer plus a low-rank term; ``weight`` is the base layer's."""

    def __init__(self, base: nn.Linear, r: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, 0, 0.5)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


@pytest.mark.parametrize("kind", ["some", "none"])
@pytest.mark.parametrize("name", ["Plora_A", "Plora_B"])
def test_output_changing_hook_on_an_adapter_layer_acts_as_in_the_original(name, kind):
    ours, orig = _pair()
    x, mask = _inputs(kind)
    calls = {"ours": 0, "orig": 0}

    def doubling(key):
        def hook(module, args, out):
            calls[key] += 1
            return out * 2
        return hook

    getattr(ours, name).register_forward_hook(doubling("ours"))
    getattr(orig, name).register_forward_hook(doubling("orig"))
    assert_same_run(run_module(ours, x, mask), run_module(orig, x, mask))
    assert calls["ours"] == calls["orig"] == 1


@pytest.mark.parametrize("name", ["Plora_A", "Plora_B"])
def test_a_wrapped_adapter_layer_takes_effect_as_in_the_original(name):
    ours, orig = _pair()
    x, mask = _inputs("some")
    plain = ours(x, mask).detach()
    torch.manual_seed(1)
    wrapped = LoraWrapped(getattr(ours, name))
    setattr(ours, name, wrapped)
    setattr(orig, name, copy.deepcopy(wrapped))
    got = run_module(ours, x, mask)
    assert_same_run(got, run_module(orig, x, mask))
    assert not torch.allclose(got[0][mask], plain[mask])      # the wrapper's term is there
    torch.testing.assert_close(got[0][~mask], plain[~mask])   # text rows: the base linear only


def test_a_global_forward_hook_sees_the_adapter_calls_of_the_original():
    ours, orig = _pair()
    x, mask = _inputs("some")
    called = []
    handle = register_module_forward_hook(lambda m, a, o: called.append(m))
    try:
        y = ours(x, mask)
        ours_calls = [type(m).__name__ for m in called]
        called.clear()
        want = orig(x, mask)
        orig_calls = [type(m).__name__ for m in called]
    finally:
        handle.remove()
    torch.testing.assert_close(y, want)
    assert ours_calls.count("Linear") == orig_calls.count("Linear") == 2   # Plora_A and Plora_B


def test_a_replaced_dropout_module_is_called_on_the_image_rows_as_in_the_original():
    ours, orig = _pair(dropout=0.5)
    with torch.no_grad():
        ours.weight.normal_()
        orig.weight.copy_(ours.weight)
    for m in (ours, orig):
        m.lora_dropout = nn.AlphaDropout(0.5)
        m.train()
    x, mask = _inputs("some")
    torch.manual_seed(3)
    got = ours(x, mask)
    torch.manual_seed(3)
    want = orig(x, mask)
    torch.testing.assert_close(got, want)
    evaluated = ours.eval()(x, mask)
    assert (got[mask] - evaluated[mask]).abs().mean() > 1e-2     # the replaced dropout acts
    torch.testing.assert_close(got[~mask], evaluated[~mask])     # and on the adapter input only


def test_a_hook_on_the_dropout_module_fires():
    ours, orig = _pair(dropout=0.25)
    seen = []
    ours.lora_dropout.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    orig.lora_dropout.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    x, mask = _inputs("some")
    torch.testing.assert_close(ours(x, mask), orig(x, mask))    # eval: no dropout in either
    assert seen == [(4, IN), (4, IN)]                            # the gathered image rows, as the original


def test_module_path_keeps_the_mask_checks_and_the_flattened_mask():
    ours, orig = _pair()
    ours.Plora_A.register_forward_hook(lambda m, a, o: None)
    x, mask = _inputs("some")
    torch.testing.assert_close(ours(x, mask.reshape(-1)), orig(x, mask))
    with pytest.raises(ValueError, match="im_mask"):
        ours(x, mask.t().contiguous())
    with pytest.raises(TypeError, match="im_mask"):
        ours(x, mask.float())


def test_module_path_without_image_tokens_stays_finite_on_fp16_overflow():
    """The original adds ``adapter(x[:, :1]) * 0``, NaN when the adapter overflows in fp16; the fused op and the
    module path add exact zeros (the module path still calls the adapter there, as the original)."""
    ours, orig = _pair(dtype=torch.float16)
    with torch.no_grad():
        for m in (ours, orig):
            m.bias.zero_()
            m.weight.fill_(0.01)
            m.Plora_A.weight.fill_(100.0)
            m.Plora_B.weight.fill_(1.0)
    calls = []
    ours.Plora_B.register_forward_hook(lambda m, a, o: calls.append(1))
    x = torch.full((1, 6, IN), 30.0).half()
    mask = torch.zeros(1, 6, dtype=torch.bool)
    with torch.no_grad():
        assert torch.isnan(orig(x, mask)).any()
        y = ours(x, mask)
    assert calls == [1]
    assert torch.isfinite(y).all() and torch.equal(y, F.linear(x, ours.weight, ours.bias))


def test_plain_modules_take_the_fused_op(monkeypatch):
    ours, orig = _pair(dropout=0.1)
    x, mask = _inputs("some")
    handle = ours.Plora_A.register_forward_hook(lambda m, a, o: None)
    with torch.no_grad():
        hooked = ours(x, mask)
    handle.remove()

    def refuse(*args, **kwargs):
        raise AssertionError("the module path ran for plain modules")

    monkeypatch.setattr(PLoRA, "forward_modules", refuse)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask), orig(x, mask))
        torch.testing.assert_close(ours(x, mask), hooked)
    ours.lora_dropout = nn.Identity()
    with torch.no_grad():
        ours(x, mask)
    ours.lora_dropout = nn.AlphaDropout(0.1)
    with pytest.raises(AssertionError, match="module path"):
        ours(x, mask)
