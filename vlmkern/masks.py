"""The Q-Former attention masks, defined once: the modes and the visibility rule.

BLIP-2's Q-Former (LAVIS ``blip2_qformer.py``) runs self-attention over ``[num_query learned queries ; text]``
with one of three masks, one per training objective. The oracle (``vlmkern.reference.attention``), the
production PyTorch backend (``vlmkern.ops.attention._torch``), the Triton kernels' ``_visible``
(``vlmkern.kernels.attention``, Triton code implementing :func:`qformer_visible`) and the benchmarks'
FlexAttention ``mask_mod`` all take the rule from here. Neutral and low-level: imports nothing of vlmkern.
"""
from __future__ import annotations

import enum


class QFormerMode(enum.IntEnum):
    """The Q-Former mask of each objective; the value is what the custom op's schema and the kernels' ``MODE``
    constexpr take."""

    BIDIRECTIONAL = 0       # ITM, InstructBLIP: every row sees every key
    UNIMODAL = 1            # ITC in one pass: queries see queries, text sees text
    MULTIMODAL_CAUSAL = 2   # ITG: queries see queries, text row t sees every query and the text keys <= t

    @classmethod
    def parse(cls, mode) -> "QFormerMode":
        """``mode`` as a :class:`QFormerMode`: the enum itself or its lower-case name (``"unimodal"``)."""
        if isinstance(mode, cls):
            return mode
        if isinstance(mode, str) and mode in _BY_NAME:
            return _BY_NAME[mode]
        raise ValueError(f"mode must be one of {tuple(_BY_NAME)} or a QFormerMode, got {mode!r}")


_BY_NAME = {m.name.lower(): m for m in QFormerMode}


def qformer_visible(mode, num_query, row, key):
    """Whether sequence position ``row`` attends to position ``key`` under ``mode`` (before key padding).

    ``row`` and ``key`` are positions in ``[num_query queries ; text]`` (a row's position, not its index in
    ``q`` when ``q`` holds only the text rows): python ints, giving a bool, or broadcasting integer tensors,
    giving a bool tensor of their broadcast shape (``BIDIRECTIONAL`` depends on ``key`` only and keeps
    ``key``'s shape). Padded text keys are excluded separately, for every mode.
    """
    mode = QFormerMode.parse(mode)
    if mode == QFormerMode.UNIMODAL:
        return (row < num_query) == (key < num_query)
    if mode == QFormerMode.MULTIMODAL_CAUSAL:
        return (key < num_query) | (key <= row)
    return key >= 0
