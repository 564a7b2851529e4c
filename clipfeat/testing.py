"""Helpers for tests and benchmarks: tiny random checkpoints.

Checkpoint folders written with ``save_pretrained`` (random weights, no download) together
with the checkpoint's PIL image processor, as a hub repository would hold them. The test
suite's fixtures (``tests/conftest.py``) and the benchmarks' towers (``benchmarks/``) are made
here, so both build the same models the same way.

Importing this module imports neither torch nor transformers (each function imports them
when called) and has no side effects. Nothing here is used by extraction itself.

* :func:`save_tiny_clip` / :func:`save_tiny_siglip`: a random CLIP or SigLIP checkpoint (full
  text + vision, or vision-only); vision sizes default to :data:`TINY_VISION`. A full SigLIP
  with bilinear resampling is saved as the fixed-resolution SigLIP2 checkpoints are.
* :func:`save_tiny_dinov2`: a random DINOv2 (optionally with registers) with its
  ``BitImageProcessor`` config, fed a smaller crop than its config's ``image_size`` (as the
  real ones: 224 px crops of a 518 px model).
* :func:`save_vitl336_config`: config.json + preprocessor_config.json of ViT-L/14-336 only.
* :data:`TOWERS` and :func:`tower_checkpoint`: the benchmarks' named vision-only CLIP towers
  (``tiny336``, ``vitb32``, ``vitl336``), made once in a cache folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["TINY_TEXT", "TINY_VISION", "TOWERS", "save_tiny_clip", "save_tiny_dinov2",
           "save_tiny_siglip", "save_vitl336_config", "tower_checkpoint"]

#: The test suite's vision tower: 3 blocks of width 32, 30 px in 6 px patches (25 patches).
TINY_VISION: dict[str, int] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=30,
    patch_size=6,
)

#: The text half of a tiny full CLIP checkpoint (``model_type`` "clip", like openai/* repos).
TINY_TEXT: dict[str, int] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, vocab_size=99, max_position_embeddings=16)

#: The benchmarks' vision-only CLIP towers, by name.
TOWERS: dict[str, dict[str, int]] = {
    # hidden 32, 1 head, 3 blocks, patch 14, 336-px input: preprocessing-bound
    "tiny336": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=1, image_size=336, patch_size=14),
    # ViT-B/32-sized (hidden 768, 12 layers, 224 px): compute-bound on a CPU
    "vitb32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, image_size=224, patch_size=32),
    # ViT-L/14-336 (LLaVA-1.5's tower): for a GPU
    "vitl336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14),
}

#: The text half of ViT-L/14-336's full checkpoint (openai/clip-vit-large-patch14-336).
_VITL_TEXT: dict[str, int] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12)


def _processor(family: str, image_size: int, **overrides: Any) -> Any:
    """The family's PIL image processor at ``image_size`` (CLIP: shortest edge + centre crop;
    SigLIP: resize; DINOv2: its recipe, shortest edge 8/7 of the crop)."""
    from clipfeat import families

    config = families.missing_processor_config(family, image_size)
    return families.processor_class(family)(**dict(config, **overrides))


def save_tiny_clip(path: str | Path, *, full: bool = False, image_size: int = 30,
                   patch_size: int = 6, seed: int = 0, **vision: int) -> Path:
    """A random CLIP checkpoint in ``path``: full (text + vision, ``model_type`` "clip") or
    vision-only ("clip_vision_model"), plus its PIL image processor. ``vision`` overrides
    :data:`TINY_VISION`; weights come from ``torch.manual_seed(seed)``. Returns the folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    torch.manual_seed(seed)
    vcfg = dict(TINY_VISION, **vision)
    vcfg.update(image_size=image_size, patch_size=patch_size)
    if full:
        model = CLIPModel(CLIPConfig(text_config=dict(TINY_TEXT), vision_config=vcfg,
                                     projection_dim=16))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vcfg))
    model.save_pretrained(path)
    _processor("clip", image_size).save_pretrained(path)
    return path


def save_tiny_siglip(path: str | Path, *, full: bool = False, image_size: int = 28,
                     patch_size: int = 7, resample: int = 3, seed: int = 0,
                     **vision: int) -> Path:
    """A random SigLIP checkpoint (no CLS token) in ``path``: vision-only
    ("siglip_vision_model") or full (text + vision, ``model_type`` "siglip"), plus its PIL
    image processor resizing with ``resample`` (PIL code; 3 bicubic). ``full=True,
    resample=2`` is how transformers' conversion saved the fixed-resolution SigLIP2
    checkpoints (``google/siglip2-so400m-patch14-384``: ``SiglipConfig``, a
    ``SiglipImageProcessor`` with bilinear resampling). ``vision`` overrides
    :data:`TINY_VISION`. Returns the folder."""
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    path = Path(path)
    torch.manual_seed(seed)
    vcfg = dict(TINY_VISION, **vision, image_size=image_size, patch_size=patch_size)
    if full:
        SiglipModel(SiglipConfig(text_config=dict(TINY_TEXT), vision_config=vcfg)
                    ).save_pretrained(path)
    else:
        SiglipVisionModel(SiglipVisionConfig(**vcfg)).save_pretrained(path)
    _processor("siglip", image_size, resample=resample).save_pretrained(path)
    return path


def save_tiny_dinov2(path: str | Path, *, registers: int = 0, image_size: int = 28,
                     patch_size: int = 7, crop_size: int = 21, resize: int | None = None,
                     seed: int = 0, **vision: Any) -> Path:
    """A random DINOv2 checkpoint in ``path`` (``Dinov2Model``, or with ``registers`` > 0
    ``Dinov2WithRegistersModel``), plus a ``BitImageProcessor`` config as facebook/dinov2-*
    have (shortest edge ``resize``, default 8/7 of the crop; centre crop ``crop_size``;
    ImageNet mean/std). ``image_size`` is the config's (the position embeddings' size);
    the processor's smaller crop makes the model interpolate them, as the real ones do (518
    and 224). ``vision`` overrides :data:`TINY_VISION` (the MLP width as ``mlp_ratio``).
    Returns the folder."""
    import torch
    import transformers

    path = Path(path)
    torch.manual_seed(seed)
    sizes = dict(TINY_VISION)
    sizes["mlp_ratio"] = sizes.pop("intermediate_size") // sizes["hidden_size"]
    sizes.update(vision, image_size=image_size, patch_size=patch_size)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **sizes)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**sizes))
    model.save_pretrained(path)
    overrides = {} if resize is None else {"size": {"shortest_edge": resize}}
    _processor("dinov2", crop_size, **overrides).save_pretrained(path)
    return path


def save_vitl336_config(path: str | Path) -> Path:
    """Only config.json + preprocessor_config.json of a full ViT-L/14-336 CLIP checkpoint
    (openai/clip-vit-large-patch14-336's sizes), no weights: for what reads configs only."""
    from transformers import CLIPConfig

    path = Path(path)
    vision = TOWERS["vitl336"]
    CLIPConfig(text_config=dict(_VITL_TEXT), vision_config=dict(vision),
               projection_dim=768).save_pretrained(path)
    _processor("clip", vision["image_size"]).save_pretrained(path)
    return path


def tower_checkpoint(folder: str | Path, name: str) -> Path:
    """The vision-only CLIP tower :data:`TOWERS` ``[name]`` in ``folder/tower-<name>``, made
    with random weights unless a folder with the same config is already there."""
    path = Path(folder) / f"tower-{name}"
    if (path / "config.json").exists():
        saved = json.loads((path / "config.json").read_text())
        if all(saved.get(k) == v for k, v in TOWERS[name].items()):
            return path
        shutil.rmtree(path)
    spec = dict(TOWERS[name])
    return save_tiny_clip(path, full=False, image_size=spec.pop("image_size"),
                          patch_size=spec.pop("patch_size"), **spec)
