"""clipfeat verify: sound stores pass; truncation, flipped bytes, duplicate keys, missing
shards, NaN and bad metadata are each reported naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from stores import (
    MULTI_META,
    MULTI_OUTPUTS,
    Output,
    Shard,
    build_store,
    multi_output_store,
    write_shard,
)

from clipfeat.store import ShardWriter, finalize, scan_shards
from clipfeat.verify import VerifyReport, verify_store

TOKENS, HIDDEN = 6, 16


def meta_for(store_dtype="float16", compute_dtype="float16"):
    return {"model": "tiny/clip", "layer": -2, "layer_index": 2, "feature": "patch",
            "aspect": "pad", "tokens": TOKENS, "hidden_size": HIDDEN,
            "store_dtype": store_dtype, "compute_dtype": compute_dtype,
            "preprocessing": {"size": 30, "mean": [0.48, 0.45, 0.4]}}


def make_store(out: Path, *, rows=(4, 3, 5), store_dtype="float16", compute_dtype="float16",
               key_lists=None, attrs_override=None, complete=True, write_plan=True):
    """Shards of random features + finalize + a plan.jsonl; returns {key: float32 row}."""
    rng = np.random.default_rng(1)
    meta = meta_for(store_dtype, compute_dtype)
    expected = {}
    shards = []
    plan_items = []
    for sid, n in enumerate(rows):
        keys = key_lists[sid] if key_lists else [f"s{sid}/{i}.jpg" for i in range(n)]
        x = rng.standard_normal((n, TOKENS, HIDDEN)).astype(np.float32) * 3
        shards.append(Shard(keys, x, attrs=dict(meta, **((attrs_override or {}).get(sid, {}))),
                            failures=[{"key": f"bad{sid}", "path": f"/img/bad{sid}.jpg",
                                       "error": "cannot identify image file"}]))
        stored = x.astype(store_dtype).astype(np.float32)
        expected.update(zip(keys, stored, strict=False))
        plan_items += [{"key": k, "path": f"/img/{k}"} for k in keys]
    build_store(out, shards, meta=meta, plan={"num_chunks": len(rows)}, store_dtype=store_dtype,
                complete=complete)
    if write_plan:
        (out / ".clipfeat").mkdir(exist_ok=True)
        lines = [json.dumps({"version": 1, "shard_size": 5})]
        lines += [json.dumps(dict(it, i=i)) for i, it in enumerate(plan_items)]
        (out / ".clipfeat" / "plan.jsonl").write_text("\n".join(lines) + "\n")
    return expected


def problems_about(report: VerifyReport, name: str) -> list[str]:
    return [p for p in report.problems if name in p]


def test_sound_store_passes(tmp_path):
    make_store(tmp_path)
    report = verify_store(tmp_path)
    assert report.ok, report.format()
    assert report.problems == []
    assert report.checked_shards == 3 and report.checked_rows == 12
    assert report.format().startswith("OK:")
    assert report.to_dict()["ok"] is True


def test_empty_shard_and_float32_store_pass(tmp_path):
    make_store(tmp_path, rows=(3, 0, 2), store_dtype="float32")
    report = verify_store(tmp_path)
    assert report.ok, report.format()


def test_truncated_shard(tmp_path):
    make_store(tmp_path)
    path = tmp_path / "shard-000001.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = verify_store(tmp_path)
    assert not report.ok
    assert not problems_about(report, "shard-000000.h5")
    assert "FAILED" in report.format() and "shard-000001.h5" in report.format()
    # reported once: its findings (size, HDF5) on one line, the fix said once
    about = problems_about(report, "shard-000001.h5")
    assert len(about) == 1 and len(report.problems) == 1, report.problems
    assert "was written with" in about[0] and "cannot be opened as HDF5" in about[0]
    assert about[0].count("shard-000001.h5") == 1
    assert about[0].count("delete it and rerun") == 1
    assert "1 problem (" in report.format()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))  # one bit: the value changes a little, stays finite


def test_flipped_byte_in_feature_data(tmp_path):
    make_store(tmp_path)
    path = tmp_path / "shard-000002.h5"
    with h5py.File(path, "r") as f:
        offset = f["features"].id.get_chunk_info(3).byte_offset + 17
    _flip(path, offset)
    with h5py.File(path, "r") as f:  # HDF5 still opens and reads it without complaint
        assert np.isfinite(f["features"][...]).all()
    report = verify_store(tmp_path)
    assert not report.ok
    found = problems_about(report, "shard-000002.h5")
    assert found and "checksum" in found[0]


@pytest.mark.parametrize("where", ["start", "user block padding", "middle", "end"])
def test_flipped_byte_anywhere(tmp_path, where):
    make_store(tmp_path)
    path = tmp_path / "shard-000001.h5"
    size = path.stat().st_size
    offset = {"start": 0, "user block padding": 300, "middle": size // 2, "end": size - 1}[where]
    _flip(path, offset)
    report = verify_store(tmp_path)
    assert not report.ok
    assert problems_about(report, "shard-000001.h5")


def test_checksum_block_matches_an_independent_hash(tmp_path):
    """Format 2: sha256 of the XXH3-128 digests of the file's 8 MiB blocks after byte 512
    (one shard here spans several blocks, the rows hashed while written)."""
    import hashlib

    import xxhash

    from clipfeat import store as store_mod

    make_store(tmp_path)
    rng = np.random.default_rng(1)
    with ShardWriter(tmp_path, 7, tokens=256, hidden=256, store_dtype="float32",
                     attrs={"model": "m"}) as w:
        for start in (0, 30):  # 256 KiB rows: 70 rows span three 8 MiB blocks
            w.append([f"big{start + i}" for i in range(40 if start else 30)],
                     rng.standard_normal((40 if start else 30, 256, 256)).astype(np.float32))
        big = w.commit()
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["shards"].append(big.to_manifest())
    man = json.loads((tmp_path / "manifest.json").read_text())
    for entry in man["shards"]:
        data = (tmp_path / entry["file"]).read_bytes()
        assert store_mod.CHECKSUM_KIND == "xxh3_128-8MiB-tree"
        block = 8 * 1024 * 1024
        body = data[512:]
        digests = b"".join(xxhash.xxh3_128(body[i:i + block]).digest()
                           for i in range(0, len(body), block))
        assert entry["checksum"] == hashlib.sha256(digests).hexdigest()
        assert data.startswith(b"clipfeat-shard 1\n")
        assert f"checksum xxh3_128-8MiB-tree {entry['checksum']}".encode() in data[:512]
        assert f"bytes {len(data)}".encode() in data[:512]
        assert store_mod.shard_checksum(tmp_path / entry["file"]) == (entry["checksum"], len(data))


def test_multi_block_checksum(tmp_path):
    """Shards bigger than one hash block (rows hashed while written, the rest read back in
    threads) verify, and a flip in an early or a late block is caught."""
    import numpy as np

    from clipfeat.store import ShardWriter, check_shard_bytes, finalize

    rng = np.random.default_rng(3)
    with ShardWriter(tmp_path, 0, tokens=256, hidden=256, store_dtype="float32",
                     attrs={"model": "m"}, expected_rows=70) as w:
        for start in range(0, 70, 16):  # 256 KiB rows: 70 rows span three 8 MiB blocks
            n = min(16, 70 - start)
            w.append([f"k{start + i}" for i in range(n)],
                     rng.standard_normal((n, 256, 256)).astype(np.float32))
        info = w.commit()
    finalize(tmp_path, meta={"tokens": 256, "hidden_size": 256, "store_dtype": "float32"},
             plan={}, shards=[info], complete=True)
    path = tmp_path / "shard-000000.h5"
    assert path.stat().st_size > 16 * 1024 * 1024
    assert check_shard_bytes(path) is None and verify_store(tmp_path).ok
    for offset in (700_000, 9_000_000, path.stat().st_size - 3000):
        _flip(path, offset)
        assert check_shard_bytes(path) is not None
        assert problems_about(verify_store(tmp_path), "shard-000000.h5")
        _flip(path, offset)  # back
    assert check_shard_bytes(path) is None


def test_flipped_byte_in_keys(tmp_path):
    make_store(tmp_path)
    path = tmp_path / "shard-000000.h5"
    data = path.read_bytes()
    offset = data.index(b"s0/2.jpg")
    _flip(path, offset + 3)
    report = verify_store(tmp_path)
    assert not report.ok
    assert problems_about(report, "shard-000000.h5")


def test_duplicated_key(tmp_path):
    keys = [["a.jpg", "b.jpg"], ["c.jpg", "b.jpg", "d.jpg"]]
    make_store(tmp_path, rows=(2, 3), key_lists=keys)
    report = verify_store(tmp_path)
    assert not report.ok
    dup = [p for p in report.problems if "'b.jpg'" in p]
    assert len(dup) == 1 and "shard-000000.h5" in dup[0] and "shard-000001.h5" in dup[0]


def test_manifest_lists_missing_shard(tmp_path):
    make_store(tmp_path)
    (tmp_path / "shard-000001.h5").unlink()
    report = verify_store(tmp_path)
    assert not report.ok
    assert any("shard-000001.h5" in p and "missing" in p for p in report.problems)
    assert report.checked_shards == 2


def test_stray_shard_not_in_manifest(tmp_path):
    make_store(tmp_path)
    write_shard(tmp_path, 7, Shard(["z.jpg"], np.zeros((1, TOKENS, HIDDEN), np.float32)),
                attrs=meta_for())
    report = verify_store(tmp_path)
    assert not report.ok
    assert any("shard-000007.h5" in p and "not listed" in p for p in report.problems)


def test_stray_shard_of_unfinished_run_is_a_note(tmp_path):
    make_store(tmp_path, complete=False)
    write_shard(tmp_path, 3, Shard(["z.jpg"], np.zeros((1, TOKENS, HIDDEN), np.float32)),
                attrs=meta_for())
    report = verify_store(tmp_path)
    assert report.ok, report.format()
    assert any("shard-000003.h5" in n for n in report.notes)
    assert any("incomplete" in n for n in report.notes)


def test_nan_in_features(tmp_path):
    make_store(tmp_path)
    with h5py.File(tmp_path / "shard-000001.h5", "r+") as f:
        f["features"][2, 0, 0] = np.nan
    report = verify_store(tmp_path)
    assert any("shard-000001.h5" in p and "NaN" in p and "(2)" in p for p in report.problems)


def test_row_count_disagrees_with_manifest(tmp_path):
    make_store(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["shards"][0]["num_rows"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    report = verify_store(tmp_path)
    assert any("shard-000000.h5" in p and "99" in p for p in report.problems)


def test_settings_differ_between_shards(tmp_path):
    make_store(tmp_path, attrs_override={2: {"layer": -1}})
    report = verify_store(tmp_path)
    assert any("shard-000002.h5" in p and "layer" in p for p in report.problems)


def test_missing_or_broken_manifest_and_failures(tmp_path):
    make_store(tmp_path)
    (tmp_path / "failures.jsonl").write_text('{"key": "a", "path": "b", "error": "c"}\nnot json\n')
    report = verify_store(tmp_path)
    assert any("failures.jsonl" in p and "line 2" in p for p in report.problems)
    (tmp_path / "manifest.json").write_text("{ truncated")
    report = verify_store(tmp_path)
    assert not report.ok and any("manifest.json" in p for p in report.problems)
    assert report.checked_shards == 3  # shards on disk are still checked
    (tmp_path / "manifest.json").unlink()
    assert any("manifest.json" in p for p in verify_store(tmp_path).problems)


def test_missing_index_is_only_a_note(tmp_path):
    make_store(tmp_path)
    (tmp_path / ".clipfeat" / "index.json").unlink()
    report = verify_store(tmp_path)
    assert report.ok and any("index" in n for n in report.notes)


# ----------------------------------------------------------------------------- sampling


@pytest.fixture
def fake_compute(monkeypatch):
    """Stand-in for clipfeat.verify.compute_features (the re-extraction); records its calls."""
    calls = []
    state = {"answer": None}

    def compute_features(items, meta, *, model, device, allow_pickle=False):
        calls.append((list(items), meta, model, device))
        state["allow_pickle"] = allow_pickle
        return {key: state["answer"](key, path) for key, path in items}

    import clipfeat.verify

    monkeypatch.setattr(clipfeat.verify, "compute_features", compute_features)
    return calls, state


def test_sample_matches_fresh_extraction(tmp_path, fake_compute):
    calls, state = fake_compute
    expected = make_store(tmp_path)
    rng = np.random.default_rng(5)
    # a fresh float16 extraction differs by float16 rounding noise
    state["answer"] = lambda key, path: expected[key] * (1 + 1e-3 * rng.standard_normal())
    report = verify_store(tmp_path, model="tiny/clip", sample=5, device="cpu", seed=3)
    assert report.ok, report.format()
    assert report.sampled == 5
    (items, meta, model, device), = calls
    assert len(items) == 5 and all(path == f"/img/{key}" for key, path in items)
    assert meta["layer"] == -2 and model == "tiny/clip" and device == "cpu"
    same_seed = verify_store(tmp_path, model="tiny/clip", sample=5, seed=3)
    assert same_seed.ok and [k for k, _ in calls[1][0]] == [k for k, _ in items]


def test_sample_detects_other_features(tmp_path, fake_compute):
    _, state = fake_compute
    expected = make_store(tmp_path)
    state["answer"] = lambda key, path: expected[key][::-1].copy()  # e.g. another layer
    report = verify_store(tmp_path, model="tiny/clip", sample=3)
    assert not report.ok
    assert len(report.problems) == 3 and all("fresh extraction" in p for p in report.problems)


def test_sample_tolerance_float32(tmp_path, fake_compute):
    _, state = fake_compute
    expected = make_store(tmp_path, store_dtype="float32", compute_dtype="float32")
    state["answer"] = lambda key, path: expected[key] * (1 + 1e-3)  # fine for fp16, not fp32
    assert not verify_store(tmp_path, model="m", sample=2).ok
    state["answer"] = lambda key, path: expected[key] * (1 + 1e-6)
    assert verify_store(tmp_path, model="m", sample=2).ok


def test_sample_reports_extraction_errors(tmp_path, fake_compute):
    _, state = fake_compute
    make_store(tmp_path)
    state["answer"] = lambda key, path: "cannot identify image file"
    report = verify_store(tmp_path, model="m", sample=2)
    assert len(report.problems) == 2 and "cannot identify image file" in report.problems[0]


def test_sample_without_plan(tmp_path, fake_compute):
    make_store(tmp_path, write_plan=False)
    report = verify_store(tmp_path, model="m", sample=2)
    assert any("plan.jsonl" in p for p in report.problems)


def test_not_a_folder(tmp_path):
    from clipfeat.errors import ConfigError

    with pytest.raises(ConfigError, match="no such folder"):
        verify_store(tmp_path / "nope")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        verify_store(tmp_path / "a-file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a clipfeat store"):
        verify_store(tmp_path / "empty")
    assert sorted(os.listdir(tmp_path)) == ["a-file", "empty"]
    assert os.listdir(tmp_path / "empty") == []


def test_other_tower_is_one_shape_mismatch(tmp_path, fake_compute):
    """--model of another tower (other hidden size/tokens): one problem, and the verdict
    line says shape mismatch, not "max relative error 0"."""
    _, state = fake_compute
    make_store(tmp_path)
    state["answer"] = lambda key, path: np.zeros((TOKENS + 1, 2 * HIDDEN), np.float32)
    report = verify_store(tmp_path, model="other/tower", sample=6)
    assert not report.ok and report.sampled == 6
    assert len(report.problems) == 1, report.problems
    assert "shape 7 x 32 but the store holds 6 x 16" in report.problems[0]
    head = report.format().splitlines()[0]
    assert head.startswith("FAILED:") and "1 problem (" in head
    assert "shape mismatch: other/tower gives 7 x 32, the store holds 6 x 16" in head
    assert "relative error" not in report.format()
    assert report.max_sample_error is None
    assert report.to_dict()["sample_mismatch"] == report.sample_mismatch


def test_one_shard_counts_in_singular(tmp_path):
    make_store(tmp_path, rows=(1,))
    head = verify_store(tmp_path).format().splitlines()[0]
    assert "1 row in 1 shard checked" in head, head


def test_allow_pickle_reaches_the_tower_loader(tmp_path, fake_compute, monkeypatch):
    _, state = fake_compute
    expected = make_store(tmp_path)
    state["answer"] = lambda key, path: expected[key]
    assert verify_store(tmp_path, model="m", sample=1, allow_pickle=True).ok
    assert state["allow_pickle"] is True
    import clipfeat.tower
    import clipfeat.verify

    monkeypatch.undo()  # the real compute_features, with a stand-in loader
    seen = {}

    def load_tower(model, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(clipfeat.tower, "load_tower", load_tower)
    with pytest.raises(RuntimeError, match="stop here"):
        clipfeat.verify.compute_features([], {"layer": -2, "feature": "patch"}, model="m",
                                         allow_pickle=True)
    assert seen["allow_pickle"] is True


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_real_extraction_verifies_with_samples(tmp_path, clip_vision_dir):
    """A store made by the real pipeline passes verify, including re-extraction of rows
    with the real compute_features (float32 on CPU: rows must agree to ~1e-4)."""
    from PIL import Image

    import clipfeat

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        size = (40 + 7 * i, 33 + 5 * i)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / f"im{i}.png")
    out = tmp_path / "out"
    summary = clipfeat.extract(roots=[str(root)], out=str(out), model=str(clip_vision_dir),
                               device="cpu", dtype="float32", store_dtype="float32",
                               shard_size=2, batch_size=2, workers=1)
    assert summary.complete
    report = verify_store(out, model=str(clip_vision_dir), sample=4, device="cpu")
    assert report.ok, report.format()
    assert report.sampled == 4 and report.max_sample_error < 1e-4
    assert report.checked_rows == 5 and report.checked_shards == 3


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
    from typer.testing import CliRunner

    from clipfeat.cli import app

    return CliRunner().invoke(app, ["verify", *map(str, args)])


def _one_line(res, code, needle):
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == code, (res.exit_code, res.output)
    assert len(lines) == 1 and lines[0].startswith("clipfeat: error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert res.stdout.strip() == "" and "Traceback" not in res.output


def test_cli_missing_path_and_not_a_store_exit_2(tmp_path):
    _one_line(_cli(tmp_path / "nope"), 2, "no such folder")
    _one_line(_cli(tmp_path), 2, "not a clipfeat store")


def test_cli_sample_without_model_exits_2(tmp_path):
    make_store(tmp_path)
    _one_line(_cli(tmp_path, "--sample", "32"), 2, "--sample 32 needs --model")


def test_cli_json_has_ok(tmp_path):
    make_store(tmp_path)
    res = _cli(tmp_path, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["ok"] is True and d["problems"] == [] and d["checked_shards"] == 3
    (tmp_path / "shard-000001.h5").unlink()
    res = _cli(tmp_path, "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["ok"] is False


def test_cli_allow_pickle(tmp_path, fake_compute):
    _, state = fake_compute
    expected = make_store(tmp_path)
    state["answer"] = lambda key, path: expected[key]
    res = _cli(tmp_path, "--model", "m", "--sample", "2", "--allow-pickle")
    assert res.exit_code == 0, res.output
    assert state["allow_pickle"] is True and "2 rows re-extracted" in res.stdout


# ----------------------------------------------------------------------------- several outputs

SIGLIP = MULTI_OUTPUTS[1].name


def _multi(out: Path, **kw) -> dict:
    want = multi_output_store(out, **kw)
    (out / ".clipfeat" / "plan.jsonl").write_text("\n".join(
        [json.dumps({"version": 1, "shard_size": 5})]
        + [json.dumps({"key": k, "path": f"/img/{k}", "i": i})
           for i, k in enumerate(want[SIGLIP])]) + "\n")
    return want


def test_several_output_store_passes(tmp_path):
    _multi(tmp_path)
    report = verify_store(tmp_path)
    assert report.ok, report.format()
    assert report.checked_shards == 3 and report.checked_rows == 5


def test_nan_in_one_output_is_named(tmp_path):
    _multi(tmp_path)
    with h5py.File(tmp_path / "shard-000002.h5", "r+") as f:
        f[f"features/{SIGLIP}"][1, 2, 3] = np.nan
    report = verify_store(tmp_path)
    found = problems_about(report, "shard-000002.h5")
    assert len(found) == 1 and f"NaN/Inf in 1 rows of features/{SIGLIP} (1)" in found[0]


def test_output_attributes_checked_against_the_manifest(tmp_path):
    _multi(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["outputs"][1]["layer"] = "mean(0:3)"
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    assert verify_store(tmp_path).problems == [
        f"shard-000000.h5: attribute features/{SIGLIP}:layer='mean(0:2)' differs from its "
        "entry in manifest.json outputs ('mean(0:3)')"]
    man["outputs"][0]["hidden_size"] = 9
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    problems = verify_store(tmp_path).problems
    assert len(problems) == 3 and all(
        "features/tiny-clip/-2 have hidden size 8 but the manifest.json outputs entry "
        "hidden_size is 9" in p for p in problems), problems


def test_output_settings_differ_between_shards(tmp_path):
    want = _multi(tmp_path)
    keys = list(want[SIGLIP])[3:]  # shard 2's
    feats = [np.stack([want[o.name][k] for k in keys]) for o in MULTI_OUTPUTS]
    outputs = [MULTI_OUTPUTS[0], Output(SIGLIP, dict(MULTI_OUTPUTS[1].attrs, feature="cls_patch"))]
    write_shard(tmp_path, 2, Shard(keys, feats), attrs=MULTI_META, outputs=outputs)
    man = json.loads((tmp_path / "manifest.json").read_text())
    finalize(tmp_path, meta=man["config"], plan=man["plan"], outputs=man["outputs"],
             shards=scan_shards(tmp_path).values(), complete=True)
    problems = verify_store(tmp_path).problems
    assert problems == [f"shard-000002.h5: attribute features/{SIGLIP}:feature='cls_patch' "
                        "differs from shard-000000.h5 ('patch')"]


def test_sampling_reads_each_output_with_its_own_settings(tmp_path, fake_compute):
    calls, state = fake_compute
    want = _multi(tmp_path)
    state["answer"] = lambda key, path: want["tiny-clip/-2"][key].astype(np.float32)
    report = verify_store(tmp_path, model="/other/tiny-clip", sample=3)
    assert report.ok, report.format()
    assert report.sampled == 3 and len(calls) == 1  # only the outputs of that tower
    (items, meta, model, _), = calls
    assert meta["layer"] == -2 and meta["model"] == "/ckpt/tiny-clip" and meta["aspect"] == "pad"
    report = verify_store(tmp_path, model="/ckpt/tiny-siglip", sample=2)
    assert report.sampled == 2 and len(calls) == 2  # the mean layer is re-extracted too
    assert calls[1][1]["layer"] == "mean(0:2)" and calls[1][2] == "/ckpt/tiny-siglip"
    assert any("output tiny-clip/-2: not re-extracted (no --model names its tower" in n
               for n in report.notes), report.notes
