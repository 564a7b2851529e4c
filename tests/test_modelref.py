"""resolve_model: local folders, the HF cache, weights policy, unsupported models."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from clipfeat.errors import ConfigError, ModelError
from clipfeat.modelref import ModelRef, resolve_model


def _copy(src: Path, dst: Path, *names: str) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


@pytest.mark.parametrize(
    "fixture, model_type, family, config_cls",
    [
        ("clip_full_dir", "clip", "clip", "CLIPVisionConfig"),
        ("clip_vision_dir", "clip_vision_model", "clip", "CLIPVisionConfig"),
        ("siglip_dir", "siglip_vision_model", "siglip", "SiglipVisionConfig"),
        ("config_only_vitl336", "clip", "clip", "CLIPVisionConfig"),
    ],
)
def test_local_folder_matches_transformers_config(request, fixture, model_type, family,
                                                  config_cls):
    import transformers

    path = request.getfixturevalue(fixture)
    ref = resolve_model(str(path))
    expected = getattr(transformers, config_cls).from_pretrained(path)

    assert isinstance(ref, ModelRef)
    assert ref.local_dir == path.resolve()
    assert ref.revision is None
    assert ref.model_type == model_type
    assert ref.family == family
    assert ref.has_cls_token is (family == "clip")
    for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
        assert getattr(ref, key) == getattr(expected, key), key
    assert type(ref.vision_config) is type(expected)
    assert ref.vision_config.to_dict() == expected.to_dict()
    assert ref.num_patches == (expected.image_size // expected.patch_size) ** 2
    assert ref.preprocessor_config == json.loads((path / "preprocessor_config.json").read_text())


def test_weights_file_found_or_none(clip_full_dir, config_only_vitl336):
    assert resolve_model(str(clip_full_dir), need_weights=True).weights_file == (
        clip_full_dir.resolve() / "model.safetensors"
    )
    assert resolve_model(str(config_only_vitl336)).weights_file is None


def test_config_only_folder_refused_when_weights_needed(config_only_vitl336):
    with pytest.raises(ModelError, match="has no weights"):
        resolve_model(str(config_only_vitl336), need_weights=True)


def test_pickle_only_refused_unless_allowed(tmp_path, clip_vision_dir):
    import torch
    from safetensors.torch import load_file

    folder = _copy(clip_vision_dir, tmp_path / "pickle", "config.json")
    torch.save(load_file(clip_vision_dir / "model.safetensors"), folder / "pytorch_model.bin")

    with pytest.raises(ModelError, match="--allow-pickle") as err:
        resolve_model(str(folder), need_weights=True)
    assert "\n" not in str(err.value)
    ref = resolve_model(str(folder), need_weights=True, allow_pickle=True)
    assert ref.weights_file == folder.resolve() / "pytorch_model.bin"


def test_sharded_index_with_missing_shard(tmp_path, clip_vision_dir):
    folder = _copy(clip_vision_dir, tmp_path / "sharded", "config.json")
    shutil.copy(clip_vision_dir / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"model-00002-of-00002\.safetensors"):
        resolve_model(str(folder), need_weights=True)

    shutil.copy(clip_vision_dir / "model.safetensors", folder / "model-00002-of-00002.safetensors")
    ref = resolve_model(str(folder), need_weights=True)
    assert ref.weights_file.name == "model.safetensors.index.json"


def test_non_vision_model_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        resolve_model(str(tmp_path))
    msg = str(err.value)
    assert "'bert'" in msg and "clip_vision_model" in msg and "siglip" in msg


def test_llava_checkpoint_points_to_its_tower(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    with pytest.raises(ModelError, match="--model openai/clip-vit-large-patch14-336"):
        resolve_model(str(tmp_path))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "~/no-such-clipfeat-dir",
                                  "a/b/c"])
def test_missing_path_is_not_a_hub_name(name):
    with pytest.raises(ModelError, match="no such model folder"):
        resolve_model(name)


def test_model_error_is_config_error():
    with pytest.raises(ConfigError):
        resolve_model("/no/such/dir")


def test_unknown_hub_name_offline():
    with pytest.raises(ModelError) as err:
        resolve_model("clipfeat-test/does-not-exist")
    msg = str(err.value)
    assert "clipfeat-test/does-not-exist" in msg
    assert "--model" in msg and "HF_HUB_OFFLINE" in msg
    assert "\n" not in msg


def test_invalid_hub_name():
    with pytest.raises(ModelError, match="valid hub name"):
        resolve_model("bad name!!")


def test_hub_name_resolved_from_cache(tmp_path, monkeypatch, clip_vision_dir):
    """A repo already in the HF cache resolves offline to its snapshot and commit."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-clip"
    snapshot = _copy(clip_vision_dir, repo / "snapshots" / commit, "config.json",
                     "preprocessor_config.json", "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    ref = resolve_model("acme/tiny-clip", need_weights=True)
    assert ref.local_dir == snapshot.resolve()
    assert ref.revision == commit
    assert ref.model_type == "clip_vision_model"
    assert ref.weights_file == snapshot.resolve() / "model.safetensors"


def test_revision_ignored_for_local_folder(clip_vision_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="clipfeat.modelref"):
        ref = resolve_model(str(clip_vision_dir), revision="v1")
    assert ref.revision is None
    assert "revision 'v1' ignored" in caplog.text


def test_geometry_agrees_with_transformers_on_old_openai_config(tmp_path):
    """Old openai/* configs also carry vision_config_dict; we read what the vision model loads."""
    from transformers import CLIPVisionConfig

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "clip",
        "vision_config": {"hidden_size": 1024, "image_size": 336, "patch_size": 14,
                          "num_hidden_layers": 24, "num_attention_heads": 16},
        "vision_config_dict": {"hidden_size": 1024, "image_size": 336, "patch_size": 14,
                               "num_hidden_layers": 24, "num_attention_heads": 16},
    }))
    ref = resolve_model(str(tmp_path))
    expected = CLIPVisionConfig.from_pretrained(tmp_path)
    got = (ref.hidden_size, ref.image_size, ref.patch_size, ref.num_hidden_layers)
    assert got == (expected.hidden_size, expected.image_size, expected.patch_size,
                   expected.num_hidden_layers) == (1024, 336, 14, 24)
    assert ref.num_patches == 576


@pytest.mark.parametrize("raw, config_cls", [
    ({"model_type": "clip", "vision_config": {}}, "CLIPVisionConfig"),
    ({"model_type": "clip_vision_model"}, "CLIPVisionConfig"),
    ({"model_type": "siglip", "vision_config": {}}, "SiglipVisionConfig"),
    ({"model_type": "siglip_vision_model"}, "SiglipVisionConfig"),
])
def test_defaults_when_config_omits_fields(tmp_path, raw, config_cls):
    """Fields missing from config.json take transformers' own defaults."""
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(raw))
    ref = resolve_model(str(tmp_path))
    expected = getattr(transformers, config_cls).from_pretrained(tmp_path)
    for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
        assert getattr(ref, key) == getattr(expected, key), key
