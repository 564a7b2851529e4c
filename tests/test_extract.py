"""End-to-end `extract`: features equal an independent computation, output contract, exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from llava_reference import LlavaReference
from PIL import Image
from stores import read_failures, read_rows
from typer.testing import CliRunner

import clipfeat
from clipfeat.cli import app
from clipfeat.errors import ConfigError, ExtractionError
from clipfeat.store import FeatureStore

runner = CliRunner()


def make_images(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    specs = {
        "a.jpg": ("RGB", (64, 48), "JPEG"),
        "sub/b.png": ("RGBA", (37, 53), "PNG"),
        "sub/deeper/c.png": ("L", (30, 30), "PNG"),
        "sub/d.gif": ("P", (45, 20), "GIF"),
        "e.tiff": ("CMYK", (40, 41), "TIFF"),
        "f.png": ("I;16", (33, 47), "PNG"),
        "G.JPEG": ("RGB", (120, 31), "JPEG"),
    }
    out = {}
    for key, (mode, size, fmt) in specs.items():
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(mode) if mode != "I;16" else Image.fromarray(
            arr[..., 0].astype(np.uint16) * 257)
        img.save(root / key, format=fmt)
        out[key] = root / key
    (root / "notes.txt").write_text("not an image")
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return make_images(tmp_path_factory.mktemp("imgs") / "root")


@pytest.mark.parametrize("fixture,family,feature,aspect,layer", [
    ("clip_full_dir", "clip", "patch", "square", -2),
    ("clip_full_dir", "clip", "cls_patch", "pad", -1),
    ("clip_vision_dir", "clip", "patch", "pad", 1),
    ("siglip_dir", "siglip", "patch", "square", -2),
    ("siglip_dir", "siglip", "patch", "pad", 0),
])
def test_features_equal_llava_path(request, tmp_path, images, fixture, family, feature, aspect,
                                   layer):
    ckpt = request.getfixturevalue(fixture)
    root = next(iter(images.values())).parent
    out = tmp_path / "out"
    summary = clipfeat.extract(
        roots=[str(root)], out=str(out), model=str(ckpt), layer=layer, feature=feature,
        aspect=aspect, device="cpu", store_dtype="float32", batch_size=3, shard_size=4,
        workers=1,
    )
    assert summary.extracted == len(images) and summary.failed == 0 and summary.complete
    rows = read_rows(out)
    assert sorted(rows) == sorted(images)
    # LLaVA's path, computed with transformers only: PIL processor + hidden_states[layer]
    llava = LlavaReference(ckpt, family=family, layer=layer, feature=feature,
                           hide_transparency=False)
    for key, path in images.items():
        ref = llava.features([path], aspect=aspect)[0]
        assert rows[key].shape == ref.shape
        np.testing.assert_allclose(rows[key], ref, rtol=1e-5, atol=1e-5, err_msg=key)


def test_output_contract(tmp_path, images, clip_full_dir):
    root = next(iter(images.values())).parent
    out = tmp_path / "out"
    clipfeat.extract(roots=[str(root)], out=str(out), model=str(clip_full_dir), device="cpu",
                     shard_size=3, batch_size=2, workers=1)
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    shards = [n for n in names if n.endswith(".h5")]
    assert shards == [f"shard-{i:06d}.h5" for i in range(3)]  # 7 images / 3 per shard
    assert set(names) == set(shards) | {"manifest.json", "failures.jsonl"}
    with h5py.File(out / shards[0], "r") as f:
        feats = f["features"]
        assert feats.dtype == np.float16
        assert feats.shape == (3, 25, 32)  # 30 px / patch 6 = 25 patches, CLS dropped
        assert feats.chunks == (1, 25, 32)
        assert h5py.check_string_dtype(f["keys"].dtype).encoding == "utf-8"
        attrs = dict(f.attrs)
    for name in ("model", "model_type", "layer", "feature", "aspect", "image_size", "patch_size",
                 "hidden_size", "tokens", "compute_dtype", "store_dtype", "preprocessing",
                 "clipfeat_version"):
        assert name in attrs, name
    assert attrs["layer"] == -2 and attrs["feature"] == "patch" and attrs["tokens"] == 25
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert sum(s["num_rows"] for s in manifest["shards"]) == len(images)
    keys_in_order = [k for s in shards for k in h5py.File(out / s, "r")["keys"].asstr()[()]]
    assert keys_in_order == sorted(images)  # deterministic sorted order


def test_llava_json_keys_exact(tmp_path, images, clip_full_dir):
    root = next(iter(images.values())).parent
    data = [
        {"id": 1, "image": "sub/b.png", "conversations": []},
        {"id": 2, "conversations": []},  # text-only
        {"id": 3, "image": "a.jpg"},
        {"id": 4, "image": ["sub/b.png", "missing.jpg"]},
    ]
    js = tmp_path / "train.json"
    js.write_text(json.dumps(data))
    out = tmp_path / "out"
    s = clipfeat.extract(llava_json=str(js), image_folder=str(root), out=str(out),
                         model=str(clip_full_dir), device="cpu", workers=0)
    assert s.extracted == 2 and s.failed == 1
    assert set(read_rows(out)) == {"sub/b.png", "a.jpg"}
    fails = read_failures(out)
    assert [f["key"] for f in fails] == ["missing.jpg"]
    assert fails[0]["error"] and fails[0]["path"].endswith("missing.jpg")


def test_bad_files_are_recorded_and_run_completes(tmp_path, clip_full_dir):
    root = tmp_path / "root"
    make_images(root)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("<html>404</html>")
    good = (root / "a.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    res = runner.invoke(app, ["extract", str(root), "--out", str(out), "--model",
                              str(clip_full_dir), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    fails = {f["key"] for f in read_failures(out)}
    assert {"empty.jpg", "text.png"} <= fails
    rows = read_rows(out)
    assert not (set(rows) & fails)
    assert len(rows) + len(fails) == 10
    res = runner.invoke(app, ["extract", str(root), "--out", str(tmp_path / "o2"), "--model",
                              str(clip_full_dir), "--device", "cpu", "--quiet", "--strict"])
    assert res.exit_code == 1


def test_rerun_does_nothing_and_other_config_is_refused(tmp_path, images, clip_full_dir):
    root = next(iter(images.values())).parent
    out = tmp_path / "out"
    args = ["extract", str(root), "--out", str(out), "--model", str(clip_full_dir),
            "--device", "cpu", "--shard-size", "4"]
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "nothing to do" in res.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == before
    res = runner.invoke(app, args + ["--layer", "-1"])
    assert res.exit_code == 2 and "layer" in res.output and "--overwrite" in res.output
    res = runner.invoke(app, args + ["--layer", "-1", "--overwrite", "--quiet"])
    assert res.exit_code == 0
    with h5py.File(next(out.glob("*.h5")), "r") as f:
        assert f.attrs["layer"] == -1


@pytest.mark.parametrize("extra,needle", [
    (["--layer", "7"], "7"),
    (["--feature", "cls"], "cls"),
    (["--batch-size", "0"], "--batch-size"),
    (["--aspect", "wide"], "wide"),
    (["--store-dtype", "int8"], "int8"),
    (["--device", "tpu"], "tpu"),
])
def test_usage_errors_exit_2_and_write_nothing(tmp_path, images, clip_full_dir, extra, needle):
    root = next(iter(images.values())).parent
    out = tmp_path / "out"
    res = runner.invoke(app, ["extract", str(root), "--out", str(out), "--model",
                              str(clip_full_dir), "--device", "cpu"] + extra)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert not out.exists()


def test_missing_root_unknown_model_out_is_file(tmp_path, images, clip_full_dir):
    root = next(iter(images.values())).parent
    res = runner.invoke(app, ["extract", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                              "--model", str(clip_full_dir)])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, ["extract", str(root), "--out", str(tmp_path / "o"),
                              "--model", "no-such-org/no-such-model"])
    assert res.exit_code == 2 and "--model" in res.output
    f = tmp_path / "file"
    f.write_text("x")
    res = runner.invoke(app, ["extract", str(root), "--out", str(f), "--model", str(clip_full_dir)])
    assert res.exit_code == 2 and "file" in res.output
    assert not (tmp_path / "o").exists()


def test_float16_overflow_fails_clearly(tmp_path, images, clip_full_dir):
    from transformers import CLIPVisionModel

    big = tmp_path / "big"
    model = CLIPVisionModel.from_pretrained(clip_full_dir)
    with torch.no_grad():
        model.state_dict()  # touch
        emb = model.vision_model.embeddings if hasattr(model, "vision_model") else model.embeddings
        emb.class_embedding.mul_(0).add_(1e6)
        emb.position_embedding.weight.mul_(0).add_(1e6)
        pre = model.vision_model.pre_layrnorm if hasattr(model, "vision_model") else model.pre_layrnorm
        pre.weight.fill_(1e6)
    model.save_pretrained(big)
    for name in ("preprocessor_config.json",):
        (big / name).write_bytes((clip_full_dir / name).read_bytes())
    root = next(iter(images.values())).parent
    with pytest.raises(ExtractionError, match="store-dtype float32"):
        clipfeat.extract(roots=[str(root)], out=str(tmp_path / "o"), model=str(big),
                         device="cpu", layer=0, workers=0)
    assert not list((tmp_path / "o").glob("*.h5"))
    s = clipfeat.extract(roots=[str(root)], out=str(tmp_path / "o32"), model=str(big),
                         device="cpu", layer=0, workers=0, store_dtype="float32")
    assert s.extracted == len(images)
    # the advice, followed into the same OUT (it holds no finished shard): its plan is replaced
    s = clipfeat.extract(roots=[str(root)], out=str(tmp_path / "o"), model=str(big),
                         device="cpu", layer=0, workers=0, store_dtype="float32")
    assert s.extracted == len(images) and s.complete
    assert FeatureStore(tmp_path / "o").meta["store_dtype"] == "float32"


def test_config_errors_raise_before_writing(tmp_path, clip_full_dir):
    with pytest.raises(ConfigError):
        clipfeat.extract(roots=[str(tmp_path / "missing")], out=str(tmp_path / "o"),
                         model=str(clip_full_dir))
    assert not (tmp_path / "o").exists()


def test_summary_json_and_exit_code(tmp_path, images, clip_full_dir):
    root = next(iter(images.values())).parent
    res = runner.invoke(app, ["extract", str(root), "--out", str(tmp_path / "o"), "--model",
                              str(clip_full_dir), "--device", "cpu", "--json", "--quiet"])
    assert res.exit_code == 0
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert data["extracted"] == len(images) and data["complete"] is True
    assert os.path.exists(tmp_path / "o" / "manifest.json")


def test_thread_tuner_shares_the_cores_with_the_decode_workers():
    """CPU runs: torch gets the cores the workers leave while they decode, every core when
    the decoded-image queue is (nearly) full or decoding is over, and gives them back when
    the queue falls under half full."""
    from clipfeat.pipeline.tuning import ThreadTuner

    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(4, workers=3)
        tuner.step(0.3)  # decoding, queue short: the one core the workers leave
        assert tuner.threads == torch.get_num_threads() == 1
        tuner.step(0.7)  # between the marks: no change
        assert tuner.threads == 1
        tuner.step(0.95)  # the workers wait for room: every core to torch
        assert tuner.threads == torch.get_num_threads() == 4
        tuner.step(0.6)
        assert tuner.threads == 4
        tuner.step(0.4)  # decoding falls behind: cores back to the workers
        assert tuner.threads == torch.get_num_threads() == 1
        tuner.step(0.0, decoding=False)  # every image is decoded: all threads, now
        assert tuner.threads == torch.get_num_threads() == 4

        few = ThreadTuner(8, workers=2)  # more cores than workers: torch keeps the rest
        few.step(0.0)
        assert few.threads == torch.get_num_threads() == 6
    finally:
        torch.set_num_threads(before)


def test_reused_pixel_slots_give_the_rows_of_in_process_decoding(tmp_path, clip_full_dir):
    """Decoded images wait in shared-memory slots that are reused once their batch is
    stacked. With the queue squeezed to a few slots (each reused many times), every row must
    still be the one decoding in-process gives: a slot freed too early would show here."""
    rng = np.random.default_rng(7)
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(40):
        w, h = (int(x) for x in rng.integers(20, 90, size=2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    # extra["queue_bytes"] is the decoded-image budget: 1 byte gives a queue of depth 8,
    # 16 slots in all
    common = dict(roots=[str(root)], model=str(clip_full_dir), device="cpu", batch_size=4,
                  torch_threads=1, shard_size=16, extra={"queue_bytes": 1})
    a = clipfeat.extract(out=str(tmp_path / "a"), workers=2, **common)
    b = clipfeat.extract(out=str(tmp_path / "b"), workers=0, **common)
    assert a.extracted == b.extracted == 40
    rows_a, rows_b = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    assert sorted(rows_a) == sorted(rows_b) == [f"{i:02d}.png" for i in range(40)]
    for key, row in rows_b.items():
        np.testing.assert_array_equal(rows_a[key], row, err_msg=key)
    assert len({row.tobytes() for row in rows_a.values()}) == 40  # 40 different images


def test_a_refused_settings_change_names_each_field_briefly(tmp_path, images, clip_full_dir):
    """The refusal names each differing field, old -> new, nested preprocessing fields by
    their own names: not a dump of two whole preprocessing dicts."""
    import shutil

    root = next(iter(images.values())).parent
    out = tmp_path / "out"
    model = tmp_path / "model"
    shutil.copytree(clip_full_dir, model)
    args = ["extract", str(root), "--out", str(out), "--model", str(model), "--device", "cpu",
            "--workers", "0", "--quiet"]
    assert runner.invoke(app, args).exit_code == 0
    pp = json.loads((model / "preprocessor_config.json").read_text())
    pp["image_mean"] = [0.5, 0.5, 0.5]
    (model / "preprocessor_config.json").write_text(json.dumps(pp))
    res = runner.invoke(app, args + ["--layer", "-1"])
    assert res.exit_code == 2, res.output
    msg = res.stderr.strip()
    assert "layer: -2 in OUT -> -1 now" in msg
    assert "preprocessing.mean: " in msg and "-> [0.5, 0.5, 0.5] now" in msg
    assert "preprocessing.std" not in msg and len(msg) < 600, msg


def test_limit_on_a_rerun_says_what_it_does(tmp_path, images, clip_full_dir, caplog):
    """A smaller --limit on a rerun cannot take planned images out: it says so."""
    import logging

    root = next(iter(images.values())).parent
    common = dict(roots=[str(root)], out=str(tmp_path / "out"), model=str(clip_full_dir),
                  device="cpu", workers=0)
    assert clipfeat.extract(**common, limit=4).planned == 4
    with caplog.at_level(logging.WARNING):
        s = clipfeat.extract(**common, limit=2)
    assert s.planned == 4 and "--limit 2" in caplog.text and "already planned for 4" in caplog.text
    assert clipfeat.extract(**common, limit=6).planned == 6  # a larger one adds images
