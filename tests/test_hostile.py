"""Hostile inputs end-to-end through `clipfeat.extract`: never hang, never crash, never lose
track of an image.

Every input of a run must end up either in a shard (with features equal to LLaVA's path,
computed here independently with transformers) or in failures.jsonl with a reason, exactly
once. All hostile files are generated at test time. This module stays importable without
torch/transformers/h5py at the top, because decode worker processes import it to run
`rlimited_decode`.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import imagegen
import numpy as np
import pytest
from llava_reference import LlavaReference
from PIL import Image
from stores import read_failures, read_rows

import clipfeat

pytestmark = pytest.mark.slow  # these start decode worker processes

# A decode worker may use at most this much more address space than it has when it starts
# (see rlimited_decode): enough for every legitimate test image, far too little for a bomb.
WORKER_HEADROOM = 1 << 30


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def _hang_guard():
    """A hang is a failure, not a stuck CI job: dump the stacks and exit after 10 minutes."""
    import faulthandler

    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def llava(clip_full_dir) -> LlavaReference:
    """LLaVA's features, from transformers only: PIL processor + hidden_states[-2][:, 1:].

    Images are converted to RGB unless they are, and their transparent colour is hidden from
    the processor (transformers 5 would paint it; 4.x, which LLaVA used, does not): see
    llava_reference.LlavaReference. Paths are opened LLaVA's way, Image.open(p).convert('RGB')
    (no EXIF transpose, frame 0).
    """
    return LlavaReference(clip_full_dir, family="clip", layer=-2, feature="patch",
                          hide_transparency=True)


def read_out(out: Path) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """(key -> stored row, key -> failure record); fails on any key stored twice."""
    rows = read_rows(out)
    fails: dict[str, dict] = {}
    for rec in read_failures(out):
        assert rec["key"] not in fails, f"key {rec['key']!r} listed twice in failures.jsonl"
        assert rec["error"] and isinstance(rec["error"], str) and "\n" not in rec["error"]
        assert "path" in rec
        fails[rec["key"]] = rec
    assert not (set(rows) & set(fails)), f"both stored and failed: {set(rows) & set(fails)}"
    return rows, fails


def run(root: Path, out: Path, ckpt: Path, **kw: Any) -> Any:
    args = dict(roots=[str(root)], out=str(out), model=str(ckpt), device="cpu", layer=-2,
                feature="patch", store_dtype="float32", batch_size=8, shard_size=16,
                workers=2, decode_timeout=30.0)
    args.update(kw)
    return clipfeat.extract(**args)


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


_limited = False


def rlimited_decode(path: str, spec: Any, aspect: str, exif_transpose: bool,
                    max_pixels: int | None) -> np.ndarray:
    """`decode_file` in a worker whose address space is capped (runs in decode workers).

    A decompression bomb that got as far as allocating its pixels fails here with "out of
    memory" instead of being refused as a bomb, so the test can tell the two apart.
    """
    global _limited
    from clipfeat.decode import decode_file

    if not _limited:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + WORKER_HEADROOM, hard))
        _limited = True
    return decode_file(path, spec, aspect, exif_transpose, max_pixels)


# A clean process that imports Pillow and numpy, never decodes anything itself, and forks
# one child per file: each file is decoded (LLaVA's way) by a process that decoded nothing
# before. Reads "i<TAB>path" lines; leaves i.npy or i.err in the folder given as argv[1].
_FRESH_SERVER = """
import os, sys
import numpy as np
from PIL import Image
Image.init()  # import every format plugin once, here, before any fork
out = sys.argv[1]
for line in sys.stdin:
    i, path = line.rstrip("\\n").split("\\t", 1)
    pid = os.fork()
    if pid == 0:
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            np.save(os.path.join(out, i + ".npy"), arr, allow_pickle=False)
        except Exception as err:
            with open(os.path.join(out, i + ".err"), "w") as fh:
                fh.write(f"{type(err).__name__}: {err}")
        os._exit(0)
    os.waitpid(pid, 0)
"""


def fresh_decode(paths: list[str], scratch: Path) -> list[tuple[str, Any]]:
    """[("ok", RGB array) or ("error", message)] for each path, each in a fresh process."""
    import subprocess
    import sys

    scratch.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{i}\t{p}\n" for i, p in enumerate(paths))
    subprocess.run([sys.executable, "-c", _FRESH_SERVER, str(scratch)], input=lines,
                   text=True, check=True, timeout=300)
    answers: list[tuple[str, Any]] = []
    for i in range(len(paths)):
        if (scratch / f"{i}.npy").exists():
            answers.append(("ok", np.load(scratch / f"{i}.npy", allow_pickle=False)))
        elif (scratch / f"{i}.err").exists():
            answers.append(("error", (scratch / f"{i}.err").read_text()))
        else:
            answers.append(("crash", None))
    return answers


def _jpeg_bytes(size: tuple[int, int], seed: int, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(imagegen.photo_array(*size, seed=seed)).save(buf, "JPEG", **kw)
    return buf.getvalue()


def make_jpeg_bomb(path: Path) -> Path:
    """A small valid JPEG whose SOF header claims 65500 x 65500 pixels."""
    data = bytearray(_jpeg_bytes((16, 16), seed=5))
    i = data.index(b"\xff\xc0")  # baseline SOF0: FFC0 len(2) precision(1) height(2) width(2)
    data[i + 5:i + 9] = struct.pack(">HH", 65500, 65500)
    path.write_bytes(bytes(data))
    return path


def make_gif_bomb(path: Path) -> Path:
    """A small valid GIF whose logical screen claims 65535 x 65535 pixels."""
    buf = io.BytesIO()
    Image.fromarray(imagegen.photo_array(8, 8, seed=6)).convert("P").save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", 65535, 65535)
    path.write_bytes(bytes(data))
    return path


def make_large_photo(path: Path, size: tuple[int, int] = (6000, 4000)) -> Path:
    """A big, valid JPEG made cheaply from gradients (no per-pixel float maths)."""
    w, h = size
    r = Image.linear_gradient("L").resize((w, h))
    g = Image.radial_gradient("L").resize((w, h))
    b = Image.linear_gradient("L").rotate(90).resize((w, h))
    Image.merge("RGB", (r, g, b)).save(path, "JPEG", quality=85)
    return path


# --------------------------------------------------------------------------- the hostile tree

NON_UTF8_NAME = b"odd\xff\xfebytes.png"
NON_UTF8_KEY = "ok/odd\\xff\\xfebytes.png"


def build_tree(root: Path, outside: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """imagegen's hostile tree plus every other case of the issue.

    Returns ({key: "ok" | "fail" | "not-an-input"}, {key: path bytes} for keys whose path is
    not root/key).
    """
    exp = imagegen.make_hostile_tree(root)
    paths: dict[str, bytes] = {}

    def add(rel: str, outcome: str) -> Path:
        exp[rel] = outcome
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    # Every Pillow mode LLaVA may meet, in a format that keeps it.
    for name, mode, size, kw in [
        ("modes/la.png", "LA", (23, 17), {}),
        ("modes/ycbcr.tif", "YCbCr", (27, 33), {}),
        ("modes/int32.tif", "I", (19, 21), {}),
        ("modes/float.tif", "F", (21, 19), {}),
        ("modes/cmyk.tif", "CMYK", (20, 31), {}),
        ("modes/i16.png", "I;16", (25, 20), {}),
        ("modes/bilevel.png", "1", (31, 7), {}),
        ("modes/palette_trns.gif", "P", (30, 40), {"transparency": 3}),
        ("modes/rgba.webp", "RGBA", (41, 30), {"lossless": True}),
        ("modes/gray.jpg", "L", (35, 22), {"quality": 90}),
    ]:
        made = imagegen.make_image(add(name, "ok"), mode, size, **kw)
        if not imagegen.pillow_reads(made):  # LLaVA's path fails on it too (see pillow_reads)
            exp[name] = "fail"
    imagegen.make_animated(add("ok/animated_apng.png", "ok"), fmt="PNG")
    imagegen.make_image(add("ok/three_high.png", "ok"), "RGB", (50, 3))
    imagegen.make_image(add("ok/three_wide.jpg", "ok"), "RGB", (3, 50))
    imagegen.make_image(add("ok/one_by_n.gif", "ok"), "RGB", (1, 33))
    make_large_photo(add("ok/large_6000x4000.jpg", "ok"))

    # Names: unicode, spaces, tabs, newlines, backslashes, leading dash, very long, non-UTF-8.
    for i, name in enumerate(["名前 日本.png", "emoji 😀.jpg", "tab\tname.png", "new\nline.png",
                              "back\\slash.png", "-dash.png", "#hash.png", "%41 percent.png",
                              "x" * 240 + ".png"]):
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        imagegen.make_image(add(f"names/{name}", "ok"), "RGB", (20 + i, 18), fmt, seed=i)
    raw = os.fsencode(root) + b"/ok/" + NON_UTF8_NAME
    with open(raw, "wb") as fh:
        Image.fromarray(imagegen.photo_array(22, 19, seed=9)).save(fh, "PNG")
    exp[NON_UTF8_KEY] = "ok"
    paths[NON_UTF8_KEY] = raw

    # More content that lies about its type, and more bombs.
    add("bad/pdf.png", "fail").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    add("bad/zeros.gif", "fail").write_bytes(b"\0" * 4096)
    make_jpeg_bomb(add("bad/bomb.jpg", "fail"))
    make_gif_bomb(add("bad/bomb.gif", "fail"))
    imagegen.make_truncated(add("bad/truncated.gif", "fail"), keep=0.3)

    # Special files named like images: never opened.
    os.symlink("/dev/zero", add("bad/dev_zero.png", "fail"))
    os.symlink("/dev/null", add("bad/dev_null.jpg", "fail"))
    os.symlink("fifo.jpg", add("bad/link_to_fifo.png", "fail"))
    try:
        os.mknod(add("bad/chardev.jpg", "fail"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except OSError:  # not allowed in this container: the /dev links cover devices
        del exp["bad/chardev.jpg"]
    os.symlink("/proc/self/status", add("bad/proc_status.jpg", "fail"))  # regular, size 0
    unreadable = root / "bad/unreadable.jpg"
    exp["bad/unreadable.jpg"] = "fail"  # made unreadable for root too by the test
    assert unreadable.exists()

    # Directory cycles and aliases: each directory is walked once.
    (root / "cycle").mkdir()
    os.symlink("..", root / "cycle/up_to_root")
    os.symlink(".", root / "cycle/self")
    os.symlink("../../nested", root / "nested/deeper/back")
    os.symlink("ok", root / "alias_of_ok")
    os.symlink("ok", root / "dir_link.png")  # a symlink to a folder, named like an image
    imagegen.make_image(add("cycle/in_cycle.png", "ok"), "RGB", (24, 24))
    # A folder outside ROOT reached through a symlink: keys stay relative to ROOT.
    imagegen.make_image(outside / "outside.png", "RGB", (26, 21))
    os.symlink(outside, root / "linked_outside")
    exp["linked_outside/outside.png"] = "ok"
    return exp, paths


def _bind_socket(path: Path) -> socket.socket:
    """A UNIX socket at `path` (bound through a relative name: sun_path is short)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        s.bind(path.name)
    finally:
        os.chdir(cwd)
    return s


def _deny_read(monkeypatch, name: str) -> None:
    """Tests run as root, who may read anything: make `name` read as unreadable."""
    real = os.access

    def access(path, mode, *a, **kw):
        if mode & os.R_OK and os.fsdecode(path).endswith(name):
            return False
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)


def test_hostile_tree_end_to_end(tmp_path, clip_full_dir, llava, monkeypatch):
    root, out = tmp_path / "root", tmp_path / "out"
    exp, raw_paths = build_tree(root, tmp_path / "outside")
    sock = _bind_socket(root / "bad/socket.png")
    exp["bad/socket.png"] = "fail"
    os.chmod(root / "bad/unreadable.jpg", 0)
    if os.geteuid() == 0:
        _deny_read(monkeypatch, "bad/unreadable.jpg")

    try:
        summary = run(root, out, clip_full_dir,
                      extra={"decode_fn": "test_hostile:rlimited_decode"})
    finally:
        sock.close()

    inputs = {k for k, e in exp.items() if e != "not-an-input"}
    rows, fails = read_out(out)
    assert summary.complete
    assert summary.planned == len(inputs)
    assert summary.extracted == len(rows) and summary.failed == len(fails)
    assert set(rows) | set(fails) == inputs  # nothing lost, nothing invented
    assert set(rows) == {k for k, e in exp.items() if e == "ok"}
    assert set(fails) == {k for k, e in exp.items() if e == "fail"}

    # Keys made from folders are relative paths inside ROOT.
    for key in set(rows) | set(fails):
        parts = key.split("/")
        assert not key.startswith("/") and ".." not in parts and "" not in parts, key

    # Clear reasons, and bombs refused from the header (never "out of memory").
    reasons = {
        "bad/bomb.png": "decompression bomb",
        "bad/bomb.jpg": "decompression bomb",
        "bad/bomb.gif": "decompression bomb",
        "bad/fifo.jpg": "fifo",
        "bad/link_to_fifo.png": "fifo",
        "bad/socket.png": "socket",
        "bad/dev_zero.png": "device",
        "bad/dev_null.jpg": "device",
        "bad/chardev.jpg": "device",
        "bad/dangling.jpg": "dangling symlink",
        "bad/self_loop.jpg": "symlink loop",
        "bad/unreadable.jpg": "permission denied",
        "bad/empty.jpg": "cannot identify image file",
        "bad/text.jpg": "cannot identify image file",
        "bad/proc_status.jpg": "cannot identify image file",
        "bad/truncated.jpg": "truncat",
        "bad/truncated.png": "truncat",
    }
    for key, needle in reasons.items():
        if key in exp:
            assert needle in fails[key]["error"], (key, fails[key]["error"])
    assert not any("out of memory" in f["error"] for f in fails.values())

    # Everything stored equals LLaVA's path, computed independently.
    keys = sorted(rows)
    paths = [raw_paths.get(k, os.fsencode(root / k)) for k in keys]
    ref = llava.features(paths)
    for key, expected in zip(keys, ref, strict=False):
        np.testing.assert_allclose(rows[key], expected, rtol=1e-5, atol=1e-5, err_msg=key)

    # The reader finds every odd key (newlines, escapes, unicode), failure-only shards too.
    from clipfeat.store import FeatureStore

    with FeatureStore(out) as store:
        assert sorted(store.keys()) == keys
        for key in keys:
            np.testing.assert_array_equal(np.asarray(store[key]), rows[key], err_msg=key)


def test_max_pixels_refuses_from_the_header(tmp_path, clip_full_dir, llava):
    root, out = tmp_path / "root", tmp_path / "out"
    imagegen.make_image(root / "small.png", "RGB", (40, 40))  # 1600 pixels
    imagegen.make_image(root / "over.png", "RGB", (60, 60))  # 3600 pixels
    imagegen.make_animated(root / "anim_over.gif", size=(50, 50))
    imagegen.make_bomb_png(root / "bomb.png")
    summary = run(root, out, clip_full_dir, max_pixels=2000, workers=1,
                  extra={"decode_fn": "test_hostile:rlimited_decode"})
    rows, fails = read_out(out)
    assert summary.complete and set(rows) == {"small.png"}
    assert set(fails) == {"over.png", "anim_over.gif", "bomb.png"}
    assert "--max-pixels 2000" in fails["over.png"]["error"]
    assert "60x60" in fails["over.png"]["error"]
    assert all("decompression bomb" in f["error"] for f in fails.values())
    np.testing.assert_allclose(rows["small.png"], llava.features([root / "small.png"])[0],
                               rtol=1e-5, atol=1e-5)


def test_files_changed_between_walk_and_read(tmp_path, clip_full_dir, llava, monkeypatch):
    from clipfeat import sources

    root, out = tmp_path / "root", tmp_path / "out"
    for i, name in enumerate(["deleted.png", "garbage.jpg", "to_fifo.png", "to_dir.jpg",
                              "replaced.png", "truncated.jpg", "to_link.png", "stable.png"]):
        imagegen.make_image(root / name, "RGB", (30 + i, 24), seed=i)
    replacement = imagegen.make_image(tmp_path / "new.png", "RGBA", (41, 23), seed=99)

    def change() -> None:
        (root / "deleted.png").unlink()
        (root / "garbage.jpg").write_bytes(b"<html>gone</html>")
        (root / "to_fifo.png").unlink()
        os.mkfifo(root / "to_fifo.png")
        (root / "to_dir.jpg").unlink()
        (root / "to_dir.jpg").mkdir()
        os.replace(replacement, root / "replaced.png")
        data = (root / "truncated.jpg").read_bytes()
        (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
        (root / "to_link.png").unlink()
        os.symlink("/dev/zero", root / "to_link.png")

    real_walk = sources.read_roots
    walked: list[int] = []

    def walk_then_change(*args: Any, **kwargs: Any) -> list:
        items = real_walk(*args, **kwargs)
        walked.append(len(items))
        change()
        return items

    monkeypatch.setattr(sources, "read_roots", walk_then_change)
    summary = run(root, out, clip_full_dir, workers=2, batch_size=4)
    assert walked == [8] and summary.planned == 8 and summary.complete
    rows, fails = read_out(out)
    assert set(rows) == {"replaced.png", "stable.png"}
    assert set(fails) == {"deleted.png", "garbage.jpg", "to_fifo.png", "to_dir.jpg",
                          "truncated.jpg", "to_link.png"}
    assert "file not found" in fails["deleted.png"]["error"]
    assert "not a regular file" in fails["to_fifo.png"]["error"]
    assert "not a regular file" in fails["to_dir.jpg"]["error"]
    assert "not a regular file" in fails["to_link.png"]["error"]
    # What is read is what is stored: the replacement's pixels, not the walked file's.
    ref = llava.features([root / "replaced.png", root / "stable.png"])
    np.testing.assert_allclose(rows["replaced.png"], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows["stable.png"], ref[1], rtol=1e-5, atol=1e-5)


def test_misbehaving_decoder_never_stalls_the_run(tmp_path, clip_full_dir, llava):
    """A hang is abandoned at --decode-timeout, a crashed worker is replaced, a failure that
    comes from a worker's leftover state is retried in a fresh process."""
    root, out = tmp_path / "root", tmp_path / "out"
    good = [f"a{i}.png" for i in range(4)] + ["k.png", "z.png"]
    for i, name in enumerate(good):
        imagegen.make_image(root / name, "RGB", (30 + i, 26), seed=i)
    bad = {
        "b__stateful__.png": None,  # fails unless first in its process: must be extracted
        "c__raise__.png": "simulated broken file",
        "d__segv__.png": "decoder crashed (signal 11)",
        "e__exit__.png": "decoder crashed (exit code 3)",
        "f__hang__.png": "decode timed out after 2s",
    }
    for i, name in enumerate(bad):
        imagegen.make_image(root / name, "RGB", (28, 30 + i), seed=10 + i)

    summary = run(root, out, clip_full_dir, workers=2, batch_size=3, shard_size=4,
                  decode_timeout=2.0, extra={"decode_fn": "imagegen:misbehaving_decode"})
    rows, fails = read_out(out)
    assert summary.complete
    assert set(rows) == set(good) | {"b__stateful__.png"}
    assert set(fails) == {k for k, v in bad.items() if v}
    for key, needle in bad.items():
        if needle:
            assert needle in fails[key]["error"], (key, fails[key]["error"])
    stats = summary.stats
    assert stats["timeouts"] == 1 and stats["crashes"] >= 2
    assert stats["recovered"] >= 1 and stats["retries"] >= 1
    keys = sorted(rows)
    ref = llava.features([root / k for k in keys])
    for key, expected in zip(keys, ref, strict=False):
        np.testing.assert_allclose(rows[key], expected, rtol=1e-5, atol=1e-5, err_msg=key)


# --------------------------------------------------------------------------- LLaVA JSON keys


def test_llava_json_keys_exact_and_escapes_refused(tmp_path, clip_full_dir, llava):
    folder = tmp_path / "images"
    imagegen.make_image(folder / "ok/rgb.jpg", "RGB", (40, 30))
    imagegen.make_image(folder / "ok/名前 1.png", "L", (30, 40))
    imagegen.make_image(tmp_path / "secret.png", "RGB", (20, 20))  # outside the folder
    data = [
        {"id": 1, "image": "ok/rgb.jpg"},
        {"id": 2, "image": "./ok/rgb.jpg"},  # another spelling: another key, kept as written
        {"id": 3, "image": "ok//名前 1.png"},
        {"id": 4, "image": "../secret.png"},
        {"id": 5, "image": "ok/../../secret.png"},
        {"id": 6, "image": str(tmp_path / "secret.png")},
        {"id": 7, "image": ["ok/rgb.jpg", "ok/missing.png"]},
        {"id": 8, "conversations": []},
    ]
    js = tmp_path / "train.json"
    js.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    summary = clipfeat.extract(llava_json=str(js), image_folder=str(folder), out=str(out),
                               model=str(clip_full_dir), device="cpu", store_dtype="float32",
                               workers=0)
    rows, fails = read_out(out)
    assert summary.complete
    assert set(rows) == {"ok/rgb.jpg", "./ok/rgb.jpg", "ok//名前 1.png"}
    escaping = {"../secret.png", "ok/../../secret.png", str(tmp_path / "secret.png")}
    assert set(fails) == escaping | {"ok/missing.png"}
    for key in escaping:
        assert "outside" in fails[key]["error"], fails[key]
    ref = llava.features([folder / "ok/rgb.jpg", folder / "ok/名前 1.png"])
    np.testing.assert_allclose(rows["./ok/rgb.jpg"], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows["ok//名前 1.png"], ref[1], rtol=1e-5, atol=1e-5)


def test_files_from_escapes_are_failures(tmp_path, clip_full_dir):
    root = tmp_path / "root"
    imagegen.make_image(root / "a.png", "RGB", (20, 20))
    imagegen.make_image(tmp_path / "secret.png", "RGB", (20, 20))
    lst = tmp_path / "list.txt"
    lst.write_text("a.png\n../secret.png\nsub/../../secret.png\n")
    out = tmp_path / "out"
    clipfeat.extract(roots=[str(root)], files_from=str(lst), out=str(out),
                     model=str(clip_full_dir), device="cpu", workers=0)
    rows, fails = read_out(out)
    assert set(rows) == {"a.png"}
    assert set(fails) == {"../secret.png", "sub/../../secret.png"}
    assert all("outside" in f["error"] for f in fails.values())


# --------------------------------------------------------------------------- security


def _evil_pickle(marker: Path) -> bytes:
    """A pickle that creates `marker` (a folder) when loaded."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    return pickle.dumps({"vision_model.embeddings.class_embedding": Evil()}, protocol=2)


def test_store_reading_never_unpickles(tmp_path, clip_full_dir):
    """Index arrays replaced by pickled object arrays are never loaded as pickles."""
    from clipfeat.errors import ClipfeatError
    from clipfeat.store import FeatureStore

    root, out = tmp_path / "root", tmp_path / "out"
    for i in range(3):
        imagegen.make_image(root / f"{i}.png", "RGB", (20 + i, 20))
    clipfeat.extract(roots=[str(root)], out=str(out), model=str(clip_full_dir), device="cpu",
                     store_dtype="float32", workers=0)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    npys = list((out / ".clipfeat").rglob("*.npy"))
    assert npys, "expected a key index"
    for p in npys:
        np.save(p, np.array([Evil()], dtype=object), allow_pickle=True)
    try:
        with FeatureStore(out) as store:
            for key in store.keys():
                store[key]
    except ClipfeatError:
        pass  # refusing the damaged index is fine too
    assert not marker.exists()


@pytest.fixture
def pickle_dirs(tmp_path, clip_full_dir):
    """Checkpoint folders: legit pickle only; evil pickle only; safetensors + evil pickle."""
    import shutil

    import torch
    from safetensors.torch import load_file

    marker = tmp_path / "pwned"
    dirs = {}
    for name in ("legit", "evil", "both"):
        d = tmp_path / name
        d.mkdir()
        for f in ("config.json", "preprocessor_config.json"):
            shutil.copy(clip_full_dir / f, d / f)
        dirs[name] = d
    torch.save(load_file(clip_full_dir / "model.safetensors"), dirs["legit"] / "pytorch_model.bin")
    (dirs["evil"] / "pytorch_model.bin").write_bytes(_evil_pickle(marker))
    (dirs["both"] / "pytorch_model.bin").write_bytes(_evil_pickle(marker))
    shutil.copy(clip_full_dir / "model.safetensors", dirs["both"] / "model.safetensors")
    return dirs, marker


def test_pickle_weights_refused_unless_allowed(tmp_path, pickle_dirs, llava):
    from clipfeat.errors import ModelError

    dirs, marker = pickle_dirs
    root = tmp_path / "root"
    imagegen.make_image(root / "a.png", "RGB", (31, 22))
    for name in ("legit", "evil"):
        with pytest.raises(ModelError, match="--allow-pickle"):
            run(root, tmp_path / f"out-{name}", dirs[name], workers=0)
        assert not (tmp_path / f"out-{name}").exists()
    # Safetensors are taken when present, with or without --allow-pickle.
    for allow in (False, True):
        s = run(root, tmp_path / f"out-both-{allow}", dirs["both"], workers=0, allow_pickle=allow)
        assert s.extracted == 1
    # An explicit --allow-pickle loads legit pickle weights, with the same features.
    s = run(root, tmp_path / "out-legit-ok", dirs["legit"], workers=0, allow_pickle=True)
    rows, _ = read_out(tmp_path / "out-legit-ok")
    np.testing.assert_allclose(rows["a.png"], llava.features([root / "a.png"])[0],
                               rtol=1e-5, atol=1e-5)
    # Even with --allow-pickle, a pickle that runs code is not executed.
    with pytest.raises(ModelError):
        run(root, tmp_path / "out-evil-allowed", dirs["evil"], workers=0, allow_pickle=True)
    assert not marker.exists()


# --------------------------------------------------------------------------- fuzz


def _mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    b = bytearray(data)
    kind = ("flip", "truncate", "insert", "shuffle")[int(rng.integers(4))]
    if kind == "flip":
        for _ in range(int(rng.integers(1, 12))):
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == "truncate":
        b = b[: int(rng.integers(0, len(b)))]
    elif kind == "insert":
        i = int(rng.integers(len(b) + 1))
        b[i:i] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    else:
        cuts = sorted(int(c) for c in rng.integers(0, len(b), 4))
        parts = [b[s:e] for s, e in zip([0, *cuts], [*cuts, len(b)], strict=False)]
        order = list(range(len(parts)))
        i, j = (int(x) for x in rng.choice(len(parts), 2, replace=False))
        order[i], order[j] = order[j], order[i]
        b = bytearray(b"".join(parts[k] for k in order))
    return kind, bytes(b)


def _seeds() -> dict[str, bytes]:
    out = {}
    for fmt, ext, mode, kw in [("JPEG", "jpg", "RGB", {"quality": 85}),
                               ("PNG", "png", "RGB", {}),
                               ("GIF", "gif", "P", {})]:
        buf = io.BytesIO()
        img = Image.fromarray(imagegen.photo_array(24, 18, seed=len(out)))
        (img.convert(mode) if mode != "RGB" else img).save(buf, fmt, **kw)
        out[ext] = buf.getvalue()
    return out


# Failures whose confirmation is not "Pillow fails too": refusals made on purpose.
REFUSALS = ("decompression bomb", "extreme aspect ratio", "padded canvas", "timed out")


def test_fuzzed_images(tmp_path, clip_full_dir, llava):
    rng = np.random.default_rng(20240611)
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    inputs = []
    for ext, data in _seeds().items():
        for i in range(100):
            kind, mutated = _mutate(data, rng)
            name = f"{ext}_{i:03d}_{kind}.{ext}"
            (root / name).write_bytes(mutated)
            inputs.append(name)
    summary = run(root, out, clip_full_dir, workers=2, batch_size=16, shard_size=64,
                  decode_timeout=20.0)
    rows, fails = read_out(out)
    assert summary.complete
    assert set(rows) | set(fails) == set(inputs) and len(rows) + len(fails) == len(inputs)
    assert rows and fails  # the mutations produce both outcomes

    # Every outcome agrees with Pillow in a fresh process (Pillow keeps state between files:
    # a failure must not come from an earlier file), and every stored row equals LLaVA's
    # path on the pixels that fresh process decoded.
    answers = fresh_decode([str(root / k) for k in inputs], tmp_path / "fresh")
    imgs, keys = [], []
    for key, (status, value) in zip(inputs, answers, strict=False):
        if key in rows:
            assert status == "ok", (key, value)
            imgs.append(Image.fromarray(value, "RGB"))
            keys.append(key)
        elif not any(r in fails[key]["error"] for r in REFUSALS):
            assert status == "error", (key, fails[key]["error"])
    ref = llava.features(imgs)
    for key, expected in zip(keys, ref, strict=False):
        np.testing.assert_allclose(rows[key], expected, rtol=1e-5, atol=1e-5, err_msg=key)
