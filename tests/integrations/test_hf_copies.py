"""Patched transformers models survive ``copy.deepcopy`` (the copy is independent and runs its own weights) and
whole-module ``pickle`` / ``torch.save`` wherever the unpatched model does."""
import copy
import io
import pickle

import pytest
import torch

pytest.importorskip("transformers")

from vlmkern.integrations import hf  # noqa: E402
from vlmkern.integrations.hf import tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")   # transformers' deprecation chatter


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _bump_bias(module) -> None:
    """Add 1 to the first bias inside ``module`` (a swapped-in projector / Q-Former / patch embedding)."""
    name, bias = next((n, p) for n, p in module.named_parameters() if n.endswith("bias"))
    with torch.no_grad():
        bias.add_(1.0)


def test_deepcopy_of_patched_llava_next_runs_its_own_projector():
    model, inputs = tiny.tiny_llava_next()
    hf.apply(model)
    ref = _logits(model, inputs)
    clone = copy.deepcopy(model)
    assert clone.model.get_image_features.model is clone.model            # hooks follow the copy
    assert torch.equal(_logits(clone, inputs), ref)
    with torch.no_grad():
        clone.model.multi_modal_projector.linear_2.bias.add_(1.0)
    assert not torch.equal(_logits(clone, inputs), ref)                   # the copy's own projector ran
    assert torch.equal(_logits(model, inputs), ref)                       # the original's is untouched


@pytest.mark.parametrize("family", list(tiny.BUILDERS))
def test_deepcopy_of_every_patched_family_is_independent(family):
    model, inputs = tiny.BUILDERS[family]()
    (swapped,) = hf.apply(model)
    ref = _logits(model, inputs)
    clone = copy.deepcopy(model)
    _bump_bias(clone.get_submodule(swapped.qualified_name))
    assert not torch.equal(_logits(clone, inputs), ref)
    assert torch.equal(_logits(model, inputs), ref)


def _round_trips(model) -> list:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return [pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)]


@pytest.mark.parametrize("family", list(tiny.BUILDERS))
def test_pickle_and_torch_save_of_whole_patched_model(family):
    model, inputs = tiny.BUILDERS[family]()
    try:
        pickle.dumps(model)
    except Exception as exc:  # pragma: no cover - depends on the transformers version
        pytest.skip(f"the unpatched {family} model does not pickle either: {exc}")
    hf.apply(model)
    # before any forward: some transformers models install local-function output hooks on their first one
    loaded = _round_trips(model)
    ref = _logits(model, inputs)
    for other in loaded:
        assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
        assert torch.equal(_logits(other, inputs), ref)
