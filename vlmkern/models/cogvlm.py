"""CogVLM visual-expert blocks (HF hub ``modeling_cogvlm.py``), training / prefill path.

Image tokens and text tokens use different weights for QKV, the attention output and the MLP. The
original gathers each modality with a boolean mask and scatters back (a host sync per linear); here every
linear is ``vlmkern.ops.expert_linear`` keyed by a per-token expert id, computed on device with
``cogvlm_expert_ids`` (vision expert iff a token and the next one are vision-type: ``boi`` + patches; the
``eoi`` token uses the language expert). The two experts' ``nn.Linear`` weights are used in place (an expert
layer wrapped by an adapter or hooked is called instead, as the original calls it; ``VisionExpertMLP`` calls its
two expert containers on their own tokens, as the original, when one is hooked or replaced or their activations
differ), so the state-dict keys are the original's (``{language,vision}_mlp.{gate,up,down}_proj.weight``,
``{language,vision}_expert_{query_key_value,dense}.weight``, ``rotary_emb.inv_freq``).
"""
from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkern.models._config import positive_int
from vlmkern.models.cogagent import CrossAttention  # noqa: F401  (CogAgent layers live beside CogVLM's)
from vlmkern.nn._linear import act2fn, has_hooks, plain_linear, plain_module
from vlmkern.ops.checks import check_same_device, check_tensor, check_weight_dtype
from vlmkern.ops.routed_linear import cogvlm_expert_ids, expert_linear


@dataclass
class CogVLMConfig:
    """What ``VisionExpertMLP`` and ``VisionExpertAttention`` read from their config; defaults are CogVLM-17B's
    (Vicuna-7B LLM). The original's config object (or any object with these attributes) works as well.

    Attributes:
        hidden_size: LLM width D (4096).
        intermediate_size: SwiGLU MLP width (11008); read by ``VisionExpertMLP``.
        num_attention_heads: attention heads, ``hidden_size`` must be divisible by it (32 heads of 128); read by
            ``VisionExpertAttention``.
        hidden_act: MLP activation, a name of transformers' ``ACT2FN`` (``silu``); without transformers one of
            ``silu`` (= ``swish``), ``gelu``, ``relu``.
        max_position_embeddings: kept on the attention module as the original does (2048).
    """

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048


def _per_expert(x: Tensor, language, vision, on_vision: Tensor) -> Tensor:
    """The original's boolean gather and scatter (a host synchronisation): ``vision`` called on the tokens where
    ``on_vision`` (``x.shape[:-1]``, bool) holds, then ``language`` on the others."""
    image, text = vision(x[on_vision]), language(x[~on_vision])
    out = text.new_empty(*x.shape[:-1], text.shape[-1])
    out[on_vision] = image.to(out.dtype)
    out[~on_vision] = text
    return out


def _routed(x: Tensor, language: nn.Module, vision: nn.Module, ids: Tensor) -> Tensor:
    """Token ``t`` through ``language`` (``ids[t] == 0``) or ``vision`` (1): one ``expert_linear`` over their
    weights. An expert layer that is not a plain ``nn.Linear`` without hooks (an adapter such as PEFT LoRA, a
    hook) is called on its own tokens instead, as the original does (boolean gather and scatter, with its host
    synchronisation): reading its weights would skip what is attached to it."""
    if plain_linear(language) and plain_linear(vision):
        return expert_linear(x, [language.weight, vision.weight], ids, validate_ids=False)
    return _per_expert(x, language, vision, ids.bool())


def _check_tokens(hidden_states, token_type_ids, weight: Tensor) -> None:
    """``hidden_states (B, L, D)`` floating in ``weight``'s dtype and device (``D = weight.shape[1]``) and
    ``token_type_ids (B, L)``, with errors naming them (the routed op's would name its own ``x`` / ``expert_ids``)."""
    check_tensor(hidden_states, "hidden_states", ndim=3, shape_doc="(batch, tokens, hidden_size)")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be a floating-point tensor, got {hidden_states.dtype}")
    if hidden_states.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden_states has last dim {hidden_states.shape[-1]} but hidden_size is {weight.shape[1]}")
    check_tensor(token_type_ids, "token_type_ids", ndim=2, shape_doc="(batch, tokens)")
    if tuple(token_type_ids.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"token_type_ids must have shape (batch, tokens) = {tuple(hidden_states.shape[:2])}, "
                         f"got {tuple(token_type_ids.shape)}")
    check_same_device(hidden_states=hidden_states, token_type_ids=token_type_ids)
    if hidden_states.device != weight.device:
        raise ValueError(f"hidden_states is on {hidden_states.device} but the module's weights are on {weight.device}")
    check_weight_dtype(hidden_states, "hidden_states", weight)


def _check_attention_inputs(hidden_states, position_ids, attention_mask, heads: int) -> None:
    """``position_ids (B or 1, L)`` and ``attention_mask (B or 1, 1 or heads, L, >= L)`` or None, for
    ``hidden_states (B, L, D)``: ValueError naming them (the original fails inside torch)."""
    B, L = hidden_states.shape[:2]
    check_tensor(position_ids, "position_ids", ndim=2, shape_doc=f"(batch or 1, tokens) = ({B} or 1, {L})")
    # comparisons, not ``in (1, B)``: a traced symbolic size is not found in a tuple by ``in``
    if (position_ids.shape[0] != 1 and position_ids.shape[0] != B) or position_ids.shape[1] != L:
        raise ValueError(f"position_ids must have shape (batch or 1, tokens) = ({B} or 1, {L}), got "
                         f"{tuple(position_ids.shape)}")
    check_same_device(hidden_states=hidden_states, position_ids=position_ids, attention_mask=attention_mask)
    if attention_mask is None:
        return
    check_tensor(attention_mask, "attention_mask", ndim=4, shape_doc="(batch, 1, tokens, tokens), additive")
    b, h, rows, cols = attention_mask.shape
    if (b != 1 and b != B) or (h != 1 and h != heads) or rows != L or cols < L:
        raise ValueError(f"attention_mask must have shape (batch or 1, 1 or heads, tokens, >= tokens) = "
                         f"({B} or 1, 1 or {heads}, {L}, >= {L}), got {tuple(attention_mask.shape)}")


def _cfg(config, name: str) -> int:
    return positive_int(config, name, CogVLMConfig)


def _activation(config) -> nn.Module:
    """The original's ``ACT2FN[config.hidden_act]`` (a module; :func:`vlmkern.nn._linear.act2fn`)."""
    return act2fn(getattr(config, "hidden_act", "silu"), "config.hidden_act")


# Parameter-free elementwise activations (with transformers' own, ``transformers.activations``): one call on every
# token's gate computes what each expert's call on its own tokens does.
_ELEMENTWISE = (nn.SiLU, nn.GELU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish)


def _setting(value):
    """A comparable form of an activation's attribute: ``partial`` and bound methods compare by what they call."""
    if isinstance(value, functools.partial):
        return value.func, value.args, tuple(sorted(value.keywords.items()))
    if isinstance(value, types.MethodType):
        return value.__func__
    return value


def _settings(act: nn.Module) -> Optional[dict]:
    """``act``'s public attributes (``approximate``, ``act``, ...) or None where one is a tensor (not comparable)."""
    items = {}
    for k, v in vars(act).items():
        if k[0] != "_" and k != "training":
            if isinstance(v, Tensor):
                return None
            items[k] = _setting(v)
    return items


def _same_elementwise_activation(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` are one known parameter-free elementwise activation with the same settings and
    nothing attached (hooks; the caller checks global ones): then the routed path may apply ``a`` once to every
    token's gate, where the original applies each expert's own to its tokens."""
    kind = type(a)
    if kind is not type(b) or not (kind in _ELEMENTWISE or kind.__module__ == "transformers.activations"):
        return False
    if (a._parameters or b._parameters or a._buffers or b._buffers or a._modules or b._modules
            or has_hooks(a) or has_hooks(b)):
        return False
    settings = _settings(a)
    return settings is not None and settings == _settings(b)


class ExpertMLP(nn.Module):
    """One expert's SwiGLU MLP, the original ``MLP``: ``gate_proj``, ``up_proj``, ``down_proj`` and
    ``act_fn = ACT2FN[config.hidden_act]`` (a module; the local table's without transformers)."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.hidden_size = _cfg(config, "hidden_size")
        self.intermediate_size = _cfg(config, "intermediate_size")
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = _activation(config)

    def forward(self, hidden_state: Tensor) -> Tensor:  # this expert alone, for every token
        return self.down_proj(self.act_fn(self.gate_proj(hidden_state)) * self.up_proj(hidden_state))


class VisionExpertMLP(nn.Module):
    """``y_t = down^{e(t)}(act(gate^{e(t)} x_t) ⊙ up^{e(t)} x_t)``; ``forward(hidden_states, token_type_ids)``.

    ``config``: a :class:`CogVLMConfig` (``hidden_size``, ``intermediate_size``, ``hidden_act``), or any object
    with those attributes (the original's config)."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.language_mlp = ExpertMLP(config)
        self.vision_mlp = ExpertMLP(config)

    def forward(self, hidden_states: Tensor, token_type_ids: Tensor) -> Tensor:
        """``hidden_states (B, L, D)``, ``token_type_ids (B, L)`` (0 language, 1 vision) -> ``(B, L, D)``."""
        _check_tokens(hidden_states, token_type_ids, self.language_mlp.gate_proj.weight)
        ids = cogvlm_expert_ids(token_type_ids)  # in [0, 2) by construction: no value check needed
        lang, vis = self.language_mlp, self.vision_mlp
        if not self._routable():
            return _per_expert(hidden_states, lang, vis, ids.bool())
        gate = _routed(hidden_states, lang.gate_proj, vis.gate_proj, ids)
        up = _routed(hidden_states, lang.up_proj, vis.up_proj, ids)
        return _routed(lang.act_fn(gate) * up, lang.down_proj, vis.down_proj, ids)

    def _routable(self) -> bool:
        """Whether the routed path computes what calling the two containers would: both plain ``ExpertMLP``s (no
        hook, wrapper or replacement, no global hooks) with the same known elementwise activation."""
        lang, vis = self.language_mlp, self.vision_mlp
        return (plain_module(lang, ExpertMLP) and plain_module(vis, ExpertMLP)
                and _same_elementwise_activation(lang.act_fn, vis.act_fn))


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE, base 10000, over the head dim; ``inv_freq`` is a persistent buffer as in the original.

    cos / sin are computed from ``position_ids`` directly (fp32, then cast), the same values as the
    original's table lookup, without its ``position_ids.max()`` host sync.
    """

    def __init__(self, dim: int, max_position_embeddings: int = 2048, base: float = 10000, device=None):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device) / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``position_ids (B, L)`` -> cos, sin ``(B, L, dim)`` in ``dtype``."""
        freqs = position_ids.to(self.inv_freq.dtype)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionExpertAttention(nn.Module):
    """CogVLM self-attention with expert QKV and output projections (plain MHA, contiguous ``[Q|K|V]``).

    ``forward(hidden_states, token_type_ids, position_ids, attention_mask=None, past_key_value=None,
    output_attentions=False) -> (attn_output, attn_weights or None, past_key_value)`` as the original;
    ``attention_mask`` is the additive ``(B, 1, L, L)`` mask (None: no mask, as the original's eager path).
    Training / prefill only: ``past_key_value`` must be None. ``config``: a :class:`CogVLMConfig`
    (``hidden_size``, ``num_attention_heads``, ``max_position_embeddings``), or any object with those attributes.
    """

    def __init__(self, config: CogVLMConfig, layer_idx: Optional[int] = None):
        super().__init__()
        self.config = config
        self.hidden_size = _cfg(config, "hidden_size")
        self.num_heads = _cfg(config, "num_attention_heads")
        self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_heads}")
        self.max_position_embeddings = getattr(config, "max_position_embeddings", 2048)
        self.layer_idx = layer_idx
        self.rotary_emb = RotaryEmbedding(self.head_dim)
        D = self.hidden_size
        self.vision_expert_query_key_value = nn.Linear(D, 3 * D, bias=False)
        self.vision_expert_dense = nn.Linear(D, D, bias=False)
        self.language_expert_query_key_value = nn.Linear(D, 3 * D, bias=False)
        self.language_expert_dense = nn.Linear(D, D, bias=False)

    def _heads(self, t: Tensor) -> Tensor:
        B, L, _ = t.shape
        return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: Tensor, token_type_ids: Tensor, position_ids: Tensor,
                attention_mask: Optional[Tensor] = None, past_key_value=None,
                output_attentions: bool = False):
        if past_key_value is not None:
            raise NotImplementedError("VisionExpertAttention implements the training / prefill path: "
                                      "past_key_value must be None")
        _check_tokens(hidden_states, token_type_ids, self.language_expert_query_key_value.weight)
        _check_attention_inputs(hidden_states, position_ids, attention_mask, self.num_heads)
        B, L, D = hidden_states.shape
        ids = cogvlm_expert_ids(token_type_ids)
        qkv = _routed(hidden_states, self.language_expert_query_key_value, self.vision_expert_query_key_value, ids)
        q, k, v = (self._heads(t) for t in qkv.split(D, dim=-1))
        cos, sin = self.rotary_emb(position_ids, q.dtype)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        mask = None if attention_mask is None else attention_mask[:, :, :, :L].to(q.dtype)
        weights = None
        if output_attentions:  # explicit scores, as the original's eager path
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            ctx = torch.matmul(weights, v)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        ctx = ctx.transpose(1, 2).reshape(B, L, D)
        out = _routed(ctx, self.language_expert_dense, self.vision_expert_dense, ids)
        return out, weights, past_key_value


__all__ = ["CogVLMConfig", "ExpertMLP", "RotaryEmbedding", "VisionExpertAttention", "VisionExpertMLP"]
