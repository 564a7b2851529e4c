"""LLaVA's path, computed with transformers and Pillow only: the tests' expected values.

Nothing here imports clipfeat: what clipfeat computes is checked against this.

LLaVA's path (``llava/mm_utils.py``, ``clip_encoder.py``): ``Image.open(p).convert('RGB')``
(no EXIF transpose, first frame); for aspect ``pad`` LLaVA's :func:`expand2square` onto a
canvas of ``tuple(int(m * 255) for m in proc.image_mean)``; the checkpoint's own PIL image
processor (:func:`processor_class`); ``CLIPVisionModel`` / ``SiglipVisionModel`` /
``Dinov2Model`` / ``Dinov2WithRegistersModel`` ``hidden_states[layer]``; for ``patch`` the CLS
token (token 0) dropped on CLIP and DINOv2, and DINOv2's register tokens (after the CLS token)
too; SigLIP has no CLS token, so ``patch`` keeps every token. ``cls_patch`` keeps the CLS token
and the patches (registers dropped).

    ref = LlavaReference(ckpt, layer=-2, feature="patch")
    ref.features([path, ...], aspect="pad")   # (N, tokens, hidden) float32 numpy
    ref.pixels(path_or_image, aspect)         # the processor's pixel_values of one image
    ref.uint8(path_or_image, aspect)          # the same before rescale/normalise, as uint8
    LlavaReference(processor=proc).pixels(img, "pad")   # a processor without a checkpoint

Import it from tests as ``from llava_reference import LlavaReference`` (tests/ is on
sys.path, as for ``imagegen``). Importing it imports neither torch nor transformers (decode
worker processes import test modules).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["LlavaReference", "auto_processor", "expand2square", "family_of",
           "processor_class"]

# model_type -> the vision model class that loads it (full checkpoints too)
_MODEL_CLASSES = {
    "clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
    "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
}


def processor_class(family: str) -> Any:
    """The PIL image processor class of a family ("clip" | "siglip" | "dinov2"):
    ``*ImageProcessorPil`` on transformers 5, the plain class (the PIL one) on 4.x."""
    import transformers

    base = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor",
            "dinov2": "BitImageProcessor"}[family]
    return getattr(transformers, base + "Pil", None) or getattr(transformers, base)


def auto_processor(ckpt: str | Path) -> Any:
    """What ``AutoImageProcessor`` loads for a checkpoint with the PIL backend."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(ckpt, backend="pil")
    except TypeError:  # transformers 4.x: no backend argument; use_fast=False is PIL
        return AutoImageProcessor.from_pretrained(ckpt, use_fast=False)


def model_type_of(ckpt: str | Path) -> str:
    return json.loads((Path(ckpt) / "config.json").read_text())["model_type"]


def model_class(model_type: str) -> Any:
    """The transformers vision model class for a config.json ``model_type``."""
    import transformers

    return getattr(transformers, _MODEL_CLASSES[model_type])


def family_of(ckpt: str | Path) -> str:
    """"siglip", "dinov2" or "clip", from the checkpoint's config.json ``model_type``."""
    model_type = model_type_of(ckpt)
    if "siglip" in model_type:
        return "siglip"
    return "dinov2" if model_type.startswith("dinov2") else "clip"


def registers_of(ckpt: str | Path) -> int:
    """Register tokens of a DINOv2-with-registers checkpoint (transformers' default 4), else 0."""
    raw = json.loads((Path(ckpt) / "config.json").read_text())
    if raw["model_type"] != "dinov2_with_registers":
        return 0
    return int(raw.get("num_register_tokens", 4))


def expand2square(img: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """LLaVA's expand2square, restated: paste onto a square canvas at floor-centred offsets."""
    w, h = img.size
    if w == h:
        return img
    if w > h:
        out = Image.new(img.mode, (w, w), color)
        out.paste(img, (0, (w - h) // 2))
    else:
        out = Image.new(img.mode, (h, h), color)
        out.paste(img, ((h - w) // 2, 0))
    return out


def open_rgb(path: Any) -> Image.Image:
    """LLaVA's loading: ``Image.open(p).convert('RGB')`` (frame 0, no EXIF transpose)."""
    with Image.open(path) as im:
        return im.convert("RGB")


class LlavaReference:
    """LLaVA's pixels and features for one checkpoint (or one processor), transformers only.

    ``ckpt``: a checkpoint folder; its processor and vision model are loaded on first use.
    ``processor``: use this processor instead of the checkpoint's (pixels only without a
    ``ckpt``). ``family`` defaults to the checkpoint's (:func:`family_of`), else "clip".
    ``layer`` / ``feature``: which ``hidden_states`` entry and which tokens (``patch`` drops
    the CLS and register tokens; ``cls_patch`` keeps CLS and the patches). ``device`` /
    ``dtype``: where the model runs (the pixels are moved there; features come back as
    float32 on the CPU).

    ``hide_transparency``: Pillow keeps a palette/RGB image's transparent colour in
    ``info["transparency"]`` after ``convert('RGB')``; transformers 5 (not 4.x, which LLaVA
    used) would then paint those pixels white. LLaVA's reference is "alpha dropped", so by
    default the key is removed (from the caller's image too, when an image is passed) before
    the processor sees it; ``False`` hands the processor the image as it is.
    """

    def __init__(self, ckpt: str | Path | None = None, *, family: str | None = None,
                 layer: int = -2, feature: str = "patch", processor: Any = None,
                 hide_transparency: bool = True, device: Any = "cpu", dtype: Any = None) -> None:
        self.ckpt = Path(ckpt) if ckpt is not None else None
        self.family = family or (family_of(self.ckpt) if self.ckpt is not None else "clip")
        self.registers = registers_of(self.ckpt) if self.ckpt is not None else 0
        self.layer = layer
        self.feature = feature
        self.hide_transparency = hide_transparency
        self.device = device
        self.dtype = dtype
        self._processor = processor
        self._model = None

    @property
    def processor(self) -> Any:
        """The checkpoint's own PIL image processor (or the one given)."""
        if self._processor is None:
            if self.ckpt is None:
                raise ValueError("LlavaReference needs a ckpt or a processor")
            self._processor = processor_class(self.family).from_pretrained(self.ckpt)
        return self._processor

    @property
    def model(self) -> Any:
        """transformers' own vision model of the checkpoint (eval mode, on device/dtype)."""
        if self._model is None:
            if self.ckpt is None:
                raise ValueError("LlavaReference has no checkpoint to load a model from")
            model = model_class(model_type_of(self.ckpt)).from_pretrained(self.ckpt)
            if self.dtype is not None or self.device != "cpu":
                model = model.to(self.device, self.dtype)
            self._model = model.eval()
        return self._model

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the processor's pixel_values: what the model is fed."""
        return tuple(self.pixels(Image.new("RGB", (41, 29))).shape[-2:])

    @property
    def pad_color(self) -> tuple[int, ...]:
        """LLaVA's background for ``pad``: the processor's mean, as 0-255 integers."""
        return tuple(int(m * 255) for m in self.processor.image_mean)

    # -- pixels --------------------------------------------------------------------------------

    def image(self, src: Any, aspect: str = "square") -> Image.Image:
        """The image LLaVA hands the processor: a path is opened (:func:`open_rgb`), an image
        converted to RGB unless it is; then transparency hidden (see the class) and, for
        ``pad``, :func:`expand2square` with :attr:`pad_color`."""
        if isinstance(src, Image.Image):
            img = src.convert("RGB") if src.mode != "RGB" else src
        else:
            img = open_rgb(src)
        if self.hide_transparency:
            img.info.pop("transparency", None)
        if aspect == "pad":
            img = expand2square(img, self.pad_color)
        elif aspect != "square":
            raise ValueError(f"unknown aspect {aspect!r}")
        return img

    def pixels(self, src: Any, aspect: str = "square") -> Any:
        """The processor's ``pixel_values`` of one image: a float32 (3, H, W) torch tensor."""
        return self.processor(self.image(src, aspect), return_tensors="pt")["pixel_values"][0]

    def uint8(self, src: Any, aspect: str = "square") -> Any:
        """The processor's pixels before rescaling and normalising: uint8 (3, H, W) numpy."""
        import numpy as np

        out = self.processor(self.image(src, aspect), return_tensors="np", do_rescale=False,
                             do_normalize=False)["pixel_values"][0]
        return out.astype(np.uint8)

    # -- features ------------------------------------------------------------------------------

    def hidden_states(self, pixel_values: Any) -> tuple[Any, ...]:
        """Every ``hidden_states`` entry of the model for a (B, 3, H, W) batch (no grad)."""
        import torch

        px = pixel_values
        if self.dtype is not None or self.device != "cpu":
            px = px.to(self.device, self.dtype)
        with torch.no_grad():
            return self.model(px, output_hidden_states=True).hidden_states

    def select(self, hidden: Any, feature: str | None = None) -> Any:
        """The tokens of ``feature`` (default :attr:`feature`): ``patch`` drops the CLS token
        (CLIP, DINOv2) and the registers after it; ``cls_patch`` drops the registers only."""
        import torch

        feature = feature or self.feature
        cls = 0 if self.family == "siglip" else 1
        first_patch = cls + self.registers
        if feature == "patch":
            return hidden[:, first_patch:]
        return torch.cat([hidden[:, :cls], hidden[:, first_patch:]], dim=1)

    def features(self, srcs: list[Any], aspect: str = "square") -> Any:
        """LLaVA's features of images (paths or PIL images), run as one batch:
        float32 numpy (N, tokens, hidden)."""
        images = [self.image(src, aspect) for src in srcs]
        px = self.processor(images, return_tensors="pt")["pixel_values"]
        hidden = self.hidden_states(px)[self.layer]
        return self.select(hidden).float().cpu().numpy()
