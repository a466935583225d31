"""Fuyu's encoder-free image path (HF ``models/fuyu``): image -> patches -> embeddings -> token stream.

Pipeline of ``FuyuProcessor`` + ``FuyuForCausalLM``, piece by piece:

1. ``resize_to_fit``: downscale only images larger than 1080x1920, ``s = min(1080/h, 1920/w)``,
   size ``(int(h*s), int(w*s))``, bilinear with antialias (``resized_size`` gives the size alone).
2. ``patchify``: pad bottom/right to a multiple of 30 with raw value 1, rescale 1/255, normalise
   ``(x-0.5)/0.5``, 30x30 patches, ``(row, col, channel)`` inside a patch -> ``(B, nP, 2700)`` float32.
   ``FuyuImageEmbedder`` / ``PatchEmbedLinear.forward_images`` fuse this with the Linear instead.
3. Token stream (``build_input_ids``): ``[(|SPEAKER| x nW, |NEWLINE|) x nH] + [<s>] + prompt + [<0x04>]``;
   the image precedes BOS; batches are left padded with id 0 (``pad_left``).
4. ``scatter_image_embeddings``: ``inputs_embeds.masked_scatter(input_ids == image_token_id, E)`` (v5), or
   ``scatter_by_patch_indices`` with ``image_patches_indices`` (v4.46 ``gather_continuous_embeddings``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkern import ops
from vlmkern.nn.patch_embed import PatchEmbedLinear
from vlmkern.ops.checks import FLOATS, check_same_device, check_tensor
from vlmkern.ops.dispatch import values_readable
from vlmkern.ops.patch_embed import PIXEL_DTYPES

PATCH_SIZE = 30
MAX_SIZE = (1080, 1920)            # (height, width) FuyuImageProcessor.size
PAD_VALUE = 1.0                    # raw pixel units, before rescale: (1/255 - 0.5)/0.5 = -0.99216 after
RESCALE = 1 / 255
MEAN = 0.5
STD = 0.5
IMAGE_TOKEN_ID = 71011             # |SPEAKER| in adept/fuyu-8b, FuyuConfig.image_token_id
PAD_TOKEN_ID = 0

_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _check_images(pixels, name: str) -> Tensor:
    """``(C, H, W)`` or ``(B, C, H, W)`` non-empty pixels -> 4-D view."""
    check_tensor(pixels, name, dtypes=PIXEL_DTYPES)
    if pixels.dim() not in (3, 4):
        raise ValueError(f"{name} must be (C, H, W) or (B, C, H, W), got shape {tuple(pixels.shape)}")
    x = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
    if x.numel() == 0:
        raise ValueError(f"{name} must hold at least one non-empty image, got shape {tuple(pixels.shape)}")
    return x


def _check_size_pair(value, name: str) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def _check_positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_token_id(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int token id, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ resize
def resized_size(height: int, width: int, max_size: tuple[int, int] = MAX_SIZE) -> tuple[int, int]:
    """Size FuyuImageProcessor resizes ``(height, width)`` to: unchanged unless larger than ``max_size``."""
    max_h, max_w = _check_size_pair(max_size, "max_size")
    height, width = _check_size_pair((height, width), "(height, width)")
    if height <= max_h and width <= max_w:
        return height, width
    s = min(max_h / height, max_w / width)   # same float expression as the processor, so int() truncates alike
    return int(height * s), int(width * s)


def resize_to_fit(image: Tensor, max_size: tuple[int, int] = MAX_SIZE, *, method: str = "torch") -> Tensor:
    """FuyuImageProcessor's resize step: downscale (never upscale) to fit ``max_size``, keeping aspect ratio.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)``, uint8 or float in raw units; returned as is if it fits.
        method: ``"torch"`` = the torchvision backend (``FuyuImageProcessor`` with torchvision): antialiased
            bilinear, uint8 kept native on the CPU (torch's PIL-like fixed-point kernel; torchvision does the same
            on AVX2/AVX512 CPUs), elsewhere computed in float32 and rounded. ``"pil"`` = the PIL backend
            (``FuyuImageProcessorPil``): ``PIL.Image.resize`` BILINEAR, CPU uint8 with 1 or 3 channels only.
            The two backends differ by 1-2 grey levels on some pixels (0.6% at 2000x3000, 25% at 1200x500).

    Returns:
        The resized image, same dtype, device and number of dims.
    """
    x = _check_images(image, "image")
    if method not in ("torch", "pil"):
        raise ValueError(f"method must be 'torch' or 'pil', got {method!r}")
    H, W = x.shape[-2:]
    h, w = resized_size(H, W, max_size)
    if (h, w) == (H, W):
        return image
    if method == "pil":
        out = _resize_pil(x, h, w)
    elif x.dtype == torch.uint8 and x.device.type == "cpu":
        out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    else:
        compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        out = F.interpolate(x.to(compute), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        # the antialiased bilinear weights are >= 0 and sum to 1, so a uint8 result stays inside [0, 255]
        out = out.round_().to(torch.uint8) if x.dtype == torch.uint8 else out.to(x.dtype)
    return out if image.dim() == 4 else out.squeeze(0)


def _resize_pil(x: Tensor, h: int, w: int) -> Tensor:
    if x.dtype != torch.uint8 or x.device.type != "cpu" or x.shape[1] not in (1, 3):
        raise ValueError(f"method='pil' needs a CPU uint8 image with 1 or 3 channels, got {x.dtype} on "
                         f"{x.device} with {x.shape[1]} channels")
    import numpy as np
    from PIL import Image

    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    outs = []
    for img in x:
        arr = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
        pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).resize((w, h), resample=bilinear)
        t = torch.from_numpy(np.array(pil))
        outs.append(t[None] if t.dim() == 2 else t.permute(2, 0, 1))
    return torch.stack(outs).contiguous()


# ---------------------------------------------------------------------------------------------- patchify
def patchify(pixels: Tensor, patch_size: int = PATCH_SIZE, *, pad_value: float = PAD_VALUE,
             rescale: float = RESCALE, mean: float | Sequence[float] = MEAN,
             std: float | Sequence[float] = STD) -> Tensor:
    """FuyuImageProcessor's patches from already-resized raw pixels.

    Args:
        pixels: ``(B, C, H, W)`` or one image ``(C, H, W)``, uint8 or float in raw units (0..255).

    Returns:
        float32 ``(B, nH*nW, p*p*C)`` (``(nH*nW, p*p*C)`` for a 3-D input), ``nH = ceil(H/p)``,
        ``nW = ceil(W/p)``; border patches padded with ``pad_value`` (raw units) before normalising, so the
        result equals the processor's pad-to-1080x1920 then crop-to-``ceil(h/p)*p``.
    """
    x = _check_images(pixels, "pixels")
    _check_positive_int(patch_size, "patch_size")
    out = ops.patchify(x, patch_size, pad_value=pad_value, rescale=rescale, mean=mean, std=std)
    return out if pixels.dim() == 4 else out.squeeze(0)


def image_to_patches(image: Tensor, *, max_size: tuple[int, int] | None = MAX_SIZE,
                     patch_size: int = PATCH_SIZE, resize_method: str = "torch") -> tuple[Tensor, tuple[int, int]]:
    """One arbitrary ``(C, H, W)`` image -> ``(patches (nP, p*p*C) float32, (nH, nW))`` as the processor does."""
    _check_images(image, "image")
    if image.dim() != 3:
        raise ValueError(f"image must be one (C, H, W) image, got shape {tuple(image.shape)}")
    if max_size is not None:
        image = resize_to_fit(image, max_size, method=resize_method)
    grid = image_token_layout(*image.shape[-2:], patch_size, max_size=None)
    return patchify(image, patch_size), grid


# ----------------------------------------------------------------------------------------- token stream
def image_token_layout(height: int, width: int, patch_size: int = PATCH_SIZE, *,
                       max_size: tuple[int, int] | None = MAX_SIZE) -> tuple[int, int]:
    """``(nH, nW)`` patch grid of an image of the given (original) size; ``max_size=None``: no resize step."""
    _check_positive_int(patch_size, "patch_size")
    h, w = (height, width) if max_size is None else resized_size(height, width, max_size)
    h, w = _check_size_pair((h, w), "(height, width)")
    return math.ceil(h / patch_size), math.ceil(w / patch_size)


def build_image_tokens(nH: int, nW: int, image_token_id: int, newline_token_id: int, *, device=None) -> Tensor:
    """``[(image_token_id x nW, newline_token_id) x nH]`` as int64 ``(nH*(nW+1),)``."""
    for v, n in ((nH, "nH"), (nW, "nW")):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{n} must be a non-negative int, got {v!r}")
    _check_token_id(image_token_id, "image_token_id")
    _check_token_id(newline_token_id, "newline_token_id")
    rows = torch.full((nH, nW + 1), image_token_id, dtype=torch.int64, device=device)
    rows[:, nW] = newline_token_id
    return rows.reshape(-1)


def build_input_ids(prompt_ids: Sequence[int] | Tensor, grid: tuple[int, int] | None, *,
                    newline_token_id: int, bos_token_id: int, boa_token_id: int | None = None,
                    image_token_id: int = IMAGE_TOKEN_ID, device=None) -> Tensor:
    """One sample's token stream, ``FuyuProcessor`` layout::

        [(image x nW, newline) x nH] + [bos] + prompt_ids + [boa]

    ``prompt_ids`` is the tokenised prompt without BOS; ``grid = (nH, nW)`` (``image_token_layout``) or
    ``None`` for no image; ``boa_token_id`` (``<0x04>`` in Fuyu's vocabulary) is appended unless ``None``.
    """
    if isinstance(prompt_ids, Tensor):
        check_tensor(prompt_ids, "prompt_ids", ndim=1, dtypes=_ID_DTYPES, shape_doc="(n,)")
        device = prompt_ids.device if device is None else device
        prompt = prompt_ids.to(device=device, dtype=torch.int64)
    else:
        prompt = torch.as_tensor(list(prompt_ids), dtype=torch.int64, device=device).reshape(-1)
    _check_token_id(bos_token_id, "bos_token_id")
    parts = []
    if grid is not None:
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise ValueError(f"grid must be (nH, nW) or None, got {grid!r}")
        parts.append(build_image_tokens(grid[0], grid[1], image_token_id, newline_token_id, device=device))
    parts += [torch.tensor([bos_token_id], dtype=torch.int64, device=device), prompt]
    if boa_token_id is not None:
        parts.append(torch.tensor([_check_token_id(boa_token_id, "boa_token_id")], dtype=torch.int64,
                                  device=device))
    return torch.cat(parts)


def pad_left(sequences: Sequence[Tensor], pad_token_id: int = PAD_TOKEN_ID) -> tuple[Tensor, Tensor]:
    """Left-pad 1-D id sequences as FuyuProcessor does -> ``(input_ids (B, L), attention_mask (B, L))``."""
    if len(sequences) == 0:
        raise ValueError("sequences must hold at least one sequence")
    for i, s in enumerate(sequences):
        check_tensor(s, f"sequences[{i}]", ndim=1, dtypes=_ID_DTYPES, shape_doc="(n,)")
    L = max(s.shape[0] for s in sequences)
    dev = sequences[0].device
    ids = torch.full((len(sequences), L), pad_token_id, dtype=torch.int64, device=dev)
    mask = torch.zeros((len(sequences), L), dtype=torch.int64, device=dev)
    for i, s in enumerate(sequences):
        if s.shape[0]:
            ids[i, L - s.shape[0]:] = s.to(dev)
            mask[i, L - s.shape[0]:] = 1
    return ids, mask


def image_patches_indices(input_ids: Tensor, image_token_id: int = IMAGE_TOKEN_ID) -> Tensor:
    """``(..., L)`` ids -> same shape int64: ``k`` at the k-th image placeholder of each row, ``-1`` elsewhere.

    This is v4.46 FuyuProcessor's ``image_patches_indices`` (without its 10 trailing ``-1`` for generation).
    """
    check_tensor(input_ids, "input_ids", dtypes=_ID_DTYPES)
    if input_ids.dim() == 0:
        raise ValueError("input_ids must have a sequence dimension")
    mask = input_ids == image_token_id
    k = torch.cumsum(mask.to(torch.int64), dim=-1) - 1
    return torch.where(mask, k, torch.full_like(k, -1))


# ------------------------------------------------------------------------------------------------ scatter


def _check_embeds(inputs_embeds, ids, ids_name: str) -> None:
    check_tensor(inputs_embeds, "inputs_embeds", ndim=3, dtypes=FLOATS, shape_doc="(B, L, D)")
    check_tensor(ids, ids_name, ndim=2, dtypes=_ID_DTYPES, shape_doc="(B, L)")
    if ids.shape[0] != inputs_embeds.shape[0]:
        raise ValueError(f"{ids_name} has batch size {ids.shape[0]} but inputs_embeds has {inputs_embeds.shape[0]}")


def scatter_image_embeddings(inputs_embeds: Tensor, input_ids: Tensor, patch_embeddings: Tensor,
                             image_token_id: int = IMAGE_TOKEN_ID, *, check: bool = True) -> Tensor:
    """Put patch embeddings on the image placeholders, in order (transformers v5 ``masked_scatter``).

    Args:
        inputs_embeds: ``(B, L, D)`` text embeddings; input_ids: ``(B, L)``.
        patch_embeddings: ``(N, D)`` or ``(B', nP, D)`` (flattened), one row per placeholder in row-major
            order of ``input_ids``: every image's patches, images in batch order.
        check: verify N equals the number of placeholders (one host sync; skipped under torch.compile).

    Returns:
        New ``(B, L, D)`` tensor in ``inputs_embeds.dtype``, differentiable in both embeddings. Computed as a
        gather by ``cumsum(mask) - 1``: no data-dependent shapes.
    """
    _check_embeds(inputs_embeds, input_ids, "input_ids")
    if input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} must equal inputs_embeds (B, L) = "
                         f"{tuple(inputs_embeds.shape[:2])}")
    check_tensor(patch_embeddings, "patch_embeddings", dtypes=FLOATS)
    D = inputs_embeds.shape[-1]
    if patch_embeddings.dim() < 1 or patch_embeddings.shape[-1] != D:
        raise ValueError(f"patch_embeddings must be (N, D={D}) or (B, nP, D={D}), got shape "
                         f"{tuple(patch_embeddings.shape)}")
    check_same_device(inputs_embeds=inputs_embeds, input_ids=input_ids, patch_embeddings=patch_embeddings)
    E = patch_embeddings.reshape(-1, D).to(inputs_embeds.dtype)
    mask = input_ids == image_token_id
    if check and values_readable(mask):      # values to read: not traced, fake, transformed or captured
        n = int(mask.sum())
        if n != E.shape[0]:
            raise ValueError(f"input_ids hold {n} image placeholders (id {image_token_id}) but patch_embeddings "
                             f"has {E.shape[0]} rows: they must match")
    if E.shape[0] == 0:
        return inputs_embeds.clone()
    src = (torch.cumsum(mask.reshape(-1).to(torch.int64), 0) - 1).clamp_(0, E.shape[0] - 1)
    gathered = E.index_select(0, src).view_as(inputs_embeds)
    return torch.where(mask.unsqueeze(-1), gathered, inputs_embeds)


def _device_ints(values: list[int], device: torch.device) -> Tensor:
    """``values`` as an int64 tensor on ``device``, copied without waiting for the device's queue (a blocking
    copy to a GPU synchronises its stream: with ``check=False`` the scatter reads nothing back)."""
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def scatter_by_patch_indices(inputs_embeds: Tensor, patch_indices: Tensor,
                             patch_embeddings: Tensor | Sequence[Tensor], *, check: bool = True) -> Tensor:
    """v4.46 ``FuyuForCausalLM.gather_continuous_embeddings``: ``out[b, t] = E_b[idx[b, t]]`` where ``idx >= 0``.

    Args:
        inputs_embeds: ``(B, L, D)``; patch_indices: ``(B, L')`` with ``L' >= L`` (v4.46's processor returns
            10 extra trailing ``-1``; only the first ``L`` are used).
        patch_embeddings: ``(B, nP, D)`` or a list of ``B`` tensors ``(nP_b, D)``.
        check: verify every index is ``< nP_b`` (one host sync; skipped under torch.compile).
    """
    _check_embeds(inputs_embeds, patch_indices, "patch_indices")
    B, L, D = inputs_embeds.shape
    if patch_indices.shape[1] < L:
        raise ValueError(f"patch_indices must have at least L={L} columns, got shape {tuple(patch_indices.shape)}")
    idx = patch_indices[:, :L].to(torch.int64)
    if isinstance(patch_embeddings, Tensor):
        check_tensor(patch_embeddings, "patch_embeddings", ndim=3, dtypes=FLOATS, shape_doc="(B, nP, D)")
        per_image = list(patch_embeddings.unbind(0)) if patch_embeddings.shape[0] == B else None
    else:
        per_image = list(patch_embeddings)
        for i, e in enumerate(per_image):
            check_tensor(e, f"patch_embeddings[{i}]", ndim=2, dtypes=FLOATS, shape_doc="(nP, D)")
    if per_image is None or len(per_image) != B:
        raise ValueError(f"patch_embeddings must hold one entry per sample (B={B})")
    if any(e.shape[-1] != D for e in per_image):
        raise ValueError(f"patch_embeddings must have last dim D={D}")
    check_same_device(inputs_embeds=inputs_embeds, patch_indices=patch_indices, patch_embeddings=per_image[0])
    counts = [e.shape[0] for e in per_image]
    if check and values_readable(idx):       # values to read: not traced, fake, transformed or captured
        over = (idx >= _device_ints(counts, idx.device)[:, None]).any(dim=1)
        if bool(over.any()):
            b = int(over.nonzero()[0, 0])
            raise ValueError(f"patch_indices of sample {b} point past its {counts[b]} patch embeddings")
    E = torch.cat(per_image).to(inputs_embeds.dtype)
    if E.shape[0] == 0:
        return inputs_embeds.clone()
    offsets = _device_ints([0] + counts[:-1], idx.device).cumsum(0)
    src = (idx + offsets[:, None]).clamp_(0, E.shape[0] - 1)
    gathered = E.index_select(0, src.reshape(-1)).view_as(inputs_embeds)
    return torch.where((idx >= 0).unsqueeze(-1), gathered, inputs_embeds)


def build_inputs_embeds(input_ids: Tensor, patch_embeddings: Tensor, embed_tokens: nn.Module,
                        image_token_id: int = IMAGE_TOKEN_ID) -> Tensor:
    """``embed_tokens(input_ids)`` with the placeholders replaced by ``patch_embeddings`` (prefill input)."""
    return scatter_image_embeddings(embed_tokens(input_ids), input_ids, patch_embeddings, image_token_id)


# ---------------------------------------------------------------------------------------------- weights
_VISION_PREFIXES = ("model.vision_embed_tokens.", "vision_embed_tokens.", "vit_encoder.linear_encoder.")


def fuyu_vision_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{weight, bias}`` of Fuyu's ``vision_embed_tokens`` from a full checkpoint state dict.

    Accepts transformers v5 (``model.vision_embed_tokens.*``), v4 (``vision_embed_tokens.*``) and adept's
    original (``vit_encoder.linear_encoder.*``) key layouts.
    """
    found = {}
    for prefix in _VISION_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if sub:
            found[prefix] = sub
    if len(found) != 1:
        what = "no" if not found else f"several ({', '.join(found)})"
        raise ValueError(f"state_dict has {what} vision_embed_tokens key layouts; expected exactly one of "
                         f"{', '.join(p + 'weight' for p in _VISION_PREFIXES)}")
    return next(iter(found.values()))


class ImageEmbeddings(NamedTuple):
    embeddings: Tensor               # (sum of nH*nW, D): rows in placeholder order
    grids: list[tuple[int, int]]     # (nH, nW) per image, for build_input_ids


class FuyuImageEmbedder(nn.Module):
    """Raw image(s) -> Fuyu patch embeddings: resize + fused normalise/patchify/Linear.

    State dict: ``vision_embed_tokens.{weight, bias}`` (the v4 checkpoint names); ``load_fuyu_state_dict``
    also takes full v5 / v4 / adept checkpoints.
    """

    def __init__(self, hidden_size: int, *, patch_size: int = PATCH_SIZE, num_channels: int = 3,
                 max_size: tuple[int, int] | None = MAX_SIZE, resize_method: str = "torch",
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.patch_size = _check_positive_int(patch_size, "patch_size")
        self.num_channels = _check_positive_int(num_channels, "num_channels")
        self.max_size = None if max_size is None else _check_size_pair(max_size, "max_size")
        if resize_method not in ("torch", "pil"):
            raise ValueError(f"resize_method must be 'torch' or 'pil', got {resize_method!r}")
        self.resize_method = resize_method
        self.vision_embed_tokens = PatchEmbedLinear(patch_size * patch_size * num_channels, hidden_size,
                                                    bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, config, **kwargs) -> "FuyuImageEmbedder":
        """From a transformers ``FuyuConfig`` (v5 ``text_config.hidden_size`` or v4 ``hidden_size``)."""
        text = getattr(config, "text_config", None)
        hidden = getattr(text, "hidden_size", None) or config.hidden_size
        return cls(hidden, patch_size=config.patch_size, num_channels=config.num_channels, **kwargs)

    @classmethod
    def from_pretrained_model(cls, model: nn.Module, **kwargs) -> "FuyuImageEmbedder":
        """Copy of a loaded transformers ``FuyuForCausalLM`` / ``FuyuModel``'s vision embedding."""
        w = fuyu_vision_state_dict(model.state_dict())
        kwargs.setdefault("device", w["weight"].device)
        kwargs.setdefault("dtype", w["weight"].dtype)
        emb = cls.from_config(model.config, bias="bias" in w, **kwargs)
        emb.vision_embed_tokens.load_state_dict(w, strict=True)
        return emb

    def load_fuyu_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        return self.vision_embed_tokens.load_state_dict(fuyu_vision_state_dict(state_dict), strict=strict)

    def forward(self, images: Tensor | Sequence[Tensor]) -> ImageEmbeddings:
        """``images``: ``(B, C, H, W)`` (same size) or a list of ``(C, H, W)``, uint8/float raw pixels.

        Each image is resized as the processor does (unless ``max_size is None``), then embedded in one
        fused op per image size.
        """
        batch = [images] if isinstance(images, Tensor) else list(images)
        if isinstance(images, Tensor):
            _check_images(images, "images")
            if images.dim() != 4:
                raise ValueError(f"images must be (B, C, H, W) or a list of (C, H, W), got shape "
                                 f"{tuple(images.shape)}")
        elif not batch:
            raise ValueError("images must hold at least one image")
        embeddings, grids = [], []
        for i, img in enumerate(batch):
            name = "images" if isinstance(images, Tensor) else f"images[{i}]"
            x = _check_images(img, name)
            if not isinstance(images, Tensor) and img.dim() != 3:
                raise ValueError(f"{name} must be one (C, H, W) image, got shape {tuple(img.shape)}")
            if x.shape[1] != self.num_channels:
                raise ValueError(f"{name} has {x.shape[1]} channels, expected num_channels={self.num_channels}")
            if self.max_size is not None:
                x = resize_to_fit(x, self.max_size, method=self.resize_method)
            e = self.vision_embed_tokens.forward_images(x, patch_size=self.patch_size)
            embeddings.append(e.reshape(-1, e.shape[-1]))
            grid = image_token_layout(*x.shape[-2:], self.patch_size, max_size=None)
            grids += [grid] * x.shape[0]
        return ImageEmbeddings(torch.cat(embeddings), grids)
