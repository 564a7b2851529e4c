"""Hostile tar and parquet inputs: a bad item is a recorded failure, a damaged or wrong file
a warning or one usage line (exit 2, nothing written), never a traceback, a hang, or a
path made from a name inside a file."""

from __future__ import annotations

import gzip
import io
import logging
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

import imagegen
import numpy as np
import pytest
from PIL import Image
from stores import read_failures, read_rows
from test_cli_errors import assert_one_line_error
from test_datasets import extract, runner
from test_resume import cli_args

from clipfeat.cli import app

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def jpeg(seed: int, size: tuple[int, int] = (36, 28)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(imagegen.photo_array(*size, seed=seed)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(imagegen.photo_array(30, 33, seed=seed)).save(buf, "PNG")
    return buf.getvalue()


def special(kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo("x")
    info.type, info.linkname = kind, linkname
    return info


def files_under(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*")}


def failures_by_path(out: Path) -> dict[str, str]:
    return {f["path"].split("::", 1)[1]: f["error"] for f in read_failures(out)}


# --------------------------------------------------------------------------- tar members


def test_hostile_tar_members(tmp_path, monkeypatch, clip_full_dir):
    """Names with '..' or '/' are keys, never paths; links, devices, FIFOs, sparse files
    and names without a key are recorded (webdataset does not yield them); folders,
    non-images and webdataset metadata are skipped; garbage is a decode failure."""
    sparse = special(tarfile.GNUTYPE_SPARSE)
    sparse.sparse = [(0, 4)]
    members: list[tuple[str, Any]] = [
        ("ok.jpg", jpeg(1)), ("../evil.jpg", jpeg(1)), ("/abs/evil.jpg", jpeg(1)),
        ("../../../tmp/escape.png", png(2)),
        ("link.jpg", special(tarfile.SYMTYPE, "ok.jpg")),
        ("hard.jpg", special(tarfile.LNKTYPE, "ok.jpg")),
        ("dev.jpg", special(tarfile.CHRTYPE)), ("fifo.jpg", special(tarfile.FIFOTYPE)),
        ("dir.jpg", special(tarfile.DIRTYPE)), ("notes.txt", b"hello"), ("ok.json", b"{}"),
        ("ok.cls", b"3"), ("__meta__", b"x"), ("__index__/thumb.jpg", jpeg(3)),
        ("garbage.jpg", b"<html>not an image</html>"), ("dup.jpg", jpeg(4)),
        ("dup.png", png(5)), (".jpg", jpeg(6)), ("sub/ok2.png", png(7)),
    ]
    tar = imagegen.make_tar(tmp_path / "data" / "hostile.tar", members)
    # the same tar again, with a GNU sparse member named like an image
    gnu = tmp_path / "data" / "sparse.tar"
    with tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("sparse.jpg")
        info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
        tf.addfile(info)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = files_under(tmp_path)
    out = tmp_path / "out"
    s = extract([str(tar), str(gnu)], out, clip_full_dir, workers=2)
    assert s.complete
    rows = read_rows(out)
    assert sorted(rows) == ["../../../tmp/escape", "../evil", "/abs/evil", "dup", "ok",
                            "sub/ok2"]
    np.testing.assert_array_equal(rows["../evil"], rows["ok"])
    np.testing.assert_array_equal(rows["/abs/evil"], rows["ok"])
    skips = "webdataset skips it too"
    assert failures_by_path(out) == {
        "link.jpg": f"not a regular tar member (symlink): not read ({skips})",
        "hard.jpg": f"not a regular tar member (hard link): not read ({skips})",
        "dev.jpg": f"not a regular tar member (device): not read ({skips})",
        "fifo.jpg": f"not a regular tar member (fifo): not read ({skips})",
        "garbage.jpg": "cannot identify image file",
        "dup.png": f"duplicate key: also found at {tar}::dup.jpg",
        ".jpg": "no webdataset key: the member's name has nothing before its first dot "
                "(webdataset skips it)",
        "sparse.jpg": f"sparse tar member: not read ({skips})",
    }
    # nothing was made from a member name: not in the tar's folder, OUT, cwd or /abs
    assert {f for f in files_under(tmp_path) if f.split("/")[0] != "out"} == before
    assert not any(cwd.iterdir()) and not Path("/abs/evil.jpg").exists()
    assert not (tmp_path / "evil.jpg").exists() and not Path("/tmp/escape.png").exists()
    # the row of a member equals that of the same file in a folder
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "ok.jpg").write_bytes(jpeg(1))
    extract([str(tmp_path / "folder")], tmp_path / "ref", clip_full_dir)
    np.testing.assert_array_equal(read_rows(tmp_path / "ref")["ok.jpg"], rows["ok"])


def _tar_of_five(path: Path) -> tuple[Path, list[tarfile.TarInfo]]:
    tar = imagegen.make_tar(path, [(f"img{i}.jpg", jpeg(i, (60, 50))) for i in range(5)])
    with tarfile.open(tar) as tf:
        return tar, tf.getmembers()


@pytest.mark.parametrize("cut", ["in-data", "in-header", "garbage-header", "no-end-block"])
def test_a_damaged_tar_keeps_the_members_before_the_damage(tmp_path, clip_full_dir, caplog,
                                                           cut):
    tar, infos = _tar_of_five(tmp_path / "t.tar")
    data = bytearray(tar.read_bytes())
    third = infos[3]
    if cut == "in-data":
        data = data[: third.offset_data + third.size // 2]
    elif cut == "in-header":
        data = data[: third.offset + 100]
    elif cut == "garbage-header":
        data[third.offset:third.offset + 512] = os.urandom(512)
    else:  # cut where the archive's end blocks begin
        data = data[: infos[4].offset_data + -(-infos[4].size // 512) * 512]
    tar.write_bytes(bytes(data))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="clipfeat.sources"):
        s = extract([str(tar)], out, clip_full_dir)
    assert s.complete
    kept = 5 if cut == "no-end-block" else 3
    assert sorted(read_rows(out)) == [f"img{i}" for i in range(kept)]
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("clipfeat.sources")]
    assert len(warned) == 1 and str(tar) in warned[0] and "at byte" in warned[0], warned
    if cut == "in-data":
        assert failures_by_path(out) == {"img3.jpg": (
            f"truncated tar member: the tar file ends {third.size // 2:,} bytes into its "
            f"{third.size:,} bytes")}
    else:
        assert read_failures(out) == []


# --------------------------------------------------------------------------- parquet rows


def test_hostile_parquet_rows(tmp_path, clip_full_dir):
    """Null images (a null struct, or a datasets Image with only a path), garbage bytes,
    a null or duplicate key: recorded failures; the good rows equal the folder's."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    good = jpeg(1)
    rows = [{"bytes": good, "path": None}, None, {"bytes": None, "path": "elsewhere.jpg"},
            {"bytes": b"garbage", "path": None}, {"bytes": good[: len(good) // 3], "path": None},
            {"bytes": png(2), "path": None}, {"bytes": png(3), "path": None}]
    names = ["good", "null", "path-only", "garbage", "truncated", None, "good"]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image": pa.array(rows, type=image), "name": names}), path,
                   row_group_size=3)
    out = tmp_path / "out"
    s = extract([str(path)], out, clip_full_dir, key_column="name", workers=2)
    assert s.complete and s.extracted == 1
    fails = {f["key"]: f["error"] for f in read_failures(out)}
    assert fails.pop("null") == "null image: the row holds no image bytes"
    assert fails.pop("path-only") == ("null image: the row holds no image bytes (the datasets "
                                      "Image names a file instead: 'elsewhere.jpg')")
    assert fails.pop("garbage") == "cannot identify image file"
    assert fails.pop("truncated").startswith(("truncated image", "OSError"))
    assert fails.pop("rows/5") == "null key in --key-column 'name'"
    assert fails == {"good": f"duplicate key: also found at {path}::0"}
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "good.jpg").write_bytes(good)
    extract([str(tmp_path / "folder")], tmp_path / "ref", clip_full_dir)
    np.testing.assert_array_equal(read_rows(out)["good"], read_rows(tmp_path / "ref")["good.jpg"])


# --------------------------------------------------------------------------- usage errors


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    """Files that are usage errors as ROOTs (or with the flags of each case)."""
    d = tmp_path_factory.mktemp("bad-datasets")
    img = d / "images"
    imagegen.make_image(img / "a.png", "RGB", (20, 20))
    good = d / "good.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": jpeg(1), "path": None}]),
                             "n": [1], "name": ["a"]}), good)
    data = good.read_bytes()
    (d / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (d / "text.parquet").write_text("not parquet at all\n")
    pq.write_table(pa.table({"a": pa.array([b"x"]), "b": pa.array([b"y"], pa.large_binary())}),
                   d / "two-binary.parquet")
    pq.write_table(pa.table({"n": [1], "s": ["x"]}), d / "no-image.parquet")
    tar, _ = _tar_of_five(d / "shards" / "000000.tar")
    (d / "shards" / "000000.json").write_text("{}")
    (d / "shards.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
    (d / "gzipped.tar").write_bytes(gzip.compress(tar.read_bytes()))
    (d / "empty.tar").write_bytes(b"")
    (d / "cut.tar").write_bytes(tar.read_bytes()[:100])
    imagegen.make_tar(d / "only-json.tar", [("0.json", b"{}"), ("0.txt", b"x")])
    (d / "data.zip").write_bytes(b"PK\x03\x04")
    os.mkfifo(d / "pipe.tar")
    return {"dir": d, "img": img, "good": good, "tar": tar}


# (case id, ROOTs and flags with {placeholders}, a string the one line must contain)
USAGE = [
    ("truncated-parquet", ["{dir}/truncated.parquet"], "truncated.parquet cannot be read as "
     "parquet"),
    ("not-parquet", ["{dir}/text.parquet"], "damaged, truncated or not a parquet file"),
    ("image-column-missing", ["{good}", "--image-column", "img"], "'img' is not a column of"),
    ("image-column-listed", ["{good}", "--image-column", "img"], "name (string)"),
    ("image-column-wrong-type", ["{good}", "--image-column", "n"], "'n' of"),
    ("image-column-int", ["{good}", "--image-column", "n"], "is of type int64"),
    ("key-column-missing", ["{good}", "--key-column", "id"], "--key-column 'id' is not a column"),
    ("key-column-struct", ["{good}", "--key-column", "image"], "is of type struct"),
    ("ambiguous-image-column", ["{dir}/two-binary.parquet"], "2 binary columns (a, b)"),
    ("no-image-column", ["{dir}/no-image.parquet"], "no column of encoded images"),
    ("image-column-for-tars", ["{tar}", "--image-column", "image"], "is for parquet files"),
    ("key-column-for-folders", ["{img}", "--key-column", "id"], "is for parquet files"),
    ("folder-and-tar", ["{img}", "{tar}"], "cannot be mixed"),
    ("glob-matches-nothing", ["{dir}/none-*.tar"], "matches no file"),
    ("brace-names-missing", ["{dir}/shards/{{000000..000001}}.tar"], "000001.tar, which does "
     "not exist"),
    ("unbalanced-braces", ["{dir}/shards/{{000000..000001.tar"], "unbalanced braces"),
    ("glob-matches-json", ["{dir}/shards/*"], "000000.json, which is neither"),
    ("zip-root", ["{dir}/data.zip"], "is a file, not"),
    ("compressed-suffix", ["{dir}/shards.tar.gz"], "is a compressed tar"),
    ("gzip-inside", ["{dir}/gzipped.tar"], "gzip-compressed"),
    ("empty-tar", ["{dir}/empty.tar"], "is not a tar file"),
    ("cut-in-first-header", ["{dir}/cut.tar"], "cut.tar is not a tar file"),
    ("fifo-tar", ["{dir}/pipe.tar"], "not a regular file"),
    ("no-image-members", ["{dir}/only-json.tar"], "hold no member with a taken extension"),
]


@pytest.mark.parametrize("template,needle", [c[1:] for c in USAGE], ids=[c[0] for c in USAGE])
def test_usage_errors_are_one_line(bad, tmp_path, clip_full_dir, template, needle):
    args = [a.format(**bad) for a in template]
    out = tmp_path / "out"
    res = runner().invoke(app, cli_args(args[0], out, clip_full_dir) + args[1:])
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, needle)
    assert not out.exists()


def test_without_pyarrow_a_parquet_root_names_the_extra(bad, tmp_path, monkeypatch,
                                                        clip_full_dir):
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` fails
    out = tmp_path / "out"
    res = runner().invoke(app, cli_args(str(bad["good"]), out, clip_full_dir))
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, "pip install 'clipfeat[parquet]'")
    assert not out.exists()
    res = runner().invoke(app, cli_args(str(bad["tar"]), out, clip_full_dir, "--quiet"))
    assert res.exit_code == 0, res.stderr  # tars need no pyarrow


def test_a_row_group_too_large_for_a_worker_is_refused(bad, tmp_path, monkeypatch,
                                                       clip_full_dir):
    from clipfeat.sources import parquet

    monkeypatch.setattr(parquet, "MAX_ROW_GROUP_BYTES", 100)
    out = tmp_path / "out"
    res = runner().invoke(app, cli_args(str(bad["good"]), out, clip_full_dir))
    line = assert_one_line_error(res.exit_code, res.stdout, res.stderr, "row group 0 holds")
    assert "row_group_size=" in line and str(bad["good"]) in line
