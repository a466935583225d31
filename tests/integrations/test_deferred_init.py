"""Deferred initialisation of patched models: built on the meta device, patched, then materialised with
``to_empty()`` + transformers' ``init_weights()`` (as transformers' own deferred init does), a model gives the
unpatched model's outputs once the same weights are loaded: nothing vlmkern adds stays uninitialised."""

import pytest
import torch

pytest.importorskip("transformers")

from vlmkern.integrations import hf  # noqa: E402
from vlmkern.integrations.hf import tiny  # noqa: E402
from vlmkern.nn.qformer import QFormerTextEmbeddings  # noqa: E402
from vlmkern.testing import assert_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")   # transformers' deprecation chatter


def _materialise(model):
    model.to_empty(device="cpu")
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.data.fill_(float("nan"))   # what to_empty leaves is arbitrary: make any missed init loud
        else:
            t.data.fill_(-(2 ** 31) if t.dtype == torch.int64 else 0)
    model.init_weights()
    return model


@pytest.mark.parametrize("family", list(tiny.BUILDERS))
def test_meta_built_patched_model_materialises_like_the_unpatched_one(family):
    ref, inputs = tiny.BUILDERS[family]()
    with torch.device("meta"):
        model = type(ref)(ref.config)
    assert hf.apply(model), "nothing was patched on the meta model"
    _materialise(model).eval()
    # Persistent state comes from the checkpoint; non-persistent buffers must have been recomputed.
    model.load_state_dict(ref.state_dict(), strict=True)
    for name, buf in model.named_buffers():
        assert torch.isfinite(buf.float()).all(), name
    with torch.no_grad():
        want = ref(**inputs).logits
        got = model(**inputs).logits
    assert_close(got, want, want, name=f"{family} deferred-init logits")


def test_qformer_text_positions_survive_to_empty():
    ref, _ = tiny.tiny_instructblip()
    with torch.device("meta"):
        model = type(ref)(ref.config)
    hf.apply(model)
    _materialise(model)
    emb = model.qformer.embeddings
    assert isinstance(emb, QFormerTextEmbeddings)
    n = ref.config.qformer_config.max_position_embeddings
    assert torch.equal(emb.position_ids, torch.arange(n)[None])
    assert torch.equal(emb.position_ids, ref.qformer.embeddings.position_ids)
