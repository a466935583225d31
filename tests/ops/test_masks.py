"""vlmkern.masks: the one definition of the Q-Former modes and visibility rule, and the masks built from it
(the oracle's, the PyTorch backend's) against the rule evaluated on python ints."""
import pytest
import torch

from vlmkern.masks import QFormerMode, qformer_visible
from vlmkern.ops.attention import _torch as attn_torch
from vlmkern.reference import attention as ref_attention

NAMES = ("bidirectional", "unimodal", "multimodal_causal")


def test_parse_accepts_names_and_members_only():
    for value, name in enumerate(NAMES):
        assert QFormerMode.parse(name) is QFormerMode(value)
        assert QFormerMode.parse(QFormerMode(value)) is QFormerMode(value)
    for bad in ("causal", "BIDIRECTIONAL", 1, None):
        with pytest.raises(ValueError, match="mode must be one of"):
            QFormerMode.parse(bad)


def test_rule_by_hand():
    """3 queries + 3 text: query row 1, text rows 4 (second text token)."""
    assert all(qformer_visible("bidirectional", 3, r, j) for r in range(6) for j in range(6))
    assert [qformer_visible("unimodal", 3, 1, j) for j in range(6)] == [True] * 3 + [False] * 3
    assert [qformer_visible("unimodal", 3, 4, j) for j in range(6)] == [False] * 3 + [True] * 3
    assert [qformer_visible("multimodal_causal", 3, 1, j) for j in range(6)] == [True] * 3 + [False] * 3
    assert [qformer_visible("multimodal_causal", 3, 4, j) for j in range(6)] == [True] * 5 + [False]


def _rule(mode, nq, rows, L, text_mask):
    """The rule and the key padding on python ints: ``(B, 1, len(rows), L)`` bool."""
    B = text_mask.shape[0]
    flat = [qformer_visible(mode, nq, r, j) and (j < nq or bool(text_mask[b, j - nq]))
            for b in range(B) for r in rows for j in range(L)]
    return torch.tensor(flat, dtype=torch.bool).reshape(B, 1, len(rows), L)


@pytest.mark.parametrize("mode", NAMES)
@pytest.mark.parametrize("nq,T", [(4, 5), (0, 6), (5, 0)])
@pytest.mark.parametrize("text_rows_only", [False, True])
def test_masks_follow_the_rule(mode, nq, T, text_rows_only):
    """Broadcasting tensors give what python ints give; the oracle's and the PyTorch backend's masks (in
    their broadcast shapes, with and without key padding) are the rule."""
    L = nq + T
    text_mask = torch.rand(3, T) < 0.6
    rows = range(L - T, L) if text_rows_only else range(L)
    pos = torch.arange(rows.start, rows.stop)[:, None]
    keys = torch.arange(L)[None, :]
    want = _rule(mode, nq, rows, L, text_mask)
    ones = torch.ones_like(text_mask)
    assert torch.equal(qformer_visible(mode, nq, pos, keys).expand(len(rows), L), _rule(mode, nq, rows, L, ones)[0, 0])
    for tm, expected in ((text_mask, want), (None, _rule(mode, nq, rows, L, ones))):
        oracle = ref_attention.qformer_mask_broadcast(nq, mode, tm, q_len=len(rows), k_len=L)
        ours = attn_torch.visibility(len(rows), L, tm, nq, QFormerMode.parse(mode), "cpu")
        for m in (oracle, ours):
            assert m.dim() == 4 and torch.equal(m.expand(3, 1, len(rows), L), expected)
