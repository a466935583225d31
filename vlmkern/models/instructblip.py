"""InstructBLIP instruction-aware Q-Former: drop-in for ``transformers.InstructBlipQFormerModel``.

Same config class (``transformers.InstructBlipQFormerConfig``), state-dict keys, forward arguments and outputs.
The instruction is embedded here (``embeddings``: word + position embeddings, LayerNorm over
``[queries ; instruction]``), then one bidirectional pass with key padding on the instruction: queries
cross-attend the image (even layers) and use the query FFN, instruction tokens the text FFN. Differences from
transformers are those listed in :mod:`vlmkern.models.blip2`; in addition ``encoder_hidden_states`` is cast to
the model's dtype (transformers would fail on a dtype mismatch).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vlmkern.models.blip2 import QFormerModelBase, check_ids
from vlmkern.nn.qformer import QFormerEncoder, QFormerTextEmbeddings
from vlmkern.ops.checks import FLOATS, check_tensor

_ID_DTYPES = (torch.int64, torch.int32)


class InstructBlipQFormerModel(QFormerModelBase):
    """Drop-in for ``transformers.InstructBlipQFormerModel(config)``: ``embeddings`` + ``encoder``."""

    _transformers_class = "transformers:InstructBlipQFormerModel"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = QFormerTextEmbeddings(config)
        self.encoder = QFormerEncoder(config, text_ffn=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value) -> None:
        self.embeddings.word_embeddings = value

    def forward(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, query_embeds: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                *, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool | int | list[int]] = None,
                return_dict: Optional[bool] = None, encoder_batch_index: Optional[Tensor] = None, **kwargs):
        """Q-Former over ``[query_embeds ; embed(input_ids)]``.

        Args:
            input_ids: instruction tokens ``(B, T)`` or ``None`` (queries only).
            attention_mask: ``(B, Q + T)``: 1 for the queries and real instruction tokens, 0 = padding.
            position_ids: ``(B or 1, T)``, default ``0 .. T-1`` (queries get no position embedding).
            query_embeds: learned queries ``(B, Q, D)`` (``Q = 32``), or ``None`` (text only).
            encoder_hidden_states, encoder_attention_mask, encoder_batch_index: as in
                :meth:`vlmkern.models.blip2.Blip2QFormerModel.forward`.

        Returns:
            ``BaseModelOutputWithPoolingAndCrossAttentions`` (``last_hidden_state (B, Q + T, D)``; the LLM
            takes ``[:, :Q]``), or a tuple with ``return_dict=False``.
        """
        if input_ids is None and query_embeds is None:
            raise ValueError("You have to specify query_embeds when input_ids is None")
        if input_ids is not None:
            check_tensor(input_ids, "input_ids", ndim=2, dtypes=_ID_DTYPES, shape_doc="(batch, text_length)")
            check_ids(input_ids, "input_ids", self.config.vocab_size, "config.vocab_size")
        if position_ids is not None:
            check_tensor(position_ids, "position_ids", ndim=2, dtypes=_ID_DTYPES, shape_doc="(batch or 1, text_length)")
            check_ids(position_ids, "position_ids", self.config.max_position_embeddings,
                       "config.max_position_embeddings")
        if query_embeds is not None:
            check_tensor(query_embeds, "query_embeds", ndim=3, dtypes=FLOATS, shape_doc="(batch, queries, hidden)")
            if query_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"query_embeds must have hidden_size={self.config.hidden_size} features, got "
                                 f"{query_embeds.shape[-1]}")
            if input_ids is not None and query_embeds.shape[0] != input_ids.shape[0]:
                raise ValueError(f"query_embeds has batch {query_embeds.shape[0]} but input_ids has batch "
                                 f"{input_ids.shape[0]}")
        query_length = query_embeds.shape[1] if query_embeds is not None else 0
        embedding_output = self.embeddings(input_ids=input_ids, position_ids=position_ids, query_embeds=query_embeds)
        return self._run(embedding_output, query_length, attention_mask, encoder_hidden_states,
                         encoder_attention_mask, encoder_batch_index, output_attentions, output_hidden_states,
                         return_dict, kwargs)


__all__ = ["InstructBlipQFormerModel"]
