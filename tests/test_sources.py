"""Input sources: folder walks, file lists, LLaVA JSON. Trees are built in tmp_path."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from clipfeat.errors import ConfigError
from clipfeat.sources import (
    DEFAULT_EXTS,
    Item,
    count_by_error,
    parse_exts,
    read_files_from,
    read_llava_json,
    walk_folders,
)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def keys(items: list[Item]) -> list[str]:
    return [it.key for it in items]


def errors(items: list[Item]) -> dict[str, str | None]:
    return {it.key: it.error for it in items}


def run_with_timeout(fn, *args, timeout: float = 20.0, **kwargs):
    """Run fn in a daemon thread; fail (instead of hanging) if it blocks, e.g. on a FIFO."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # pragma: no cover - re-raised below
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn.__name__} blocked (did it open a FIFO?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- parse_exts ------------------------------------------------------------------------


def test_parse_exts_default_and_normalised():
    assert parse_exts(None) == DEFAULT_EXTS
    assert parse_exts("JPG, .png,webp,jpg") == ("jpg", "png", "webp")
    assert parse_exts(".TIFF") == ("tiff",)


@pytest.mark.parametrize("value", ["", " ", ",", " , ,", ".", "a/b", "j pg"])
def test_parse_exts_rejects_empty_or_bad(value):
    with pytest.raises(ConfigError) as exc:
        parse_exts(value)
    assert "ext" in str(exc.value)


# -- walk_folders: basic tree ----------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    touch(root / "a.jpg")
    touch(root / "B.JPG")
    touch(root / "c.Png")
    touch(root / "d.JpEg")
    touch(root / "sub" / "deep" / "e.webp")
    touch(root / "sub" / "f.gif")
    touch(root / "sub" / "notes.txt")
    touch(root / "jpg")  # no dot: not an image name
    touch(root / "x.jpg.txt")
    touch(root / ".hidden.jpg")
    touch(root / ".git" / "inside.jpg")
    touch(root / "sub" / ".cache" / "thumb.png")
    (root / "folder.jpg").mkdir()
    touch(root / "folder.jpg" / "inner.png")
    touch(root / "with space é.png")
    touch(root / "日本" / "画像.bmp")
    return root


def test_walk_tree_keys_exact(tree: Path):
    items = walk_folders([tree])
    expected = sorted([
        "B.JPG", "a.jpg", "c.Png", "d.JpEg",
        "folder.jpg/inner.png",
        "sub/deep/e.webp", "sub/f.gif",
        "with space é.png", "日本/画像.bmp",
    ])
    assert keys(items) == expected
    assert all(it.error is None for it in items)
    for it in items:
        assert os.path.isabs(it.path)
        assert Path(it.path) == (tree / it.key).absolute()
        assert Path(it.path).read_bytes() == b"x"


def test_walk_keys_are_relative_posix_and_sorted(tree: Path, monkeypatch):
    monkeypatch.chdir(tree.parent)
    items = walk_folders(["root"])  # relative ROOT
    ks = keys(items)
    assert ks == sorted(ks)
    assert all(not k.startswith("/") and ".." not in k.split("/") and "\\" not in k for k in ks)
    assert all(os.path.isabs(it.path) and os.path.isfile(it.path) for it in items)


def test_walk_custom_exts(tree: Path):
    assert keys(walk_folders([tree], parse_exts("txt"))) == ["sub/notes.txt", "x.jpg.txt"]
    assert keys(walk_folders([tree], ["PNG"])) == [
        "c.Png", "folder.jpg/inner.png", "with space é.png"]


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_walk_root_must_be_directory(tmp_path: Path, kind: str):
    root = tmp_path / "nope"
    if kind == "file":
        touch(root)
    with pytest.raises(ConfigError) as exc:
        walk_folders([root])
    assert str(root) in str(exc.value)
    assert ("does not exist" if kind == "missing" else "not a directory") in str(exc.value)


def test_walk_no_roots_is_config_error():
    with pytest.raises(ConfigError):
        walk_folders([])


# -- walk_folders: symlinks ------------------------------------------------------------


def test_symlink_to_file_followed_with_link_key(tmp_path: Path):
    root = tmp_path / "root"
    real = touch(tmp_path / "elsewhere" / "real.png", b"png")
    touch(root / "a.jpg")
    root.joinpath("link.jpg").symlink_to(real)
    root.joinpath("link-no-ext").symlink_to(real)  # name decides, not the target
    items = walk_folders([root])
    assert keys(items) == ["a.jpg", "link.jpg"]
    assert items[1].error is None
    assert Path(items[1].path).read_bytes() == b"png"


def test_symlink_cycle_terminates(tmp_path: Path):
    root = tmp_path / "root"
    touch(root / "sub" / "a.jpg")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "self").symlink_to(".", target_is_directory=True)
    items = run_with_timeout(walk_folders, [root])
    assert keys(items) == ["sub/a.jpg"]


def test_symlinked_dir_visited_once_real_path_preferred(tmp_path: Path):
    root = tmp_path / "root"
    touch(root / "zreal" / "a.jpg")
    (root / "alias").symlink_to(root / "zreal", target_is_directory=True)
    (root / "sub").mkdir()
    (root / "sub" / "alias2").symlink_to(root / "zreal", target_is_directory=True)
    assert keys(walk_folders([root])) == ["zreal/a.jpg"]


def test_symlink_to_outside_dir_walked_once(tmp_path: Path):
    root = tmp_path / "root"
    touch(tmp_path / "ext" / "b.png")
    touch(tmp_path / "ext" / "inner" / "c.png")
    root.mkdir()
    (root / "x").symlink_to(tmp_path / "ext", target_is_directory=True)
    (root / "y").symlink_to(tmp_path / "ext", target_is_directory=True)
    (root / "z").symlink_to(tmp_path / "ext" / "inner", target_is_directory=True)
    # first in key order wins; 'z' points inside an already walked tree
    assert keys(walk_folders([root])) == ["x/b.png", "x/inner/c.png"]


def test_symlink_dir_named_like_image_is_a_directory(tmp_path: Path):
    root = tmp_path / "root"
    touch(tmp_path / "d" / "p.png")
    root.mkdir()
    (root / "dir.jpg").symlink_to(tmp_path / "d", target_is_directory=True)
    assert keys(walk_folders([root])) == ["dir.jpg/p.png"]


def test_dangling_and_looping_symlinks_recorded(tmp_path: Path):
    root = tmp_path / "root"
    touch(root / "ok.jpg")
    (root / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "gone-dir").symlink_to(tmp_path / "missing")  # not an image name: ignored
    (root / "loop.png").symlink_to(root / "loop.png")
    assert errors(walk_folders([root])) == {
        "gone.jpg": "dangling symlink",
        "loop.png": "symlink loop",
        "ok.jpg": None,
    }


# -- walk_folders: special files never opened -----------------------------------------


def test_special_files_recorded_never_opened(tmp_path: Path, monkeypatch):
    root = tmp_path / "root"
    touch(root / "ok.jpg")
    os.mkfifo(root / "fifo.jpg")
    os.mkfifo(root / "fifo-no-ext")
    (root / "fifolink.png").symlink_to(root / "fifo.jpg")
    (root / "null.jpg").symlink_to(os.devnull)
    monkeypatch.chdir(root)  # AF_UNIX paths are limited to ~108 bytes: bind relative
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("sock.png")
        items = run_with_timeout(walk_folders, [root], timeout=20)
    finally:
        sock.close()
    assert errors(items) == {
        "fifo.jpg": "not a regular file (fifo)",
        "fifolink.png": "not a regular file (fifo)",
        "null.jpg": "not a regular file (device)",
        "ok.jpg": None,
        "sock.png": "not a regular file (socket)",
    }


def test_unreadable_file_recorded(tmp_path: Path, monkeypatch):
    # Tests run as root, where every file is readable: simulate the access check.
    root = tmp_path / "root"
    touch(root / "ok.jpg")
    touch(root / "secret.jpg")
    real_access = os.access

    def fake_access(path, mode, **kw):
        return False if str(path).endswith("secret.jpg") else real_access(path, mode, **kw)

    monkeypatch.setattr(os, "access", fake_access)
    assert errors(walk_folders([root])) == {"ok.jpg": None, "secret.jpg": "permission denied"}


def test_unlistable_subdirectory_recorded(tmp_path: Path, monkeypatch):
    root = tmp_path / "root"
    touch(root / "ok.jpg")
    touch(root / "locked" / "a.jpg")
    real_scandir = os.scandir

    def fake_scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    assert errors(walk_folders([root])) == {
        "locked": "cannot list directory: Permission denied",
        "ok.jpg": None,
    }


# -- walk_folders: names ---------------------------------------------------------------


def test_invalid_utf8_name_gives_utf8_key_and_openable_path(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "sub").mkdir()
    fd = os.open(os.fsencode(root) + b"/sub/bad\xff\xfename.jpg", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"raw")
    os.close(fd)
    touch(root / "good.jpg")
    items = walk_folders([root])
    assert keys(items) == ["good.jpg", "sub/bad\\xff\\xfename.jpg"]
    bad = items[1]
    bad.key.encode("utf-8")  # strict: would raise on surrogates
    assert bad.error is None
    with open(bad.path, "rb") as fh:
        assert fh.read() == b"raw"
    assert os.fsencode(bad.path).endswith(b"/sub/bad\xff\xfename.jpg")


def test_sorted_by_python_str_order(tmp_path: Path):
    root = tmp_path / "root"
    names = ["b.jpg", "B.jpg", "a/z.jpg", "a-b.jpg", "a.jpg", "é.jpg", "Z.jpg", "10.jpg", "9.jpg"]
    for n in names:
        touch(root / n)
    # Python str order on the whole key, not per path component: "a-b" < "a." < "a/"
    assert keys(walk_folders([root])) == [
        "10.jpg", "9.jpg", "B.jpg", "Z.jpg", "a-b.jpg", "a.jpg", "a/z.jpg", "b.jpg", "é.jpg"]


# -- walk_folders: several roots, exclude ----------------------------------------------


def test_multiple_roots_duplicates_recorded(tmp_path: Path):
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    touch(r1 / "b.jpg")
    touch(r1 / "a.jpg")
    touch(r2 / "a.jpg", b"second")
    touch(r2 / "c.jpg")
    items = walk_folders([r1, r2])
    assert [(it.key, it.error) for it in items] == [
        ("a.jpg", None),
        ("b.jpg", None),
        ("a.jpg", f"duplicate key: also found under {r1}"),
        ("c.jpg", None),
    ]
    assert Path(items[2].path).read_bytes() == b"second"  # nothing lost: path kept
    assert count_by_error(items) == {"duplicate key": 1}


def test_exclude_output_dir_under_root(tmp_path: Path):
    root = tmp_path / "root"
    touch(root / "a.jpg")
    touch(root / "out" / "preview.jpg")
    touch(root / "keep" / "b.jpg")
    (root / "out-link").symlink_to(root / "out", target_is_directory=True)
    items = walk_folders([root], exclude=[root / "out", tmp_path / "does-not-exist"])
    assert keys(items) == ["a.jpg", "keep/b.jpg"]


# -- read_files_from -------------------------------------------------------------------


def test_files_from_relative_absolute_outside(tmp_path: Path):
    root = tmp_path / "root"
    touch(root / "a.jpg")
    touch(root / "sub" / "b.png")
    touch(root / "sub" / "c.png")
    touch(root / "any.txt")  # extension not filtered: the list is explicit
    touch(tmp_path / "outside.jpg")
    lst = tmp_path / "list.txt"
    lines = [
        "# a comment",
        "sub/b.png",
        "",
        "   ",
        "./a.jpg",
        str(root / "sub" / "c.png"),      # absolute inside ROOT
        str(tmp_path / "outside.jpg"),     # absolute elsewhere
        "../outside.jpg",                  # escapes ROOT
        "sub/../../outside.jpg",           # escapes via normalisation
        "sub//./b.png",                    # duplicate of the first after normalisation
        "a.jpg",                           # duplicate
        "missing.jpg",
        "any.txt",
        "sub",
    ]
    lst.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    items = read_files_from(lst, [root])
    assert [(it.key, it.error) for it in items] == [
        ("sub/b.png", None),
        ("a.jpg", None),
        ("sub/c.png", None),
        (str(tmp_path / "outside.jpg"), "outside ROOT"),
        ("../outside.jpg", "outside ROOT"),
        ("sub/../../outside.jpg", "outside ROOT"),
        ("missing.jpg", "file not found"),
        ("any.txt", None),
        ("sub", "not a regular file (directory)"),
    ]
    assert Path(items[0].path).read_bytes() == b"x"
    assert Path(items[2].path) == root / "sub" / "c.png"


def test_files_from_default_root_is_cwd(tmp_path: Path, monkeypatch):
    touch(tmp_path / "x" / "a.jpg")
    lst = touch(tmp_path / "l.txt", b"x/a.jpg\n")
    monkeypatch.chdir(tmp_path)
    items = read_files_from(lst, None)
    assert items == [Item("x/a.jpg", str(tmp_path / "x" / "a.jpg"), None)]


def test_files_from_absolute_through_symlinked_root(tmp_path: Path):
    real = tmp_path / "real"
    touch(real / "a.jpg")
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    lst = touch(tmp_path / "l.txt", f"{real / 'a.jpg'}\n".encode())
    assert [(it.key, it.error) for it in read_files_from(lst, [tmp_path / "alias"])] == [
        ("a.jpg", None)]


def test_files_from_special_files_and_bytes(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "f.jpg")
    (root / "dev.jpg").symlink_to(os.devnull)
    (root / "gone.jpg").symlink_to(root / "nothing")
    fd = os.open(os.fsencode(root) + b"/b\xff.jpg", os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    lst = tmp_path / "l.txt"
    lst.write_bytes(b"\xef\xbb\xbff.jpg\ndev.jpg\ngone.jpg\nb\xff.jpg\n")  # BOM, raw byte
    items = run_with_timeout(read_files_from, lst, [root])
    assert [(it.key, it.error) for it in items] == [
        ("f.jpg", "not a regular file (fifo)"),
        ("dev.jpg", "not a regular file (device)"),
        ("gone.jpg", "dangling symlink"),
        ("b\\xff.jpg", None),
    ]
    assert os.path.isfile(items[3].path)


def test_files_from_config_errors(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ConfigError, match="does not exist"):
        read_files_from(tmp_path / "nolist.txt", [root])
    lst = touch(tmp_path / "l.txt", b"a.jpg\n")
    with pytest.raises(ConfigError, match="at most one ROOT"):
        read_files_from(lst, [root, root])
    with pytest.raises(ConfigError, match="nowhere"):
        read_files_from(lst, [tmp_path / "nowhere"])


# -- read_llava_json -------------------------------------------------------------------


@pytest.fixture
def llava_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    for rel in ["coco/1.jpg", "coco/2.jpg", "gqa/3.jpg", "ocr/4.png", "a/../5.jpg"]:
        touch(folder / os.path.normpath(rel))
    (folder / "a").mkdir()  # the kernel resolves "a/.." only if "a" exists
    touch(tmp_path / "secret.jpg")
    return folder


SAMPLES = [
    {"id": "0", "image": "coco/2.jpg", "conversations": []},
    {"id": "1", "conversations": []},  # text-only
    {"id": "2", "image": None},        # text-only
    {"id": "3", "image": ["gqa/3.jpg", "coco/1.jpg", "coco/2.jpg"]},
    {"id": "4", "image": "coco/2.jpg"},  # repeated
    {"id": "5", "image": "./coco/1.jpg"},  # written differently: a different key
    {"id": "6", "image": "missing/9.jpg"},
    {"id": "7", "image": "/etc/passwd"},
    {"id": "8", "image": "../secret.jpg"},
    {"id": "9", "image": "a/../5.jpg"},
    {"id": "10", "image": []},
]

EXPECTED = [
    ("coco/2.jpg", None),
    ("gqa/3.jpg", None),
    ("coco/1.jpg", None),
    ("./coco/1.jpg", None),
    ("missing/9.jpg", "file not found"),
    ("/etc/passwd", "outside --image-folder"),
    ("../secret.jpg", "outside --image-folder"),
    ("a/../5.jpg", None),
]


@pytest.mark.parametrize("fmt", ["json", "json-indent", "jsonl"])
def test_llava_keys_order_and_errors(tmp_path: Path, llava_folder: Path, fmt: str):
    f = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        f.write_text("\n".join(json.dumps(s) for s in SAMPLES) + "\n\n", encoding="utf-8")
    else:
        f.write_text(json.dumps(SAMPLES, indent=2 if fmt == "json-indent" else None),
                     encoding="utf-8")
    items = read_llava_json(f, llava_folder)
    assert [(it.key, it.error) for it in items] == EXPECTED
    for it in items:
        if it.error is None:
            assert it.path == os.path.join(str(llava_folder.absolute()), it.key)
            assert Path(it.path).read_bytes() == b"x"
    assert count_by_error(items) == {"file not found": 1, "outside --image-folder": 2}


def test_llava_content_detection_ignores_suffix(tmp_path: Path, llava_folder: Path):
    f = tmp_path / "data.json"  # JSON Lines content under a .json name
    f.write_text('{"image": "ocr/4.png"}\n{"image": "gqa/3.jpg"}\n', encoding="utf-8")
    assert keys(read_llava_json(f, llava_folder)) == ["ocr/4.png", "gqa/3.jpg"]


def test_llava_unicode_and_surrogate_keys(tmp_path: Path, llava_folder: Path):
    touch(llava_folder / "ünï" / "x.jpg")
    f = tmp_path / "d.json"
    f.write_text('[{"image": "ünï/x.jpg"}, {"image": "bad\\ud800.jpg"}, {"image": ""}]',
                 encoding="utf-8")
    items = read_llava_json(f, llava_folder)
    assert [(it.key, it.error) for it in items] == [
        ("ünï/x.jpg", None),
        ("bad\\ud800.jpg", "invalid path (not valid Unicode)"),
        ("", "empty image path"),
    ]
    for it in items:
        it.key.encode("utf-8")


@pytest.mark.parametrize(
    "content, match",
    [
        ('[{"image": "a.jpg"},\n {"image": "b.jpg",}]', r"line 2 column \d+"),
        ('{"image": "a.jpg"}\n{"image": "b.jpg"\n', r"line 2 column \d+"),
        ('{\n  "image": "a.jpg"\n}\n', "single JSON object"),
        ("", "empty"),
        ("image: a.jpg", "expected a JSON list"),
        ('[{"image": "a.jpg"}, "oops"]', "sample 1 is a JSON str"),
        ('[{"image": 3}]', "sample 0 has 'image' of type int"),
        ('[{"image": ["a.jpg", null]}]', "sample 0 has 'image' of type list"),
        ('{"image": "a.jpg"}\n[1]\n', r"sample 1 \(line 2\)"),
    ],
)
def test_llava_malformed_is_config_error(tmp_path: Path, llava_folder: Path, content, match):
    f = tmp_path / "bad.json"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=match) as exc:
        read_llava_json(f, llava_folder)
    assert str(f) in str(exc.value)


def test_llava_missing_file_or_folder(tmp_path: Path, llava_folder: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_llava_json(tmp_path / "none.json", llava_folder)
    f = touch(tmp_path / "d.json", b'[{"image": "coco/1.jpg"}]')
    with pytest.raises(ConfigError, match="--image-folder"):
        read_llava_json(f, tmp_path / "no-folder")


def test_llava_special_file_not_opened(tmp_path: Path, llava_folder: Path):
    os.mkfifo(llava_folder / "pipe.jpg")
    f = touch(tmp_path / "d.json", b'[{"image": "pipe.jpg"}]')
    items = run_with_timeout(read_llava_json, f, llava_folder)
    assert [(it.key, it.error) for it in items] == [("pipe.jpg", "not a regular file (fifo)")]


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, clipfeat.sources; "
            "print(any(m in sys.modules for m in ('torch', 'PIL', 'h5py', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- links out


def _tree_with_outside_links(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import Image

    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    (outside / "more").mkdir(parents=True)
    for p in (root / "a.png", root / "sub" / "b.png", outside / "secret.png",
              outside / "more" / "c.png"):
        Image.new("RGB", (8, 8)).save(p)
    (root / "link.png").symlink_to(outside / "secret.png")  # a file out of ROOT
    (root / "dirlink").symlink_to(outside / "more")  # a folder out of ROOT
    (root / "inside.png").symlink_to(root / "sub" / "b.png")  # stays inside: fine
    return root, outside


def test_links_out_of_root_are_followed_by_default(tmp_path):
    root, _ = _tree_with_outside_links(tmp_path)
    items = {it.key: it.error for it in walk_folders([root])}
    assert items == {"a.png": None, "dirlink/c.png": None, "inside.png": None,
                     "link.png": None, "sub/b.png": None}


def test_no_follow_outside_records_links_out_of_root(tmp_path):
    from clipfeat.sources import LINK_OUTSIDE, read_files_from, read_llava_json

    root, outside = _tree_with_outside_links(tmp_path)
    items = {it.key: it.error for it in walk_folders([root], follow_outside=False)}
    assert items == {"a.png": None, "dirlink": LINK_OUTSIDE, "inside.png": None,
                     "link.png": LINK_OUTSIDE, "sub/b.png": None}
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\nlink.png\ndirlink/c.png\ninside.png\n")
    got = {it.key: it.error for it in read_files_from(listing, [root], follow_outside=False)}
    assert got == {"a.png": None, "link.png": LINK_OUTSIDE, "dirlink/c.png": LINK_OUTSIDE,
                   "inside.png": None}
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"image": "link.png"}, {"image": "dirlink/c.png"},
                                {"image": "a.png"}]))
    got = {it.key: it.error for it in read_llava_json(data, root, follow_outside=False)}
    assert got == {"link.png": LINK_OUTSIDE, "dirlink/c.png": LINK_OUTSIDE, "a.png": None}


def test_no_follow_outside_end_to_end(tmp_path, clip_full_dir):
    import clipfeat
    from clipfeat.store import FeatureStore

    root, _ = _tree_with_outside_links(tmp_path)
    out = tmp_path / "out"
    s = clipfeat.extract(roots=[str(root)], out=str(out), model=str(clip_full_dir),
                         device="cpu", workers=0, follow_outside=False)
    assert s.complete and s.extracted == 3 and s.failed == 2
    assert sorted(FeatureStore(out).keys()) == ["a.png", "inside.png", "sub/b.png"]
    fails = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert {f["key"] for f in fails} == {"dirlink", "link.png"}
    assert all("--no-follow-outside" in f["error"] for f in fails)
