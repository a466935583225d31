"""BLIP-2 Q-Former on vlmkern kernels: drop-in for ``transformers.Blip2QFormerModel``.

Same config class (``transformers.Blip2QFormerConfig``, read by attribute: any object with its fields works),
same state-dict keys (``ours.load_state_dict(hf.state_dict(), strict=True)``), same forward arguments and
outputs (``BaseModelOutputWithPoolingAndCrossAttentions`` with ``last_hidden_state`` and ``pooler_output``;
a tuple with ``return_dict=False``). LAVIS checkpoints load through :mod:`vlmkern.models.lavis`.

The model runs in the dtype of its parameters (transformers v5 keeps the Q-Former in fp32 inside BLIP-2 and
casts ``query_embeds`` and ``encoder_hidden_states`` to it, as here); the output stays in that dtype.

Differences from transformers, all documented where they occur:

* ``encoder_batch_index`` (vlmkern extension): ``encoder_hidden_states`` may hold each distinct image once
  ``(N, Lk, E)`` and ``encoder_batch_index (B,)`` say which one each batch row uses (the ITM batch
  ``[pos, neg image, neg text]`` of LAVIS ``blip2_qformer.py`` repeats every positive image), so the cross-attention K/V
  projection runs once per image. ``encoder_attention_mask`` is then per distinct image ``(N, Lk)``. Eager CPU
  calls whose images need no gradient find repeated images themselves (:func:`repeated_images`).
* ``output_attentions=True`` and 3-D/4-D masks run the original's dense attention
  (:func:`vlmkern.nn.qformer.eager_attention`) instead of the kernels. Attention-probability dropout in
  training mode runs in the kernels, with their own keep mask: a seed gives the same distribution as
  transformers, not the same mask.
* A row with no visible key (a batch row whose attention mask is all zeros) returns zeros with zero gradients on
  every path, also with ``output_attentions=True`` (its weights are zeros) and with 3-D/4-D boolean masks, as
  transformers' default SDPA attention does; transformers' eager attention averages the values there instead.
  A float (additive) 4-D mask is added as given. ``head_mask`` and ``past_key_values`` are not supported
  (transformers v5 takes and ignores them).
"""
from __future__ import annotations

import functools
import importlib
import operator
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import Tensor, nn

from vlmkern.nn.qformer import AttentionMask, QFormerEncoder, init_qformer_module
from vlmkern.ops.checks import FLOATS, check_tensor
from vlmkern.ops.dispatch import eager_mode, values_readable

_INDEX_DTYPES = (torch.int64, torch.int32)


@dataclass
class QFormerModelOutput:
    """Stand-in for transformers' ``BaseModelOutputWithPoolingAndCrossAttentions`` when transformers is absent:
    attribute, key and index access; ``to_tuple()`` drops the ``None`` fields."""

    last_hidden_state: Optional[Tensor] = None
    pooler_output: Optional[Tensor] = None
    hidden_states: Optional[tuple] = None
    past_key_values: Any = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@functools.lru_cache(maxsize=None)
def _output_class():
    """transformers' output class (imported by the model's constructor: a first import inside a
    ``torch.export`` trace would register its pytree node too late for the export to flatten the output)."""
    try:
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
        return BaseModelOutputWithPoolingAndCrossAttentions
    except Exception:  # transformers is an optional dependency
        return QFormerModelOutput


_UNSUPPORTED = ("head_mask", "past_key_values")
# Keywords transformers' Q-Former forwards accept through ``**kwargs`` (``TransformersKwargs``) and ignore here as
# they do there; any other keyword is a mistake and raises TypeError naming it.
_IGNORED_KWARGS = ("use_cache", "cache_position", "position_ids", "output_router_logits", "max_length_q",
                   "max_length_k", "cu_seq_lens_q", "cu_seq_lens_k", "num_items_in_batch")


def _known_kwargs() -> frozenset:
    try:
        from transformers.utils.generic import TransformersKwargs
        names = set(getattr(TransformersKwargs, "__annotations__", {}))
    except Exception:  # transformers is optional
        names = set()
    return frozenset(names | set(_IGNORED_KWARGS) | set(_UNSUPPORTED))


def _check_query_length(query_length, length: int) -> int:
    """An integer ``query_length`` (a Python, numpy or 0-d tensor integer, as transformers takes) clipped to the
    sequence length."""
    if isinstance(query_length, bool) or not hasattr(type(query_length), "__index__"):
        raise TypeError(f"query_length must be an int, got {type(query_length).__name__}")
    try:
        query_length = operator.index(query_length)
    except TypeError as exc:      # a float or many-element tensor
        raise TypeError(f"query_length must be an int, got {query_length!r}") from exc
    if query_length < 0:
        raise ValueError(f"query_length must be >= 0, got {query_length}")
    return min(query_length, length)


def check_ids(ids: Tensor, name: str, bound: int, bound_name: str) -> None:
    """Ids in ``[0, bound)`` (read unless on meta): an index out of range would otherwise surface deep inside
    as an IndexError on the CPU or a device-side assert on CUDA, neither naming the argument."""
    if ids.numel() == 0 or not values_readable(ids):   # traced / fake / transformed / graph capture: not read
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} must be in [0, {bound_name} = {bound}), got values in [{lo}, {hi}]")


def _config_flag(config, name: str, value, default):
    return value if value is not None else getattr(config, name, default)


def hidden_state_selection(value, num_layers: int) -> Optional[set[int]]:
    """transformers v5's ``output_hidden_states``: a flag, or the index / indices of the ``num_layers + 1``
    hidden states to keep (negative from the end; out of range selects nothing; ``0`` and ``[]`` mean
    ``False``, as there). ``None`` for a flag, else the resolved indices."""
    if value is None or isinstance(value, bool):
        return None
    items = list(value) if isinstance(value, (list, tuple, range)) else [value]
    if any(isinstance(i, bool) or not hasattr(i, "__index__") for i in items):
        raise TypeError(f"output_hidden_states must be a bool, an int or a list of ints, got {value!r}")
    n = num_layers + 1
    return {operator.index(i) % n for i in items if -n <= operator.index(i) < n}


def _select(hidden_states: Optional[tuple], selection: Optional[set[int]]) -> Optional[tuple]:
    """Unselected entries become ``None``, as transformers returns them."""
    if hidden_states is None or selection is None:
        return hidden_states
    return tuple(h if i in selection else None for i, h in enumerate(hidden_states))


def _floating_dtype(dtype, model_name: str) -> Optional[torch.dtype]:
    """``dtype`` (a ``torch.dtype``, its name such as ``"bfloat16"``, or ``None``) as a floating ``torch.dtype``."""
    if dtype is None:
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or its name, got {dtype!r}")
    if not resolved.is_floating_point:
        raise ValueError(f"{model_name} cannot be instantiated under dtype={resolved} as it's not a floating-point "
                         f"dtype")
    return resolved


class QFormerModelBase(nn.Module):
    """What both Q-Former models share: the encoder run, masks, outputs and ``from_transformers``."""

    encoder: QFormerEncoder

    def __init__(self) -> None:
        super().__init__()
        _output_class()

    # Class attributes of transformers' Q-Former models that user code and trainers read.
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # What transformers' attention-implementation checks read (the kernels run in place of any implementation).
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_transformers(cls, hf_model: nn.Module) -> "QFormerModelBase":
        """The vlmkern twin of a transformers Q-Former: same config, weights (copied), dtype, device and mode.

        Built on the meta device and filled from ``hf_model`` (no random initialisation of ~100M parameters).
        """
        p = next(hf_model.parameters())
        with torch.device("meta"):
            model = cls(hf_model.config)
        model = model.to_empty(device=p.device).to(p.dtype)
        model.reset_buffers()
        model.load_state_dict(hf_model.state_dict(), strict=True)
        return model.train(hf_model.training)

    # the transformers class this model stands in for (``module:Class``; transformers is imported on use only)
    _transformers_class = ""

    @classmethod
    def _original_class(cls):
        module, name = cls._transformers_class.split(":")
        return getattr(importlib.import_module(module), name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "QFormerModelBase":
        """transformers' ``from_pretrained`` of the original class (config, weights, ``dtype``, ``device_map`` and
        the rest of its arguments, as it takes them), then :meth:`from_transformers`: a directory or hub
        checkpoint of the original loads as it would into the original."""
        return cls.from_transformers(cls._original_class().from_pretrained(pretrained_model_name_or_path, *args,
                                                                           **kwargs))

    def to_transformers(self) -> nn.Module:
        """The original transformers model with this one's config, weights (copied), dtype, device and mode.

        Built on the device, not on meta: its constructor computes buffers the state dict does not hold
        (InstructBLIP's ``position_ids``), which ``to_empty`` would leave as uninitialised memory."""
        p = next(self.parameters())
        with torch.device(p.device):
            original = self._original_class()(self.config)
        original = original.to(p.dtype)
        original.load_state_dict(self.state_dict(), strict=True)
        return original.train(self.training)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Saved by the original class (``config.json`` + weights, its arguments), so that both it and
        :meth:`from_pretrained` load the directory."""
        self.to_transformers().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs) -> "QFormerModelBase":
        """transformers' ``PreTrainedModel._from_config`` (how ``Blip2ForConditionalGeneration`` builds its
        Q-Former): ``cls(config)`` built with torch's default dtype set to ``dtype`` (default ``config.dtype``;
        the deprecated ``torch_dtype`` is taken where ``dtype`` is not given), which is recorded on
        ``config.dtype``; ``attn_implementation`` is recorded on the config (the kernels run in place of any)."""
        dtype = kwargs.pop("dtype", getattr(config, "dtype", None))
        torch_dtype = kwargs.pop("torch_dtype", None)
        if torch_dtype is not None and dtype == getattr(config, "dtype", None):
            dtype = torch_dtype
        dtype = _floating_dtype(dtype, cls.__name__)
        config.dtype = dtype
        for name in getattr(config, "sub_configs", None) or {}:
            if getattr(config, name, None) is not None:
                getattr(config, name).dtype = dtype
        if "attn_implementation" in kwargs:
            config._attn_implementation = kwargs.pop("attn_implementation")
        if dtype is None:
            return cls(config, **kwargs)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return cls(config, **kwargs)
        finally:
            torch.set_default_dtype(previous)

    @classmethod
    def from_config(cls, config, **kwargs) -> "QFormerModelBase":
        """``AutoModel.from_config``-style construction: :meth:`_from_config`."""
        return cls._from_config(config, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' ``_init_weights`` for one module: Linear/Embedding ``N(0, config.initializer_range)``,
        zero biases and padding row, LayerNorm ``(1, 0)``."""
        init_qformer_module(module, getattr(self.config, "initializer_range", None) or 0.02)

    def init_weights(self) -> None:
        """transformers' ``init_weights``: :meth:`_init_weights` on every module, children before parents (its
        order: a seed gives its values), then the computed buffers (:meth:`reset_buffers`). What a model built
        on the meta device needs after ``to_empty()``. Unlike transformers, which skips modules it initialised
        before (``_is_hf_initialized``), every call initialises every module again."""
        self.apply(self._init_weights)
        self.reset_buffers()

    def post_init(self) -> None:
        """transformers' ``post_init``, which the constructor runs last: :meth:`init_weights`."""
        self.init_weights()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the floating-point parameters (``PreTrainedModel.dtype``, which user code reads of
        ``model.qformer``)."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        """The device of the parameters (``PreTrainedModel.device``)."""
        return next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """``PreTrainedModel.num_parameters``: parameter count, only those requiring grad with ``only_trainable``,
        without ``nn.Embedding`` weights with ``exclude_embeddings``."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (after ``to_empty``)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_buffers"):
                m.reset_buffers()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1) -> None:
        """transformers' ``activation_checkpointing_enable``: in training, every ``every_n_layers``-th encoder
        layer (from the first) recomputes its activations in backward, through
        ``torch.utils.checkpoint.checkpoint(**activation_checkpointing_kwargs)`` (default ``use_reentrant=False``)."""
        self.encoder.enable_checkpointing(activation_checkpointing_kwargs, every_n_layers)

    def activation_checkpointing_disable(self) -> None:
        self.encoder.gradient_checkpointing = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs) -> None:
        """The older name of :meth:`activation_checkpointing_enable` (transformers keeps both)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """``PreTrainedModel.is_gradient_checkpointing``."""
        return self.encoder.gradient_checkpointing

    def _run(self, embedding_output: Tensor, query_length: int, attention_mask, encoder_hidden_states,
             encoder_attention_mask, encoder_batch_index, output_attentions, output_hidden_states, return_dict,
             kwargs: dict):
        for name in _UNSUPPORTED:
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"{type(self).__name__} does not support {name}")
        unknown = sorted(set(kwargs) - _known_kwargs()) if kwargs else []
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword argument(s) {', '.join(unknown)}")
        config = self.config
        output_attentions = bool(_config_flag(config, "output_attentions", output_attentions, False))
        output_hidden_states = _config_flag(config, "output_hidden_states", output_hidden_states, False)
        selection = hidden_state_selection(output_hidden_states, len(self.encoder.layer))
        output_hidden_states = bool(output_hidden_states)   # 0 and [] select nothing, as in transformers
        return_dict = _config_flag(config, "return_dict", return_dict, True)

        B, L, _ = embedding_output.shape
        device = embedding_output.device
        self_mask = AttentionMask.from_hf(attention_mask, "attention_mask", B, L, L, device)
        query_length = _check_query_length(query_length, L)
        cross_mask = AttentionMask()
        if encoder_hidden_states is not None:
            check_tensor(encoder_hidden_states, "encoder_hidden_states", ndim=3, dtypes=FLOATS,
                         shape_doc="(batch, image_tokens, encoder_hidden_size)")
            if encoder_hidden_states.is_meta != embedding_output.is_meta:
                raise ValueError(f"encoder_hidden_states is on {encoder_hidden_states.device} but the model runs on "
                                 f"{device}: a meta tensor has no values to move")
            N, Lk, E = encoder_hidden_states.shape
            if E != config.encoder_hidden_size:
                raise ValueError(f"encoder_hidden_states must have {config.encoder_hidden_size} features "
                                 f"(config.encoder_hidden_size), got {E}")
            if encoder_batch_index is not None:
                check_tensor(encoder_batch_index, "encoder_batch_index", ndim=1, dtypes=_INDEX_DTYPES,
                             shape_doc="(batch,) of rows of encoder_hidden_states")
                if encoder_batch_index.shape[0] != B:
                    raise ValueError(f"encoder_batch_index must have one entry per batch row ({B}), got "
                                     f"{encoder_batch_index.shape[0]}")
                check_ids(encoder_batch_index, "encoder_batch_index", N, "encoder_hidden_states.shape[0]")
                encoder_batch_index = encoder_batch_index.to(device)
            elif N not in (B, 1):
                raise ValueError(f"encoder_hidden_states has batch {N} but the queries have batch {B} (give "
                                 f"encoder_batch_index to map rows to distinct images)")
            else:
                found = repeated_images(encoder_hidden_states, encoder_attention_mask)
                if found is not None:
                    encoder_hidden_states, encoder_attention_mask, encoder_batch_index = found
                    N = encoder_hidden_states.shape[0]
            encoder_hidden_states = encoder_hidden_states.to(device=device, dtype=embedding_output.dtype)
            mask_rows = N
            if (encoder_batch_index is None and N == 1 and isinstance(encoder_attention_mask, Tensor)
                    and encoder_attention_mask.dim() >= 2 and encoder_attention_mask.shape[0] == B):
                mask_rows = B      # one image for every row, a mask per row (transformers broadcasts the image)
            cross_mask = AttentionMask.from_hf(encoder_attention_mask, "encoder_attention_mask", mask_rows,
                                               query_length, Lk, device)
        elif encoder_batch_index is not None:
            raise ValueError("encoder_batch_index was given without encoder_hidden_states")

        enc = self.encoder(embedding_output, self_mask, encoder_hidden_states, cross_mask, query_length,
                           encoder_batch_index, output_attentions, output_hidden_states)
        seq = enc.last_hidden_state
        out = _output_class()(last_hidden_state=seq, pooler_output=seq[:, 0, :],
                              hidden_states=_select(enc.hidden_states, selection),
                              attentions=enc.attentions, cross_attentions=enc.cross_attentions)
        return out if return_dict else out.to_tuple()


def repeated_images(images: Tensor, mask: Optional[Tensor]
                    ) -> Optional[tuple[Tensor, Optional[Tensor], Tensor]]:
    """``(distinct images, their masks, encoder_batch_index)`` when batch rows of ``images`` ``(B, Lk, E)``
    (with equal rows of the 2-D ``mask``) repeat, else ``None``.

    The ITM batch ``[pos, (text, neg image), (neg text, image)]`` repeats every image; finding the repeats lets
    the cross-attention K/V projections, the most expensive GEMMs of the Q-Former, run once per image without
    the caller passing ``encoder_batch_index``. Only for eager CPU calls on images that need no gradient (the
    frozen vision tower of BLIP-2 / InstructBLIP): there the content check (~256 sampled values per row as a
    key, then an exact comparison of rows whose samples agree) costs no device sync and less than one read of
    the images, and the per-row gradients of ``images`` do not exist to be routed.
    """
    B = images.shape[0]
    # eager_mode(): not under torch.compile, jit.trace, a fake-tensor / dispatch mode or a functorch transform,
    # where the values are not there to read
    if (B < 2 or images.device.type != "cpu" or images.requires_grad or not eager_mode()
            or (mask is not None and (mask.dim() != 2 or mask.shape[0] != B))):
        return None
    flat = images.reshape(B, -1)
    samples = flat[:, :: max(1, flat.shape[1] // 256)].contiguous()     # ~256 values a row: the candidate key
    reps: list[int] = []
    index: list[int] = []
    by_key: dict[bytes, list[int]] = {}                    # sampled values -> slots of the distinct rows with them
    for b in range(B):
        slots = by_key.setdefault(samples[b].view(torch.uint8).numpy().tobytes(), [])
        for slot in slots:
            r = reps[slot]
            if torch.equal(images[r], images[b]) and (mask is None or torch.equal(mask[r], mask[b])):
                index.append(slot)
                break
        else:
            slots.append(len(reps))
            index.append(len(reps))
            reps.append(b)
    if len(reps) == B:
        return None
    keep = torch.tensor(reps, device=images.device)
    return (images.index_select(0, keep), None if mask is None else mask.index_select(0, keep),
            torch.tensor(index, device=images.device))


class Blip2QFormerModel(QFormerModelBase):
    """Drop-in for ``transformers.Blip2QFormerModel(config)``: ``layernorm`` + ``dropout`` on ``query_embeds``
    (the caller embeds any text and concatenates it after the queries), then the encoder.

    The text FFN (``intermediate``/``output``) exists only with ``config.use_qformer_text_input``, as in
    transformers; text rows without it raise a ``ValueError``.
    """

    _transformers_class = "transformers:Blip2QFormerModel"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = QFormerEncoder(config, text_ffn=bool(getattr(config, "use_qformer_text_input", False)))
        self.post_init()

    def get_input_embeddings(self):
        return None  # as transformers: the Q-Former owns no input embeddings

    def set_input_embeddings(self, value) -> None:
        raise NotImplementedError("Blip2QFormerModel does not own input embeddings and cannot set them.")

    def forward(self, query_embeds: Tensor, query_length: Optional[int] = None,
                attention_mask: Optional[Tensor] = None, encoder_hidden_states: Optional[Tensor] = None,
                encoder_attention_mask: Optional[Tensor] = None, *, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool | int | list[int]] = None,
                return_dict: Optional[bool] = None,
                encoder_batch_index: Optional[Tensor] = None, **kwargs):
        """Q-Former over ``query_embeds``.

        Args:
            query_embeds: ``(B, L, D)``; the first ``query_length`` rows are the learned queries (they
                cross-attend the image and use the query FFN), the rest text (ITM: ``L = 32 + T``).
            query_length: default ``L``; 0 for a text-only pass (no cross-attention).
            attention_mask: ``(B, L)``, 1 = attend, 0 = padding (keys only: padded rows are computed).
            encoder_hidden_states: image tokens ``(B, Lk, encoder_hidden_size)`` (or ``(1, ...)``, or ``(N, ...)``
                with ``encoder_batch_index``); cast to the model's dtype.
            encoder_attention_mask: ``(B, Lk)`` (``(N, Lk)`` with ``encoder_batch_index``), 1 = real token.
            encoder_batch_index: vlmkern extension, ``(B,)`` row of ``encoder_hidden_states`` for each batch row.
            output_hidden_states: a flag, or (transformers v5) the index / list of indices of the
                ``num_hidden_layers + 1`` hidden states to return; the others are ``None`` in the tuple.

        Returns:
            ``BaseModelOutputWithPoolingAndCrossAttentions``: ``last_hidden_state (B, L, D)``, ``pooler_output
            = last_hidden_state[:, 0]``, optional ``hidden_states``/``attentions``/``cross_attentions``.
        """
        check_tensor(query_embeds, "query_embeds", ndim=3, dtypes=FLOATS, shape_doc="(batch, length, hidden)")
        if query_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"query_embeds must have hidden_size={self.config.hidden_size} features, got "
                             f"{query_embeds.shape[-1]}")
        if query_length is None:
            query_length = query_embeds.shape[1]
        query_embeds = query_embeds.to(self.layernorm.weight.dtype)
        embedding_output = self.dropout(self.layernorm(query_embeds))
        return self._run(embedding_output, query_length, attention_mask, encoder_hidden_states,
                         encoder_attention_mask, encoder_batch_index, output_attentions, output_hidden_states,
                         return_dict, kwargs)


__all__ = ["Blip2QFormerModel", "QFormerModelBase", "QFormerModelOutput"]
