"""Shared fixtures: tiny random checkpoints saved with save_pretrained, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=30,
    patch_size=6,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """Never touch the network or the user's HF cache."""
    cache = tmp_path_factory.getbasetemp() / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))


def _save_clip(path: Path, *, full: bool, image_size: int, patch_size: int, **vision) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:  # transformers 4.x: the default processor is the PIL one
        from transformers import CLIPImageProcessor as Proc

    torch.manual_seed(0)
    vcfg = dict(TINY_VISION, **vision)
    vcfg.update(image_size=image_size, patch_size=patch_size)
    if full:
        cfg = CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, vocab_size=99, max_position_embeddings=16),
            vision_config=vcfg,
            projection_dim=16,
        )
        model = CLIPModel(cfg)
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vcfg))
    model.save_pretrained(path)
    Proc(size={"shortest_edge": image_size},
         crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def _save_siglip(path: Path, *, image_size: int = 28, patch_size: int = 7) -> Path:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    try:
        from transformers import SiglipImageProcessorPil as Proc
    except ImportError:
        from transformers import SiglipImageProcessor as Proc

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(**dict(TINY_VISION, image_size=image_size, patch_size=patch_size))
    SiglipVisionModel(cfg).save_pretrained(path)
    Proc(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def clip_full_dir(tmp_path_factory) -> Path:
    """A full CLIP checkpoint (text + vision), model_type 'clip', like openai/* repos."""
    return _save_clip(tmp_path_factory.mktemp("clip-full"), full=True, image_size=30, patch_size=6)


@pytest.fixture(scope="session")
def clip_vision_dir(tmp_path_factory) -> Path:
    """A vision-only CLIP checkpoint, model_type 'clip_vision_model'."""
    return _save_clip(tmp_path_factory.mktemp("clip-vision"), full=False, image_size=30,
                      patch_size=6)


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory) -> Path:
    """A vision-only SigLIP checkpoint (no CLS token)."""
    return _save_siglip(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="session")
def config_only_vitl336(tmp_path_factory) -> Path:
    """A folder with only config.json + preprocessor_config.json of ViT-L/14-336 (no weights)."""
    from transformers import CLIPConfig

    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc
    path = tmp_path_factory.mktemp("vitl336-config")
    cfg = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=336, patch_size=14),
        projection_dim=768,
    )
    cfg.save_pretrained(path)
    Proc(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(path)
    return path
