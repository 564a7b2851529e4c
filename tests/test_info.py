"""clipfeat info: describe_model / format_model, store detection, and the CLI command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from llava_reference import processor_class
from typer.testing import CliRunner

from clipfeat import info
from clipfeat.cli import app
from clipfeat.errors import ConfigError, ModelError

VITL_PATCH_BYTES = 576 * 1024 * 2


def _processor(path):
    return processor_class("clip").from_pretrained(path)


def test_describe_vitl336(config_only_vitl336):
    d = info.describe_model(str(config_only_vitl336))
    assert d["model_type"] == "clip" and d["family"] == "clip"
    assert d["hidden_size"] == 1024
    assert d["num_hidden_layers"] == 24
    assert d["image_size"] == 336 and d["patch_size"] == 14
    assert d["num_patches"] == 576
    assert d["has_cls_token"] is True
    assert d["layer"] == -2 and d["layer_index"] == 23
    assert d["layer_range"] == [-25, 24]
    assert d["feature"] == "patch"
    assert d["tokens_per_image"] == 576
    assert d["feature_shape"] == [576, 1024]
    assert d["bytes_per_image"] == VITL_PATCH_BYTES
    assert d["weights"] is None
    assert "images" not in d and "total_bytes" not in d
    json.dumps(d)  # serialisable as is


def test_preprocessing_matches_hf_processor(config_only_vitl336):
    proc = _processor(config_only_vitl336)
    pp = info.describe_model(str(config_only_vitl336))["preprocessing"]
    assert pp["resize"] == dict(proc.size) == {"shortest_edge": 336}
    assert pp["crop"] == dict(proc.crop_size) == {"height": 336, "width": 336}
    assert pp["resample"] == "bicubic" and int(proc.resample) == 3
    assert pp["rescale_factor"] == pytest.approx(proc.rescale_factor)
    assert pp["mean"] == pytest.approx(list(proc.image_mean))
    assert pp["std"] == pytest.approx(list(proc.image_std))


def test_cls_patch_and_layers(config_only_vitl336):
    d = info.describe_model(str(config_only_vitl336), layer=0, feature="cls_patch")
    assert d["tokens_per_image"] == 577
    assert d["bytes_per_image"] == 577 * 1024 * 2
    assert d["layer_index"] == 0
    assert info.describe_model(str(config_only_vitl336), layer=-25)["layer_index"] == 0
    assert info.describe_model(str(config_only_vitl336), layer=-1)["layer_index"] == 24
    assert info.describe_model(str(config_only_vitl336), layer=24)["layer_index"] == 24


def test_siglip(siglip_dir):
    d = info.describe_model(str(siglip_dir))
    assert d["family"] == "siglip" and d["has_cls_token"] is False
    assert d["tokens_per_image"] == d["num_patches"] == 16
    assert d["preprocessing"]["resize"] == {"height": 28, "width": 28}
    assert d["preprocessing"]["crop"] is None
    assert d["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert d["weights"] == "model.safetensors"
    with pytest.raises(ConfigError, match="cls_patch"):
        info.describe_model(str(siglip_dir), feature="cls_patch")


def test_images_total(config_only_vitl336):
    d = info.describe_model(str(config_only_vitl336), images=1000)
    assert d["images"] == 1000
    assert d["total_bytes"] == 1000 * VITL_PATCH_BYTES
    assert d["total_human"] == "1.10 GiB"


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (VITL_PATCH_BYTES, "1.12 MiB"),
    (int(1.21 * 1024**4), "1.21 TiB"),
])
def test_human_bytes(n, text):
    assert info.human_bytes(n) == text


@pytest.mark.parametrize("layer", [25, -26])
def test_bad_layer(config_only_vitl336, layer):
    with pytest.raises(ConfigError, match=str(layer)):
        info.describe_model(str(config_only_vitl336), layer=layer)


def test_bad_feature(config_only_vitl336):
    with pytest.raises(ConfigError, match="'cls'"):
        info.describe_model(str(config_only_vitl336), feature="cls")


def test_missing_preprocessor_config_reports_defaults(tmp_path, clip_vision_dir):
    shutil.copy(clip_vision_dir / "config.json", tmp_path / "config.json")
    d = info.describe_model(str(tmp_path))
    pp = d["preprocessing"]
    assert pp["source"].startswith("defaults")
    assert pp["resize"] == {"shortest_edge": 30}
    assert pp["crop"] == {"height": 30, "width": 30}
    assert any("preprocessor_config.json" in w for w in d["warnings"])


def test_old_int_sizes_and_mismatch_warning(tmp_path, clip_vision_dir):
    shutil.copy(clip_vision_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": 224, "crop_size": 224, "do_center_crop": True, "resample": 3}))
    d = info.describe_model(str(tmp_path))
    assert d["preprocessing"]["resize"] == {"shortest_edge": 224}
    assert d["preprocessing"]["crop"] == {"height": 224, "width": 224}
    assert any("224x224" in w and "30x30" in w for w in d["warnings"])


def test_format_model_table(config_only_vitl336):
    d = info.describe_model(str(config_only_vitl336), images=1000)
    text = info.format_model(d)
    lines = text.splitlines()
    assert len(lines) > 10
    assert "576 x 1024" in text and "-25..24" in text and "1.10 GiB" in text
    assert "bicubic" in text and "336x336" in text
    # aligned: every value starts in the same column
    starts = {len(line) - len(line[line.index("  "):].lstrip()) for line in lines}
    assert len(starts) == 1


def test_describe_model_needs_neither_torch_nor_transformers(config_only_vitl336):
    code = (
        "import sys; from clipfeat.info import describe_model; "
        f"d = describe_model({str(config_only_vitl336)!r}); "
        "print(d['tokens_per_image'], 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["576", "False", "False"]


def test_is_store(tmp_path, config_only_vitl336):
    manifest_dir = tmp_path / "a"
    manifest_dir.mkdir()
    (manifest_dir / "manifest.json").write_text("{}")
    shard_dir = tmp_path / "b"
    shard_dir.mkdir()
    (shard_dir / "shard-000000.h5").write_bytes(b"")
    assert info.is_store(str(manifest_dir))
    assert info.is_store(str(shard_dir))
    assert not info.is_store(str(config_only_vitl336))
    assert not info.is_store(str(tmp_path / "missing"))
    assert not info.is_store("openai/clip-vit-large-patch14-336")


def test_info_on_a_store(tmp_path, clip_full_dir):
    """`clipfeat info OUT` summarises a real store: images, shards, config, failures."""
    import json as _json

    import numpy as np
    from PIL import Image

    import clipfeat
    from clipfeat.cli import app

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20 + i, 31, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    clipfeat.extract(roots=[str(root)], out=str(out), model=str(clip_full_dir), device="cpu",
                     shard_size=2, workers=0)
    assert info.is_store(str(out)) and not info.is_store(str(root))
    d = info.describe_store(str(out))
    text = info.format_store(d)
    assert "5" in text and "broken" not in text or "fail" in text.lower()
    res = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = _json.loads(res.stdout)
    flat = _json.dumps(data)
    assert data == d
    assert "-2" in flat and "patch" in flat
    assert any(v == 5 for v in _walk_values(data, "images")), data
    assert any(v == 3 for v in _walk_values(data, "shards")), data


def _walk_values(obj, key):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key or k.startswith(key) or k.endswith(key):
                yield v
            yield from _walk_values(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_values(v, key)


# -- CLI ---------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_info_json(config_only_vitl336):
    result = runner.invoke(app, ["info", str(config_only_vitl336), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert (d["hidden_size"], d["num_hidden_layers"], d["num_patches"]) == (1024, 24, 576)
    assert d["tokens_per_image"] == 576
    assert d["bytes_per_image"] == VITL_PATCH_BYTES


def test_cli_info_cls_patch(config_only_vitl336):
    result = runner.invoke(app, ["info", str(config_only_vitl336), "--json",
                                 "--feature", "cls_patch"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tokens_per_image"] == 577


def test_cli_info_images(config_only_vitl336):
    result = runner.invoke(app, ["info", str(config_only_vitl336), "--images", "1000", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["total_bytes"] == 1000 * VITL_PATCH_BYTES
    text = runner.invoke(app, ["info", str(config_only_vitl336), "--images", "1000"])
    assert text.exit_code == 0 and "1.10 GiB" in text.stdout and "576 x 1024" in text.stdout


@pytest.mark.parametrize("args, needle", [
    (["--layer", "25"], "layer 25"),
    (["--layer", "-26"], "layer -26"),
    (["--feature", "cls"], "feature 'cls'"),
])
def test_cli_info_bad_choice_exits_2(config_only_vitl336, args, needle):
    result = runner.invoke(app, ["info", str(config_only_vitl336), *args])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipfeat: error:") and needle in err[0]


@pytest.mark.parametrize("target, needle", [
    ("clipfeat-test/no-such-model", "--model"),
    ("./no/such/folder", "no such model folder"),
])
def test_cli_info_unknown_model_exits_2(target, needle):
    result = runner.invoke(app, ["info", target])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_model_error_types():
    with pytest.raises(ModelError):
        info.describe_model("./no/such/folder")


def _small_store(out, rows=(2, 1, 3)):
    """A finished store of random rows via the public writer (tests/stores.py)."""
    import numpy as np
    from stores import Shard, build_store

    meta = {"model": "tiny/clip", "layer": -2, "feature": "patch", "aspect": "square",
            "tokens": 6, "hidden_size": 16, "store_dtype": "float16",
            "compute_dtype": "float32"}
    shards = [Shard([f"s{sid}/{i}.jpg" for i in range(n)],
                    np.zeros((n, 6, 16), np.float32),
                    failures=[{"key": f"bad{sid}.jpg", "path": f"/img/bad{sid}.jpg",
                               "error": "cannot identify image file"}])
              for sid, n in enumerate(rows)]
    build_store(out, shards, meta=meta, plan={"num_chunks": len(rows)})


def test_info_store_with_a_deleted_shard_is_incomplete(tmp_path):
    """manifest.json says complete, but a listed shard is gone: INCOMPLETE, naming it."""
    _small_store(tmp_path)
    (tmp_path / "shard-000001.h5").unlink()
    d = info.describe_store(str(tmp_path))
    assert d["complete"] is False
    assert d["missing_shards"] == 1 and d["missing_shard_files"] == ["shard-000001.h5"]
    assert d["shards"] == 2 and d["images"] == 5
    res = runner.invoke(app, ["info", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "(INCOMPLETE)" in res.stdout and "(complete)" not in res.stdout
    assert ("missing    1 shard listed in manifest.json but not on disk (shard-000001.h5): "
            "rerun the same extract command to redo it") in res.stdout
    assert "pending    1 of 3 shards (1)" in res.stdout


def test_info_store_counts_in_singular(tmp_path):
    _small_store(tmp_path, rows=(1,))
    text = info.format_store(info.describe_store(str(tmp_path)))
    assert "(complete)" in text and "images     1 in 1 shard," in text, text
    assert "missing" not in text


def test_pickle_only_weights_are_named_with_how_and_risk(tmp_path, clip_vision_dir):
    """A pytorch_model.bin-only folder: not "not present", but pickle, --allow-pickle, risk."""
    folder = tmp_path / "pickle"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(clip_vision_dir / name, folder / name)
    (folder / "pytorch_model.bin").write_bytes(b"pickle stand-in")
    d = info.describe_model(str(folder))
    assert d["weights"] is None and d["pickle_weights"] == "pytorch_model.bin"
    result = runner.invoke(app, ["info", str(folder)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "not present" not in text
    assert "pytorch_model.bin only: pickle, refused without --allow-pickle" in text
    assert "--allow-pickle loads them, but unpickling can run arbitrary code" in text
    assert info.describe_model(str(clip_vision_dir))["pickle_weights"] is None


def test_mistyped_local_path_with_a_slash(tmp_path, monkeypatch):
    """runs/exx with runs/ here and the hub offline: a missing folder, not a hub repo."""
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["info", "runs/exx"])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()
    assert len(line) == 1 and "no such folder or cached model: runs/exx" in line[0]
    assert "runs/ exists here" in line[0] and "hf download" not in line[0]
