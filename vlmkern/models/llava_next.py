"""LLaVA-NeXT (1.6) AnyRes image path with the projector fused into the packing (HF ``llava_next``).

Conventions are transformers' (v5) by default: image sizes and grid pinpoints are ``(height, width)``, and unpadding
rounds ``int(round(x, 7))``. ``convention="llava"`` takes the original LLaVA's instead (``llava/mm_utils.py``,
``llava_arch.py``): sizes and pinpoints ``(width, height)`` (``image.size``, the config's list as the original reads
it) and ``int(x)``; the two differ on exact ties of the pinpoint choice and by one feature row or column on sizes
where ``x`` falls just below an integer.

Data side, CPU, exactly as ``LlavaNextImageProcessorPil`` (PIL backend):
``select_best_resolution`` -> ``resize_and_pad`` (aspect-preserving bicubic resize, centred on a black canvas)
-> ``divide_to_tiles`` (row-major ``tile x tile`` crops); ``image_tiles`` gives ``[base] + tiles``.

Model side: ``project_and_pack`` equals ``LlavaNextModel.pack_image_features`` applied to
``multi_modal_projector(features[i])``, computed as

1. ``h = gelu(features[kept] W1ᵀ + b1)``: one gather-GEMM over the base tile and the feature-grid rows and columns
   that ``unpad_image`` keeps (the rows it drops are never projected);
2. ``out = h[src] W2ᵀ + b2`` with ``out[r] = image_newline`` where ``src[r] = -1``: the second GEMM writes every
   projected row straight to its place in the packed sequence and the newline after each grid row.

The two index vectors depend only on image sizes: built once per (size, grid) on the CPU, moved to the device once.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from vlmkern.nn._linear import plain_gelu, plain_linear
from vlmkern.nn.projector import MLPProjector
from vlmkern.ops.checks import autocasting, check_same_device, check_tensor
from vlmkern.ops import gather_linear
from vlmkern.ops.dispatch import eager_cache

# llava-hf/llava-v1.6-* config: image_grid_pinpoints, vision_config.image_size, vision_config.patch_size.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
TILE_SIZE = 336
PATCH_SIZE = 14


# ------------------------------------------------------------------------------------------------ checks
def _size_pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def _pinpoints(image_grid_pinpoints) -> tuple[tuple[int, int], ...]:
    if not isinstance(image_grid_pinpoints, (list, tuple)) or not image_grid_pinpoints:
        raise ValueError(f"image_grid_pinpoints must be a non-empty list of (height, width) pairs, "
                         f"got {image_grid_pinpoints!r}")
    return tuple(_size_pair(p, f"image_grid_pinpoints[{i}]") for i, p in enumerate(image_grid_pinpoints))


CONVENTIONS = ("transformers", "llava")


def _is_llava(convention) -> bool:
    """Whether ``convention`` is the original LLaVA's ``(width, height)`` / ``int(x)`` (ValueError if neither)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return convention == "llava"


def _swap(pair) -> tuple[int, int]:
    return pair[1], pair[0]


def _hf_order(convention, image_sizes, image_grid_pinpoints, name: str | None = None) -> tuple[list, tuple, bool]:
    """``(sizes, pinpoints, exact)`` in transformers' ``(height, width)`` order (checked; errors name
    ``image_sizes[i]``, or ``name``), and whether unpadding rounds as transformers (``int(round(x, 7))``) rather
    than as the original LLaVA (``int(x)``)."""
    llava = _is_llava(convention)
    pins = _pinpoints(image_grid_pinpoints)
    sizes = [_size_pair(s, name or f"image_sizes[{i}]") for i, s in enumerate(image_sizes)]
    if llava:
        pins, sizes = tuple(_swap(p) for p in pins), [_swap(s) for s in sizes]
    return sizes, pins, not llava


def _positive(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ------------------------------------------------------------------------------------- resolution, grid
def select_best_resolution(image_size, image_grid_pinpoints, *, convention: str = "transformers") -> tuple[int, int]:
    """transformers' ``select_best_resolution``: the pinpoint ``(H, W)`` keeping the most pixels after an
    aspect-preserving downscale (``min(int(w·s)·int(h·s), w·h)``), ties -> least waste, then first listed.
    ``convention="llava"``: the original's, on ``(width, height)`` pairs, returning ``(W, H)``."""
    if _is_llava(convention):
        return _swap(select_best_resolution(_swap(_size_pair(image_size, "image_size")),
                                            [_swap(p) for p in _pinpoints(image_grid_pinpoints)]))
    h, w = _size_pair(image_size, "image_size")
    best, best_eff, best_waste = None, 0, float("inf")
    for H, W in _pinpoints(image_grid_pinpoints):
        scale = min(W / w, H / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = W * H - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (H, W), eff, waste
    return best


def anyres_grid_shape(image_size, image_grid_pinpoints, tile_size: int = TILE_SIZE, *,
                      convention: str = "transformers") -> tuple[int, int]:
    """``(tiles down, tiles across)`` = ``get_anyres_image_grid_shape`` (HF passes ``vision_config.image_size``);
    ``convention="llava"``: the original's ``(tiles across, tiles down)`` of a ``(width, height)`` size."""
    a, b = select_best_resolution(image_size, image_grid_pinpoints, convention=convention)
    _positive(tile_size, "tile_size")
    return a // tile_size, b // tile_size


def num_tiles(image_size, image_grid_pinpoints, tile_size: int = TILE_SIZE, *, convention: str = "transformers") -> int:
    """Tiles the processor makes for one image, base included (``image_size_to_num_patches``)."""
    H, W = select_best_resolution(image_size, image_grid_pinpoints, convention=convention)
    _positive(tile_size, "tile_size")
    return math.ceil(H / tile_size) * math.ceil(W / tile_size) + 1


def resized_size_for_patching(image_size, target) -> tuple[int, int]:
    """``get_patch_output_size``: fit inside ``target`` keeping aspect, ``ceil`` on the non-limiting side, capped."""
    h, w = _size_pair(image_size, "image_size")
    H, W = _size_pair(target, "target")
    scale_w, scale_h = W / w, H / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), H), W
    return H, min(math.ceil(w * scale_h), W)


def padding_for_patching(resized, target) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` black padding centring ``resized`` on ``target`` (v5: odd pixel bottom/right)."""
    h, w = _size_pair(resized, "resized")
    H, W = _size_pair(target, "target")
    top, ry = divmod(H - h, 2)
    left, rx = divmod(W - w, 2)
    return top, top + ry, left, left + rx


def _check_image(image) -> Tensor:
    check_tensor(image, "image", ndim=3, dtypes=(torch.uint8,), shape_doc="(C, H, W) uint8")
    if image.shape[0] not in (1, 3) or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image must be a non-empty (C, H, W) uint8 image with 1 or 3 channels, "
                         f"got shape {tuple(image.shape)}")
    return image.cpu()


def _pil_resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    import numpy as np
    from PIL import Image

    bicubic = getattr(Image, "Resampling", Image).BICUBIC
    arr = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    out = torch.from_numpy(np.array(pil.resize((size[1], size[0]), resample=bicubic)))
    return (out[None] if out.dim() == 2 else out.permute(2, 0, 1)).contiguous()


def resize_and_pad(image: Tensor, target) -> Tensor:
    """``(C, H, W)`` uint8 -> ``(C, target_h, target_w)`` uint8: PIL bicubic resize to
    ``resized_size_for_patching`` then zero padding by ``padding_for_patching`` (the processor's two steps)."""
    image = _check_image(image)
    size = resized_size_for_patching(image.shape[1:], target)
    top, bottom, left, right = padding_for_patching(size, target)
    return torch.nn.functional.pad(_pil_resize(image, size), (left, right, top, bottom))


def divide_to_tiles(image: Tensor, tile_size: int = TILE_SIZE) -> Tensor:
    """Row-major ``tile x tile`` crops of ``(C, H, W)`` (``H``, ``W`` multiples of ``tile``) -> ``(n, C, t, t)``."""
    _positive(tile_size, "tile_size")
    C, H, W = image.shape
    if H % tile_size or W % tile_size:
        raise ValueError(f"image of size {H}x{W} is not a whole number of {tile_size}-pixel tiles")
    t = tile_size
    return image.reshape(C, H // t, t, W // t, t).permute(1, 3, 0, 2, 4).reshape(-1, C, t, t)


def image_tiles(image: Tensor, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, tile_size: int = TILE_SIZE, *,
                convention: str = "transformers") -> Tensor:
    """``[base resized to tile x tile (aspect not kept)] + tiles`` of one uint8 ``(C, H, W)`` image:
    ``(1 + n, C, tile, tile)`` uint8, the processor's ``get_image_patches`` before rescale/normalise
    (``convention="llava"``: pinpoints as the original reads them, ``(width, height)``)."""
    image = _check_image(image)
    pins = _pinpoints(image_grid_pinpoints)
    target = select_best_resolution(image.shape[1:], [_swap(p) for p in pins] if _is_llava(convention) else pins)
    tiles = divide_to_tiles(resize_and_pad(image, target), tile_size)
    base = _pil_resize(image, (tile_size, tile_size))
    return torch.cat([base[None], tiles])


# -------------------------------------------------------------------------------------------- unpadding
def unpad_bounds(image_size, grid_size, *, convention: str = "transformers") -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)`` of the ``(grid_h, grid_w)`` feature grid that ``unpad_image`` keeps
    (v5 arithmetic: ``int(round(x, 7))``; ``convention="llava"``: the original's ``int(x)`` on a
    ``(width, height)`` image size)."""
    size = _size_pair(image_size, "image_size")
    llava = _is_llava(convention)
    return _unpad(_swap(size) if llava else size, _size_pair(grid_size, "grid_size"), not llava)


def _unpad(image_size: tuple[int, int], grid_size: tuple[int, int], exact: bool) -> tuple[int, int, int, int]:
    """:func:`unpad_bounds` of a ``(height, width)`` size; ``exact``: transformers' rounding, else ``int(x)``."""
    (oh, ow), (ch, cw) = image_size, grid_size
    cut = (lambda x: int(round(x, 7))) if exact else int
    if ow / oh > cw / ch:
        pad = (ch - cut(oh * (cw / ow))) // 2
        return pad, ch - pad, 0, cw
    pad = (cw - cut(ow * (ch / oh))) // 2
    return 0, ch, pad, cw - pad


class PackPlan(NamedTuple):
    """Per image: which feature rows are projected (``kept``, ascending, relative to the image's first row) and
    where each packed token comes from (``source``: a row of the projected ``kept`` rows, or -1 for the newline)."""
    kept: Tensor          # (R,) int32
    source: Tensor        # (L,) int32
    feature_rows: int     # rows of features[i] (tiles x tokens_per_tile)


@eager_cache(maxsize=256)
def _plan(image_size: tuple[int, int], n_tiles: int, tokens: int, side: int, pinpoints: tuple, tile_size: int,
          newline: bool, exact: bool) -> PackPlan:
    T = tokens
    base = torch.arange(T, dtype=torch.int32)
    if n_tiles == 1:  # HF's single-tile fallback: base then one newline
        src = torch.cat([base, torch.full((1,), -1, dtype=torch.int32)]) if newline else base
        return PackPlan(base, src, T)
    nph, npw = anyres_grid_shape(image_size, list(pinpoints), tile_size)
    r0, r1, c0, c1 = _unpad(image_size, (nph * side, npw * side), exact)
    ys = torch.arange(r0, r1, dtype=torch.int32)[:, None]
    xs = torch.arange(c0, c1, dtype=torch.int32)[None, :]
    tile = (ys // side) * npw + xs // side
    grid_rows = (1 + tile) * T + (ys % side) * side + xs % side
    h, w = grid_rows.shape
    # Kept rows in feature order (a row-major walk of the grid jumps between tiles): the first GEMM then reads
    # its rows in memory order, and when unpadding drops nothing it reads ``features`` as they are, no gather.
    # The grid's row-major order moves to ``source``, which the second GEMM gathers anyway.
    grid_flat = grid_rows.reshape(-1)
    order = torch.argsort(grid_flat, stable=True)
    kept = torch.cat([base, grid_flat[order]])
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel())
    grid_src = (T + where).to(torch.int32).reshape(h, w)
    if newline:
        grid_src = torch.cat([grid_src, torch.full((h, 1), -1, dtype=torch.int32)], 1)
    return PackPlan(kept, torch.cat([base, grid_src.reshape(-1)]), n_tiles * T)


@eager_cache(maxsize=64)
def _batch_index(keys: tuple[tuple, ...], device: str) -> tuple[Tensor, Tensor, Tensor]:
    """Both index columns for a batch of images (``keys``: ``_plan`` arguments per image) and the packed lengths
    ``(num_images,)`` int64, on ``device``: a call copies nothing from the host (no sync; a CUDA graph captures)."""
    kept, src, lens, row0, kept0 = [], [], [], 0, 0
    for key in keys:
        p = _plan(*key)
        kept.append(p.kept + row0)
        src.append(torch.where(p.source >= 0, p.source + kept0, p.source))
        lens.append(p.source.numel())
        row0 += p.feature_rows
        kept0 += p.kept.numel()
    return (torch.cat(kept)[:, None].to(device), torch.cat(src)[:, None].to(device),
            torch.tensor(lens, dtype=torch.long).to(device))


def _plan_key(image_size, n_tiles, tokens, pinpoints, tile_size, patch_size, newline, name, exact) -> tuple:
    """Checks one image's features against its grid; the ``_plan`` arguments for it."""
    side = tile_size // patch_size
    if side * patch_size != tile_size:
        raise ValueError(f"tile_size={tile_size} must be a multiple of patch_size={patch_size}")
    if tokens != side * side:
        raise ValueError(f"{name} has {tokens} tokens per tile; a {tile_size}-pixel tile of {patch_size}-pixel "
                         f"patches has {side}x{side} = {side * side} (drop the CLS token first)")
    if n_tiles != 1:
        nph, npw = anyres_grid_shape(image_size, list(pinpoints), tile_size)
        if n_tiles != 1 + nph * npw:
            raise ValueError(f"{name} has {n_tiles} tiles but image size {tuple(image_size)} selects a "
                             f"{nph}x{npw} grid: expected 1 + {nph * npw} = {1 + nph * npw} tiles (base first)")
    return (tuple(image_size), n_tiles, tokens, side, pinpoints, tile_size, newline, exact)


def _plan_for(*args) -> PackPlan:
    return _plan(*_plan_key(*args))


def packed_length(image_size, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, tile_size: int = TILE_SIZE,
                  patch_size: int = PATCH_SIZE, *, convention: str = "transformers") -> int:
    """Tokens one image becomes: ``side² + h'(w'+1)`` (e.g. 2340 for 480x640 with the v1.6 config)."""
    (size,), pins, exact = _hf_order(convention, [image_size], image_grid_pinpoints, "image_size")
    side = tile_size // patch_size
    return _plan_for(size, num_tiles(size, pins, tile_size), side * side, pins, tile_size, patch_size, True,
                     "features", exact).source.numel()


def projector_work(image_size, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, tile_size: int = TILE_SIZE,
                   patch_size: int = PATCH_SIZE, *, convention: str = "transformers") -> dict[str, int]:
    """Projector rows for one image: ``reference`` (every tile, as transformers projects them), ``projected``
    (base + the rows unpadding keeps, what ``project_and_pack`` projects), ``skipped`` = the difference."""
    (size,), pins, exact = _hf_order(convention, [image_size], image_grid_pinpoints, "image_size")
    side = tile_size // patch_size
    n = num_tiles(size, pins, tile_size)
    plan = _plan_for(size, n, side * side, pins, tile_size, patch_size, True, "features", exact)
    total = n * side * side
    return {"reference": total, "projected": plan.kept.numel(), "skipped": total - plan.kept.numel(),
            "packed_tokens": plan.source.numel()}


# --------------------------------------------------------------------------------------------- projector
def _projector_layers(projector: nn.Module) -> tuple | None:
    """``(first Linear, activation or None, last Linear)`` of an ``nn.Sequential`` of three or a module with
    ``linear_1`` / ``linear_2`` (``act``); None for anything else."""
    if isinstance(projector, nn.Sequential) and len(projector) == 3:
        return tuple(projector)
    if hasattr(projector, "linear_1") and hasattr(projector, "linear_2"):
        return projector.linear_1, getattr(projector, "act", None), projector.linear_2
    return None


def reads_projector_weights(projector: nn.Module) -> bool:
    """Whether the fused packing may read ``projector``'s weights: False when its two Linears are there but are
    not plain (an adapter, a quantised subclass, a hook of their own or a global one such as ``FlopCounterMode``
    adds) or its activation is not a plain exact GELU: then the packer modules call the projector instead
    (``unfused_project_and_pack``), so that what is attached to it runs. True otherwise, also for a projector
    ``projector_parameters`` refuses (its error)."""
    layers = _projector_layers(projector)
    if layers is None or not (isinstance(layers[0], nn.Linear) and isinstance(layers[2], nn.Linear)):
        return True
    return plain_linear(layers[0]) and plain_linear(layers[2]) and (layers[1] is None or plain_gelu(layers[1]))


def projector_parameters(projector: nn.Module) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(W1, b1, W2, b2)`` of ``Linear -> exact GELU -> Linear``: ``MLPProjector``, transformers'
    ``LlavaNextMultiModalProjector`` (``linear_1``/``act``/``linear_2``) or LLaVA's ``nn.Sequential``."""
    if isinstance(projector, nn.Sequential) and len(projector) != 3:
        raise TypeError(f"projector nn.Sequential must be (Linear, GELU, Linear), got {len(projector)} modules")
    layers = _projector_layers(projector)
    if layers is None:
        raise TypeError(f"projector must be an MLPProjector, an HF LlavaNextMultiModalProjector or "
                        f"nn.Sequential(Linear, GELU, Linear), got {type(projector).__name__}")
    l1, act, l2 = layers
    if not plain_linear(l1) or not plain_linear(l2):
        raise TypeError("projector's first and last modules must be plain nn.Linear without hooks: their weights "
                        "are read, so an adapter (e.g. PEFT LoRA), a quantised subclass or a hook would be skipped; "
                        "run the projector, then pack_image_features, for such a projector")
    if act is not None and not plain_gelu(act):
        raise TypeError(f"projector activation must be exact GELU without hooks (it is fused, not called), got "
                        f"{act!r}")
    if l2.in_features != l1.out_features:
        raise ValueError(f"projector's second Linear takes {l2.in_features} features but the first gives "
                         f"{l1.out_features}")
    return l1.weight, l1.bias, l2.weight, l2.bias


def _features_source(features, name: str = "features") -> tuple[Tensor, list[int] | None]:
    """A ``(G, T, C)`` tensor of all tiles and, for a list, the tiles per image."""
    if isinstance(features, Tensor):
        check_tensor(features, name, ndim=3, shape_doc="(total tiles, tokens_per_tile, C)")
        return features, None
    if not isinstance(features, (list, tuple)) or not features:
        raise TypeError(f"{name} must be a non-empty list of (tiles, tokens_per_tile, C) tensors or one "
                        f"(total tiles, tokens_per_tile, C) tensor, got {type(features).__name__}")
    for i, f in enumerate(features):
        check_tensor(f, f"{name}[{i}]", ndim=3, shape_doc="(tiles, tokens_per_tile, C)")
        if f.shape[1:] != features[0].shape[1:] or f.dtype != features[0].dtype:
            raise ValueError(f"{name}[{i}] has shape {tuple(f.shape)} {f.dtype}, but {name}[0] has (tiles, "
                             f"{features[0].shape[1]}, {features[0].shape[2]}) {features[0].dtype}: every image "
                             f"needs the same tokens per tile, width and dtype")
    counts = [f.shape[0] for f in features]
    return (features[0] if len(features) == 1 else torch.cat(list(features))), counts


# ------------------------------------------------------------------------------------------ fused packing
def project_and_pack(features, image_sizes, projector: nn.Module, image_newline: Tensor | None, *,
                     image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, tile_size: int = TILE_SIZE,
                     patch_size: int = PATCH_SIZE, convention: str = "transformers") -> tuple[list[Tensor], Tensor]:
    """``pack_image_features(projector(features), image_sizes, image_newline)`` without projecting dropped rows.

    Args:
        features: per image ``(1 + n_tiles_i, tokens_per_tile, C)`` vision features (base tile first, CLS
            dropped), as a list, or all images' tiles as one ``(sum_i (1 + n_tiles_i), tokens_per_tile, C)``
            tensor (any strides, e.g. ``hidden_states[-2][:, 1:]``; no copy is made of it).
        image_sizes: ``(num_images, 2)`` tensor or pairs, ``(height, width)`` of the original images.
        projector: ``Linear(C, D1) -> exact GELU -> Linear(D1, D)`` (see ``projector_parameters``).
        image_newline: ``(D,)`` vector written after every grid row (and after the base of a single-tile image);
            ``None`` packs without newlines.
        image_grid_pinpoints: ``(height, width)`` candidates; ``tile_size`` = ``vision_config.image_size``.
        convention: ``"transformers"``, or ``"llava"``: the original LLaVA's ``(width, height)`` image sizes and
            pinpoints and its ``int(x)`` unpadding (``llava_arch.py``), e.g. ``image_sizes=[img.size]``.

    Returns:
        ``(list of (len_i, D) tensors, feature_lens (num_images,) int64)``, like transformers.
    """
    x, counts = _features_source(features)
    W1, b1, W2, b2 = projector_parameters(projector)
    _positive(tile_size, "tile_size")
    _positive(patch_size, "patch_size")
    if isinstance(image_sizes, Tensor):
        check_tensor(image_sizes, "image_sizes", ndim=2, shape_doc="(num_images, 2)")
        if image_sizes.is_meta:  # the sizes choose the layout: meta features are fine, meta sizes are not
            raise ValueError("image_sizes is on meta: its values choose the layout; pass them as a list of "
                             "(height, width) pairs or a tensor holding values")
        image_sizes = image_sizes.tolist()
    sizes, pins, exact = _hf_order(convention, image_sizes, image_grid_pinpoints)
    if not sizes:
        raise ValueError("image_sizes must name at least one image's (height, width)")
    G, T, C = x.shape
    if counts is None:
        counts = [num_tiles(s, pins, tile_size) for s in sizes]
        if sum(counts) != G:
            raise ValueError(f"features has {G} tiles but image_sizes {sizes} need {counts} (sum {sum(counts)}) "
                             f"tiles, base tiles included")
    elif len(counts) != len(sizes):
        raise ValueError(f"features has {len(counts)} images but image_sizes has {len(sizes)}")
    if C != W1.shape[1]:
        raise ValueError(f"features have width C={C} but the projector's first Linear takes {W1.shape[1]}")
    if x.dtype != W1.dtype and not autocasting(x):  # under autocast both run in its dtype, as the original
        raise TypeError(f"features dtype {x.dtype} must match the projector's dtype {W1.dtype}")
    D = W2.shape[0]
    if image_newline is not None:
        check_tensor(image_newline, "image_newline", ndim=1, shape_doc="(D,)")
        if image_newline.shape[0] != D:
            raise ValueError(f"image_newline must have the projector's output width D={D}, "
                             f"got {image_newline.shape[0]}")
    check_same_device(features=x, projector=W1, image_newline=image_newline)
    keys = tuple(_plan_key(s, n, T, pins, tile_size, patch_size, image_newline is not None, f"features[{i}]", exact)
                 for i, (s, n) in enumerate(zip(sizes, counts)))
    kept, source, feature_lens = _batch_index(keys, str(x.device))
    h = gather_linear(x, kept, W1, b1, gelu=True, validate_values=False)
    fill = None if image_newline is None else image_newline.to(h.dtype)
    out = gather_linear(h, source, W2, b2, fill=fill, validate_values=False)
    lens = [_plan(*k).source.numel() for k in keys]
    return list(torch.split(out, lens)), feature_lens.clone()     # a copy on the device: the cache keeps its own


def unfused_project_and_pack(features, image_sizes, projector: nn.Module, image_newline: Tensor | None, *,
                             image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, tile_size: int = TILE_SIZE,
                             patch_size: int = PATCH_SIZE, convention: str = "transformers") -> tuple[list[Tensor], Tensor]:
    """The transformers computation in plain PyTorch (projector on every tile, then reshape, unpad, newline):
    same arguments and result as ``project_and_pack``; the baseline for benchmarks."""
    x, counts = _features_source(features)
    if isinstance(image_sizes, Tensor):
        image_sizes = image_sizes.tolist()
    sizes, pins, exact = _hf_order(convention, image_sizes, image_grid_pinpoints)
    if counts is None:
        counts = [num_tiles(s, pins, tile_size) for s in sizes]
    side = tile_size // patch_size
    out, lens = [], []
    for f, size in zip(torch.split(projector(x), counts), sizes):
        if f.shape[0] > 1:
            nph, npw = anyres_grid_shape(size, list(pins), tile_size)
            g = f[1:].view(nph, npw, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
            r0, r1, c0, c1 = _unpad(size, tuple(g.shape[1:]), exact)
            g = g[:, r0:r1, c0:c1]
            if image_newline is not None:
                g = torch.cat([g, image_newline[:, None, None].expand(*g.shape[:-1], 1).to(g.dtype)], -1)
            f = torch.cat([f[0], g.flatten(1, 2).transpose(0, 1)])
        else:
            f = f[0] if image_newline is None else torch.cat([f[0], image_newline[None].to(f.dtype)])
        out.append(f)
        lens.append(f.shape[0])
    return out, torch.tensor(lens, dtype=torch.long, device=x.device)


def merge_image_features(inputs_embeds: Tensor, input_ids: Tensor, image_features, image_token_id: int) -> Tensor:
    """``inputs_embeds`` with the ``image_token_id`` positions replaced, in order, by the packed image features
    (transformers' ``masked_scatter``). ``inputs_embeds (B, S, D)``, ``input_ids (B, S)``."""
    check_tensor(inputs_embeds, "inputs_embeds", ndim=3, shape_doc="(batch, seq, D)")
    check_tensor(input_ids, "input_ids", ndim=2, shape_doc="(batch, seq)")
    feats = torch.cat(list(image_features)) if isinstance(image_features, (list, tuple)) else image_features
    mask = input_ids == image_token_id
    n = int(mask.sum())
    if feats.dim() != 2 or feats.shape[-1] != inputs_embeds.shape[-1] or n != feats.shape[0]:
        raise ValueError(f"input_ids hold {n} image tokens but image_features are {tuple(feats.shape)}: expected "
                         f"({n}, {inputs_embeds.shape[-1]})")
    return inputs_embeds.masked_scatter(mask[..., None], feats.to(inputs_embeds.dtype))


# ----------------------------------------------------------------------------------------------- module
class LlavaNextImagePacker(nn.Module):
    """``multi_modal_projector`` + ``image_newline`` of ``LlavaNextModel`` (same names, so the HF keys
    ``multi_modal_projector.linear_{1,2}.*`` and ``image_newline`` load; LLaVA's ``0.*``/``2.*`` too).

    ``forward(features, image_sizes) -> (list of (len_i, D), feature_lens)`` = ``project_and_pack``.
    """

    def __init__(self, vision_hidden_size: int, text_hidden_size: int,
                 image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, tile_size: int = TILE_SIZE,
                 patch_size: int = PATCH_SIZE, bias: bool = True, device=None, dtype=None, *,
                 convention: str = "transformers"):
        super().__init__()
        self.multi_modal_projector = MLPProjector(vision_hidden_size, text_hidden_size, text_hidden_size, bias,
                                                  device=device, dtype=dtype)
        self.image_newline = nn.Parameter(
            torch.randn(text_hidden_size, device=device, dtype=dtype) / math.sqrt(text_hidden_size))
        self.image_grid_pinpoints = [list(p) for p in _pinpoints(image_grid_pinpoints)]
        self.tile_size = _positive(tile_size, "tile_size")
        self.patch_size = _positive(patch_size, "patch_size")
        _is_llava(convention)
        self.convention = convention

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> "LlavaNextImagePacker":
        """From a transformers ``LlavaNextConfig``."""
        layers = config.vision_feature_layer
        n_layers = 1 if isinstance(layers, int) else len(layers)
        return cls(config.vision_config.hidden_size * n_layers, config.text_config.hidden_size,
                   config.image_grid_pinpoints, config.vision_config.image_size, config.vision_config.patch_size,
                   getattr(config, "multimodal_projector_bias", True), device=device, dtype=dtype)

    def forward(self, features, image_sizes) -> tuple[list[Tensor], Tensor]:
        pack = project_and_pack if reads_projector_weights(self.multi_modal_projector) else unfused_project_and_pack
        return pack(features, image_sizes, self.multi_modal_projector, self.image_newline,
                    image_grid_pinpoints=self.image_grid_pinpoints, tile_size=self.tile_size,
                    patch_size=self.patch_size, convention=self.convention)


# ------------------------------------------------------------------------------------------- benchmarks
def benchmark_inputs(image_sizes: Sequence[tuple[int, int]] = ((1080, 1920),), *, vision_hidden_size: int = 1024,
                     text_hidden_size: int = 4096, device="cuda", dtype=torch.bfloat16,
                     requires_grad: bool = False, seed: int = 0) -> dict:
    """Random inputs at the llava-v1.6 (7B: 1024 -> 4096) shapes for ``image_sizes`` ``(height, width)``:
    ``dict(features, image_sizes, projector, image_newline, kwargs)``; call
    ``project_and_pack(d["features"], d["image_sizes"], d["projector"], d["image_newline"], **d["kwargs"])``
    (or ``unfused_project_and_pack`` with the same arguments). ``features`` is one all-tiles tensor."""
    g = torch.Generator().manual_seed(seed)
    counts = [num_tiles(s, LLAVA_NEXT_PINPOINTS, TILE_SIZE) for s in image_sizes]
    side = TILE_SIZE // PATCH_SIZE
    features = torch.randn(sum(counts), side * side, vision_hidden_size, generator=g).to(device, dtype)
    projector = MLPProjector(vision_hidden_size, text_hidden_size, text_hidden_size).to(device, dtype)
    newline = (torch.randn(text_hidden_size, generator=g) / math.sqrt(text_hidden_size)).to(device, dtype)
    if requires_grad:
        features.requires_grad_(True)
        newline.requires_grad_(True)
    else:
        projector.requires_grad_(False)
    return dict(features=features, image_sizes=[tuple(s) for s in image_sizes], projector=projector,
                image_newline=newline,
                kwargs=dict(image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, tile_size=TILE_SIZE, patch_size=PATCH_SIZE))


__all__ = [
    "LLAVA_NEXT_PINPOINTS", "TILE_SIZE", "PATCH_SIZE", "select_best_resolution", "anyres_grid_shape", "num_tiles",
    "resized_size_for_patching", "padding_for_patching", "resize_and_pad", "divide_to_tiles", "image_tiles",
    "unpad_bounds", "packed_length", "projector_work", "projector_parameters", "project_and_pack",
    "unfused_project_and_pack", "merge_image_features", "LlavaNextImagePacker", "benchmark_inputs",
]
