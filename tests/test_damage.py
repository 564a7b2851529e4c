"""Damage is found, never read back as data: a damaged manifest, key index, shard or plan is
reported (one line naming the file and the fix) or repaired, never trusted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from stores import MULTI_OUTPUTS, Shard, build_store, multi_output_store
from typer.testing import CliRunner

from clipfeat.cli import app
from clipfeat.errors import StoreError
from clipfeat.store import FeatureStore
from clipfeat.verify import verify_store

runner = CliRunner()
TOKENS, HIDDEN = 3, 8
META = {"model": "tiny/clip", "layer": -2, "feature": "patch", "aspect": "square",
        "tokens": TOKENS, "hidden_size": HIDDEN, "store_dtype": "float32"}


def small_store(out: Path, rows=(3, 2)) -> dict[str, np.ndarray]:
    """A finished store of len(rows) shards; returns {key: row}."""
    rng = np.random.default_rng(0)
    shards, want = [], {}
    for sid, n in enumerate(rows):
        keys = [f"s{sid}/{i}.png" for i in range(n)]
        x = rng.standard_normal((n, TOKENS, HIDDEN)).astype(np.float32)
        shards.append(Shard(keys, x))
        want.update(zip(keys, x, strict=True))
    build_store(out, shards, meta=META, plan={"num_chunks": len(rows)}, store_dtype="float32")
    return want


# --------------------------------------------------------------------------- manifest

def _edit(man: dict, how: str) -> object:
    s0 = man["shards"][0]
    if how == "not a dict":
        return [man]
    if how == "num_rows ten":
        s0["num_rows"] = "ten"
    elif how == "no file":
        del s0["file"]
    elif how == "no shard_id":
        del s0["shard_id"]
    elif how == "no num_rows":
        del s0["num_rows"]
    elif how == "entry not a dict":
        man["shards"][0] = "shard-000000.h5"
    elif how == "shards not a list":
        man["shards"] = {"0": s0}
    elif how == "config a list":
        man["config"] = ["model"]
    elif how == "bytes negative":
        s0["bytes"] = -3
    elif how == "shard_id bool":
        s0["shard_id"] = False
    elif how == "listed twice":
        man["shards"].append(dict(s0))
    elif how == "num_images str":
        man["num_images"] = "5"
    elif how == "file not a shard":
        s0["file"] = "../etc/passwd"
    return man


DAMAGES = ["not a dict", "num_rows ten", "no file", "no shard_id", "no num_rows",
           "entry not a dict", "shards not a list", "config a list", "bytes negative",
           "shard_id bool", "listed twice", "num_images str", "file not a shard", "not json"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_manifest_is_one_line_everywhere(tmp_path, how):
    small_store(tmp_path)
    path = tmp_path / "manifest.json"
    if how == "not json":
        path.write_bytes(b'{"format": "clipfeat", "shards": [\xff')
    else:
        path.write_text(json.dumps(_edit(json.loads(path.read_text()), how)))

    with pytest.raises(StoreError) as err:
        FeatureStore(tmp_path)
    msg = str(err.value)
    assert "manifest.json" in msg and "rerun the extract command" in msg and "\n" not in msg

    res = runner.invoke(app, ["info", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.json" in lines[0] and "rerun" in lines[0]

    res = runner.invoke(app, ["verify", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)
    assert "FAILED" in res.stdout and "manifest.json" in res.stdout
    report = verify_store(tmp_path)
    assert any(p.startswith("manifest.json:") and "rerun the extract command" in p
               for p in report.problems), report.problems
    assert report.checked_shards == 2  # the shards are still checked


# --------------------------------------------------------------------------- key index

def _index_file(out: Path, name: str) -> Path:
    header = json.loads((out / ".clipfeat" / "index.json").read_text())
    return out / ".clipfeat" / header["dir"] / f"{name}.npy"


def _swap(path: Path, i: int, j: int) -> None:
    arr = np.load(path)
    arr[[i, j]] = arr[[j, i]]
    with open(path, "wb") as fh:
        np.save(fh, arr)


def _swap_blob(path: Path) -> None:
    """Swap two key bytes: 's0/0.png' <-> 's0/1.png' (same lengths, different keys)."""
    arr = np.load(path)
    text = bytes(arr).replace(b"s0/0.png", b"s0/X.png").replace(b"s0/1.png", b"s0/0.png")
    text = text.replace(b"s0/X.png", b"s0/1.png")
    with open(path, "wb") as fh:
        np.save(fh, np.frombuffer(text, dtype=np.uint8))


@pytest.mark.parametrize("name", ["rows", "positions", "blob", "hashes"])
def test_damaged_index_is_not_used_and_verify_names_it(tmp_path, caplog, name):
    want = small_store(tmp_path)
    path = _index_file(tmp_path, name)
    if name == "blob":
        _swap_blob(path)
    elif name == "hashes":
        _swap(path, 0, 4)
    else:
        _swap(path, 0, 1)
    with caplog.at_level(logging.WARNING):
        store = FeatureStore(tmp_path)
    assert store.index_kind == "scan"
    assert any(f"{name}.npy" in r.getMessage() and "damaged" in r.getMessage()
               for r in caplog.records)
    for key, row in want.items():
        np.testing.assert_array_equal(store[key].numpy(), row, err_msg=key)
    assert store.keys() == list(want)

    report = verify_store(tmp_path)
    assert not report.ok
    assert any(f"{name}.npy" in p and "rerun clipfeat extract" in p for p in report.problems), (
        report.problems)
    res = runner.invoke(app, ["verify", str(tmp_path)])
    assert res.exit_code == 1 and f"{name}.npy" in res.stdout


def test_index_that_disagrees_with_the_shards_despite_its_checksums(tmp_path):
    """The index's own checksums are rewritten to match: verify still compares it with the
    shards' keys and row offsets."""
    small_store(tmp_path)
    path = _index_file(tmp_path, "rows")
    _swap(path, 1, 2)
    header_path = tmp_path / ".clipfeat" / "index.json"
    header = json.loads(header_path.read_text())
    import xxhash
    header["checksums"]["rows"] = "xxh3_128:" + xxhash.xxh3_128(path.read_bytes()).hexdigest()
    header_path.write_text(json.dumps(header))
    report = verify_store(tmp_path)
    assert any("rows.npy" in p and "disagrees with the shards" in p and "'s0/1.png'" in p
               for p in report.problems), report.problems


def test_sound_index_passes_and_is_used(tmp_path):
    want = small_store(tmp_path)
    assert verify_store(tmp_path).ok
    store = FeatureStore(tmp_path)
    assert store.index_kind == "array" and len(store) == len(want)


# --------------------------------------------------------------------------- resume

SHARD_SIZE = 4


def make_tree(root: Path, n: int) -> list[str]:
    import imagegen

    keys = []
    for i in range(n):
        rel = f"{'ab'[i % 2]}/img{i:03d}.png"
        imagegen.make_image(root / rel, "RGB", (14 + i % 5, 11 + i % 3), seed=i)
        keys.append(rel)
    return sorted(keys)


def run_extract(root: Path, out: Path, model: Path, **kw):
    import clipfeat

    kw.setdefault("shard_size", SHARD_SIZE)
    return clipfeat.extract(roots=[str(root)], out=str(out), model=str(model), device="cpu",
                            dtype="float32", store_dtype="float32", batch_size=3, workers=0,
                            **kw)


def store_contents(out: Path) -> dict:
    from stores import read_shards

    return {name: (keys, feats.tobytes(), fails)
            for name, (keys, feats, fails) in read_shards(out).items()}


@pytest.fixture(scope="module")
def ref_store(tmp_path_factory, clip_full_dir):
    root = tmp_path_factory.mktemp("damage-tree")
    keys = make_tree(root, 10)  # chunks of 4, 4, 2
    out = tmp_path_factory.mktemp("damage-ref") / "out"
    summary = run_extract(root, out, clip_full_dir)
    assert summary.complete and summary.extracted == 10
    return root, keys, out


def _replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1, (path, old)
    path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize("damage", ["key flipped", "other shard copied over it",
                                    "not the file the manifest lists"])
def test_rerun_redoes_a_damaged_finished_shard(tmp_path, ref_store, clip_full_dir, caplog,
                                               damage):
    import shutil

    root, keys, ref = ref_store
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    if damage == "key flipped":  # a/img002.png -> a/img004.png: a duplicate, a lost input
        _replace_bytes(out / "shard-000000.h5", b"a/img002.png", b"a/img004.png")
    elif damage == "other shard copied over it":
        shutil.copyfile(out / "shard-000001.h5", out / "shard-000000.h5")
    else:  # the shard is not the file manifest.json lists (its checksum differs)
        man = json.loads((out / "manifest.json").read_text())
        man["shards"][0]["checksum"] = "0" * 32
        (out / "manifest.json").write_text(json.dumps(man))
    with caplog.at_level(logging.WARNING):
        summary = run_extract(root, out, clip_full_dir)
    warned = [r.getMessage() for r in caplog.records if "shard-000000.h5" in r.getMessage()]
    assert len(warned) == 1 and "damaged" in warned[0] and "deleted" in warned[0], warned
    assert summary.complete and summary.extracted == 4 and summary.skipped == 6
    assert store_contents(out) == store_contents(ref)
    assert verify_store(out).ok


# --------------------------------------------------------------------------- lost plan

def _shard_states(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.h5"))}


@pytest.mark.parametrize("loss", ["meta dir deleted", "plan truncated", "plan garbled"])
def test_lost_plan_is_rebuilt_from_intact_shards(tmp_path, ref_store, clip_full_dir, caplog,
                                                 loss):
    import shutil

    root, keys, ref = ref_store
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "shard-000001.h5").unlink()  # one chunk still to do
    plan = out / ".clipfeat" / "plan.jsonl"
    if loss == "meta dir deleted":
        shutil.rmtree(out / ".clipfeat")
    elif loss == "plan truncated":
        plan.write_bytes(plan.read_bytes()[:-25])
    else:
        plan.write_bytes(plan.read_bytes().replace(b'"k"', b'"q"', 1))
    kept = _shard_states(out)
    with caplog.at_level(logging.WARNING):
        summary = run_extract(root, out, clip_full_dir)
    said = [r.getMessage() for r in caplog.records if "rebuilt" in r.getMessage()]
    assert len(said) == 1 and "plan.jsonl" in said[0] and "2 intact finished shards" in said[0]
    assert summary.complete and (summary.skipped, summary.extracted) == (6, 4)
    assert {n: b for n, b in _shard_states(out).items() if n in kept} == kept
    assert store_contents(out) == store_contents(ref)
    assert verify_store(out).ok


def _cli_args(root: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["extract", str(root), "--out", str(out), "--model", str(model), "--device", "cpu",
            "--dtype", "float32", "--store-dtype", "float32", "--shard-size", str(SHARD_SIZE),
            "--batch-size", "3", "--workers", "0", "--quiet", *extra]


def test_lost_plan_and_shards_that_disagree_with_the_sources_is_refused(tmp_path, ref_store,
                                                                         clip_full_dir):
    import shutil

    root, keys, ref = ref_store
    out, src = tmp_path / "out", tmp_path / "root"
    shutil.copytree(ref, out)
    shutil.copytree(root, src)
    shutil.rmtree(out / ".clipfeat")
    (src / keys[0]).unlink()  # a key of shard 0 the sources no longer list
    kept = _shard_states(out)
    res = runner.invoke(app, _cli_args(src, out, clip_full_dir))
    assert res.exit_code == 1, res.output
    line = res.stderr.strip().splitlines()
    assert len(line) == 1, res.stderr
    assert "plan.jsonl is missing" in line[0] and repr(keys[0]) in line[0]
    assert "3 finished shards are intact; move them aside" in line[0]
    assert _shard_states(out) == kept


def test_lost_plan_and_other_settings_is_refused_naming_them(tmp_path, ref_store,
                                                             clip_full_dir):
    import shutil

    root, keys, ref = ref_store
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    shutil.rmtree(out / ".clipfeat")
    kept = _shard_states(out)
    res = runner.invoke(app, _cli_args(root, out, clip_full_dir, "--layer", "-1"))
    assert res.exit_code == 2, res.output
    assert "other settings" in res.stderr and "layer: -2 in OUT -> -1 now" in res.stderr
    assert _shard_states(out) == kept


# --------------------------------------------------------------------------- several outputs

def _chunks(want: dict, rows=(3, 0, 2)) -> dict[int, list[str]]:
    return {sid: [f"m{sid}/{i}.jpg" for i in range(n)] + [f"bad{sid}.jpg"]
            for sid, n in enumerate(rows)}


def _damage_output(path: Path, how: str) -> None:
    import h5py

    name = f"features/{MULTI_OUTPUTS[1].name}"
    if how == "dataset deleted":
        with h5py.File(path, "r+") as f:
            del f[name]
    elif how == "dataset shortened":
        with h5py.File(path, "r+") as f:
            f[name].resize(1, axis=0)
    else:  # the file cut inside the second output's rows
        with h5py.File(path, "r") as f:
            cut = f[name].id.get_chunk_info(1).byte_offset + 5
        with open(path, "r+b") as fh:
            fh.truncate(cut)


@pytest.mark.parametrize("how", ["dataset deleted", "dataset shortened", "file truncated"])
def test_damaged_output_of_a_several_output_shard_is_found(tmp_path, how):
    from clipfeat.store import check_finished, read_shard_info

    want = multi_output_store(tmp_path)
    path = tmp_path / "shard-000000.h5"
    _damage_output(path, how)
    report = verify_store(tmp_path)
    about = [p for p in report.problems if p.startswith("shard-000000.h5: ")]
    assert len(about) == 1 and "rerun" in about[0], report.problems
    assert {"dataset deleted": "missing", "dataset shortened": "has 1 rows but",
            "file truncated": "truncated"}[how] in about[0]
    checked = check_finished(tmp_path, _chunks(want))
    assert sorted(checked.trusted) == [1, 2] and [p for p, _ in checked.damaged] == [path]
    with pytest.raises(StoreError, match="shard-000000.h5"):
        read_shard_info(path)
    store = FeatureStore(tmp_path)  # the index is intact: the reader checks size and
    if how == "file truncated":     # checksum block only (verify re-hashes the bytes)
        with pytest.raises(StoreError, match="shard-000000.h5"):
            store["m0/1.jpg"]
    np.testing.assert_array_equal(store["m2/1.jpg"][MULTI_OUTPUTS[1].name].numpy(),
                                  want[MULTI_OUTPUTS[1].name]["m2/1.jpg"])


def test_sound_several_output_store_is_trusted(tmp_path):
    from clipfeat.store import check_finished, read_finished

    want = multi_output_store(tmp_path)
    checked = check_finished(tmp_path, _chunks(want))
    assert sorted(checked.trusted) == [0, 1, 2] and not checked.damaged
    content = read_finished(tmp_path)[0]
    assert content.output_attrs[MULTI_OUTPUTS[1].name]["layer"] == "mean(0:2)"
    assert content.attrs["aspect"] == "pad" and "layer" not in content.attrs
