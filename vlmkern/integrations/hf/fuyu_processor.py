"""``FusedFuyuProcessor``: transformers' ``FuyuProcessor`` that hands the model resized uint8 images instead of
normalised float patches, for a model patched by ``vlmkern.integrations.hf.apply``.

transformers' processor resizes, pads to 1080x1920, rescales and normalises in float32, crops and patchifies on
the CPU; the model then runs ``vision_embed_tokens`` (a Linear) on the patches. With this processor the image
processor only resizes (its own resize: same pixels), and the patched model's ``vision_embed_tokens`` runs the
rest as one fused op (``vlmkern.ops.patch_embed``: border pad, rescale, normalise, patchify and the GEMM), never
materialising the float patch tensor. Token ids, attention mask and every other output are those of
``FuyuProcessor`` (its own text code runs).

``pixel_values`` (``image_patches`` with ``return_legacy_image_output=True``, as ``FuyuProcessor``) is a uint8
``(B, C, H, W)`` tensor when all images have one size, else a list of ``(C, h_i, w_i)`` uint8 tensors. The
processor settings must be the ones the fused op implements (the Fuyu defaults: rescale 1/255, mean = std =
0.5, constant padding with value 1, square patches); anything else raises a ``ValueError`` instead of giving other
numbers. So do the inputs ``FuyuProcessor`` itself refuses: a ``size`` the patch does not divide, or an image
larger than ``size`` after the resize (``do_resize=False``): the fused path pads each image only to whole patches,
and would otherwise return tokens where the original raises.
"""
from __future__ import annotations

import math

import torch
from transformers import FuyuProcessor

# What ``FuyuPatchEmbed.forward`` computes from uint8 pixels (the FuyuImageProcessor defaults).
FUSED_SETTINGS = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": 0.5,
                  "image_std": 0.5, "do_pad": True, "padding_value": 1.0}


def _setting(processor, kwargs: dict, name: str):
    value = kwargs.get(name)
    return getattr(processor, name, None) if value is None else value


def _same(value, want) -> bool:
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    return all(isinstance(v, (int, float)) and math.isclose(float(v), want, rel_tol=1e-9) for v in vals)


def _height_width(size) -> tuple[int, int]:
    """A processor's ``SizeDict`` or ``{"height": h, "width": w}`` as ``(h, w)``."""
    return (size.height, size.width) if hasattr(size, "height") else (size["height"], size["width"])


def _check_settings(image_processor, kwargs: dict) -> tuple[int, tuple[int, int]]:
    """``(patch size, (height, width) the original pads to)``, after checking that the image processor computes
    what the fused op does."""
    for name, want in FUSED_SETTINGS.items():
        value = _setting(image_processor, kwargs, name)
        if not _same(value, float(want)):
            raise ValueError(f"FusedFuyuProcessor: {name}={value!r} is not supported (the fused patch embedding "
                             f"computes {name}={want!r}); use FuyuProcessor for other settings")
    mode = _setting(image_processor, kwargs, "padding_mode") or "constant"
    if mode != "constant":     # edge / reflect padding: other border pixels than the fused op's constant
        raise ValueError(f"FusedFuyuProcessor: padding_mode={mode!r} is not supported (the fused patch embedding "
                         f"pads with the constant padding_value); use FuyuProcessor for other settings")
    h, w = _height_width(_setting(image_processor, kwargs, "patch_size"))
    if h != w:
        raise ValueError(f"FusedFuyuProcessor: patch_size must be square, got {h}x{w}")
    pad_h, pad_w = _height_width(_setting(image_processor, kwargs, "size"))
    if pad_h % h or pad_w % h:
        raise ValueError(f"FusedFuyuProcessor: size={pad_h}x{pad_w} must be a multiple of patch_size={h} in both "
                         f"dimensions (FuyuProcessor pads every image to it and cuts it into whole patches)")
    return int(h), (int(pad_h), int(pad_w))


class FusedFuyuProcessor(FuyuProcessor):
    """``FuyuProcessor`` whose image output is resized uint8 pixels for a patched model (see the module doc).

    Build it from an existing processor with :meth:`from_processor` (the sub-processors are shared), or with
    ``FusedFuyuProcessor.from_pretrained(...)`` like ``FuyuProcessor``.
    """

    skip_tensor_conversion = [*FuyuProcessor.skip_tensor_conversion, "pixel_values", "image_patches"]

    def __init__(self, image_processor, tokenizer, **kwargs):   # this signature: transformers reads it
        if not callable(getattr(FuyuProcessor, "_process_images", None)):
            # the step overridden below; without it the processor would silently hand over float patches
            import transformers
            raise NotImplementedError(f"FusedFuyuProcessor needs FuyuProcessor._process_images (transformers 5.x); "
                                      f"transformers {transformers.__version__} has none")
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_processor(cls, processor: FuyuProcessor) -> "FusedFuyuProcessor":
        if not isinstance(processor, FuyuProcessor):
            raise TypeError(f"processor must be a transformers FuyuProcessor, got {type(processor).__name__}")
        return cls(image_processor=processor.image_processor, tokenizer=processor.tokenizer)

    def _process_images(self, images, return_legacy_image_output: bool = True, **kwargs):
        """``FuyuProcessor._process_images`` with the image processor stopped after its resize."""
        p, (pad_h, pad_w) = _check_settings(self.image_processor, kwargs)
        resize_only = {**kwargs, "do_pad": False, "do_rescale": False, "do_normalize": False, "return_tensors": "pt"}
        pixels, outputs, replacements = [], {}, []
        for i, image in enumerate(images):
            # One call per image: the resized images may differ in size, and the processor stacks its output.
            out = self.image_processor(image, **resize_only)
            img = out.pop("images")[0, 0]
            if img.dtype != torch.uint8:
                raise ValueError(f"FusedFuyuProcessor hands uint8 pixels to the model, but images[{i}] became "
                                 f"{img.dtype}: pass uint8 arrays / tensors or PIL images, or use FuyuProcessor")
            if img.shape[-2] > pad_h or img.shape[-1] > pad_w:   # FuyuProcessor's own pad fails there
                raise ValueError(f"FusedFuyuProcessor: images[{i}] is {img.shape[-2]}x{img.shape[-1]} after the "
                                 f"resize, larger than size={pad_h}x{pad_w} that FuyuProcessor pads it to "
                                 f"(do_resize=False on a large image?)")
            for key, value in out.items():
                outputs.setdefault(key, []).append(value)
            nH, nW = math.ceil(img.shape[-2] / p), math.ceil(img.shape[-1] / p)
            replacements.append(self.replace_image_token(outputs, image_idx=i, num_patches=nH * nW, row_width=nW,
                                                         **kwargs))
            pixels.append(img)
        # the per-image outputs (unpadded sizes, scale factors) joined as one batched call returns them
        processed = {k: torch.cat(v) if isinstance(v[0], torch.Tensor) else [x for part in v for x in part]
                     for k, v in outputs.items()}
        same = all(t.shape == pixels[0].shape for t in pixels)
        processed["image_patches" if return_legacy_image_output else "pixel_values"] = (
            torch.stack(pixels) if same else pixels)
        return processed, replacements


__all__ = ["FUSED_SETTINGS", "FusedFuyuProcessor"]
