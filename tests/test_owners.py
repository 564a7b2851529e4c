"""One owner per fact: the values and readers that once existed twice (and had drifted) now
agree wherever they are used, and `extract()` leaves the calling process as it found it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import clipfeat
from clipfeat.cli import app

runner = CliRunner()


def _images(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_decode_pool_uses_the_config_default_worker_count():
    """DecodePool(workers=None) used cores minus one while extract used one per core."""
    from clipfeat.config import default_workers
    from clipfeat.decode import DecodePool
    from clipfeat.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_processor_config(None, family="clip", image_size=30)
    pool = DecodePool(spec)
    try:
        assert pool.workers == default_workers() == clipfeat.ExtractConfig().num_workers
    finally:
        pool.close()


def test_cli_defaults_are_the_config_defaults():
    """Every default shown by --help is the library's: the CLI hard-coded its own copies."""
    from clipfeat.config import DEFAULT_MAX_PIXELS, ExtractConfig
    from clipfeat.preprocess import DEFAULT_MAX_PIXELS as preprocess_max

    d = ExtractConfig()
    assert DEFAULT_MAX_PIXELS == preprocess_max == d.max_pixels == Image.MAX_IMAGE_PIXELS
    res = runner.invoke(app, ["extract", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for flag, value in (("--model", d.model), ("--layer", d.layer), ("--batch-size", d.batch_size),
                        ("--shard-size", d.shard_size), ("--max-pixels", d.max_pixels)):
        line = next(ln for ln in res.output.splitlines() if flag in ln)
        assert str(value) in line.replace(",", ""), (flag, line)


def test_one_byte_formatter():
    from clipfeat import info, units
    from clipfeat.store import format_store

    assert info.human_bytes is units.human_bytes
    text = format_store({"path": "x", "images": 1, "shards": 1, "bytes": 1181116006})
    assert "1.10 GiB" in text


def test_llava_data_with_a_utf8_bom_reads_in_extract_and_the_dataset(tmp_path, clip_full_dir):
    """sources accepted a UTF-8 BOM, clipfeat.llava's reader refused it."""
    from clipfeat.llava import LlavaFeatureDataset, load_llava_samples

    folder = _images(tmp_path / "imgs", 2)
    data = tmp_path / "train.json"
    samples = [{"id": "a", "image": "0.png", "conversations": []},
               {"id": "b", "conversations": []},
               {"id": "c", "image": "1.png", "conversations": []}]
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps(samples).encode())
    assert load_llava_samples(data) == samples
    out = tmp_path / "out"
    s = clipfeat.extract(llava_json=str(data), image_folder=str(folder), out=str(out),
                         model=str(clip_full_dir), device="cpu", workers=0)
    assert s.complete and s.extracted == 2
    ds = LlavaFeatureDataset(data, out)
    assert len(ds) == 3


def test_info_on_a_run_stopped_before_its_first_shard_is_a_store(tmp_path, clip_full_dir):
    """`clipfeat info OUT` with only the plan in OUT (killed before the first shard) said
    'has no config.json': there were two store detectors."""
    from clipfeat.plan import extend, save
    from clipfeat.store import is_store

    out = tmp_path / "out"
    out.mkdir()
    plan = extend(None, [], shard_size=4, sources={}, identity={})
    save(out, plan)
    assert is_store(out)
    res = runner.invoke(app, ["info", str(out)])
    assert res.exit_code == 0, res.output
    assert "INCOMPLETE" in res.output and "config.json" not in res.output


def test_the_model_is_resolved_once_per_run(tmp_path, clip_full_dir, monkeypatch):
    import clipfeat.modelref
    import clipfeat.tower

    calls = []
    real = clipfeat.modelref.resolve_model

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(clipfeat.modelref, "resolve_model", counting)
    monkeypatch.setattr(clipfeat.tower, "resolve_model", counting)
    s = clipfeat.extract(roots=[str(_images(tmp_path / "imgs"))], out=str(tmp_path / "out"),
                         model=str(clip_full_dir), device="cpu", workers=0)
    assert s.complete and len(calls) == 1


def test_verify_reextracts_at_the_stored_revision(monkeypatch):
    """verify --model ignored the revision the store was made from."""
    import clipfeat.tower
    from clipfeat.verify import compute_features

    seen = []

    class Stop(Exception):
        pass

    def load_tower(model, **kwargs):
        seen.append((model, kwargs.get("revision")))
        raise Stop

    monkeypatch.setattr(clipfeat.tower, "load_tower", load_tower)
    meta = {"model": "org/tower", "model_revision": "0123abc", "layer": -2, "feature": "patch"}
    for model in ("org/tower", "org/other"):
        with pytest.raises(Stop):
            compute_features([], meta, model=model)
    assert seen == [("org/tower", "0123abc"), ("org/other", None)]


def test_extract_leaves_no_process_state_behind(tmp_path, clip_full_dir):
    """Torch's thread count and the signal handlers are the caller's again afterwards."""
    def handler(signum, frame):  # pragma: no cover - never called
        pass

    before_threads = torch.get_num_threads()
    old = signal.signal(signal.SIGTERM, handler)
    try:
        s = clipfeat.extract(roots=[str(_images(tmp_path / "imgs"))], out=str(tmp_path / "out"),
                             model=str(clip_full_dir), device="cpu", workers=1,
                             torch_threads=1)
        assert s.complete
        assert torch.get_num_threads() == before_threads
        assert signal.getsignal(signal.SIGTERM) is handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, old)


def test_revision_of_a_local_folder_is_warned_about_once(tmp_path, clip_full_dir, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        s = clipfeat.extract(roots=[str(_images(tmp_path / "imgs"))], out=str(tmp_path / "out"),
                             model=str(clip_full_dir), revision="v1", device="cpu", workers=0)
    assert s.complete
    assert caplog.text.count("revision 'v1' ignored") == 1, caplog.text
