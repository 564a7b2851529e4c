"""Store: atomic ShardWriter, finalize (manifest/failures/index), FeatureStore reader."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from stores import MULTI_OUTPUTS, MULTI_SHAPES, Shard, build_store, multi_output_store, read_rows

from clipfeat import store as store_mod
from clipfeat.errors import ConfigError, ExtractionError, StoreError
from clipfeat.store import (
    FeatureStore,
    OutputLayout,
    ShardWriter,
    describe_store,
    finalize,
    format_store,
    parse_shard_id,
    remove_partials,
    scan_shards,
    shard_name,
)

TOKENS, HIDDEN = 4, 8


def meta_for(store_dtype: str, **extra) -> dict:
    meta = {
        "model": "openai/clip-vit-large-patch14-336", "model_revision": None,
        "model_type": "clip", "family": "clip", "layer": -2, "layer_index": 23,
        "feature": "patch", "aspect": "pad", "image_size": 28, "patch_size": 14,
        "hidden_size": HIDDEN, "tokens": TOKENS, "compute_dtype": "float16",
        "store_dtype": store_dtype, "preprocessing": {"mean": [0.5, 0.5, 0.5], "size": 28},
        "exif_transpose": False,
    }
    meta.update(extra)
    return meta


def make_store(out: Path, *, store_dtype: str = "float16", rows=(5, 0, 3), seed: int = 0,
               complete: bool = True, keys=None):
    """Write shards with random features (shard 1 is all failures), then finalize.
    Returns (expected {key: array in store dtype}, failure records in order)."""
    rng = np.random.default_rng(seed)
    meta = meta_for(store_dtype)
    expected: dict[str, np.ndarray] = {}
    failures: list[dict] = []
    shards = []
    counter = 0
    for sid, n in enumerate(rows):
        if keys is None:
            ks = [f"dir{sid}/img_{counter + i:03d}.jpg" for i in range(n)]
        else:
            ks = keys[counter:counter + n]
        counter += n
        x = (rng.standard_normal((n, TOKENS, HIDDEN)) * 10).astype(np.float32)
        expected.update(zip(ks, x.astype(store_dtype), strict=False))
        recs = [{"key": f"bad{sid}_{j}.jpg", "path": f"/data/bad{sid}_{j}.jpg",
                 "error": f"cannot identify image file '/data/bad{sid}_{j}.jpg'"}
                for j in range(1 if n else 2)]
        failures.extend(recs)
        shards.append(Shard(ks, x, failures=recs, expected_rows=n + 1))
    # rows appended two at a time, as the pipeline appends batches
    build_store(out, shards, meta=meta, store_dtype=store_dtype, batch=2, complete=complete,
                plan={"num_items": sum(rows) + len(failures), "num_chunks": len(rows)})
    return expected, failures


# ----------------------------------------------------------------------------- names


def test_shard_names_round_trip():
    assert shard_name(3) == "shard-000003.h5"
    assert parse_shard_id("shard-000003.h5") == 3
    assert parse_shard_id("/x/y/shard-1234567.h5") == 1234567
    assert parse_shard_id("shard-000003.h5.partial") is None
    assert parse_shard_id("manifest.json") is None


# ----------------------------------------------------------------------------- read back


@pytest.mark.parametrize("store_dtype", ["float16", "float32"])
def test_every_row_reads_back(tmp_path, store_dtype):
    expected, failures = make_store(tmp_path, store_dtype=store_dtype)
    store = FeatureStore(tmp_path)
    assert len(store) == len(expected) == 8
    assert store.keys() == list(expected)  # store order: shard id, then row
    assert store.index_kind == "array"
    for key, want in expected.items():
        assert key in store
        got = store[key]
        assert isinstance(got, torch.Tensor)
        assert got.dtype == getattr(torch, store_dtype)
        assert got.shape == (TOKENS, HIDDEN)
        np.testing.assert_array_equal(got.numpy(), want)
    # int positions follow store order
    np.testing.assert_array_equal(store[0].numpy(), expected[store.keys()[0]])
    np.testing.assert_array_equal(store[-1].numpy(), expected[store.keys()[-1]])
    assert store.key_at(2) == store.keys()[2]
    order = list(expected)[::-1][:5] + [list(expected)[0]]
    many = store.get_many(order)
    assert many.shape == (len(order), TOKENS, HIDDEN)
    np.testing.assert_array_equal(many.numpy(), np.stack([expected[k] for k in order]))
    assert store.get_many([]).shape == (0, TOKENS, HIDDEN)
    assert store.meta["layer"] == -2 and store.meta["store_dtype"] == store_dtype
    assert [s.num_rows for s in store.shards] == [5, 0, 3]
    store.close()
    np.testing.assert_array_equal(store[order[0]].numpy(), expected[order[0]])  # reopens


def test_unknown_key_and_bad_index(tmp_path):
    make_store(tmp_path)
    store = FeatureStore(tmp_path)
    with pytest.raises(KeyError, match="nope.jpg"):
        store["nope.jpg"]
    with pytest.raises(KeyError, match="nope.jpg"):
        store.get_many(["dir0/img_000.jpg", "nope.jpg"])
    assert "nope.jpg" not in store and 3 not in store
    assert store.get("nope.jpg") is None
    with pytest.raises(IndexError):
        store[8]
    assert store.locate("dir2/img_005.jpg") == (2, 0)


def test_manifest_and_failures_file(tmp_path):
    expected, failures = make_store(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["format"] == "clipfeat" and man["format_version"] == store_mod.FORMAT_VERSION
    assert man["complete"] is True
    assert man["num_images"] == 8 and man["num_failures"] == len(failures) == 4
    assert man["num_shards"] == 3
    assert [s["file"] for s in man["shards"]] == [shard_name(i) for i in range(3)]
    assert [s["num_rows"] for s in man["shards"]] == [5, 0, 3]
    for s in man["shards"]:
        assert s["bytes"] == (tmp_path / s["file"]).stat().st_size
    assert man["config"]["layer"] == -2 and man["plan"]["num_chunks"] == 3
    lines = (tmp_path / "failures.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == failures  # shard order, then chunk order
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_shard_file_layout(tmp_path):
    make_store(tmp_path)
    with h5py.File(tmp_path / "shard-000000.h5", "r") as f:
        ds = f["features"]
        assert ds.shape == (5, TOKENS, HIDDEN) and ds.dtype == np.float16
        assert ds.chunks == (1, TOKENS, HIDDEN) and ds.compression is None
        assert h5py.check_string_dtype(f["keys"].dtype).encoding == "utf-8"
        assert list(f["keys"].asstr()[...]) == [f"dir0/img_{i:03d}.jpg" for i in range(5)]
        recs = [json.loads(s) for s in f["failures"].asstr()[...]]
        assert recs[0]["key"] == "bad0_0.jpg" and "error" in recs[0]
        a = f.attrs
        assert a["shard_id"] == 0 and a["num_rows"] == 5 and a["format_version"] == store_mod.FORMAT_VERSION
        assert a["layer"] == -2 and a["feature"] == "patch" and a["store_dtype"] == "float16"
        assert a["tokens"] == TOKENS and a["hidden_size"] == HIDDEN
        assert json.loads(a["preprocessing"]) == {"mean": [0.5, 0.5, 0.5], "size": 28}
        assert len(a["keys_sha256"]) == 64 and f.userblock_size == 512
    with h5py.File(tmp_path / "shard-000001.h5", "r") as f:  # every image failed
        assert f["features"].shape == (0, TOKENS, HIDDEN)
        assert f["keys"].shape == (0,) and f["failures"].shape == (2,)


def test_torch_and_bfloat16_input(tmp_path):
    x = torch.randn(3, TOKENS, HIDDEN, dtype=torch.bfloat16)
    with ShardWriter(tmp_path, 0, tokens=TOKENS, hidden=HIDDEN, store_dtype="float32",
                     attrs={}) as w:
        w.append(["a", "b", "c"], x)
        w.commit()
    finalize(tmp_path, meta={"store_dtype": "float32"}, plan={},
             shards=scan_shards(tmp_path).values(), complete=True)
    store = FeatureStore(tmp_path)
    np.testing.assert_array_equal(store.get_many(["a", "b", "c"]).numpy(), x.float().numpy())


def test_surrogate_keys_and_failure_paths(tmp_path):
    key = "caf\udce9/\u00e9t\u00e9.jpg"  # undecodable byte in a file name + real UTF-8
    rec = {"key": "x\udcff.png", "path": "/d/x\udcff.png", "error": "cannot identify image file"}
    with ShardWriter(tmp_path, 0, tokens=TOKENS, hidden=HIDDEN, store_dtype="float16",
                     attrs={}) as w:
        w.append([key], np.ones((1, TOKENS, HIDDEN), np.float32))
        w.add_failures([rec])
        info = w.commit()
    finalize(tmp_path, meta={}, plan={}, shards=[info], complete=True)
    store = FeatureStore(tmp_path)
    assert store.keys() == [key] and key in store
    assert float(store[key].sum()) == TOKENS * HIDDEN
    line = (tmp_path / "failures.jsonl").read_text(encoding="utf-8").strip()
    assert json.loads(line) == rec
    assert scan_shards(tmp_path)[0].failures == [rec]


def test_hash_collisions_still_resolve(tmp_path, monkeypatch):
    import clipfeat.store.index

    # the index's key hash is its seam: every key collides
    monkeypatch.setattr(clipfeat.store.index, "key_hash", lambda raw: 7)
    expected, _ = make_store(tmp_path)
    store = FeatureStore(tmp_path)
    assert store.index_kind == "array"
    for key, want in expected.items():
        np.testing.assert_array_equal(store[key].numpy(), want)
    assert "dir0/img_999.jpg" not in store


# ----------------------------------------------------------------------------- index


def test_index_missing_falls_back_to_scan(tmp_path, caplog):
    expected, _ = make_store(tmp_path)
    (tmp_path / ".clipfeat" / "index.json").unlink()
    with caplog.at_level(logging.WARNING, logger="clipfeat.store"):
        store = FeatureStore(tmp_path)
        assert store.index_kind == "scan"
    assert "index" in caplog.text
    assert store.keys() == list(expected)
    for key, want in expected.items():
        np.testing.assert_array_equal(store[key].numpy(), want)


def test_stale_index_falls_back_to_scan(tmp_path, caplog):
    expected, _ = make_store(tmp_path)
    header_path = tmp_path / ".clipfeat" / "index.json"
    header = json.loads(header_path.read_text())
    header["shards"] = header["shards"][:-1]  # made before the last shard existed
    header_path.write_text(json.dumps(header))
    with caplog.at_level(logging.WARNING, logger="clipfeat.store"):
        store = FeatureStore(tmp_path)
        assert store.index_kind == "scan"
    assert "stale" in caplog.text
    assert sorted(store.keys()) == sorted(expected)


def test_incomplete_store_is_readable(tmp_path, caplog):
    expected, _ = make_store(tmp_path, complete=False)
    assert not (tmp_path / ".clipfeat" / "index.json").exists()
    with caplog.at_level(logging.WARNING, logger="clipfeat.store"):
        store = FeatureStore(tmp_path)
        assert len(store) == 8
    assert "incomplete" in caplog.text
    assert not store.complete
    k = list(expected)[3]
    np.testing.assert_array_equal(store[k].numpy(), expected[k])


def test_refinalize_replaces_index(tmp_path):
    expected, _ = make_store(tmp_path)
    infos = list(scan_shards(tmp_path).values())
    with ShardWriter(tmp_path, 3, tokens=TOKENS, hidden=HIDDEN, store_dtype="float16",
                     attrs={}) as w:
        w.append(["late.jpg"], np.full((1, TOKENS, HIDDEN), 2.0, np.float32))
        infos.append(w.commit())
    finalize(tmp_path, meta=meta_for("float16"), plan={}, shards=infos, complete=True)
    dirs = [p for p in os.listdir(tmp_path / ".clipfeat") if p.startswith("index-")]
    assert len(dirs) == 1  # the old index folder is gone
    store = FeatureStore(tmp_path)
    assert store.index_kind == "array" and len(store) == 9
    assert float(store["late.jpg"].float().mean()) == 2.0


def test_open_through_index_reads_no_shard_metadata(tmp_path, monkeypatch):
    expected, _ = make_store(tmp_path)

    import h5py

    def no_scan(path, *args, **kwargs):
        raise AssertionError(f"opened {path} with h5py")

    monkeypatch.setattr(h5py, "File", no_scan)
    store = FeatureStore(tmp_path)
    for key, want in expected.items():
        np.testing.assert_array_equal(store[key].numpy(), want)


def test_finalize_failure_keeps_the_previous_manifest(tmp_path, monkeypatch):
    make_store(tmp_path)
    before = (tmp_path / "manifest.json").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ExtractionError, match=r"disk full \(ENOSPC\).*failures.jsonl"):
        finalize(tmp_path, meta={}, plan={}, shards=[], complete=False)
    monkeypatch.undo()
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_missing_listed_shard_refused(tmp_path):
    make_store(tmp_path)
    (tmp_path / "shard-000002.h5").unlink()
    with pytest.raises(StoreError, match="shard-000002.h5"):
        FeatureStore(tmp_path)
    with pytest.raises(StoreError, match="not a folder"):
        FeatureStore(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="manifest"):
        FeatureStore(tmp_path / "empty")


# ----------------------------------------------------------------------------- processes


def test_pickle_round_trip(tmp_path):
    expected, _ = make_store(tmp_path)
    store = FeatureStore(tmp_path)
    k = list(expected)[1]
    store[k]  # opens a file handle, which must not be pickled
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone[k].numpy(), expected[k])
    assert clone.keys() == store.keys()


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(tmp_path, context):
    expected, _ = make_store(tmp_path, rows=(7, 0, 6, 5))
    store = FeatureStore(tmp_path)
    keys = list(expected)
    store[keys[0]]  # the parent holds open HDF5 handles before workers start
    order = keys[::-1] + keys[:3]
    loader = torch.utils.data.DataLoader(
        store, sampler=order, batch_size=4, num_workers=2,
        multiprocessing_context=context, persistent_workers=False,
    )
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, np.stack([expected[k] for k in order]))
    # int positions work as a plain map-style dataset too
    loader = torch.utils.data.DataLoader(store, batch_size=5, num_workers=2,
                                         multiprocessing_context=context)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, np.stack([expected[k] for k in keys]))


def test_file_handle_cache_is_bounded(tmp_path):
    expected, _ = make_store(tmp_path, rows=(2, 2, 2, 2))
    store = FeatureStore(tmp_path, max_open_files=2)
    for key, want in list(expected.items()) * 2:
        np.testing.assert_array_equal(store[key].numpy(), want)
        assert store.open_files <= 2
    store.close()
    assert store.open_files == 0


def test_plain_h5py_use_alongside_the_store(tmp_path):
    """Users open shards with plain h5py (default locking) while a store is in use."""
    expected, _ = make_store(tmp_path)
    store = FeatureStore(tmp_path)
    key = next(iter(expected))
    first = store[key]
    with h5py.File(tmp_path / "shard-000000.h5", "r") as f:  # after the store read it
        np.testing.assert_array_equal(f["features"][0], first.numpy())
        np.testing.assert_array_equal(store[key].numpy(), f["features"][0])  # both open


def test_replaced_shard_is_refused(tmp_path):
    make_store(tmp_path)
    other = tmp_path / "other"
    make_store(other, seed=7)  # same layout and keys, other values
    store = FeatureStore(tmp_path)
    os.replace(other / "shard-000002.h5", tmp_path / "shard-000002.h5")
    store["dir0/img_000.jpg"]  # untouched shard still reads
    with pytest.raises(StoreError, match="shard-000002.h5.*changed"):
        store["dir2/img_005.jpg"]


def test_shard_with_other_hdf5_layout_is_read_through_h5py(tmp_path):
    """A shard rewritten by other HDF5 tools (compressed, several rows per chunk) still
    reads correctly: rows that are not one raw chunk go through h5py."""
    expected, _ = make_store(tmp_path)
    path = tmp_path / "shard-000000.h5"
    with h5py.File(path, "r") as f:
        feats, keys = f["features"][...], f["keys"][...]
        fails, attrs = f["failures"][...], dict(f.attrs)
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, chunks=(2, TOKENS, HIDDEN), compression="gzip")
        f.create_dataset("keys", data=keys, dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("failures", data=fails, dtype=h5py.string_dtype("utf-8"))
        f.attrs.update(attrs)
    finalize(tmp_path, meta=meta_for("float16"), plan={},
             shards=scan_shards(tmp_path).values(), complete=True)
    for index_present in (True, False):
        if not index_present:
            (tmp_path / ".clipfeat" / "index.json").unlink()
        store = FeatureStore(tmp_path)
        for key, want in expected.items():
            np.testing.assert_array_equal(store[key].numpy(), want)


# ----------------------------------------------------------------------------- writer


def _writer(out, shard_id=0, **kw):
    args = dict(tokens=TOKENS, hidden=HIDDEN, store_dtype="float16", attrs={"layer": -2})
    args.update(kw)
    return ShardWriter(out, shard_id, **args)


def test_commit_is_the_completion_mark(tmp_path):
    w = _writer(tmp_path, 4)
    w.append(["a"], np.zeros((1, TOKENS, HIDDEN), np.float32))
    assert sorted(os.listdir(tmp_path)) == ["shard-000004.h5.partial"]
    info = w.commit()
    assert sorted(os.listdir(tmp_path)) == ["shard-000004.h5"]
    assert (info.shard_id, info.file, info.num_rows, info.num_failures) == (4, "shard-000004.h5",
                                                                          1, 0)
    assert info.bytes == (tmp_path / "shard-000004.h5").stat().st_size
    with pytest.raises(StoreError, match="committed"):
        w.append(["b"], np.zeros((1, TOKENS, HIDDEN), np.float32))


def test_abort_and_exceptions_leave_nothing(tmp_path):
    w = _writer(tmp_path, 0)
    w.append(["a"], np.zeros((1, TOKENS, HIDDEN), np.float32))
    w.abort()
    w.abort()  # idempotent, never raises
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"):
        with _writer(tmp_path, 1) as w:
            w.append(["a"], np.zeros((1, TOKENS, HIDDEN), np.float32))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with _writer(tmp_path, 2) as w:  # leaving without commit() discards the shard
        w.append(["a"], np.zeros((1, TOKENS, HIDDEN), np.float32))
    assert os.listdir(tmp_path) == []


def test_float16_overflow_names_key_and_fix(tmp_path):
    x = np.zeros((2, TOKENS, HIDDEN), np.float32)
    x[1, 2, 3] = 70000.0
    with pytest.raises(ExtractionError, match="--store-dtype float32") as exc:
        with _writer(tmp_path) as w:
            w.append(["ok.jpg", "big.jpg"], x)
    assert "big.jpg" in str(exc.value) and "ok.jpg" not in str(exc.value)
    assert os.listdir(tmp_path) == []
    x[1, 2, 3] = -65504.0  # the largest finite float16 is fine
    with _writer(tmp_path, store_dtype="float16") as w:
        w.append(["ok.jpg", "edge.jpg"], x)
        w.commit()
    with _writer(tmp_path, 1, store_dtype="float32") as w:  # float32 keeps big values
        x[1, 2, 3] = 70000.0
        w.append(["big.jpg"], x[1:])
        w.commit()
    with h5py.File(tmp_path / "shard-000001.h5", "r") as f:
        assert f["features"][0, 2, 3] == 70000.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("store_dtype", ["float16", "float32"])
def test_non_finite_refused(tmp_path, bad, store_dtype):
    x = np.ones((3, TOKENS, HIDDEN), np.float32)
    x[2, 0, 0] = bad
    with pytest.raises(ExtractionError, match="non-finite") as exc:
        with _writer(tmp_path, store_dtype=store_dtype) as w:
            w.append(["a", "b", "c.jpg"], x)
    assert "'c.jpg'" in str(exc.value) and "--store-dtype float32" in str(exc.value)
    assert os.listdir(tmp_path) == []


def test_float16_input_with_nan_refused(tmp_path):
    x = np.ones((2, TOKENS, HIDDEN), np.float16)
    x[0, 1, 1] = np.nan
    with pytest.raises(ExtractionError, match="'first'"):
        with _writer(tmp_path) as w:
            w.append(["first", "second"], x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(store_dtype="bfloat16"), "store_dtype"),
        (dict(tokens=0), "tokens"),
        (dict(hidden=-1), "hidden"),
        (dict(expected_rows=-3), "expected_rows"),
        (dict(attrs={"shard_id": 3}), "shard_id"),
        (dict(attrs={"tokens": 99}), "tokens"),
        (dict(attrs={"bad": object()}), "bad|object"),
    ],
)
def test_writer_validates_arguments(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _writer(tmp_path, **kwargs)
    assert os.listdir(tmp_path) == []


def test_append_validates_shapes_and_keys(tmp_path):
    with _writer(tmp_path) as w:
        with pytest.raises(ConfigError, match="shape"):
            w.append(["a"], np.zeros((1, TOKENS + 1, HIDDEN), np.float32))
        with pytest.raises(ConfigError, match="2 keys for 1"):
            w.append(["a", "b"], np.zeros((1, TOKENS, HIDDEN), np.float32))
        w.append(["a"], np.zeros((1, TOKENS, HIDDEN), np.float32))
        with pytest.raises(ConfigError, match="twice"):
            w.append(["a"], np.zeros((1, TOKENS, HIDDEN), np.float32))
        with pytest.raises(ConfigError, match="'error'"):
            w.add_failures([{"key": "x", "path": "y"}])
        info = w.commit()
    assert info.num_rows == 1


def test_disk_full_during_write(tmp_path, monkeypatch):
    w = _writer(tmp_path, 3)
    w.append(["a"], np.zeros((1, TOKENS, HIDDEN), np.float32))
    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(ExtractionError) as exc:
        w.append(["b"], np.ones((1, TOKENS, HIDDEN), np.float32))
        w.commit()  # HDF5 may buffer the rows; the failure then shows at commit
    monkeypatch.setattr(os, "pwrite", real)
    msg = str(exc.value)
    assert "disk full (ENOSPC)" in msg and "shard-000003.h5.partial" in msg and "rerun" in msg
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code, cause", [
    (errno.EROFS, "read-only file system (EROFS)"),
    (errno.EIO, "I/O error (EIO)"),
    (errno.EACCES, "permission denied (EACCES)"),
    (errno.EDQUOT, "disk quota exceeded (EDQUOT)"),
])
def test_write_errors_name_their_cause(tmp_path, monkeypatch, code, cause):
    def fail(fd, data, offset):
        raise OSError(code, os.strerror(code))

    with pytest.raises(ExtractionError) as exc:
        with _writer(tmp_path, 1) as w:
            monkeypatch.setattr(os, "pwrite", fail)
            w.append(["a"], np.zeros((1, TOKENS, HIDDEN), np.float32))
            w.commit()
    assert str(exc.value).startswith(cause + " while writing ")
    assert "\n" not in str(exc.value)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_disk_full_during_fsync(tmp_path, monkeypatch):
    w = _writer(tmp_path, 5)
    w.append(["a"], np.zeros((1, TOKENS, HIDDEN), np.float32))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ExtractionError, match=r"disk full \(ENOSPC\)"):
        w.commit()
    assert os.listdir(tmp_path) == []


def test_read_only_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ExtractionError, match="permission denied"):
            _writer(ro, 0)
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE behaviour is Linux's")
def test_real_write_failure_exits_cleanly(tmp_path):
    """A real failed write inside HDF5 (file size limit) must give ExtractionError, leave
    no file, and let the process exit normally (HDF5 must not retry at exit and crash)."""
    script = textwrap.dedent(f"""
        import resource, signal, os, numpy as np
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
        from clipfeat.store import ShardWriter
        from clipfeat.errors import ExtractionError
        try:
            with ShardWriter({str(tmp_path)!r}, 0, tokens=64, hidden=128,
                             store_dtype="float32", attrs={{}}) as w:
                for i in range(8):
                    w.append([f"k{{i}}"], np.ones((1, 64, 128), np.float32))
                w.commit()
        except ExtractionError as e:
            print("ERR", e)
        print("LEFT", os.listdir({str(tmp_path)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ERR file too large (EFBIG)" in proc.stdout
    assert "LEFT []" in proc.stdout


# ----------------------------------------------------------------------------- scanning


def test_scan_shards_and_remove_partials(tmp_path):
    expected, failures = make_store(tmp_path)
    (tmp_path / "shard-000007.h5.partial").write_bytes(b"half written")
    assert remove_partials(tmp_path) == 1
    assert not (tmp_path / "shard-000007.h5.partial").exists()
    found = scan_shards(tmp_path)
    assert sorted(found) == [0, 1, 2]
    assert [found[i].num_rows for i in range(3)] == [5, 0, 3]
    assert [r for i in range(3) for r in found[i].failures] == failures
    (tmp_path / "shard-000009.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="shard-000009.h5"):
        scan_shards(tmp_path)


def test_finalize_reads_failures_of_shards_from_disk(tmp_path):
    _, failures = make_store(tmp_path)
    light = [store_mod.ShardInfo.from_manifest(e) for e in
             json.loads((tmp_path / "manifest.json").read_text())["shards"]]
    assert all(not s.failures for s in light)
    finalize(tmp_path, meta={}, plan={}, shards=light, complete=False)
    lines = (tmp_path / "failures.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == failures


# ----------------------------------------------------------------------------- describe


def test_describe_store(tmp_path):
    make_store(tmp_path, complete=False)
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["plan"]["num_chunks"] = 5  # two chunks still to do
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    d = describe_store(tmp_path)
    assert d["images"] == 8 and d["shards"] == 3 and d["failures"] == 4
    assert d["complete"] is False
    assert d["pending_shards"] == 2 and d["pending_shard_ids"] == [3, 4]
    assert d["failure_reasons"] == {"cannot identify image file …": 4}
    assert d["config"]["layer"] == -2 and d["config"]["tokens"] == TOKENS
    assert d["bytes"] >= sum(s["bytes"] for s in man["shards"])
    text = format_store(d)
    assert "INCOMPLETE" in text and "pending" in text and "cannot identify image file" in text
    assert f"{TOKENS} x {HIDDEN} float16" in text
    json.dumps(d)  # JSON-able for --json
    with pytest.raises(StoreError, match="not a clipfeat store"):
        describe_store(tmp_path / "empty")


def test_imports_stay_light():
    code = ("import sys, clipfeat.store, clipfeat.verify, clipfeat.llava; "
            "heavy = [m for m in ('torch', 'h5py', 'transformers') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- formats

V1_STORE = Path(__file__).parent / "data" / "store-v1"


def test_format_1_store_of_earlier_clipfeat_reads_and_verifies(tmp_path):
    """A store written by clipfeat's format 1 (rows written through h5py, 8 MiB checksum
    blocks; made by the code of commit 02e3088) stays readable and verifiable."""
    from clipfeat.store import check_shard_bytes
    from clipfeat.verify import verify_store

    out = tmp_path / "old"
    shutil.copytree(V1_STORE, out)
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 1
    expected = np.load(V1_STORE.parent / "store-v1-expected.npz")
    store = FeatureStore(out)
    assert store.index_kind == "array" and len(store) == len(expected.files) == 5
    for name in expected.files:
        np.testing.assert_array_equal(store[name.replace("|", "/")].numpy(), expected[name])
    for path in sorted(out.glob("shard-*.h5")):
        assert b"checksum sha256-8MiB-tree " in path.read_bytes()[:512]
        assert check_shard_bytes(path) is None
    assert verify_store(out).ok
    path = out / "shard-000001.h5"
    data = bytearray(path.read_bytes())
    data[-600] ^= 1
    path.write_bytes(bytes(data))
    assert check_shard_bytes(path) is not None and not verify_store(out).ok


def test_features_are_early_allocated_unfilled_one_row_chunks(tmp_path):
    """Format 2: HDF5 allocates every row's chunk as the dataset grows and never fills it;
    the writer puts the rows there itself. Still one uncompressed chunk per row."""
    make_store(tmp_path)
    for path in sorted(tmp_path.glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            ds = f["features"]
            plist = ds.id.get_create_plist()
            assert ds.chunks == (1, TOKENS, HIDDEN) and ds.compression is None
            assert plist.get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY
            assert plist.get_fill_time() == h5py.h5d.FILL_TIME_NEVER
            assert f.attrs["format_version"] == store_mod.FORMAT_VERSION == 2
            assert ds.id.get_num_chunks() == ds.shape[0]


def test_real_disk_full_on_a_tmpfs(tmp_path):
    """A real ENOSPC while rows are written with os.pwrite: one line, the partial file gone,
    and a process that exits cleanly (HDF5 holds no dirty metadata to retry at exit)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        code = textwrap.dedent(f"""
            import os, numpy as np
            from clipfeat.store import ShardWriter
            from clipfeat.errors import ExtractionError
            try:
                with ShardWriter({str(mnt)!r}, 0, tokens=256, hidden=512,
                                 store_dtype="float32", attrs={{"m": 1}}) as w:
                    for i in range(40):  # 512 KiB rows: the 8 MiB disk fills up
                        w.append([f"k{{i}}"], np.ones((1, 256, 512), np.float32))
                    w.commit()
            except ExtractionError as err:
                print("ERR", err)
            print("LEFT", sorted(os.listdir({str(mnt)!r})))
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "HDF5" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("ERR disk full (ENOSPC) while writing ")
        assert lines[0].endswith("shard-000000.h5.partial: free space and rerun the same "
                                 "command to resume")
        assert lines[1] == "LEFT []"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_key_that_failed_extraction_points_to_failures_jsonl(tmp_path):
    """A KeyError for a key whose extraction failed says so, with the recorded reason."""
    meta = {"model": "m", "tokens": 6, "hidden_size": 16, "store_dtype": "float16"}
    build_store(tmp_path, [Shard(["a.jpg"], np.zeros((1, 6, 16), np.float32), failures=[
        {"key": "bad.jpg", "path": "/img/bad.jpg", "error": "cannot identify image file"}])],
        meta=meta)
    store = FeatureStore(tmp_path)
    with pytest.raises(KeyError) as err:
        store["bad.jpg"]
    msg = str(err.value)
    assert "its extraction failed (cannot identify image file)" in msg
    assert str(tmp_path / "failures.jsonl") in msg
    with pytest.raises(KeyError, match="is not in the store") as err:
        store["never-listed.jpg"]
    assert "failures.jsonl" not in str(err.value)
    assert store.failure("bad.jpg") == "cannot identify image file"
    assert store.get("bad.jpg") is None
    assert pickle.loads(pickle.dumps(store))._failures is None


# ----------------------------------------------------------------------------- several outputs

MULTI_NAMES = [o.name for o in MULTI_OUTPUTS]


def test_one_output_layout_writes_exactly_the_tokens_hidden_file(tmp_path):
    """ShardWriter(outputs=[one OutputLayout]) writes the very bytes of tokens=/hidden=:
    dataset ``features``, the run's then the output's attributes at the root."""
    run = {"aspect": "pad", "store_dtype": "float16", "compute_dtype": "float16"}
    own = {k: v for k, v in meta_for("float16").items() if k not in run}
    x = (np.random.default_rng(4).standard_normal((7, TOKENS, HIDDEN)) * 5).astype(np.float32)
    files = []
    for way, kw in (("plain", dict(tokens=TOKENS, hidden=HIDDEN, attrs={**run, **own})),
                    ("layout", dict(outputs=[OutputLayout("clip/-2", TOKENS, HIDDEN, own)],
                                    attrs=run))):
        with ShardWriter(tmp_path / way, 0, store_dtype="float16", expected_rows=7, **kw) as w:
            w.append([f"k{i}" for i in range(3)], x[:3])
            w.append([f"k{i}" for i in range(3, 7)], x[3:])
            w.add_failures([{"key": "bad", "path": "/bad", "error": "broken"}])
            w.commit()
        files.append((tmp_path / way / "shard-000000.h5").read_bytes())
    assert files[0] == files[1]
    with h5py.File(tmp_path / "layout" / "shard-000000.h5", "r") as f:
        assert list(f) == ["failures", "features", "keys"] and "outputs" not in f.attrs
        assert f.attrs["format_version"] == 2 and f.attrs["layer"] == -2


@pytest.mark.parametrize("store_dtype", ["float16", "float32"])
def test_several_outputs_read_back_bit_exact(tmp_path, store_dtype):
    want = multi_output_store(tmp_path, rows=(3, 0, 4), store_dtype=store_dtype)
    for o, (t, h) in zip(MULTI_OUTPUTS, MULTI_SHAPES, strict=True):  # plain h5py, per output
        rows = read_rows(tmp_path, dataset=f"features/{o.name}")
        assert list(rows) == list(want[o.name])
        for key, row in rows.items():
            assert row.shape == (t, h) and row.dtype == np.dtype(store_dtype)
            np.testing.assert_array_equal(row, want[o.name][key])
    store = FeatureStore(tmp_path)
    keys = list(want[MULTI_NAMES[0]])
    assert store.outputs == MULTI_NAMES and store.output is None and len(store) == 7
    assert store.shapes == dict(zip(MULTI_NAMES, MULTI_SHAPES, strict=True))
    assert store.dtype == np.dtype(store_dtype) and store.keys() == keys
    for key in keys:
        got = store[key]
        assert isinstance(got, dict) and list(got) == MULTI_NAMES
        for name in MULTI_NAMES:
            assert got[name].dtype == getattr(torch, store_dtype)
            np.testing.assert_array_equal(got[name].numpy(), want[name][key])
    first = store[0]
    np.testing.assert_array_equal(first[MULTI_NAMES[1]].numpy(), want[MULTI_NAMES[1]][keys[0]])
    order = keys[::-2] + keys[:1]
    many = store.get_many(order)
    assert list(many) == MULTI_NAMES
    for name in MULTI_NAMES:
        np.testing.assert_array_equal(many[name].numpy(),
                                      np.stack([want[name][k] for k in order]))
    empty = store.get_many([])
    assert [tuple(empty[n].shape) for n in MULTI_NAMES] == [(0, 4, 8), (0, 9, 6)]
    for name, shape in zip(MULTI_NAMES, MULTI_SHAPES, strict=True):
        for one in (FeatureStore(tmp_path, output=name), store.select(name)):
            assert one.output == name and one.shape == shape and one.outputs == MULTI_NAMES
            got = one[keys[2]]
            assert isinstance(got, torch.Tensor)
            np.testing.assert_array_equal(got.numpy(), want[name][keys[2]])
            np.testing.assert_array_equal(one.get_many(order).numpy(),
                                          np.stack([want[name][k] for k in order]))
            assert one.meta["layer"] == store.output_meta(name)["layer"]
            assert one.meta["aspect"] == "pad" and one.meta["output"] == name


def test_several_outputs_shape_and_meta(tmp_path):
    multi_output_store(tmp_path)
    store = FeatureStore(tmp_path)
    with pytest.raises(StoreError, match="output=NAME") as err:
        _ = store.shape
    assert all(name in str(err.value) for name in MULTI_NAMES)
    assert store.meta == json.loads((tmp_path / "manifest.json").read_text())["config"]
    meta = store.output_meta("tiny-siglip/mean(0:2)")
    assert meta["layer"] == "mean(0:2)" and meta["layer_indices"] == [0, 1]
    assert meta["model"] == "/ckpt/tiny-siglip" and meta["tokens"] == 9
    assert meta["hidden_size"] == 6 and meta["aspect"] == "pad"
    assert meta["preprocessing"] == {"size": 30, "mean": [0.5, 0.5, 0.5]}
    for bad in (lambda: store.output_meta("tiny-clip/-1"),
                lambda: FeatureStore(tmp_path, output="tiny-clip/-1"),
                lambda: store.select("nope")):
        with pytest.raises(ConfigError, match="tiny-clip/-1|nope") as err:
            bad()
        assert "'tiny-clip/-2', 'tiny-siglip/mean(0:2)'" in str(err.value)
    assert "outputs=2" in repr(store) and "output='tiny-clip/-2'" in repr(
        store.select("tiny-clip/-2"))


def test_several_outputs_shard_layout(tmp_path):
    multi_output_store(tmp_path, rows=(3, 2))
    with h5py.File(tmp_path / "shard-000000.h5", "r") as f:
        assert sorted(f) == ["failures", "features", "keys"]
        assert json.loads(f.attrs["outputs"]) == MULTI_NAMES
        assert f.attrs["format_version"] == store_mod.MULTI_FORMAT_VERSION == 3
        assert f.attrs["store_dtype"] == "float16" and f.attrs["aspect"] == "pad"
        assert not set(f.attrs) & set(store_mod.OUTPUT_ATTRS)
        for o, (t, h) in zip(MULTI_OUTPUTS, MULTI_SHAPES, strict=True):
            ds = f[f"features/{o.name}"]
            plist = ds.id.get_create_plist()
            assert ds.shape == (3, t, h) and ds.chunks == (1, t, h) and ds.compression is None
            assert plist.get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY
            assert plist.get_fill_time() == h5py.h5d.FILL_TIME_NEVER
            assert ds.id.get_num_chunks() == 3
            a = ds.attrs
            assert a["output"] == o.name and a["tokens"] == t and a["hidden_size"] == h
            assert a["layer"] == o.attrs["layer"] and a["model"] == o.attrs["model"]
            assert json.loads(a["layer_indices"]) == o.attrs["layer_indices"]
            assert json.loads(a["preprocessing"]) == o.attrs["preprocessing"]
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["format_version"] == 3
    assert [(e["name"], e["dataset"], e["tokens"], e["hidden_size"]) for e in man["outputs"]] == [
        (o.name, f"features/{o.name}", t, h)
        for o, (t, h) in zip(MULTI_OUTPUTS, MULTI_SHAPES, strict=True)]
    assert man["outputs"][1]["layer"] == "mean(0:2)" and man["outputs"][0]["feature"] == "patch"
    header = json.loads((tmp_path / ".clipfeat" / "index.json").read_text())
    assert header["datasets"] == [f"features/{n}" for n in MULTI_NAMES]
    assert [s.num_rows for s in scan_shards(tmp_path).values()] == [3, 2]


def test_several_outputs_resist_a_lost_index(tmp_path, caplog):
    want = multi_output_store(tmp_path)
    (tmp_path / ".clipfeat" / "index.json").unlink()
    with caplog.at_level(logging.WARNING, logger="clipfeat.store"):
        store = FeatureStore(tmp_path)
    assert store.index_kind == "scan"
    for name, rows in want.items():
        for key, row in rows.items():
            np.testing.assert_array_equal(store[key][name].numpy(), row)
    clone = pickle.loads(pickle.dumps(store.select(MULTI_NAMES[1])))
    key = next(iter(want[MULTI_NAMES[1]]))
    np.testing.assert_array_equal(clone[key].numpy(), want[MULTI_NAMES[1]][key])


def test_manifest_without_outputs_derives_its_one_output(tmp_path):
    """Manifests written before outputs were listed: the one output is named from config."""
    expected, _ = make_store(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["outputs"] == [{"name": "clip-vit-large-patch14-336/-2", "dataset": "features",
                               "tokens": TOKENS, "hidden_size": HIDDEN,
                               "model": "openai/clip-vit-large-patch14-336", "layer": -2,
                               "feature": "patch"}]
    del man["outputs"]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    store = FeatureStore(tmp_path)
    assert store.outputs == ["clip-vit-large-patch14-336/-2"]
    assert store.output == "clip-vit-large-patch14-336/-2" and store.shape == (TOKENS, HIDDEN)
    assert store.meta == man["config"] == store.output_meta(store.output)
    key = next(iter(expected))
    np.testing.assert_array_equal(FeatureStore(tmp_path, output=store.output)[key].numpy(),
                                  expected[key])
    assert describe_store(tmp_path)["outputs"][0]["name"] == "clip-vit-large-patch14-336/-2"


def test_format_1_store_has_one_derived_output():
    store = FeatureStore(V1_STORE)
    assert len(store.outputs) == 1 and store.output == store.outputs[0]
    assert store.meta == store.output_meta(store.output)
    assert isinstance(store[0], torch.Tensor)


def _two_layouts(**attrs_b):
    return [OutputLayout("t/-2", TOKENS, HIDDEN, {"layer": -2}),
            OutputLayout("t/-9", 2, 3, dict({"layer": -9}, **attrs_b))]


@pytest.mark.parametrize("kwargs, match", [
    (dict(outputs=[OutputLayout("a", 1, 2), OutputLayout("a", 1, 2)]), "given twice"),
    (dict(outputs=[OutputLayout("a", 1, 2), OutputLayout("a/b", 1, 2)]), "HDF5 group"),
    (dict(outputs=[OutputLayout("a//b", 1, 2), OutputLayout("c", 1, 2)]), "empty"),
    (dict(outputs=[OutputLayout("", TOKENS, HIDDEN)]), "non-empty str"),
    (dict(outputs=[OutputLayout("a", 0, 2), OutputLayout("c", 1, 2)]), "tokens=0"),
    (dict(outputs=[]), "non-empty"),
    (dict(outputs=[("a", 1, 2)]), "not an OutputLayout"),
    (dict(outputs=_two_layouts(), tokens=4), "not both"),
    (dict(outputs=_two_layouts(), attrs={"layer": -2}), "run's"),
    (dict(outputs=_two_layouts(), attrs={"outputs": "[]"}), "outputs"),
    (dict(outputs=_two_layouts(tokens=5)), "disagrees"),
    (dict(outputs=_two_layouts(output="t/-8")), "disagrees"),
    (dict(outputs=_two_layouts(num_rows=3)), "num_rows"),
    (dict(outputs=[OutputLayout("t/-2", TOKENS, HIDDEN, {"layer": -1})],
          attrs={"layer": -2}), "disagrees"),
])
def test_writer_validates_outputs(tmp_path, kwargs, match):
    args = dict(store_dtype="float16", attrs={})
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        ShardWriter(tmp_path, 0, **args)
    assert os.listdir(tmp_path) == []


def test_several_outputs_append_checks_every_output_before_writing(tmp_path):
    a, b = np.zeros((2, TOKENS, HIDDEN), np.float32), np.zeros((2, 2, 3), np.float32)
    with ShardWriter(tmp_path, 0, outputs=_two_layouts(), store_dtype="float16",
                     attrs={}) as w:
        with pytest.raises(ConfigError, match="sequence of 2 arrays"):
            w.append(["x", "y"], a)
        with pytest.raises(ConfigError, match="1 feature arrays for 2 outputs"):
            w.append(["x", "y"], [a])
        with pytest.raises(ConfigError, match="features of output 't/-9' have shape"):
            w.append(["x", "y"], [a, np.zeros((2, 3, 3), np.float32)])
        with pytest.raises(ConfigError, match="2 keys for 1 feature rows of output 't/-9'"):
            w.append(["x", "y"], [a, b[:1]])
        bad = b.copy()
        bad[1, 0, 0] = np.inf
        with pytest.raises(ExtractionError, match=r"'y' \(output 't/-9'\)"):
            w.append(["x", "y"], [a, bad])
    assert os.listdir(tmp_path) == []  # the writer failed: nothing left
    with ShardWriter(tmp_path, 0, outputs=_two_layouts(), store_dtype="float16",
                     attrs={}) as w:
        with pytest.raises(ConfigError):
            w.append(["x", "y"], [a, b[:1]])
        assert w.num_rows == 0
        w.append(["x", "y"], (torch.ones(2, TOKENS, HIDDEN, dtype=torch.bfloat16), b + 1))
        w.append(["z"], [a[:1].astype(np.float16), b[:1].astype(np.float16)], checked=True)
        info = w.commit()
    assert info.num_rows == 3
    with h5py.File(tmp_path / "shard-000000.h5", "r") as f:
        assert f["features/t/-2"][0].sum() == TOKENS * HIDDEN and f["features/t/-9"][2].sum() == 0
        assert f["features/t/-9"][1].sum() == 6


def test_several_outputs_disk_full(tmp_path, monkeypatch):
    w = ShardWriter(tmp_path, 2, outputs=_two_layouts(), store_dtype="float16", attrs={})
    w.append(["a"], [np.zeros((1, TOKENS, HIDDEN)), np.zeros((1, 2, 3))])
    calls = []

    def full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:  # the first output's rows go, the second's fail
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(memoryview(data).cast("B"))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(ExtractionError, match=r"disk full \(ENOSPC\).*shard-000002"):
        w.append(["b"], [np.ones((1, TOKENS, HIDDEN)), np.ones((1, 2, 3))])
        w.commit()
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_several_outputs_checksum_covers_the_whole_file(tmp_path):
    """Rows of two outputs interleave in the file; each block hashed while written or at
    commit, the checksum is the file's (an independent hash of its bytes)."""
    import hashlib

    import xxhash

    from clipfeat.store import check_shard_bytes, shard_checksum

    rng = np.random.default_rng(2)
    layouts = [OutputLayout("big/-2", 128, 256, {"layer": -2}),
               OutputLayout("big/-9", 64, 96, {"layer": -9})]
    with ShardWriter(tmp_path, 0, outputs=layouts, store_dtype="float32", attrs={}) as w:
        for start in range(0, 120, 25):
            n = min(25, 120 - start)
            w.append([f"k{start + i}" for i in range(n)],
                     [rng.standard_normal((n, 128, 256)), rng.standard_normal((n, 64, 96))])
        info = w.commit()
    path = tmp_path / "shard-000000.h5"
    data = path.read_bytes()
    assert len(data) > 16 * 1024 * 1024
    body, block = data[512:], 8 * 1024 * 1024
    digests = b"".join(xxhash.xxh3_128(body[i:i + block]).digest()
                       for i in range(0, len(body), block))
    assert info.checksum == hashlib.sha256(digests).hexdigest() == shard_checksum(path)[0]
    assert check_shard_bytes(path) is None


@pytest.mark.slow
@pytest.mark.parametrize("output", [None, "tiny-siglip/mean(0:2)"])
def test_dataloader_spawn_workers_over_several_outputs(tmp_path, output):
    want = multi_output_store(tmp_path, rows=(4, 0, 5))
    store = FeatureStore(tmp_path, output=output)
    keys = store.keys()
    store[keys[0]]  # the parent holds open files before workers start
    order = keys[::-1]
    loader = torch.utils.data.DataLoader(store, sampler=order, batch_size=4, num_workers=2,
                                         multiprocessing_context="spawn")
    batches = list(loader)
    if output is None:  # default collate: a dict of (batch, tokens, hidden) per output
        for name in MULTI_NAMES:
            got = torch.cat([b[name] for b in batches]).numpy()
            np.testing.assert_array_equal(got, np.stack([want[name][k] for k in order]))
    else:
        got = torch.cat(batches).numpy()
        np.testing.assert_array_equal(got, np.stack([want[output][k] for k in order]))


def test_describe_several_outputs(tmp_path):
    multi_output_store(tmp_path)
    d = describe_store(tmp_path)
    assert [(o["name"], o["tokens"], o["hidden_size"], o["layer"], o["model"])
            for o in d["outputs"]] == [
        ("tiny-clip/-2", 4, 8, -2, "/ckpt/tiny-clip"),
        ("tiny-siglip/mean(0:2)", 9, 6, "mean(0:2)", "/ckpt/tiny-siglip")]
    text = format_store(d)
    assert "outputs    2, float16" in text
    assert "tiny-siglip/mean(0:2)  9 x 6, layer mean(0:2), feature patch, model " \
           "/ckpt/tiny-siglip" in text
    json.dumps(d)
    (tmp_path / "manifest.json").unlink()  # from the shards alone
    d = describe_store(tmp_path)
    assert [o["name"] for o in d["outputs"]] == MULTI_NAMES
    assert d["outputs"][1]["layer"] == "mean(0:2)" and d["outputs"][0]["tokens"] == 4


def test_finalize_refuses_unsound_outputs(tmp_path):
    make_store(tmp_path)
    infos = list(scan_shards(tmp_path).values())
    for outputs, match in (([{"name": "a", "dataset": "features/a"}], "not 'features'"),
                           ([{"name": "a", "dataset": "features/a"},
                             {"name": "a", "dataset": "features/a"}], "twice"),
                           ([{"dataset": "features"}], "with a name")):
        with pytest.raises(ConfigError, match=match):
            finalize(tmp_path, meta={}, plan={}, shards=infos, complete=True, outputs=outputs)
