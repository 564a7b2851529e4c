"""Shared fixtures: tiny random checkpoints (clipfeat.testing), no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipfeat.testing import (
    save_tiny_clip,
    save_tiny_dinov2,
    save_tiny_siglip,
    save_vitl336_config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """Never touch the network or the user's HF cache."""
    cache = tmp_path_factory.getbasetemp() / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))


@pytest.fixture(scope="session")
def clip_full_dir(tmp_path_factory) -> Path:
    """A full CLIP checkpoint (text + vision), model_type 'clip', like openai/* repos."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip-full"), full=True, image_size=30,
                          patch_size=6)


@pytest.fixture(scope="session")
def clip_vision_dir(tmp_path_factory) -> Path:
    """A vision-only CLIP checkpoint, model_type 'clip_vision_model'."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip-vision"), full=False, image_size=30,
                          patch_size=6)


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory) -> Path:
    """A vision-only SigLIP checkpoint (no CLS token)."""
    return save_tiny_siglip(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="session")
def config_only_vitl336(tmp_path_factory) -> Path:
    """A folder with only config.json + preprocessor_config.json of ViT-L/14-336 (no weights)."""
    return save_vitl336_config(tmp_path_factory.mktemp("vitl336-config"))


@pytest.fixture(scope="session")
def siglip2_dir(tmp_path_factory) -> Path:
    """A full SigLIP checkpoint saved as the fixed-resolution SigLIP2 ones are (model_type
    'siglip', text + vision, a SiglipImageProcessor with bilinear resampling)."""
    return save_tiny_siglip(tmp_path_factory.mktemp("siglip2"), full=True, resample=2)


@pytest.fixture(scope="session")
def dinov2_dir(tmp_path_factory) -> Path:
    """A DINOv2 checkpoint (CLS, no registers) fed 21-px crops of a 28-px config (3x3 of
    the 4x4 patches its position embeddings cover: the model interpolates, as 224 of 518)."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="session")
def dinov2_reg_dir(tmp_path_factory) -> Path:
    """A DINOv2-with-registers checkpoint (CLS, then 4 registers, then patches)."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2-reg"), registers=4)
