"""The tower families clipfeat runs, and every fact that differs between them, in one place.

Torch-free at import (transformers is imported by the functions that return its classes).

========================  ======================================  ==========================
config.json model_type    what it is                              transformers class loaded
========================  ======================================  ==========================
``clip``                  full CLIP checkpoint (text + vision)    ``CLIPVisionModel``
``clip_vision_model``     CLIP vision tower                       ``CLIPVisionModel``
``siglip``                full SigLIP checkpoint; also the        ``SiglipVisionModel``
                          fixed-resolution SigLIP2 ones
                          (``google/siglip2-so400m-patch14-384``)
``siglip_vision_model``   SigLIP vision tower                     ``SiglipVisionModel``
``dinov2``                DINOv2                                  ``Dinov2Model``
``dinov2_with_registers`` DINOv2 with registers                   ``Dinov2WithRegistersModel``
========================  ======================================  ==========================

The fixed-resolution SigLIP2 checkpoints were converted with transformers' SigLIP script, so
they *are* SigLIP models (``model_type`` ``siglip``, a ``SiglipImageProcessor`` with bilinear
resampling) and load as such. The NaFlex ones (``model_type`` ``siglip2``) are refused: they
cut each image at its own aspect ratio into a variable number of patches (with
``pixel_attention_mask`` and ``spatial_shapes``), which fixed ``(tokens, hidden)`` rows
cannot hold.

Token layout of every ``hidden_states`` entry (patches in raster order):

- CLIP: ``[CLS] + patches``
- SigLIP: ``patches`` (no CLS token)
- DINOv2: ``[CLS] + patches``
- DINOv2 with registers: ``[CLS] + R registers + patches`` (R = ``num_register_tokens``)

Features (`select_tokens`):

- ``patch``: the patch tokens only; CLS and registers dropped (``num_patches`` tokens). On
  SigLIP that is every token.
- ``cls_patch``: CLS, then the patch tokens (``1 + num_patches``); registers dropped. Refused
  on SigLIP, which has no CLS token.

Registers are never stored: they are scratch tokens the model learnt to use for global
computation, with no image position, and the DINOv2-registers paper itself reads CLS and
patches only. Whoever wants them must take ``hidden_states`` from transformers directly.

``hidden_states`` counts as transformers does for every family: L+1 entries, ``[0]`` the
embeddings (after ``pre_layrnorm`` on CLIP; CLS, registers and position embeddings included on
DINOv2), ``[i]`` the output of block i, ``[-1]`` the last block *before* the final norm
(CLIP/SigLIP ``post_layernorm``, DINOv2 ``layernorm``).

Image size: CLIP and SigLIP are fed their config's ``image_size``. DINOv2's config says 518,
the size its position embeddings were trained at; its processor crops 224, and the model
interpolates the position embeddings to the 16x16 patches it is given. The size the tower
is fed (and so ``num_patches``) is therefore the processor's output size for DINOv2
(`Family.sized_by_processor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipfeat.config import FEATURES
from clipfeat.errors import ConfigError, ModelError

__all__ = ["FAMILIES", "MODEL_TYPES", "UNSUPPORTED", "Family", "ModelType", "check_feature",
           "config_class", "family", "family_of_processor", "feature_tokens",
           "missing_processor_config", "model_class", "model_type", "processor_class",
           "processor_defaults", "select_tokens", "unsupported_reason"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_BICUBIC = 3

#: DINOv2's evaluation recipe (facebook/dinov2-* preprocessor_config.json): shortest edge 256,
#: centre crop 224, ImageNet mean/std. Used only for a DINOv2 folder with no preprocessor
#: config; keys missing from one take BitImageProcessor's class defaults, as in transformers.
DINOV2_CROP = 224


@dataclass(frozen=True)
class Family:
    """What one family of towers is like: tokens, modules, image processor."""

    name: str
    title: str
    cls_tokens: int
    """Class tokens before the patches (1 or 0)."""
    pre_layrnorm: bool
    """Whether ``hidden_states[0]`` is the embeddings after a ``pre_layrnorm`` (CLIP)."""
    blocks_attr: str
    """The encoder's attribute holding its blocks (``encoder.layers`` / ``encoder.layer``)."""
    processor: str
    """The image processor's class name (transformers 5 adds ``Pil`` for the PIL backend)."""
    sized_by_processor: bool
    """True when the tower is fed the processor's output size, not config ``image_size``."""
    processor_defaults: dict[str, Any] = field(repr=False)
    """The processor class's own defaults for the keys clipfeat reads."""


@dataclass(frozen=True)
class ModelType:
    """One ``model_type`` of config.json that clipfeat accepts."""

    name: str
    family: str
    model_class: str
    config_class: str
    full: bool
    """A text + vision checkpoint whose vision config is nested under ``vision_config``."""
    weights_prefix: str
    """Where the tower's tensors sit in a checkpoint holding more than the tower."""
    registers: bool = False
    since: str = ""
    """The first transformers version with :attr:`model_class`, for messages."""
    config_defaults: dict[str, Any] = field(default_factory=dict, repr=False)
    """transformers' config defaults for the fields clipfeat reads itself."""


_SHORTEST_CROP = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": _BICUBIC,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
}

FAMILIES: dict[str, Family] = {
    "clip": Family(
        "clip", "CLIP", cls_tokens=1, pre_layrnorm=True, blocks_attr="layers",
        processor="CLIPImageProcessor", sized_by_processor=False,
        processor_defaults=dict(_SHORTEST_CROP, image_mean=OPENAI_CLIP_MEAN,
                                image_std=OPENAI_CLIP_STD)),
    "siglip": Family(
        "siglip", "SigLIP", cls_tokens=0, pre_layrnorm=False, blocks_attr="layers",
        processor="SiglipImageProcessor", sized_by_processor=False,
        processor_defaults={
            "do_resize": True, "size": {"height": 224, "width": 224}, "resample": _BICUBIC,
            "do_center_crop": False, "crop_size": None, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": IMAGENET_STANDARD_MEAN, "image_std": IMAGENET_STANDARD_STD}),
    # BitImageProcessor's class defaults are CLIP's (shortest edge 224, OpenAI mean/std); the
    # DINOv2 checkpoints set 256 / ImageNet mean/std in their preprocessor_config.json.
    "dinov2": Family(
        "dinov2", "DINOv2", cls_tokens=1, pre_layrnorm=False, blocks_attr="layer",
        processor="BitImageProcessor", sized_by_processor=True,
        processor_defaults=dict(_SHORTEST_CROP, image_mean=OPENAI_CLIP_MEAN,
                                image_std=OPENAI_CLIP_STD)),
}

_VIT = {"hidden_size": 768, "num_hidden_layers": 12, "num_channels": 3}
_CLIP_DEFAULTS = dict(_VIT, image_size=224, patch_size=32, intermediate_size=3072)
_SIGLIP_DEFAULTS = dict(_VIT, image_size=224, patch_size=16, intermediate_size=3072)
_DINOV2_DEFAULTS = dict(_VIT, image_size=224, patch_size=14, mlp_ratio=4)

MODEL_TYPES: dict[str, ModelType] = {mt.name: mt for mt in (
    ModelType("clip", "clip", "CLIPVisionModel", "CLIPVisionConfig", full=True,
              weights_prefix="vision_model.", config_defaults=_CLIP_DEFAULTS),
    ModelType("clip_vision_model", "clip", "CLIPVisionModel", "CLIPVisionConfig", full=False,
              weights_prefix="vision_model.", config_defaults=_CLIP_DEFAULTS),
    ModelType("siglip", "siglip", "SiglipVisionModel", "SiglipVisionConfig", full=True,
              weights_prefix="vision_model.", config_defaults=_SIGLIP_DEFAULTS),
    ModelType("siglip_vision_model", "siglip", "SiglipVisionModel", "SiglipVisionConfig",
              full=False, weights_prefix="vision_model.", config_defaults=_SIGLIP_DEFAULTS),
    # base_model_prefix: a *ForImageClassification checkpoint keeps the backbone under it
    ModelType("dinov2", "dinov2", "Dinov2Model", "Dinov2Config", full=False,
              weights_prefix="dinov2.", since="4.32", config_defaults=_DINOV2_DEFAULTS),
    ModelType("dinov2_with_registers", "dinov2", "Dinov2WithRegistersModel",
              "Dinov2WithRegistersConfig", full=False, weights_prefix="dinov2_with_registers.",
              registers=True, since="4.48",
              config_defaults=dict(_DINOV2_DEFAULTS, patch_size=16, num_register_tokens=4)),
)}

_NAFLEX = ("a SigLIP2 NaFlex checkpoint: it cuts each image at its native aspect ratio into a "
           "variable number of patches (pixel_attention_mask, spatial_shapes), which fixed "
           "(tokens, hidden) rows cannot hold, so clipfeat does not support it; the "
           "fixed-resolution SigLIP2 checkpoints (google/siglip2-so400m-patch14-384 and the "
           "like, model_type 'siglip') are supported")

#: model_types known and refused, with the reason.
UNSUPPORTED: dict[str, str] = {"siglip2": _NAFLEX, "siglip2_vision_model": _NAFLEX}


def family(name: str) -> Family:
    """The `Family` called ``name``; ConfigError listing the families otherwise."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model family {name!r}; expected one of "
                          f"{', '.join(FAMILIES)}") from None


def model_type(name: Any) -> ModelType | None:
    """The accepted `ModelType` called ``name``, or None."""
    return MODEL_TYPES.get(name) if isinstance(name, str) else None


def unsupported_reason(name: Any) -> str | None:
    """Why a known model_type is refused (SigLIP2 NaFlex), or None."""
    return UNSUPPORTED.get(name) if isinstance(name, str) else None


def model_class(mt: ModelType) -> Any:
    """The transformers class that loads the tower of ``mt`` (ModelError if this transformers
    is too old to have it)."""
    import transformers

    cls = getattr(transformers, mt.model_class, None)
    if cls is None:
        raise ModelError(
            f"model_type {mt.name!r} needs transformers >= {mt.since} ({mt.model_class}); "
            f"this is transformers {transformers.__version__}: pip install -U transformers"
        )
    return cls


def config_class(mt: ModelType) -> Any:
    """The transformers config class of the tower of ``mt``."""
    import transformers

    cls = getattr(transformers, mt.config_class, None)
    if cls is None:
        model_class(mt)  # raises the version message
    return cls


def processor_class(name: str) -> Any:
    """The PIL image processor class of family ``name``: ``*ImageProcessorPil`` on
    transformers 5 (whose plain class may be the torchvision backend, with another bicubic),
    the plain class (which is the PIL one) on 4.x."""
    import transformers

    base = family(name).processor
    return getattr(transformers, base + "Pil", None) or getattr(transformers, base)


def family_of_processor(class_name: str) -> str:
    """The family whose processor class is ``class_name`` (``CLIPImageProcessorPil`` ...)."""
    for fam in FAMILIES.values():
        if class_name in (fam.processor, fam.processor + "Pil"):
            return fam.name
    raise ConfigError(f"image processor {class_name} belongs to no family clipfeat runs "
                      f"({', '.join(f.processor for f in FAMILIES.values())})")


def processor_defaults(name: str) -> dict[str, Any]:
    """The processor class's defaults (keys of preprocessor_config.json) for family ``name``."""
    return dict(family(name).processor_defaults)


def missing_processor_config(name: str, image_size: int) -> dict[str, Any]:
    """The preprocessor config used for a checkpoint that has none, at ``image_size`` px
    (CLIP: shortest edge + centre crop; SigLIP: plain resize; DINOv2: its evaluation recipe,
    shortest edge 8/7 of the crop, ImageNet mean/std)."""
    family(name)
    square = {"height": image_size, "width": image_size}
    if name == "clip":
        return {"size": {"shortest_edge": image_size}, "crop_size": square}
    if name == "siglip":
        return {"size": square}
    return {"size": {"shortest_edge": image_size * 8 // 7}, "crop_size": square,
            "image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD)}


def check_feature(feature: Any, name: str) -> str:
    """Validate a select_feature name for family ``name``; return it."""
    if feature not in FEATURES:
        raise ConfigError(
            f"feature {feature!r} is not supported; choose one of: {', '.join(FEATURES)}"
        )
    if feature == "cls_patch" and not family(name).cls_tokens:
        raise ConfigError(
            f"feature 'cls_patch' needs a CLS token, which {name} towers do not have; "
            "use --feature patch (it keeps every token)"
        )
    return feature


def feature_tokens(name: str, num_patches: int, feature: str) -> int:
    """Tokens per image a feature keeps (`select_tokens`)."""
    return num_patches + (family(name).cls_tokens if feature == "cls_patch" else 0)


def select_tokens(hidden: Any, feature: str, ref: Any) -> Any:
    """The tokens of ``feature`` from a ``(B, tokens, hidden)`` hidden state of the tower
    ``ref`` (anything with ``family`` and ``num_registers``): ``patch`` drops CLS and
    registers; ``cls_patch`` keeps CLS and the patches, registers dropped."""
    cls = family(ref.family).cls_tokens
    registers = int(getattr(ref, "num_registers", 0) or 0)
    start = cls + registers
    if feature == "patch":
        return hidden[:, start:] if start else hidden
    if feature != "cls_patch" or not cls:
        check_feature(feature, ref.family)
    if not registers:
        return hidden
    import torch

    return torch.cat((hidden[:, :cls], hidden[:, start:]), dim=1)
