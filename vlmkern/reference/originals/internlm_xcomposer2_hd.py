"""Port of InternLM-XComposer2-4KHD's image side (InternLM/InternLM-XComposer: ``ixc_utils.py`` ``HD_transform``
and ``padding_336``, and ``build_mlp.py`` ``CLIPVisionTower.forward`` around the ViT, as shipped with the 4KHD
checkpoint on the model hub; revision not pinned). The original calls torchvision on PIL images; without
torchvision the same PIL operations are written out. PIL is imported when an image function runs."""
import math

import numpy as np
import torch


def _tvf():
    try:
        from torchvision.transforms import functional
    except ImportError:
        return None
    return functional


def _resize(img, size):
    tvf = _tvf()
    if tvf is not None:
        return tvf.resize(img, size)
    from PIL import Image
    return img.resize((size[1], size[0]), Image.BILINEAR)


def _pad(img, padding, fill):
    tvf = _tvf()
    if tvf is not None:
        return tvf.pad(img, padding, fill=fill)
    from PIL import Image
    left, top, right, bottom = padding
    out = Image.new(img.mode, (img.size[0] + left + right, img.size[1] + top + bottom), tuple(fill))
    out.paste(img, (left, top))
    return out


def padding_336(b):
    """White bands top and bottom up to the next multiple of 336 rows."""
    width, height = b.size
    tar = int(np.ceil(height / 336) * 336)
    top_padding = int((tar - height) / 2)
    bottom_padding = tar - height - top_padding
    return _pad(b, [0, top_padding, 0, bottom_padding], fill=[255, 255, 255])


def hd_transform(img, hd_num=16):
    """``HD_transform``: PIL image -> PIL image resized to a 336-multiple width (at most ``hd_num`` tiles), padded."""
    from PIL import Image
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = _resize(img, [new_h, new_w])
    img = padding_336(img)
    if trans:
        img = img.transpose(Image.TRANSPOSE)
    return img


def tower_images(img):
    """``CLIPVisionTower.forward`` before the ViT, one image ``(1, 3, H, W)`` -> ``(1 + tiles, 3, 336, 336)``."""
    _, C, H, W = img.shape
    sub_img = img.reshape(1, 3, H // 336, 336, W // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
    glb_img = torch.nn.functional.interpolate(img.float(), size=(336, 336), mode="bicubic").to(sub_img.dtype)
    return torch.cat([glb_img, sub_img], dim=0)


def tower_layout(image_features, shapes, glb_GN, sub_GN):
    """``CLIPVisionTower.forward`` after the ViT (the 24/12 constants written as H and H // 2): ViT features
    ``(tiles, H², C)`` of every image, ``shapes`` its ``(h, w)`` tile grids -> ``((1, sum L_i, 4C), [L_i])``."""
    _, N, C = image_features.shape
    H = int(math.sqrt(N))
    s = H // 2
    output_imgs, output_len = [], []
    for h, w in shapes:
        B_ = h * w
        glb_img = image_features[:1]
        glb_img = glb_img.reshape(1, H, H, C).reshape(1, s, 2, s, 2, C).contiguous() \
            .permute(0, 1, 3, 2, 4, 5).reshape(1, s, s, 4 * C).contiguous()
        temp_glb_GN = sub_GN.repeat(1, s, 1, 1)
        glb_img = torch.cat([glb_img, temp_glb_GN], dim=2).reshape(1, -1, 4 * C)
        sub_img = image_features[1:1 + B_]
        sub_img = sub_img.reshape(B_, H, H, C).reshape(B_, s, 2, s, 2, C).contiguous() \
            .permute(0, 1, 3, 2, 4, 5).reshape(B_, -1, 4 * C).contiguous()
        sub_img = sub_img.reshape(1, h, w, s, s, -1).permute(0, 1, 3, 2, 4, 5).reshape(1, h * s, w * s, 4 * C)
        temp_sub_GN = sub_GN.repeat(1, h * s, 1, 1)
        sub_img = torch.cat([sub_img, temp_sub_GN], dim=2).reshape(1, -1, 4 * C)
        output_imgs.append(torch.cat([glb_img, glb_GN, sub_img], dim=1))
        temp_len = int((h * w + 1) * s * s + 1 + (h + 1) * s)
        assert temp_len == output_imgs[-1].shape[1]
        output_len.append(temp_len)
        image_features = image_features[1 + h * w:]
    return torch.cat(output_imgs, dim=1), output_len
