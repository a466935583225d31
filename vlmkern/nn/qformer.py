"""Q-Former layers (BLIP-2 / InstructBLIP; transformers ``blip_2``) on vlmkern ops, with transformers' module tree.

Module and parameter names are those of ``transformers``' ``Blip2QFormer*`` / ``InstructBlipQFormer*`` classes
(``attention.attention.{query,key,value}``, ``attention.output.{dense,LayerNorm}``, ``crossattention.*``,
``intermediate[_query].dense``, ``output[_query].{dense,LayerNorm}``), so a transformers state dict loads with
``strict=True``. What runs:

* self-attention: Q, K, V projections (their ``(B, L, H, d)`` outputs go to the kernel as strided views, no
  transpose copy), then ``vlmkern::qformer_attention`` over ``[queries ; text]`` in mode ``"bidirectional"``
  with the attention mask as key padding: no ``(B, 1, L, L)`` mask tensor;
* cross-attention (query rows of layers ``i % cross_attention_frequency == 0``): K/V projections of the image
  tokens, then ``vlmkern::cross_attention`` with ``encoder_attention_mask`` as key padding; each distinct
  image's K/V can be computed once (``encoder_batch_index``);
* FFN: ``vlmkern::linear_gelu`` (bias + exact GELU in the GEMM epilogue) for ``intermediate*``; queries use
  ``intermediate_query``/``output_query``, text rows ``intermediate``/``output``;
* post-LN residual blocks and dropouts: the same ``nn.LayerNorm`` / ``nn.Dropout`` modules as the original;
  attention-probability dropout (``attention_probs_dropout_prob``, 0.1 in BLIP-2 and InstructBLIP) runs inside
  the attention kernels in training mode, with their own counter-based keep mask (so a seed does not give
  transformers' mask, only the same distribution).

The original's attention (``eager_attention``: dense additive mask, softmax, probability dropout) runs instead
when the kernels cannot reproduce the call: attention weights requested or a 3-D/4-D attention mask.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlmkern import ops
from vlmkern.nn._linear import act2fn, plain_gelu, plain_linear
from vlmkern.ops.checks import check_tensor

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------- masks
@dataclass(frozen=True)
class AttentionMask:
    """What one attention may see.

    ``key_padding``: ``(B, Lk)`` bool, True = real key (what the kernels take). ``dense``: a mask the kernels
    cannot take, broadcastable to ``(B, H, Lq, Lk)``: bool (True = attend) or float (additive).
    """

    key_padding: Optional[Tensor] = None
    dense: Optional[Tensor] = None

    @staticmethod
    def from_hf(mask: Optional[Tensor], name: str, batch: int, q_len: int, k_len: int,
                device: torch.device) -> "AttentionMask":
        """Normalise a transformers-style mask argument.

        2-D ``(B, Lk)`` (or ``(1, Lk)``): 1 / nonzero = attend, 0 = padding (what the models pass).
        3-D ``(B, Lq, Lk)``: nonzero = attend (transformers v4 ``get_extended_attention_mask``).
        4-D ``(B, 1 or H, Lq, Lk)``: used as given, bool = attend or float additive (transformers v5 passes a
        prepared 4-D mask through unchanged).
        """
        if mask is None:
            return AttentionMask()
        check_tensor(mask, name, dtypes=_MASK_DTYPES)
        if mask.is_meta != (device.type == "meta"):
            raise ValueError(f"{name} is on {mask.device} but the model runs on {device}: a meta tensor has no "
                             f"values to move")
        mask = mask.to(device)
        if mask.dim() == 2:
            if mask.shape[1] != k_len or mask.shape[0] not in (batch, 1):
                raise ValueError(f"{name} must have shape (batch, {k_len}) = ({batch}, {k_len}) (1 = attend, "
                                 f"0 = padding), got {tuple(mask.shape)}")
            keep = mask if mask.dtype == torch.bool else mask != 0
            return AttentionMask(key_padding=keep.expand(batch, k_len))
        if mask.dim() == 3:
            mask = (mask if mask.dtype == torch.bool else mask != 0)[:, None]
        elif mask.dim() != 4:
            raise ValueError(f"{name} must be 2-D (batch, {k_len}), 3-D (batch, {q_len}, {k_len}) or 4-D "
                             f"(batch, 1, {q_len}, {k_len}), got shape {tuple(mask.shape)}")
        if mask.shape[-2:] != (q_len, k_len) or mask.shape[0] not in (batch, 1):
            raise ValueError(f"{name} must end in ({q_len}, {k_len}) with batch {batch} or 1, got shape "
                             f"{tuple(mask.shape)}")
        return AttentionMask(dense=mask)

    def expand_batch(self, batch: int) -> "AttentionMask":
        kp = self.key_padding
        return AttentionMask(None if kp is None else kp.expand(batch, kp.shape[1]), self.dense)

    def gather(self, index: Tensor) -> "AttentionMask":
        """Rows ``index`` of a mask given per distinct image (``encoder_batch_index``)."""
        kp, dense = self.key_padding, self.dense
        return AttentionMask(None if kp is None else kp.index_select(0, index),
                             None if dense is None or dense.shape[0] == 1 else dense.index_select(0, index))


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float,
                    dropout_p: float = 0.0, training: bool = False) -> tuple[Tensor, Tensor]:
    """The originals' attention (transformers' ``eager_attention_forward``): ``softmax(q kᵀ·scale + M)``,
    probability dropout, ``@ v``. ``q (B, H, Lq, d)``, ``k``/``v`` ``(B, H, Lk, d)`` -> ``(out, probs)``.

    Only for what the kernels do not do (attention weights, dense masks), with the kernels' semantics: a key a
    boolean mask (``key_padding``, a bool ``dense``) hides is excluded, and a row with no visible key gets zero
    weights, so zeros and zero gradients (as transformers' default SDPA attention; its eager attention averages the
    values there instead). Asking for the weights thus never changes the output. A float ``dense`` mask is added
    to the scores as given.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    low = torch.finfo(scores.dtype).min
    visible = None          # (B, 1 or H, 1 or Lq, Lk) bool: keys a boolean mask lets through
    if mask.key_padding is not None:
        visible = mask.key_padding[:, None, None, :]
    if mask.dense is not None and mask.dense.dtype == torch.bool:
        visible = mask.dense if visible is None else visible & mask.dense
    if visible is not None:
        scores = scores.masked_fill(~visible, low)
    if mask.dense is not None and mask.dense.dtype != torch.bool:
        scores = scores + mask.dense.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    if visible is not None:
        probs = probs * visible.any(dim=-1, keepdim=True)    # no visible key: zero weights (the kernels' rule)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return torch.matmul(probs, v), probs


# ------------------------------------------------------------------------------------------ layers
def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, L, H*d)`` -> strided view ``(B, H, L, d)`` (no copy: the kernels take any strides).

    Q, K and V stay three GEMMs: concatenating the weights on every call to make one GEMM cost as much as it
    saved on the CPU, and the GPU GEMMs are large enough either way."""
    B, L, D = x.shape
    return x.view(B, L, heads, D // heads).transpose(1, 2)      # not -1: a zero-size batch has no inferable dim


def _merge_heads(x: Tensor) -> Tensor:
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


class QFormerMultiHeadAttention(nn.Module):
    """``Blip2QFormerMultiHeadAttention``: ``query``/``key``/``value`` Linears (``key``/``value`` take
    ``encoder_hidden_size`` features for cross-attention)."""

    def __init__(self, config, is_cross_attention: bool = False):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}")
        self.config = config
        self.is_cross_attention = is_cross_attention
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size ** -0.5
        self.is_causal = False          # read by transformers' attention interfaces, as on the original
        self.attention_dropout = config.attention_probs_dropout_prob
        kv_in = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_in, self.all_head_size)
        self.value = nn.Linear(kv_in, self.all_head_size)

    def _uses_eager(self, mask: AttentionMask, need_weights: bool) -> bool:
        return need_weights or mask.dense is not None

    def _attend(self, q, k, v, mask: AttentionMask, need_weights: bool, kernel) -> tuple[Tensor, Optional[Tensor]]:
        if self._uses_eager(mask, need_weights):
            out, probs = eager_attention(q, k, v, mask, self.scaling, self.attention_dropout, self.training)
            return _merge_heads(out), probs if need_weights else None
        return _merge_heads(kernel(q, k, v, self.attention_dropout if self.training else 0.0)), None

    def forward(self, hidden_states: Tensor, mask: AttentionMask = AttentionMask(),
                encoder_hidden_states: Optional[Tensor] = None, encoder_batch_index: Optional[Tensor] = None,
                need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """``hidden_states (B, L, D)`` -> ``((B, L, D), probs (B, H, L, Lk) or None)``.

        Cross-attention: ``encoder_hidden_states (N, Lk, E)`` with ``N == B``, ``N == 1`` (broadcast) or, with
        ``encoder_batch_index (B,)``, ``N`` distinct images of which row ``b`` uses ``encoder_batch_index[b]``;
        ``mask`` then has ``N`` (or 1) rows as well.
        """
        H = self.num_attention_heads
        q = _split_heads(self.query(hidden_states), H)
        if encoder_hidden_states is None:
            k, v = _split_heads(self.key(hidden_states), H), _split_heads(self.value(hidden_states), H)
            return self._attend(q, k, v, mask, need_weights, lambda q, k, v, p: ops.qformer_attention(
                q, k, v, num_query=0, mode="bidirectional", text_mask=mask.key_padding, scale=self.scaling,
                dropout_p=p))

        B = hidden_states.shape[0]
        k, v = self.key(encoder_hidden_states), self.value(encoder_hidden_states)   # once per distinct image
        if encoder_batch_index is not None:                 # masks are per distinct image too
            k, v = k.index_select(0, encoder_batch_index), v.index_select(0, encoder_batch_index)
            mask = mask.gather(encoder_batch_index)
        elif k.shape[0] != B:                               # one image for every row: stride-0 batch
            k, v = k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])
        mask = mask.expand_batch(B)
        k, v = _split_heads(k, H), _split_heads(v, H)
        return self._attend(q, k, v, mask, need_weights, lambda q, k, v, p: ops.cross_attention(
            q, k, v, key_padding_mask=mask.key_padding, scale=self.scaling, dropout_p=p))


class QFormerSelfOutput(nn.Module):
    """``BertSelfOutput``: ``LayerNorm(dropout(dense(h)) + input)`` (post-LN)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class QFormerAttention(nn.Module):
    """``Blip2QFormerAttention``: ``attention`` (multi-head) + ``output`` (dense, dropout, residual, LayerNorm)."""

    def __init__(self, config, is_cross_attention: bool = False):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = QFormerSelfOutput(config)

    def forward(self, hidden_states: Tensor, mask: AttentionMask = AttentionMask(),
                encoder_hidden_states: Optional[Tensor] = None, encoder_batch_index: Optional[Tensor] = None,
                attentions: Optional[list] = None) -> Tensor:
        """``hidden_states (B, L, D)`` -> ``(B, L, D)``, a tensor as transformers v5 returns (a forward hook
        written for it, e.g. ``lambda m, i, o: o * 2``, works here too).

        ``attentions``: the side channel for the weights (transformers captures them with hooks on the inner
        ``attention``): a list to which ``probs (B, H, L, Lk)`` is appended; ``None`` (default) does not compute
        them."""
        attn, probs = self.attention(hidden_states, mask, encoder_hidden_states, encoder_batch_index,
                                     attentions is not None)
        if attentions is not None:
            attentions.append(probs)
        return self.output(attn, hidden_states)


def _activation(hidden_act) -> nn.Module:
    """The original's ``intermediate_act_fn``: transformers' ``ACT2FN[hidden_act]`` (a module of its own, listed
    in ``named_modules()``) for a name, the object itself otherwise."""
    return hidden_act if not isinstance(hidden_act, str) else act2fn(hidden_act, "config.hidden_act")


class QFormerIntermediate(nn.Module):
    """``BertIntermediate``: ``intermediate_act_fn(dense(h))``. While ``dense`` is a plain ``nn.Linear`` and the
    activation exact GELU (``hidden_act="gelu"``, every released Q-Former; see ``nn._linear.plain_gelu``), both run as
    one ``vlmkern::linear_gelu``; a replaced activation, an adapter or a hook on either is called as in the
    original."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _activation(config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if plain_linear(self.dense) and plain_gelu(self.intermediate_act_fn):
            return ops.linear_gelu(hidden_states, self.dense.weight, self.dense.bias)
        return self.intermediate_act_fn(self.dense(hidden_states))


class QFormerOutput(nn.Module):
    """``BertOutput``: ``LayerNorm(dropout(dense(h)) + input)``."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class QFormerLayer(nn.Module):
    """``Blip2QFormerLayer``. ``text_ffn``: whether the text FFN (``intermediate``/``output``) exists
    (BLIP-2: ``config.use_qformer_text_input``; InstructBLIP: always)."""

    def __init__(self, config, layer_idx: int, text_ffn: bool = True):
        super().__init__()
        self.chunk_size_feed_forward = getattr(config, "chunk_size_feed_forward", 0)  # chunking: same result
        self.seq_len_dim = 1
        self.layer_idx = layer_idx
        self.attention = QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, is_cross_attention=True)
        self.has_text_ffn = text_ffn
        if text_ffn:
            self.intermediate = QFormerIntermediate(config)
            self.output = QFormerOutput(config)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerOutput(config)

    def _text_ffn(self, x: Tensor) -> Tensor:
        if not self.has_text_ffn:
            raise ValueError("this Q-Former has no text FFN (BLIP-2 config.use_qformer_text_input=False) but the "
                             "input has text rows: pass query_length = the sequence length, or build the model "
                             "with use_qformer_text_input=True")
        return self.output(self.intermediate(x), x)

    def _query_ffn(self, x: Tensor) -> Tensor:
        return self.output_query(self.intermediate_query(x), x)

    def forward(self, hidden_states: Tensor, self_mask: AttentionMask = AttentionMask(),
                encoder_hidden_states: Optional[Tensor] = None, cross_mask: AttentionMask = AttentionMask(),
                query_length: int = 0, encoder_batch_index: Optional[Tensor] = None,
                attentions: Optional[list] = None) -> Tensor:
        """``hidden_states (B, L, D)``, rows ``[:query_length]`` are the learned queries -> ``(B, L, D)`` (a tensor,
        as transformers v5's layer returns).

        ``attentions``: a list to which the self-attention weights, then (query rows present and the layer has
        cross-attention) the cross-attention weights are appended; ``None`` computes no weights."""
        x = self.attention(hidden_states, self_mask, attentions=attentions)
        if query_length <= 0:
            return self._text_ffn(x)
        xq = x[:, :query_length]
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError(f"encoder_hidden_states must be given: layer {self.layer_idx} has cross-attention")
            xq = self.crossattention(xq, cross_mask, encoder_hidden_states, encoder_batch_index, attentions)
        out = self._query_ffn(xq)
        if x.shape[1] > query_length:
            out = torch.cat([out, self._text_ffn(x[:, query_length:])], dim=1)
        return out


@dataclass
class EncoderOutput:
    last_hidden_state: Tensor
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


class QFormerEncoder(nn.Module):
    """``Blip2QFormerEncoder``: ``layer`` = ``num_hidden_layers`` × :class:`QFormerLayer`.

    Activation checkpointing as transformers sets it on a module with a ``gradient_checkpointing`` flag: when
    on (in training, with grad), every ``checkpoint_every``-th layer runs through ``_gradient_checkpointing_func``
    (what transformers' ``activation_checkpointing_enable`` assigns, e.g. ``checkpoint`` with the caller's
    ``use_reentrant``), else ``checkpoint(use_reentrant=False)``."""

    def __init__(self, config, text_ffn: bool = True):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([QFormerLayer(config, i, text_ffn) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.checkpoint_every = 1
        self._gradient_checkpointing_func = _CHECKPOINT

    def enable_checkpointing(self, checkpoint_kwargs: Optional[dict] = None, every_n_layers: int = 1) -> None:
        """Checkpoint every ``every_n_layers``-th layer (from the first) in training, through
        ``torch.utils.checkpoint.checkpoint(**checkpoint_kwargs)`` (default ``use_reentrant=False``)."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
        self._gradient_checkpointing_func = (_CHECKPOINT if checkpoint_kwargs is None
                                             else functools.partial(checkpoint, **checkpoint_kwargs))
        self.checkpoint_every = every_n_layers
        self.gradient_checkpointing = True

    def forward(self, hidden_states: Tensor, self_mask: AttentionMask = AttentionMask(),
                encoder_hidden_states: Optional[Tensor] = None, cross_mask: AttentionMask = AttentionMask(),
                query_length: int = 0, encoder_batch_index: Optional[Tensor] = None,
                output_attentions: bool = False, output_hidden_states: bool = False) -> EncoderOutput:
        """Runs the layers; with ``output_attentions`` the ``attentions`` tuple lists every attention module's
        weights in execution order (self, then cross where the layer has it), as transformers v5 records them."""
        all_hidden = [hidden_states] if output_hidden_states else None
        attentions, cross = ([], []) if output_attentions else (None, None)
        for i, layer in enumerate(self.layer):
            args = (hidden_states, self_mask, encoder_hidden_states, cross_mask, query_length, encoder_batch_index)
            if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                    and i % self.checkpoint_every == 0):
                hidden_states, *probs = self._gradient_checkpointing_func(_layer_tensors, layer, output_attentions,
                                                                          *args)
            else:
                probs = [] if output_attentions else None
                hidden_states = layer(*args, attentions=probs)
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if output_attentions:
                attentions.extend(probs)
                cross.extend(probs[1:])             # the layer's cross-attention, where it ran
        return EncoderOutput(hidden_states, None if all_hidden is None else tuple(all_hidden),
                             None if attentions is None else tuple(attentions), None if cross is None else tuple(cross))


_CHECKPOINT = functools.partial(checkpoint, use_reentrant=False)


def _layer_tensors(layer: QFormerLayer, need_weights: bool, *args) -> tuple:
    """``(hidden_states, *attention weights)`` of ``layer(*args)``: a checkpoint function returns tensors (a
    reentrant checkpoint tracks tensor outputs only), so the weights come back as outputs, not in a list."""
    probs = [] if need_weights else None
    out = layer(*args, attentions=probs)
    return (out, *probs) if need_weights else (out,)


class QFormerTextEmbeddings(nn.Module):
    """``InstructBlipQFormerEmbeddings``: ``LayerNorm(concat([query_embeds, word_emb[ids] + pos_emb[pos]]))`` then
    dropout; queries get no position embedding (as transformers').

    Default positions are computed per call instead of read from a ``position_ids`` buffer, so a model built
    on the meta device and materialised with ``to_empty()`` + transformers' ``init_weights()`` (which does not
    know this class) cannot run on uninitialised positions; ``position_ids`` stays readable as a property.
    """

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config

    @property
    def position_ids(self) -> Tensor:
        """``(1, max_position_embeddings)`` int64 ``0, 1, ...`` (transformers' non-persistent buffer)."""
        w = self.position_embeddings.weight
        return torch.arange(self.position_embeddings.num_embeddings, device=w.device).expand((1, -1))

    def forward(self, input_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                query_embeds: Optional[Tensor] = None, cache_length: int = 0) -> Tensor:
        """``input_ids (B, T)``, ``query_embeds (B, Q, D)`` -> ``(B, Q + T, D)`` in the LayerNorm's dtype."""
        if input_ids is not None:
            T = input_ids.shape[1]
            if position_ids is None:
                if cache_length + T > self.position_embeddings.num_embeddings:
                    cached = f" after {cache_length} cached" if cache_length else ""
                    raise ValueError(f"input_ids has {T} tokens{cached}, more than the "
                                     f"{self.position_embeddings.num_embeddings} positions of "
                                     f"config.max_position_embeddings: shorten the text or pass position_ids")
                position_ids = torch.arange(cache_length, cache_length + T,
                                            device=self.position_embeddings.weight.device)[None]
            embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids.to(input_ids.device))
            if query_embeds is not None:
                embeddings = torch.cat((query_embeds, embeddings), dim=1)
        else:
            embeddings = query_embeds
        embeddings = embeddings.to(self.layernorm.weight.dtype)
        return self.dropout(self.layernorm(embeddings))


def init_qformer_module(m: nn.Module, std: float) -> None:
    """transformers' ``_init_weights`` for one module (its own parameters only): Linear/Embedding ``N(0, std)``,
    zero bias and padding row, LayerNorm ``(1, 0)``; any other module is left as it is."""
    with torch.no_grad():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_qformer_weights(module: nn.Module, std: float) -> None:
    """:func:`init_qformer_module` on every submodule of ``module``, children before parents (transformers' order,
    so a seed gives transformers' values)."""
    module.apply(functools.partial(init_qformer_module, std=std))


__all__ = ["AttentionMask", "QFormerAttention", "QFormerEncoder", "QFormerIntermediate", "QFormerLayer",
           "QFormerMultiHeadAttention", "QFormerOutput", "QFormerSelfOutput", "QFormerTextEmbeddings",
           "eager_attention", "init_qformer_module", "init_qformer_weights"]
