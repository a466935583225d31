"""Port of the original LLaVA-NeXT (1.6) AnyRes packing (haotian-liu/LLaVA ``llava/mm_utils.py``:
``select_best_resolution``, ``get_anyres_image_grid_shape``; ``llava/model/llava_arch.py``: ``unpad_image`` and the
``image_aspect_ratio="anyres"``, ``mm_patch_merge_type="spatial_unpad"`` branch of
``prepare_inputs_labels_for_multimodal``). Its conventions, which transformers flipped: image sizes and grid
pinpoints are ``(width, height)`` (``PIL.Image.size`` and the config's list as read), and unpadding truncates with
``int(x)``."""
import torch


def select_best_resolution(original_size, possible_resolutions):
    """``(width, height)`` of the candidate keeping the most pixels after an aspect-preserving downscale; ties ->
    least waste, then the first listed."""
    original_width, original_height = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        down_w, down_h = int(original_width * scale), int(original_height * scale)
        effective = min(down_w * down_h, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size):
    """``(tiles across, tiles down)`` for a ``(width, height)`` image."""
    width, height = select_best_resolution(image_size, grid_pinpoints)
    return width // patch_size, height // patch_size


def unpad_image(tensor, original_size):
    """``tensor (C, H, W)`` less the rows or columns that padding the ``(width, height)`` image added."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding:current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding:current_width - padding]


def pack_spatial_unpad(image_features, image_sizes, image_grid_pinpoints, tile_size, image_newline):
    """Per image ``(1 + n_tiles, side², D)`` projected features (base tile first) -> ``(len, D)``: the base tile's
    tokens, then the unpadded grid row by row, each row followed by ``image_newline``; a single-tile image gets its
    tokens and one newline."""
    out = []
    for image_feature, image_size in zip(image_features, image_sizes):
        if image_feature.shape[0] > 1:
            base, image_feature = image_feature[0], image_feature[1:]
            height = width = int(base.shape[0] ** 0.5)
            num_patch_width, num_patch_height = get_anyres_image_grid_shape(image_size, image_grid_pinpoints,
                                                                            tile_size)
            image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
            image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            image_feature = unpad_image(image_feature, image_size)
            newline = image_newline[:, None, None].expand(*image_feature.shape[:-1], 1)
            image_feature = torch.cat((image_feature, newline.to(image_feature.device)), dim=-1)
            image_feature = torch.cat((base, image_feature.flatten(1, 2).transpose(0, 1)), dim=0)
        else:
            image_feature = torch.cat((image_feature[0], image_newline[None].to(image_feature.device)), dim=0)
        out.append(image_feature)
    return out
