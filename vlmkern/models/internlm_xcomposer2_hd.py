"""InternLM-XComposer2-4KHD dynamic image partition with the token layout fused into the projector
(``ixc_utils.HD_transform``, ``build_mlp.py``).

Data side: ``HD_transform`` (exact port: landscape orientation, ``scale`` columns of 336 px, PIL bilinear resize,
white padding of the short side to a multiple of 336, centred) and ``tower_inputs`` (row-major 336 px tiles after
the bicubic 336x336 global view, what ``CLIPVisionTower.forward`` feeds the ViT).

Model side: ``project_and_pack`` builds, per image, the original ``CLIPVisionTower.forward`` sequence

    global view: 12 rows x (12 merged tokens + sub_GN) | glb_GN | local grid: 12h rows x (12w merged tokens + sub_GN)

(merged token = 2x2 ViT tokens concatenated along channels, block ``q = dy·2 + dx``; ``(h·w+1)·144 + 1 + (h+1)·12``
tokens) and applies ``vision_proj`` (``Linear -> GELU -> Linear``) to it. The first GEMM reads every merged row
straight from the ViT output through a ``(L, 4)`` row index (piece ``q`` of K from ViT token ``(2i+dy, 2j+dx)``),
the separators from two learned 4C-wide rows; the rearranged ``(L, 4C)`` sequence is never written. The index
depends only on the grid: built once per ``(h, w)`` on the CPU, moved to the device once.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkern.models.llava_next import projector_parameters, reads_projector_weights
from vlmkern.nn.projector import MLPProjector
from vlmkern.ops.checks import FLOATS, autocasting, check_same_device, check_tensor, square_side
from vlmkern.ops import gather_linear
from vlmkern.ops.dispatch import eager_cache

TILE = 336
VIT_SIDE = 24            # CLIP ViT-L/14-336: 24x24 patch tokens per tile (12x12 after the 2x2 merge)
HD_NUM_CHAT = 55         # README, 4KHD chat
HD_NUM_FINETUNE = 16     # finetune README default


# ---------------------------------------------------------------------------------------------- geometry
class HDGeometry(NamedTuple):
    """What ``HD_transform`` does to a ``width x height`` image, in the image's own orientation."""
    resized: tuple[int, int]    # (width, height) after the resize
    padded: tuple[int, int]     # (width, height) of the result: both multiples of 336
    grid: tuple[int, int]       # (h, w) = (tiles down, tiles across) of the result


def _positive(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _landscape_scale(width: int, height: int, hd_num: int) -> tuple[int, int, int]:
    """For a landscape ``width >= height``: ``(new_w, new_h, padded_h)`` exactly as the original computes them."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:   # np.ceil of a float == math.ceil
        scale += 1
    scale -= 1
    new_w = int(scale * TILE)
    new_h = int(new_w / ratio)
    padded_h = int(math.ceil(new_h / TILE) * TILE)
    return new_w, new_h, padded_h


def hd_geometry(width: int, height: int, hd_num: int = HD_NUM_FINETUNE) -> HDGeometry:
    """Sizes ``HD_transform`` produces for a ``width x height`` image (PIL's ``(width, height)`` order)."""
    _positive(width, "width")
    _positive(height, "height")
    _positive(hd_num, "hd_num")
    trans = width < height
    w, h = (height, width) if trans else (width, height)
    new_w, new_h, padded_h = _landscape_scale(w, h, hd_num)
    if new_w == 0:
        raise ValueError(f"hd_num={hd_num} is too small for a {width}x{height} image (no 336-px column fits)")
    if trans:
        return HDGeometry((new_h, new_w), (padded_h, new_w), (new_w // TILE, padded_h // TILE))
    return HDGeometry((new_w, new_h), (new_w, padded_h), (padded_h // TILE, new_w // TILE))


def HD_transform(img, hd_num: int = HD_NUM_FINETUNE):
    """The original ``HD_transform(img, hd_num)`` on a PIL image: returns the padded PIL image.

    ``torchvision.transforms.functional.resize`` / ``pad`` on PIL images are ``Image.resize`` (bilinear) and
    ``ImageOps.expand``; called here directly.
    """
    from PIL import Image, ImageOps

    transpose = getattr(Image, "Transpose", Image).TRANSPOSE
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    if getattr(img, "mode", None) != "RGB":   # the original pads with fill=[255, 255, 255], which only RGB takes
        raise ValueError(f"img must be an RGB PIL image, got mode {getattr(img, 'mode', type(img).__name__)!r}: "
                         f"convert it first (img.convert('RGB')), as InternLM-XComposer2 does")
    width, height = img.size
    hd_geometry(width, height, hd_num)  # argument checks
    trans = width < height
    if trans:
        img = img.transpose(transpose)
        width, height = img.size
    new_w, new_h, padded_h = _landscape_scale(width, height, hd_num)
    img = img.resize((new_w, new_h), bilinear)
    top = int((padded_h - new_h) / 2)
    img = ImageOps.expand(img, border=(0, top, 0, padded_h - new_h - top), fill=(255, 255, 255))
    if trans:
        img = img.transpose(transpose)
    return img


def tower_inputs(image: Tensor) -> Tensor:
    """``(1, 3, H, W)`` or ``(3, H, W)`` normalised HD image -> ``(1 + h·w, 3, 336, 336)``: the bicubic 336x336
    global view (computed in float32, cast back) then the row-major tiles, as ``CLIPVisionTower.forward``."""
    check_tensor(image, "image", dtypes=FLOATS)
    img = image if image.dim() == 4 else image[None]
    if img.dim() != 4 or img.shape[0] != 1 or img.shape[2] % TILE or img.shape[3] % TILE or img.shape[2] == 0:
        raise ValueError(f"image must be one (3, H, W) image with H, W multiples of {TILE}, "
                         f"got shape {tuple(image.shape)}")
    _, C, H, W = img.shape
    sub = img.reshape(1, C, H // TILE, TILE, W // TILE, TILE).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, TILE, TILE)
    glb = F.interpolate(img.float(), size=(TILE, TILE), mode="bicubic").to(sub.dtype)
    return torch.cat([glb, sub])


def tokens_per_image(h: int, w: int, vit_side: int = VIT_SIDE) -> int:
    """``(h·w+1)·s² + 1 + (h+1)·s`` with ``s = vit_side // 2`` merged tokens per side (7141 for 6x8)."""
    s = vit_side // 2
    return (h * w + 1) * s * s + 1 + (h + 1) * s


# ------------------------------------------------------------------------------------------- token index
# Extra source rows: the 4 C-wide pieces of sub_GN, then of glb_GN. In cached per-image plans they are coded
# as -1 - e (e = 0..7) and resolved to ``M + e`` (after all ViT rows) when a batch is assembled.
_SUB_GN = (-1, -2, -3, -4)
_GLB_GN = (-5, -6, -7, -8)


@eager_cache(maxsize=128)
def _plan(h: int, w: int, side: int) -> Tensor:
    """``(L, 4)`` int32 source rows of one image's sequence, relative to its global-view tile (row 0)."""
    s = side // 2
    T = side * side
    i = torch.arange(s, dtype=torch.int32)
    q = torch.arange(4, dtype=torch.int32)
    dy, dx = q // 2, q % 2
    # merged token (i, j) of a tile, piece q: ViT token (2i + dy, 2j + dx)
    merged = ((2 * i[:, None, None] + dy) * side + 2 * i[None, :, None] + dx)            # (s, s, 4)
    sub = torch.tensor(_SUB_GN, dtype=torch.int32)
    glb_rows = torch.cat([merged, sub.expand(s, 1, 4)], 1).reshape(-1, 4)                 # s x (s + 1)
    tiles = 1 + torch.arange(h * w, dtype=torch.int32).reshape(h, w)
    local = tiles[:, None, :, None, None] * T + merged[None, :, None, :, :]               # (h, s, w, s, 4)
    local = local.reshape(h * s, w * s, 4)
    local = torch.cat([local, sub.expand(h * s, 1, 4)], 1).reshape(-1, 4)                 # hs x (ws + 1)
    plan = torch.cat([glb_rows, torch.tensor(_GLB_GN, dtype=torch.int32)[None], local])
    if plan.shape[0] != tokens_per_image(h, w, side):  # the original asserts this count
        raise RuntimeError(f"4KHD layout of a {h}x{w} grid has {plan.shape[0]} tokens, "
                           f"expected {tokens_per_image(h, w, side)}")
    return plan


@eager_cache(maxsize=64)
def _batch_index(grids: tuple[tuple[int, int], ...], side: int, device: str) -> Tensor:
    M = sum(1 + h * w for h, w in grids) * side * side
    parts, row0 = [], 0
    for h, w in grids:
        p = _plan(h, w, side)
        parts.append(torch.where(p >= 0, p + row0, M - 1 - p))
        row0 += (1 + h * w) * side * side
    return torch.cat(parts).to(device)


def _count(v) -> int | None:
    """An integer (Python, numpy, a 0-d integer tensor; not a bool) as an int, else None."""
    if isinstance(v, int) and not isinstance(v, bool):   # first: a symbolic int (torch.compile) has no getattr
        return v
    if isinstance(v, bool) or getattr(v, "dtype", None) == torch.bool:
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _grids(grids, n_images: int | None = None) -> tuple[tuple[int, int], ...]:
    if isinstance(grids, Tensor):
        if grids.is_meta:  # the grids choose the layout: meta features are fine, meta grids are not
            raise ValueError("grids is on meta: its values choose the layout; pass (h, w) pairs or a tensor "
                             "holding values")
        grids = grids.tolist()
    if isinstance(grids, (tuple, list)) and len(grids) == 2 and all(_count(v) is not None for v in grids):
        grids = [grids]
    out = []
    for k, g in enumerate(grids if isinstance(grids, (tuple, list)) else [None]):
        pair = [_count(v) for v in g] if isinstance(g, (tuple, list)) and len(g) == 2 else [None]
        if not all(v is not None and v > 0 for v in pair):
            raise ValueError(f"grids[{k}] must be an (h, w) pair of positive tile counts, got {g!r}")
        out.append((pair[0], pair[1]))
    if not out:
        raise ValueError("grids must name at least one image's (h, w)")
    if n_images is not None and len(out) != n_images:
        raise ValueError(f"features has {n_images} images but grids has {len(out)}")
    return tuple(out)


def _separators(glb_GN: Tensor, sub_GN: Tensor, C: int, dtype) -> Tensor:
    for t, name in ((glb_GN, "glb_GN"), (sub_GN, "sub_GN")):
        check_tensor(t, name)
        if t.numel() != 4 * C:
            raise ValueError(f"{name} must hold one 4C = {4 * C} vector (merged-token width; features have "
                             f"C={C}), got shape {tuple(t.shape)}")
    return torch.cat([sub_GN.reshape(4, C), glb_GN.reshape(4, C)]).to(dtype)


def _features(features, grids) -> tuple[Tensor, tuple[tuple[int, int], ...]]:
    if isinstance(features, (list, tuple)):
        if not features:
            raise ValueError("features must hold at least one image")
        for k, f in enumerate(features):
            check_tensor(f, f"features[{k}]", ndim=3, shape_doc="(1 + h*w, tokens, C)")
        grids = _grids(grids, len(features))
        for k, (f, (h, w)) in enumerate(zip(features, grids)):
            if f.shape[0] != 1 + h * w:
                raise ValueError(f"features[{k}] has {f.shape[0]} tiles but its grid {h}x{w} needs 1 + {h * w}")
        x = features[0] if len(features) == 1 else torch.cat(list(features))
    else:
        check_tensor(features, "features", ndim=3, shape_doc="(sum_i (1 + h_i*w_i), tokens, C)")
        grids = _grids(grids)
        need = sum(1 + h * w for h, w in grids)
        if features.shape[0] != need:
            raise ValueError(f"features has {features.shape[0]} tiles but grids {list(grids)} need {need} "
                             f"(a global view + h*w tiles each)")
        x = features
    side = square_side(x.shape[1])
    if side * side != x.shape[1] or side % 2:
        raise ValueError(f"features must have an even square number of tokens per tile (576 = 24x24; CLS "
                         f"dropped), got {x.shape[1]}")
    return x, grids


# ------------------------------------------------------------------------------------------ fused packing
def project_and_pack(features, grids, glb_GN: Tensor, sub_GN: Tensor,
                     projector: nn.Module) -> tuple[list[Tensor], list[int]]:
    """``vision_proj(CLIPVisionTower layout(features))`` per image, as one gather-GEMM + one GEMM.

    Args:
        features: ViT last-layer tokens without CLS, per image ``(1 + h·w, 576, C)`` (global view first, then
            the row-major tiles), as a list or one tensor of all images' tiles (any strides).
        grids: ``(h, w)`` tiles down/across per image (``HDGeometry.grid``; the padded image is 336·h x 336·w).
        glb_GN: ``(1, 1, 4C)`` separator between the global and the local view (``plora_glb_GN``).
        sub_GN: ``(1, 1, 1, 4C)`` row-end token of both views (``plora_sub_GN``).
        projector: ``Linear(4C, D1) -> exact GELU -> Linear(D1, D)`` (``vision_proj``).

    Returns:
        ``(list of (L_i, D) tensors, [L_i])`` with ``L_i = (h·w+1)·144 + 1 + (h+1)·12``; the original returns
        their concatenation ``(1, sum L_i, D)`` and the ``output_len`` list.
    """
    x, grids = _features(features, grids)
    W1, b1, W2, b2 = projector_parameters(projector)
    C = x.shape[-1]
    if W1.shape[1] != 4 * C:
        raise ValueError(f"projector's first Linear takes {W1.shape[1]} features but the 2x2-merged tokens of "
                         f"width-{C} features have 4C = {4 * C}")
    if x.dtype != W1.dtype and not autocasting(x):  # under autocast both run in its dtype, as the original
        raise TypeError(f"features dtype {x.dtype} must match the projector's dtype {W1.dtype}")
    extra = _separators(glb_GN, sub_GN, C, x.dtype)
    check_same_device(features=x, projector=W1, glb_GN=glb_GN, sub_GN=sub_GN)
    side = square_side(x.shape[1])
    index = _batch_index(grids, side, str(x.device))
    h = gather_linear(x, index, W1, b1, extra=extra, gelu=True, validate_values=False)
    out = F.linear(h, W2, b2)
    lens = [tokens_per_image(gh, gw, side) for gh, gw in grids]
    return list(torch.split(out, lens)), lens


def layout_tokens(features, grids, glb_GN: Tensor, sub_GN: Tensor) -> Tensor:
    """The pre-projector ``(sum L_i, 4C)`` sequence (the original tower's output, batch dim dropped), gathered
    through the same index the fused kernel reads; for inspection and tests."""
    x, grids = _features(features, grids)
    C = x.shape[-1]
    extra = _separators(glb_GN, sub_GN, C, x.dtype)
    index = _batch_index(grids, square_side(x.shape[1]), str(x.device)).long()
    rows = torch.cat([x.reshape(-1, C), extra])
    return rows[index].reshape(index.shape[0], 4 * C)


def unfused_project_and_pack(features, grids, glb_GN: Tensor, sub_GN: Tensor,
                             projector: nn.Module) -> tuple[list[Tensor], list[int]]:
    """The original computation in plain PyTorch (reshape/permute/cat to the ``(L, 4C)`` sequence, then the
    projector): same arguments and result as ``project_and_pack``; the baseline for benchmarks."""
    x, grids = _features(features, grids)
    _, N, C = x.shape
    S = square_side(N)
    s = S // 2
    glb_GN = glb_GN.reshape(1, 1, 4 * C).to(x.dtype)
    sub_GN = sub_GN.reshape(1, 1, 1, 4 * C).to(x.dtype)
    seqs, lens, row0 = [], [], 0
    for h, w in grids:
        f = x[row0:row0 + 1 + h * w]
        merged = f.reshape(-1, s, 2, s, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, 4 * C)
        g = torch.cat([merged[:1], sub_GN.expand(1, s, 1, 4 * C)], 2).reshape(1, -1, 4 * C)
        loc = merged[1:].reshape(1, h, w, s, s, 4 * C).permute(0, 1, 3, 2, 4, 5).reshape(1, h * s, w * s, 4 * C)
        loc = torch.cat([loc, sub_GN.expand(1, h * s, 1, 4 * C)], 2).reshape(1, -1, 4 * C)
        seqs.append(torch.cat([g, glb_GN, loc], 1)[0])
        lens.append(seqs[-1].shape[0])
        row0 += 1 + h * w
    out = projector(torch.cat(seqs))
    return list(torch.split(out, lens)), lens


# ----------------------------------------------------------------------------------------------- module
class InternLMXComposer2HDImagePacker(nn.Module):
    """``vision_proj`` + ``plora_glb_GN`` + ``plora_sub_GN`` of ``InternLMXComposer2ForCausalLM`` (4KHD), same
    names and shapes: those checkpoint keys load (``vision_proj.0.*``/``2.*`` map onto ``MLPProjector``) and are
    the keys it saves.

    ``forward(features, grids) -> (list of (L_i, D), [L_i])`` = ``project_and_pack``.
    """

    def __init__(self, vit_hidden_size: int = 1024, hidden_size: int = 4096, device=None, dtype=None):
        super().__init__()
        merged = 4 * vit_hidden_size
        self.vision_proj = MLPProjector(merged, hidden_size, hidden_size, device=device, dtype=dtype,
                                        saved_layout="llava")
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, merged, device=device, dtype=dtype))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged, device=device, dtype=dtype))

    def forward(self, features, grids) -> tuple[list[Tensor], list[int]]:
        pack = project_and_pack if reads_projector_weights(self.vision_proj) else unfused_project_and_pack
        return pack(features, grids, self.plora_glb_GN, self.plora_sub_GN, self.vision_proj)


# ------------------------------------------------------------------------------------------- benchmarks
def benchmark_inputs(image_sizes: Sequence[tuple[int, int]] = ((1024, 768),), hd_num: int = HD_NUM_CHAT, *,
                     vit_hidden_size: int = 1024, hidden_size: int = 4096, device="cuda", dtype=torch.bfloat16,
                     requires_grad: bool = False, seed: int = 0) -> dict:
    """Random inputs at 4KHD shapes for images ``(width, height)`` and ``hd_num`` (16 or 55):
    ``dict(features, grids, glb_GN, sub_GN, projector)``; call
    ``project_and_pack(d["features"], d["grids"], d["glb_GN"], d["sub_GN"], d["projector"])`` (or
    ``unfused_project_and_pack``). 1024x768: 3x4 grid at hd_num 16 (1921 tokens), 6x8 at 55 (7141)."""
    g = torch.Generator().manual_seed(seed)
    grids = [hd_geometry(w, h, hd_num).grid for w, h in image_sizes]
    tiles = sum(1 + h * w for h, w in grids)
    C = vit_hidden_size
    features = torch.randn(tiles, VIT_SIDE * VIT_SIDE, C, generator=g).to(device, dtype)
    projector = MLPProjector(4 * C, hidden_size, hidden_size).to(device, dtype)
    glb = (torch.randn(1, 1, 4 * C, generator=g) * 0.02).to(device, dtype)
    sub = (torch.randn(1, 1, 1, 4 * C, generator=g) * 0.02).to(device, dtype)
    if requires_grad:
        for t in (features, glb, sub):
            t.requires_grad_(True)
    else:
        projector.requires_grad_(False)
    return dict(features=features, grids=grids, glb_GN=glb, sub_GN=sub, projector=projector)


__all__ = [
    "TILE", "VIT_SIDE", "HD_NUM_CHAT", "HD_NUM_FINETUNE", "HDGeometry", "hd_geometry", "HD_transform",
    "tower_inputs", "tokens_per_image", "project_and_pack", "layout_tokens", "unfused_project_and_pack",
    "InternLMXComposer2HDImagePacker", "benchmark_inputs",
]
