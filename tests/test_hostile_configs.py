"""Hostile configs and flags: one line naming the file or value and the fix (exit 2), never a
traceback, and nothing written to OUT."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import imagegen
import pytest
from test_cli_errors import _runner, assert_one_line_error

from clipfeat.cli import app
from clipfeat.errors import ConfigError, ModelError

DEEP = "[" * 200_000
HUGE_INT = "1" * 5000


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("hostile-root") / "root"
    imagegen.make_image(r / "a.png", "RGB", (20, 20))
    imagegen.make_image(r / "b.jpg", "RGB", (24, 18))
    return r


def ckpt_copy(src: Path, dst: Path, *, weights: bool = True) -> Path:
    dst.mkdir(parents=True)
    for f in ("config.json", "preprocessor_config.json", "model.safetensors"):
        if (src / f).exists() and (weights or f != "model.safetensors"):
            shutil.copy(src / f, dst / f)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    path.write_text(json.dumps(data))


def run_cli(args: list[str], out: Path, needle: str) -> str:
    res = _runner().invoke(app, ["extract", *args, "--out", str(out), "--device", "cpu"])
    line = assert_one_line_error(res.exit_code, res.stdout, res.stderr, needle)
    assert not out.exists(), "OUT was created"
    return line


def run_info(model: Path, needle: str) -> str:
    res = _runner().invoke(app, ["info", str(model)])
    return assert_one_line_error(res.exit_code, res.stdout, res.stderr, needle)


# --------------------------------------------------------------------------- 1. hostile JSON


@pytest.mark.parametrize("content,needle", [
    (DEEP, "nested too deeply"),
    ("[" + HUGE_INT + "]", "more than 4300 digits"),
    ('{"image": "a.png"}\n{"image": ' + HUGE_INT + "}\n", "line 2"),
    ('{"image": "a.png"}\n' + DEEP + "\n", "nested too deeply"),
], ids=["deep-list", "huge-int", "huge-int-jsonl", "deep-jsonl"])
def test_hostile_llava_json_is_one_line(tmp_path, root, clip_full_dir, content, needle):
    f = tmp_path / "train.json"
    f.write_text(content)
    line = run_cli(["--llava-json", str(f), "--image-folder", str(root), "--model",
                    str(clip_full_dir)], tmp_path / "out", needle)
    assert str(f) in line


@pytest.mark.parametrize("line", [DEEP, HUGE_INT], ids=["deep", "huge-int"])
def test_hostile_files_from_line_is_a_failure_not_a_crash(tmp_path, root, clip_full_dir, line):
    """A file list holds paths, not JSON: a hostile line is one more missing input."""
    f = tmp_path / "files.txt"
    f.write_text(f"a.png\n{line}\n")
    out = tmp_path / "out"
    res = _runner().invoke(app, ["extract", str(root), "--files-from", str(f), "--out", str(out),
                                 "--model", str(clip_full_dir), "--device", "cpu",
                                 "--workers", "0", "--quiet", "--json"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["extracted"] == 1 and summary["failed"] == 1


@pytest.mark.parametrize("which", ["config.json", "preprocessor_config.json"])
@pytest.mark.parametrize("content,needle", [
    (DEEP, "nested too deeply"),
    ('{"model_type": "clip", "x": ' + HUGE_INT + "}", "more than 4300 digits"),
], ids=["deep", "huge-int"])
def test_hostile_model_json_is_one_line(tmp_path, root, clip_full_dir, which, content, needle):
    model = ckpt_copy(clip_full_dir, tmp_path / "model")
    (model / which).write_text(content)
    line = run_cli([str(root), "--model", str(model)], tmp_path / "out", needle)
    assert str(model / which) in line
    run_info(model, needle)


# --------------------------------------------------------------------------- 4. flags


@pytest.mark.parametrize("args,needle", [
    (["--decode-timeout", "inf"], "--decode-timeout inf is invalid"),
    (["--decode-timeout", "nan"], "--decode-timeout nan is invalid"),
    (["--decode-timeout", "-1"], "at most 86400"),
    (["--decode-timeout", "100000"], "--decode-timeout 100000"),
    (["--shard-size", "100000000"], "--shard-size 100,000,000 is too large"),
    (["--max-pixels", "100000000000000"], "--max-pixels 100,000,000,000,000 is too large"),
    (["--limit", "-3"], "--limit -3"),
    (["--batch-size", "100000000"], "use at most --batch-size"),
], ids=["timeout-inf", "timeout-nan", "timeout-negative", "timeout-days", "shard-size-huge",
        "max-pixels-huge", "limit-negative", "batch-size-huge"])
def test_absurd_flags_are_one_line(tmp_path, root, clip_full_dir, args, needle):
    run_cli([str(root), "--model", str(clip_full_dir), *args], tmp_path / "out", needle)


def test_batch_size_limit_follows_ram(monkeypatch):
    from clipfeat import config

    monkeypatch.setattr(config, "physical_memory", lambda: 1 << 30)
    config.check_batch_memory(93, image_bytes=3 * 336 * 336, feature_bytes=4 * 576 * 1024,
                              what="at 336x336 px")
    with pytest.raises(ConfigError, match=r"--batch-size 100,000 .* use at most --batch-size 93\b"):
        config.check_batch_memory(100_000, image_bytes=3 * 336 * 336,
                                  feature_bytes=4 * 576 * 1024, what="at 336x336 px")


def test_workers_are_capped_at_cpus_and_images(tmp_path, root, clip_full_dir, caplog,
                                               monkeypatch):
    from clipfeat import config
    from clipfeat.pipeline.extract import prepare

    monkeypatch.setattr(config, "available_cpus", lambda: 3)
    cfg = config.ExtractConfig(roots=(str(root),), out=str(tmp_path / "out"),
                               model=str(clip_full_dir), device="cpu", workers=1000)
    with caplog.at_level("INFO", logger="clipfeat.config"):
        prep = prepare(cfg)
    assert prep.cfg.workers == 2  # two images
    assert "--workers 1000 capped at 3 (the CPUs available)" in caplog.text
    assert "--workers 3 capped at 2 (the images to decode)" in caplog.text
    assert config.ExtractConfig(workers=0).capped_workers(5) == 0
    assert config.ExtractConfig(workers=2).capped_workers(0) == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 5. SIGHUP


@pytest.mark.slow
def test_sighup_stops_cleanly_and_a_rerun_completes(tmp_path, clip_full_dir):
    """A closed terminal hangs up the run's whole process group: the run stops like on
    SIGTERM (exit 129, the message, no partial shard) and the same command finishes it."""
    from stores import shard_files
    from test_resume import (
        Proc,
        assert_no_orphans,
        assert_same_store,
        assert_shards_sound,
        cli_args,
        clipfeat_module_cmd,
        extract_in_process,
        make_tree,
        wait_until,
    )

    root = tmp_path / "tree"
    make_tree(root, 60)
    reference = tmp_path / "ref"
    extract_in_process(root, reference, clip_full_dir)
    out = tmp_path / "out"
    cli = cli_args(root, out, clip_full_dir, "--workers", "1")
    p = Proc(clipfeat_module_cmd(*cli), tmp_path / "logs", "sighup")
    try:
        assert wait_until(lambda: len(shard_files(out)) >= 1, p), f"finished first\n{p.stderr}"
        os.killpg(p.pid, signal.SIGHUP)
        assert p.wait(timeout=60) == 128 + signal.SIGHUP, p.stderr
        assert "interrupted by SIGHUP" in p.stderr and "Resume by running the same command" \
            in p.stderr, p.stderr
        assert "Traceback" not in p.stderr, p.stderr
        assert not list(out.glob("*.partial")), "a hang-up must remove its partial shard"
        assert len(shard_files(out)) < 15, "the run went on after SIGHUP"
        assert_no_orphans(p.marker, out=out)
        assert_shards_sound(out, "after SIGHUP")
    finally:
        p.cleanup()
    res = _runner().invoke(app, cli)
    assert res.exit_code == 0, res.stderr
    assert "resuming:" in res.stderr
    assert not list(out.glob("*.partial"))
    assert_same_store(out, reference, "after SIGHUP and a rerun")


# --------------------------------------------------------------------------- 2. processor size


@pytest.mark.parametrize("family,changes,needle", [
    ("clip", {"crop_size": {"height": 24, "width": 24}},
     "crop_size gives 24x24 px images but the model takes 30x30 (image_size 30 in"),
    ("siglip", {"size": {"height": 32, "width": 32}},
     "size gives 32x32 px images but the model takes 28x28 (image_size 28 in"),
])
def test_processor_size_differs_from_tower(tmp_path, root, clip_full_dir, siglip_dir, family,
                                           changes, needle):
    from clipfeat import info

    src = clip_full_dir if family == "clip" else siglip_dir
    model = ckpt_copy(src, tmp_path / "model")
    edit_json(model / "preprocessor_config.json", **changes)
    line = run_cli([str(root), "--model", str(model)], tmp_path / "out", needle)
    assert str(model / "preprocessor_config.json") in line
    d = info.describe_model(str(model))
    assert any(needle in w for w in d["warnings"]), d["warnings"]
    res = _runner().invoke(app, ["info", str(model)])
    assert res.exit_code == 0 and needle in res.stdout, res.stdout


# --------------------------------------------------------------------------- 3. absurd sizes


@pytest.mark.parametrize("family,extra", [
    ("clip", {}), ("clip", {"num_channels": 4, "intermediate_size": 40}),
    ("siglip", {}), ("siglip", {"vision_use_head": False}),
])
def test_vision_parameters_match_transformers(tmp_path, family, extra):
    """The config formula counts what transformers builds, without building the real size."""
    import transformers

    from clipfeat.modelref import resolve_model

    cls = "CLIP" if family == "clip" else "Siglip"
    sizes = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, image_size=28, patch_size=7)
    config = getattr(transformers, f"{cls}VisionConfig")(**dict(sizes, **extra))
    model = getattr(transformers, f"{cls}VisionModel")(config)
    config.save_pretrained(tmp_path)
    ref = resolve_model(str(tmp_path))
    assert ref.vision_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key,value,needle", [
    ("num_hidden_layers", 1_000_000, "vision num_hidden_layers is 1,000,000, more than any"),
    ("hidden_size", 10**9, "vision hidden_size is 1,000,000,000"),
    ("image_size", 10**7, "vision image_size is 10,000,000"),
    ("patch_size", 31, "patch_size 31 is larger than image_size 30"),
    ("num_hidden_layers", 4, "parameters (num_hidden_layers 4, hidden_size 32"),
    ("intermediate_size", 65, "holds only 30,080 (the rest would be random)"),
])
def test_config_that_does_not_fit_the_weights(tmp_path, root, clip_full_dir, key, value, needle):
    from clipfeat.modelref import resolve_model

    model = ckpt_copy(clip_full_dir, tmp_path / "model")
    edit_json(model / "config.json", **{f"vision_config.{key}": value})
    line = run_cli([str(root), "--model", str(model)], tmp_path / "out", needle)
    assert str(model / "config.json") in line
    run_info(model, needle)
    with pytest.raises(ModelError, match="config"):
        resolve_model(str(model), need_weights=True)


def test_pickle_weights_too_small_for_the_config(tmp_path, root, clip_vision_dir):
    import torch
    from safetensors.torch import load_file

    model = ckpt_copy(clip_vision_dir, tmp_path / "model", weights=False)
    torch.save(load_file(clip_vision_dir / "model.safetensors"), model / "pytorch_model.bin")
    edit_json(model / "config.json", num_hidden_layers=40)
    run_cli([str(root), "--model", str(model), "--allow-pickle"], tmp_path / "out",
            "but pytorch_model.bin has only")
