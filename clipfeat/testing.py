"""Helpers for tests and benchmarks: tiny random checkpoints.

Checkpoint folders written with ``save_pretrained`` (random weights, no download) together
with the checkpoint's PIL image processor, as a hub repository would hold them. The test
suite's fixtures (``tests/conftest.py``) and the benchmarks' towers (``benchmarks/``) are made
here, so both build the same models the same way.

Importing this module imports neither torch nor transformers (each function imports them
when called) and has no side effects. Nothing here is used by extraction itself.

* :func:`save_tiny_clip` / :func:`save_tiny_siglip`: a random CLIP (full text + vision, or
  vision-only) or vision-only SigLIP checkpoint; vision sizes default to :data:`TINY_VISION`.
* :func:`save_vitl336_config`: config.json + preprocessor_config.json of ViT-L/14-336 only.
* :data:`TOWERS` and :func:`tower_checkpoint`: the benchmarks' named vision-only CLIP towers
  (``tiny336``, ``vitb32``, ``vitl336``), made once in a cache folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["TINY_TEXT", "TINY_VISION", "TOWERS", "save_tiny_clip", "save_tiny_siglip",
           "save_vitl336_config", "tower_checkpoint"]

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


def _processor(family: str, image_size: int) -> Any:
    """The family's PIL image processor at ``image_size`` (CLIP: shortest edge + centre crop)."""
    from clipfeat.tower import _processor_class

    cls = _processor_class(family)
    if family == "clip":
        return cls(size={"shortest_edge": image_size},
                   crop_size={"height": image_size, "width": image_size})
    return cls(size={"height": image_size, "width": image_size})


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


def save_tiny_siglip(path: str | Path, *, image_size: int = 28, patch_size: int = 7,
                     seed: int = 0, **vision: int) -> Path:
    """A random vision-only SigLIP checkpoint (no CLS token) in ``path``, plus its PIL image
    processor. ``vision`` overrides :data:`TINY_VISION`. Returns the folder."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    path = Path(path)
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(**dict(TINY_VISION, **vision, image_size=image_size,
                                    patch_size=patch_size))
    SiglipVisionModel(cfg).save_pretrained(path)
    _processor("siglip", image_size).save_pretrained(path)
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
