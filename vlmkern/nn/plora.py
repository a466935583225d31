"""Drop-in for InternLM-XComposer2's ``build_mlp.PLoRA``: a linear with a Partial LoRA adapter.

Keys ``weight``, ``bias``, ``Plora_A.weight``, ``Plora_B.weight``; ``forward(x, im_mask=None)``. The math is
``vlmkern.ops.partial_lora_linear``: the adapter runs on image rows only, with no host sync and no ``× 0``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkern.nn._linear import plain_linear, plain_module
from vlmkern.ops.routed_linear import check_im_mask, partial_lora_linear


class PLoRA(nn.Linear):
    """``y = x Wᵀ + b + m · (α/r) · Plora_B(Plora_A(dropout(x)))`` with ``m = im_mask`` (True = image token).

    Args as the original: ``lora_r`` rank, ``lora_alpha`` (scaling ``α/r``), ``lora_dropout`` (adapter input
    only, training only), ``lora_len`` (kept, unused in forward as in the original). Differences from the
    original, none visible after loading a checkpoint: ``weight``/``bias`` get ``nn.Linear``'s default
    init (the original leaves them uninitialised), and ``reset_parameters()`` re-draws them (the original's
    does nothing); since they are drawn first, a seeded construction does not reproduce the original's
    draws: its ``Plora_A`` is the first draw after the seed, here the third (same distributions, other
    values). The dropout mask is drawn for all rows from the torch generator (see
    ``vlmkern.reference.routed_linear``) instead of for the gathered image rows.

    The fused op reads ``Plora_A.weight`` / ``Plora_B.weight`` and the dropout's ``p`` only while both adapter
    layers are plain ``nn.Linear`` and ``lora_dropout`` a plain ``nn.Dropout`` / ``nn.Identity`` (exact types, no
    hooks of their own, no global hooks). Otherwise (a hook, a PEFT or quantised wrapper, another dropout
    module) the modules are called as the original calls them, on the gathered image rows, with its host
    synchronisation; see :meth:`forward_modules`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 lora_r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.05, lora_len: int = 0,
                 **kwargs) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_len = lora_len
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.lora_scaling = self.lora_alpha / self.lora_r
        self.Plora_A = nn.Linear(in_features, lora_r, bias=False, device=device, dtype=dtype)
        self.Plora_B = nn.Linear(lora_r, out_features, bias=False, device=device, dtype=dtype)

    @property
    def lora_dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def forward(self, x: Tensor, im_mask: Tensor | None = None) -> Tensor:
        """``x (B, N, in)`` (any leading dims), ``im_mask`` bool ``(B, N)`` or flattened ``(B*N,)``; any other
        shape is refused (ValueError naming ``im_mask``), even one with as many elements: ``(N, B)`` read in
        memory order would route other tokens than the original's ``x[im_mask]``."""
        if isinstance(im_mask, Tensor) and isinstance(x, Tensor) and im_mask.dim() == 1 and x.dim() > 2 \
                and im_mask.numel() == math.prod(x.shape[:-1]):
            im_mask = im_mask.reshape(x.shape[:-1])  # the IXC2.5 variant passes the mask flattened
        if plain_linear(self.Plora_A) and plain_linear(self.Plora_B) \
                and plain_module(self.lora_dropout, nn.Dropout, nn.Identity):
            return partial_lora_linear(x, self.weight, self.bias, self.Plora_A.weight, self.Plora_B.weight,
                                       im_mask, self.lora_scaling, self.lora_dropout_p, self.training)
        return self.forward_modules(x, im_mask)

    def forward_modules(self, x: Tensor, im_mask: Tensor | None = None) -> Tensor:
        """The original's forward, calling ``lora_dropout``, ``Plora_A`` and ``Plora_B`` on the image rows
        ``x[im_mask]`` (so their hooks fire and wrappers act); shapes as :meth:`forward`. Where no token is an
        image token the original still runs the adapter on ``x[:, :1]`` and adds it times 0; so does this, but
        non-finite adapter values are zeroed first, so an fp16 overflow there does not turn the output into NaN
        (as the fused op, unlike the original)."""
        if isinstance(x, Tensor):
            check_im_mask(x, im_mask)
        res = F.linear(x, self.weight, self.bias)
        if im_mask is None:
            return res
        if im_mask.any():  # a host synchronisation, as the original's torch.sum(im_mask) > 0
            res[im_mask] += self._adapter(x[im_mask])
        elif x.dim() > 1:
            res[..., :1, :] += self._adapter(x[..., :1, :]).nan_to_num(0.0, 0.0, 0.0) * 0
        return res

    def _adapter(self, rows: Tensor) -> Tensor:
        return self.Plora_B(self.Plora_A(self.lora_dropout(rows))) * self.lora_scaling

    def extra_repr(self) -> str:
        # the dropout module's own p where it has one: a replacement dropout is not the fused op's 0.0
        p = getattr(self.lora_dropout, "p", self.lora_dropout_p)
        return f"{super().extra_repr()}, lora_r={self.lora_r}, lora_alpha={self.lora_alpha}, lora_dropout={p}"

    # ------------------------------------------------------------------------------- from a trained Linear
    @classmethod
    def from_linear(cls, linear: nn.Linear, lora_r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    lora_len: int = 0) -> "PLoRA":
        """A PLoRA holding a copy of ``linear``'s weight and bias, whose adapter starts at zero.

        ``Plora_B`` is zero and ``Plora_A`` keeps ``nn.Linear``'s init (the usual LoRA start), so the output
        equals ``linear(x)`` on every row, image rows included, until training moves the adapter. This differs
        from the constructor, which keeps the original's init for drop-in use: there ``Plora_B`` is
        ``nn.Linear``'s random init (the original's ``reset_parameters`` looks for a ``lora_A`` attribute that
        never exists, so it never zeroes B), and a fresh PLoRA changes image rows at once.
        Device, dtype, ``requires_grad`` of weight and bias, and train/eval mode follow ``linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                    dtype=w.dtype, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    lora_len=lora_len)
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            layer.Plora_B.weight.zero_()
        layer.weight.requires_grad_(w.requires_grad)
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer.train(linear.training)


__all__ = ["PLoRA"]
