"""Tar shards and parquet files as inputs, end to end against the folder path.

The same images are extracted from a folder, from webdataset tar shards holding those very
files, and from a parquet file holding their bytes (the datasets ``Image`` type): the rows
are bit-identical key for key (float32 on the CPU). Keys follow webdataset's ``__key__``
(checked against the webdataset package where it is installed) and ``--key-column`` /
``FILE_STEM/ROW``. Resume after a SIGKILL and torchrun with two ranks give the store an
uninterrupted single-process run gives. Hostile inputs: test_hostile_datasets.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import imagegen
import numpy as np
import pytest
from stores import read_failures, read_rows
from test_cli_errors import assert_one_line_error
from test_distributed import torchrun
from test_resume import (
    Proc,
    assert_no_orphans,
    assert_same_store,
    assert_shards_sound,
    cli_args,
    clipfeat_module_cmd,
    extract_in_process,
    make_tree,
    shard_files,
    shard_states,
    wait_until,
)
from typer.testing import CliRunner

import clipfeat
from clipfeat.cli import app
from clipfeat.preprocess import load_image
from clipfeat.sources import expand_braces, sample_key

pq = pytest.importorskip("pyarrow.parquet")

SHARD_SIZE = 4


def runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def extract(roots: list[str], out: Path, model: Path | list[str], **kw: Any) -> Any:
    kw.setdefault("workers", 0)
    model = [str(m) for m in model] if isinstance(model, list) else str(model)
    return clipfeat.extract(roots=roots, out=str(out), model=model, device="cpu",
                            dtype="float32", store_dtype="float32", batch_size=3,
                            shard_size=SHARD_SIZE, **kw)


def stem(key: str) -> str:
    """A file's webdataset key: its path up to the first dot of its name."""
    head, _, name = key.rpartition("/")
    return (head + "/" if head else "") + name.split(".", 1)[0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of varied images: JPEG photos, RGBA and grey PNG, an animated GIF, an
    EXIF-rotated JPEG, WebP, a deflate TIFF, BMP (file names unique up to the first dot)."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(6):
        Path(root / "a").mkdir(exist_ok=True)
        from PIL import Image

        Image.fromarray(imagegen.photo_array(40 + 7 * i, 30 + 5 * i, seed=i)).save(
            root / "a" / f"photo{i}.jpg", "JPEG", quality=90)
    imagegen.make_image(root / "b" / "alpha.png", "RGBA", (33, 41), seed=1)
    imagegen.make_image(root / "b" / "grey.png", "L", (50, 20), seed=2)
    imagegen.make_animated(root / "b" / "anim.gif")
    imagegen.make_exif_rotated_jpeg(root / "b" / "turned.jpg")
    imagegen.make_image(root / "c" / "lossy.webp", "RGB", (37, 29), seed=3)
    imagegen.make_image(root / "c" / "scan.tif", "RGB", (31, 35), seed=4,
                        compression="tiff_deflate")
    imagegen.make_image(root / "c" / "old.bmp", "RGB", (29, 31), seed=5)
    imagegen.make_image(root / "c" / "two.dots.png", "RGB", (30, 30), seed=6)
    return root


def image_keys(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def folder_store(photos, clip_full_dir, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("folder-store") / "out"
    s = extract([str(photos)], out, clip_full_dir)
    assert s.complete and s.failed == 0 and s.extracted == len(image_keys(photos))
    return read_rows(out)


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory) -> Path:
    """The photos in 3 tar shards, each image with a .json and a .txt beside it."""
    d = tmp_path_factory.mktemp("shards")
    imagegen.tar_folder(photos, d, 3, extra={".json": b'{"caption": "x"}', ".txt": b"x"})
    return d


@pytest.fixture(scope="module")
def table(photos, tmp_path_factory) -> Path:
    return imagegen.parquet_folder(photos, tmp_path_factory.mktemp("parquet") / "train.parquet")


# --------------------------------------------------------------------------- end to end


def test_tar_shards_give_the_folder_rows_under_webdataset_keys(tmp_path, photos, shards,
                                                               folder_store, clip_full_dir):
    out = tmp_path / "out"
    res = runner().invoke(app, cli_args(f"{shards}/{{000000..000002}}.tar", out, clip_full_dir,
                                        "--workers", "2", "--json"))
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    n = len(image_keys(photos))
    assert summary["planned"] == n and summary["extracted"] == n  # .json/.txt not taken
    rows = read_rows(out)
    assert sorted(rows) == sorted(stem(k) for k in folder_store)
    for key, row in folder_store.items():
        np.testing.assert_array_equal(rows[stem(key)], row, err_msg=key)
    assert read_failures(out) == []
    store = clipfeat.FeatureStore(out)
    np.testing.assert_array_equal(store["c/two"].numpy(), folder_store["c/two.dots.png"])


def test_large_members_read_as_asked_give_the_same_rows(tmp_path, monkeypatch, shards,
                                                        folder_store, clip_full_dir):
    from clipfeat.sources import tar

    monkeypatch.setattr(tar, "WHOLE_READ_BYTES", 0)  # every member "large" (in-process)
    out = tmp_path / "out"
    extract([f"{shards}/*.tar"], out, clip_full_dir)
    rows = read_rows(out)
    for key, row in folder_store.items():
        np.testing.assert_array_equal(rows[stem(key)], row, err_msg=key)


def test_a_webdataset_loader_finds_every_image_by_its_key(tmp_path, shards, folder_store,
                                                          clip_full_dir):
    """The store's keys are webdataset's own ``__key__`` for each sample with an image."""
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "out"
    extract([f"{shards}/*.tar"], out, clip_full_dir)
    store = clipfeat.FeatureStore(out)
    by_stem = {stem(k): row for k, row in folder_store.items()}
    seen = 0
    for sample in wds.WebDataset(f"{shards}/{{000000..000002}}.tar", shardshuffle=False):
        if not {"jpg", "png", "gif", "webp", "tif", "bmp", "dots.png"} & set(sample):
            continue
        seen += 1
        np.testing.assert_array_equal(store[sample["__key__"]].numpy(),
                                      by_stem[sample["__key__"]])
    assert seen == len(folder_store) == len(store)


@pytest.mark.parametrize("workers", [0, 2])
def test_parquet_rows_give_the_folder_rows(tmp_path, photos, table, folder_store,
                                           clip_full_dir, workers):
    """--key-column names the keys; without it a row's key is FILE_STEM/ROW. The image
    column is found by its type (the datasets Image struct) when not named."""
    names = image_keys(photos)
    out = tmp_path / "by-name"
    s = extract([str(table)], out, clip_full_dir, key_column="name", workers=workers)
    assert s.complete and s.failed == 0 and s.extracted == len(names)
    rows = read_rows(out)
    assert sorted(rows) == sorted(folder_store)
    for key, row in folder_store.items():
        np.testing.assert_array_equal(rows[key], row, err_msg=key)

    out = tmp_path / "by-row"
    res = runner().invoke(app, cli_args(str(table), out, clip_full_dir, "--image-column",
                                        "image", "--workers", str(workers)))
    assert res.exit_code == 0, res.stderr
    rows = read_rows(out)
    assert sorted(rows) == sorted(f"train/{i}" for i in range(len(names)))
    for i, name in enumerate(names):
        np.testing.assert_array_equal(rows[f"train/{i}"], folder_store[name], err_msg=name)


def test_several_towers_read_tars_and_parquet_as_the_folder(tmp_path, photos, shards, table,
                                                            clip_full_dir, siglip_dir):
    """Two towers with different preprocessings (one decode into both, in the workers):
    every output of the tar and parquet stores equals the folder store's."""
    clip, sig = str(clip_full_dir), str(siglip_dir)
    stores = {}
    for name, roots, extra in (("folder", [str(photos)], {}),
                               ("tar", [f"{shards}/*.tar"], {"workers": 2}),
                               ("parquet", [str(table)], {"key_column": "name"})):
        s = extract(roots, tmp_path / name, [clip, sig], layer=["-2", f"{sig}=-1"], **extra)
        assert s.complete and s.failed == 0, name
        stores[name] = clipfeat.FeatureStore(tmp_path / name)
    folder = stores["folder"]
    assert len(folder.outputs) == 2 and stores["tar"].outputs == folder.outputs
    for output in folder.outputs:
        want = folder.select(output)
        for key in image_keys(photos):
            row = want[key].numpy()
            np.testing.assert_array_equal(stores["tar"].select(output)[stem(key)].numpy(), row)
            np.testing.assert_array_equal(stores["parquet"].select(output)[key].numpy(), row)


def test_a_folder_of_parquet_files_and_a_mix_with_tars(tmp_path, photos, shards, folder_store,
                                                       clip_full_dir):
    """A folder holding parquet files (no images) is read as them, keyed by their path
    below it; tars and parquet files mix in one run, in the order the ROOTs name them."""
    names = image_keys(photos)
    data = tmp_path / "dataset"
    (data / "README.md").parent.mkdir()
    (data / "README.md").write_text("a dataset card\n")
    half = tmp_path / "halves"
    for part, chunk in (("data/train-0", names[:7]), ("data/nested/train-1", names[7:])):
        for n in chunk:
            (half / part / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(photos / n, half / part / n)
        imagegen.parquet_folder(half / part, data / f"{part}.parquet", row_group_size=3)
    out = tmp_path / "out"
    s = extract([str(data)], out, clip_full_dir)
    assert s.complete and s.failed == 0
    rows = read_rows(out)
    expect = ([f"data/nested/train-1/{i}" for i in range(len(names) - 7)]
              + [f"data/train-0/{i}" for i in range(7)])
    assert list(rows) == expect  # sorted by file path, then row order
    np.testing.assert_array_equal(rows["data/nested/train-1/0"], folder_store[names[7]])

    out = tmp_path / "mixed"
    s = extract([f"{shards}/000000.tar", str(data / "data" / "train-0.parquet")], out,
                clip_full_dir, key_column="name")
    first = -(-len(names) // 3)  # the images in the first of the 3 shards
    assert s.complete and s.failed == 0 and s.extracted == first + 7
    rows = read_rows(out)
    assert list(rows)[:first] == [stem(k) for k in names[:first]]
    for name in names[:7]:
        np.testing.assert_array_equal(rows[name], folder_store[name])


def open_paths() -> set[str]:
    """The files this process has open (Linux /proc)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return found


def test_no_tar_or_parquet_file_stays_open_after_a_run(tmp_path, shards, table,
                                                       clip_full_dir):
    """Decoding in-process (workers=0) and verify keep a tar or parquet file open while
    they read it, never after."""
    def left() -> set[str]:
        return {p for p in open_paths() if p.endswith((".tar", ".parquet"))}

    extract([f"{shards}/*.tar", str(table)], tmp_path / "out", clip_full_dir,
            key_column="name")
    assert left() == set()
    res = runner().invoke(app, ["verify", str(tmp_path / "out"), "--model",
                                str(clip_full_dir), "--sample", "30"])
    assert res.exit_code == 0, res.stdout
    assert left() == set()


def test_plans_of_folders_stay_version_1_and_sources_record_files(tmp_path, photos, shards,
                                                                   table, clip_full_dir):
    """A folder run writes the plan and store identity earlier clipfeat wrote (existing
    stores resume); a tar or parquet run records each file's size and mtime, and each
    item's place in it."""
    def header(out: Path) -> dict:
        with open(out / ".clipfeat" / "plan.jsonl") as fh:
            return json.loads(fh.readline())

    extract([str(photos)], tmp_path / "folder", clip_full_dir, limit=2)
    h = header(tmp_path / "folder")
    assert h["version"] == 1 and "files" not in h
    assert set(h["sources"]) == {"roots", "files_from", "llava_json", "image_folder", "exts"}

    extract([f"{shards}/*.tar"], tmp_path / "tar", clip_full_dir, limit=2)
    h = header(tmp_path / "tar")
    tar = shards / "000000.tar"
    assert h["version"] == 2 and h["sources"]["roots"] == [f"{shards}/*.tar"]
    assert h["files"] == [{"path": str(tar), "kind": "tar", "size": tar.stat().st_size,
                           "mtime_ns": tar.stat().st_mtime_ns, "column": None}]
    with tarfile.open(tar) as tf:
        first = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
    line = json.loads((tmp_path / "tar" / ".clipfeat" / "plan.jsonl").read_text()
                      .splitlines()[1])
    assert line == {"i": 0, "c": 0, "k": stem(first.name), "p": f"{tar}::{first.name}",
                    "f": 0, "o": first.offset_data, "n": first.size}

    extract([str(table)], tmp_path / "pq", clip_full_dir, limit=2, key_column="name")
    h = header(tmp_path / "pq")
    assert h["sources"]["key_column"] == "name" and "image_column" not in h["sources"]
    assert h["files"][0]["column"] == "image" and h["files"][0]["kind"] == "parquet"


def test_load_image_takes_bytes_and_open_files_as_the_path(photos):
    for rel in image_keys(photos):
        path = photos / rel
        want = np.asarray(load_image(path))
        np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), want)
        with open(path, "rb") as fh:
            np.testing.assert_array_equal(np.asarray(load_image(fh)), want)
        turned = np.asarray(load_image(path.read_bytes(), exif_transpose=True))
        np.testing.assert_array_equal(turned, np.asarray(load_image(path, exif_transpose=True)))


@pytest.mark.parametrize("whole", [True, False], ids=["read-whole", "read-as-asked"])
def test_a_tar_member_reads_as_its_file(photos, shards, monkeypatch, whole):
    """What a decode worker opens: exactly the member's bytes, seekable, nothing around
    (a member is read whole up to WHOLE_READ_BYTES, a larger one as the decoder asks)."""
    from clipfeat.sources import opened, read_roots, tar

    if not whole:
        monkeypatch.setattr(tar, "WHOLE_READ_BYTES", 0)
    items = read_roots([f"{shards}/*.tar"])
    assert [it.path.split("::")[1] for it in items] == image_keys(photos)
    for it in items:
        want = (photos / it.path.split("::")[1]).read_bytes()
        with opened(it.member) as fh:
            assert fh.read() == want and fh.read() == b""
            fh.seek(3)
            assert fh.read(5) == want[3:8] and fh.tell() == 8
            fh.seek(-4, os.SEEK_END)
            assert fh.read(100) == want[-4:]
            assert not hasattr(fh, "fileno") or _no_fileno(fh)


def _no_fileno(fh: Any) -> bool:
    """A member has no file descriptor of its own (libtiff must not read the tar)."""
    try:
        fh.fileno()
    except OSError:
        return True
    return False


def test_verify_samples_rows_from_the_tars(tmp_path, shards, clip_full_dir):
    out = tmp_path / "out"
    extract([f"{shards}/*.tar"], out, clip_full_dir)
    res = runner().invoke(app, ["verify", str(out), "--model", str(clip_full_dir),
                                "--sample", "4", "--json"])
    report = json.loads(res.stdout)
    assert res.exit_code == 0 and report["ok"] and report["sampled"] == 4, report


# --------------------------------------------------------------------------- changed sources


def test_a_source_file_changed_since_the_plan_is_refused(tmp_path, shards, table,
                                                          clip_full_dir):
    """Offsets and row numbers are planned once: a tar or parquet file changed since (its
    size or mtime) is refused up front, naming it; --overwrite plans again."""
    for kind in ("tar", "parquet"):
        src = tmp_path / kind
        shutil.copytree(shards if kind == "tar" else table.parent, src)
        root = f"{src}/*.tar" if kind == "tar" else str(src / table.name)
        out = tmp_path / f"out-{kind}"
        extract([root], out, clip_full_dir)
        changed = src / ("000001.tar" if kind == "tar" else table.name)
        st = changed.stat()
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()
                  and p.name != "lock"}
        res = runner().invoke(app, cli_args(root, out, clip_full_dir))
        line = assert_one_line_error(res.exit_code, res.stdout, res.stderr, str(changed))
        assert "--overwrite" in line and "modification time changed" in line
        assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()
                and p.name != "lock"} == before
        res = runner().invoke(app, cli_args(root, out, clip_full_dir, "--overwrite"))
        assert res.exit_code == 0, res.stderr


_touched: list[str] = []


def touching_decode(path: Any, *args: Any) -> Any:
    """`decode_file`, after moving the mtime of the tar the first item is read from."""
    from clipfeat.decode import decode_file

    if not _touched:
        _touched.append(path.file.path)
        st = os.stat(path.file.path)
        os.utime(path.file.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    return decode_file(path, *args)


def test_a_tar_changed_during_the_run_fails_its_items(tmp_path, shards, clip_full_dir):
    src = tmp_path / "shards"
    shutil.copytree(shards, src)
    out = tmp_path / "out"
    _touched.clear()
    s = extract([f"{src}/000000.tar"], out, clip_full_dir,
                extra={"decode_fn": "test_datasets:touching_decode"})
    assert s.complete and s.extracted == 0 and s.failed > 0
    errors = {f["error"] for f in read_failures(out)}
    assert errors == {"tar file changed since it was planned (modification time changed)"}
    assert all(f["path"].startswith(f"{src}/000000.tar::") for f in read_failures(out))


def test_a_lost_plan_is_rebuilt_with_the_members(tmp_path, shards, clip_full_dir, caplog):
    """plan.jsonl lost after some shards: rebuilt from the shards and the tars (with each
    member's place), and the run completes as if nothing had happened."""
    import logging

    ref = tmp_path / "ref"
    extract([f"{shards}/*.tar"], ref, clip_full_dir)
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    for name in shard_files(out)[1:]:
        (out / name).unlink()
    (out / ".clipfeat" / "plan.jsonl").unlink()
    with caplog.at_level(logging.WARNING):
        s = extract([f"{shards}/*.tar"], out, clip_full_dir)
    assert s.complete and s.skipped == SHARD_SIZE
    assert any("rebuilt" in r.getMessage() for r in caplog.records)
    assert_same_store(out, ref, "plan rebuilt")


def test_ranks_split_the_chunks_of_a_parquet_run(tmp_path, monkeypatch, table, clip_full_dir):
    """Rank 0 plans and does its chunks, rank 1 its own from the frozen plan (it lists
    nothing), then one process finds nothing left: the store of one process."""
    from test_distributed import _as_rank

    ref = tmp_path / "ref"
    extract([str(table)], ref, clip_full_dir)
    out = tmp_path / "out"
    for rank in (0, 1):
        with monkeypatch.context() as m:
            _as_rank(m, rank)
            res = runner().invoke(app, cli_args(str(table), out, clip_full_dir, "--workers",
                                                "0"))
        assert res.exit_code == 0, res.stderr
    res = runner().invoke(app, cli_args(str(table), out, clip_full_dir))
    assert res.exit_code == 0 and "nothing to do" in res.stderr, res.stderr
    assert_same_store(out, ref, "rank 0, rank 1, one process")


# --------------------------------------------------------------------------- keys, patterns


KEY_NAMES = ["a/b/000123.jpg", "x.y.jpg", "000001.JPG", "a.b/c.d.png", "a/.b.jpg",
             "a.b/.c.jpg", ".jpg", "noext", "dir/", "a//b.jpg", "../../up.jpg", "/abs/p.jpg",
             "sp ace/ü.jpg", "k.seg.left.png", "a/b/c"]


def test_sample_keys_are_webdatasets(tmp_path):
    expected = {  # webdataset's base_plus_ext on these names (webdataset 1.0.2)
        "a/b/000123.jpg": "a/b/000123", "x.y.jpg": "x", "000001.JPG": "000001",
        "a.b/c.d.png": "a.b/c", "a/.b.jpg": "a/", "a.b/.c.jpg": None, ".jpg": None,
        "noext": None, "dir/": None, "a//b.jpg": "a//b", "../../up.jpg": "../../up",
        "/abs/p.jpg": "/abs/p", "sp ace/ü.jpg": "sp ace/ü", "k.seg.left.png": "k",
        "a/b/c": None,
    }
    assert {n: sample_key(n) for n in KEY_NAMES} == expected
    tariterators = pytest.importorskip("webdataset.tariterators")
    assert {n: tariterators.base_plus_ext(n)[0] for n in KEY_NAMES} == expected


PATTERNS = ["s/{000000..000003}.tar", "{07..10}", "{0..10}", "{4..1}", "{a..g..2}", "{e..a}",
            "python{2.{5..7},3.{2,3}}", "index.html{,.backup}", r"{1\{2,3}", "{abc}", "x{a}y",
            "{0..10..3}", "{a,b}{1..2}", "plain.tar", "{-2..2}", "{-05..5..5}", "{008..010}"]


def test_brace_patterns_expand_as_braceexpand_does():
    expected = {
        "s/{000000..000003}.tar": [f"s/{i:06d}.tar" for i in range(4)],
        "{07..10}": ["07", "08", "09", "10"], "{0..10}": [str(i) for i in range(11)],
        "{4..1}": ["4", "3", "2", "1"], "{a..g..2}": ["a", "c", "e", "g"],
        "{e..a}": ["e", "d", "c", "b", "a"],
        "python{2.{5..7},3.{2,3}}": ["python2.5", "python2.6", "python2.7", "python3.2",
                                     "python3.3"],
        "index.html{,.backup}": ["index.html", "index.html.backup"], r"{1\{2,3}": ["1{2", "3"],
        "{abc}": ["{abc}"], "x{a}y": ["x{a}y"], "{0..10..3}": ["0", "3", "6", "9"],
        "{a,b}{1..2}": ["a1", "a2", "b1", "b2"], "plain.tar": ["plain.tar"],
        "{-2..2}": ["-2", "-1", "0", "1", "2"], "{-05..5..5}": ["-05", "000", "005"],
        "{008..010}": ["008", "009", "010"],
    }
    assert {p: expand_braces(p) for p in PATTERNS} == expected
    braceexpand = pytest.importorskip("braceexpand")
    assert {p: list(braceexpand.braceexpand(p)) for p in PATTERNS} == expected


# --------------------------------------------------------------------------- resume, torchrun


def _inputs(kind: str, tmp: Path, n: int) -> tuple[str, tuple[str, ...]]:
    """(ROOT, extra flags) of ``n`` images as tar shards or a parquet file."""
    tree = tmp / "tree"
    make_tree(tree, n, broken=(11,))
    if kind == "tar":
        imagegen.tar_folder(tree, tmp / "shards", 5)
        return f"{tmp}/shards/{{000000..000004}}.tar", ()
    imagegen.parquet_folder(tree, tmp / "data" / "train.parquet", row_group_size=7)
    return str(tmp / "data"), ("--key-column", "name")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_killed_then_rerun_equals_an_uninterrupted_run(tmp_path, clip_full_dir, kind):
    root, flags = _inputs(kind, tmp_path, 60)
    ref = tmp_path / "ref"
    s = extract_in_process(root, ref, clip_full_dir,
                           key_column="name" if flags else None)
    assert s.complete and s.failed == 1  # the empty file
    out = tmp_path / "out"
    cli = cli_args(root, out, clip_full_dir, "--workers", "1", *flags)
    p = Proc(clipfeat_module_cmd(*cli), tmp_path / "logs", "killed")
    try:
        assert wait_until(lambda: len(shard_files(out)) >= 3, p), f"finished:\n{p.stderr}"
        p.kill_all()
        assert_no_orphans(p.marker, out=out)
    finally:
        p.cleanup()
    assert_shards_sound(out, "after the kill")
    kept = shard_states(out)
    assert 3 <= len(kept) < 15
    res = runner().invoke(app, cli)
    assert res.exit_code == 0, res.stderr
    assert "resuming:" in res.stderr
    assert {n: st for n, st in shard_states(out).items() if n in kept} == kept
    assert_same_store(out, ref, f"{kind}: killed, then rerun")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_torchrun_two_ranks_equals_one_process(tmp_path, clip_full_dir, kind):
    root, flags = _inputs(kind, tmp_path, 30)
    ref = tmp_path / "ref"
    extract_in_process(root, ref, clip_full_dir, key_column="name" if flags else None)
    out = tmp_path / "out"
    cmd = torchrun(2, "-m", "clipfeat",
                   *cli_args(root, out, clip_full_dir, "--workers", "1", *flags))
    p = Proc(cmd, tmp_path / "logs", "torchrun")
    try:
        assert p.wait() == 0, p.stderr
        assert_no_orphans(p.marker)
    finally:
        p.cleanup()
    ids = sorted(int(n[6:12]) for n in shard_files(out))
    assert ids == list(range(-(-30 // SHARD_SIZE)))
    assert_same_store(out, ref, f"{kind}: torchrun with two ranks")
