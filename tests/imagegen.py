"""Test helpers: make odd, hostile and misbehaving image files at test time (no fixtures on disk).

Everything is deterministic (seeded) and small. Import from tests as ``import imagegen``.

* :func:`make_image` - any Pillow mode in any format that can hold it.
* :func:`make_animated`, :func:`make_multipage_tiff`, :func:`make_exif_rotated_jpeg`.
* :func:`make_bomb_png` (valid header claiming huge dimensions), :func:`make_truncated`,
  :func:`make_fifo`.
* :func:`make_hostile_tree` - a folder mixing all of the above, with the expected outcome.
* :func:`make_tar`, :func:`tar_folder`, :func:`parquet_folder` - a folder's images packed
  into tar shards or a parquet file (the datasets ``Image`` type), byte for byte.
* :func:`misbehaving_decode` - a decode function for ``DecodePool(decode_fn=...)`` that
  crashes, hangs or fails on request (by file name), for crash-isolation tests.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_BY_SUFFIX",
    "make_animated",
    "make_bomb_png",
    "make_exif_rotated_jpeg",
    "make_fifo",
    "make_hostile_tree",
    "make_image",
    "make_multipage_tiff",
    "make_tar",
    "make_truncated",
    "misbehaving_decode",
    "parquet_folder",
    "tar_folder",
    "photo_array",
]

FORMAT_BY_SUFFIX = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".apng": "PNG", ".gif": "GIF",
    ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
}


def photo_array(width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 with smooth gradients, edges and noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sx, sy = max(width, 1), max(height, 1)
    r = 255 * x / sx
    g = 255 * y / sy
    b = 127.5 + 127.5 * np.sin((x + 2 * y) * (0.15 + 0.05 * (seed % 7)))
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    img[(x // 8 + y // 8) % 5 == 0] *= 0.5  # some hard edges
    return np.clip(img, 0, 255).astype(np.uint8)


def _image(mode: str, size: tuple[int, int], seed: int) -> Any:
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(photo_array(w, h, seed=seed))
    if mode == "RGB":
        return rgb
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w), dtype=np.uint8) * 255).convert("1")
    if mode == "I;16":
        a = (photo_array(w, h, seed=seed)[..., 0].astype(np.uint16) * 257
             + rng.integers(0, 200, (h, w), dtype=np.uint16))
        return Image.fromarray(a.astype(np.uint16))  # mode I;16
    if mode == "I":
        a = photo_array(w, h, seed=seed)[..., 1].astype(np.int32) * 300 - 20000
        return Image.fromarray(a)
    if mode == "F":
        a = photo_array(w, h, seed=seed)[..., 2].astype(np.float32) * 1.7 - 40.0
        return Image.fromarray(a)
    if mode in ("RGBA", "LA"):
        base = rgb.convert(mode[:-1]) if mode == "LA" else rgb
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        out = base.convert(mode)
        out.putalpha(alpha)
        return out
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return rgb.convert(mode)  # L, CMYK, YCbCr, ...


def pillow_reads(path: str | os.PathLike[str]) -> bool:
    """Whether the installed Pillow opens and converts ``path`` (LLaVA's own first step).

    Not every Pillow reads every file it writes: 12.x writes an uncompressed YCbCr TIFF that
    it then reads as RGBX and calls truncated (13.0 reads it). Where LLaVA's path fails,
    clipfeat must record a failure, not produce pixels.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except Exception:  # noqa: BLE001 - any refusal counts
        return False
    return True


def make_image(
    path: str | os.PathLike[str],
    mode: str = "RGB",
    size: tuple[int, int] = (64, 48),
    fmt: str | None = None,
    *,
    seed: int = 0,
    **save_kwargs: Any,
) -> Path:
    """Write a ``size`` = (width, height) image in Pillow ``mode`` as ``fmt`` (default: suffix).

    ``save_kwargs`` go to ``Image.save`` (e.g. ``transparency=0`` for a palette PNG/GIF,
    ``quality=90``, ``lossless=True``). The format must be able to store the mode.
    """
    path = Path(path)
    fmt = fmt or FORMAT_BY_SUFFIX[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    im = _image(mode, size, seed)
    with open(path, "wb") as f:
        im.save(f, fmt, **save_kwargs)
    return path


def make_animated(
    path: str | os.PathLike[str],
    size: tuple[int, int] = (40, 30),
    frames: int = 3,
    fmt: str | None = None,
) -> Path:
    """An animated GIF / WebP / APNG (``fmt`` "PNG") whose frames all differ."""
    from PIL import Image

    path = Path(path)
    fmt = fmt or FORMAT_BY_SUFFIX[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    ims = [Image.fromarray(photo_array(*size, seed=100 + i)) for i in range(frames)]
    kw: dict[str, Any] = {"save_all": True, "append_images": ims[1:], "duration": 100, "loop": 0}
    if fmt == "WEBP":
        kw["lossless"] = True
    ims[0].save(path, fmt, **kw)
    return path


def make_multipage_tiff(
    path: str | os.PathLike[str], size: tuple[int, int] = (40, 30), pages: int = 3
) -> Path:
    """A multi-page TIFF whose pages differ (and the later pages are larger)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    ims = [Image.fromarray(photo_array(w + 4 * i, h + 2 * i, seed=200 + i)) for i in range(pages)]
    ims[0].save(path, "TIFF", save_all=True, append_images=ims[1:])
    return path


def make_exif_rotated_jpeg(
    path: str | os.PathLike[str], size: tuple[int, int] = (48, 32), orientation: int = 6
) -> Path:
    """A JPEG whose pixels are stored ``size`` but whose EXIF orientation says rotate."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(photo_array(*size, seed=7))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def make_bomb_png(
    path: str | os.PathLike[str], width: int = 100_000, height: int = 100_000
) -> Path:
    """A tiny, well-formed PNG header that claims ``width`` x ``height`` RGB pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))
    path.write_bytes(data)
    return path


def make_truncated(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    size: tuple[int, int] = (64, 48),
    keep: float = 0.5,
) -> Path:
    """A valid ``fmt`` file cut to ``keep`` of its bytes (header intact, pixels missing)."""
    from PIL import Image

    path = Path(path)
    fmt = fmt or FORMAT_BY_SUFFIX[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(photo_array(*size, seed=3)).save(buf, fmt)
    data = buf.getvalue()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def make_tar(path: str | os.PathLike[str], members: list[tuple[str, Any]]) -> Path:
    """A tar file of ``members`` in order: (name, bytes) for a regular file, or (name,
    ``tarfile.TarInfo``) for any other kind (its name is replaced by ``name``). Names are
    stored exactly as given (``../x``, ``/abs`` too)."""
    import tarfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, what in members:
            if isinstance(what, tarfile.TarInfo):
                what.name = name
                tf.addfile(what)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(what)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(what))
    return path


def tar_folder(root: str | os.PathLike[str], pattern_dir: str | os.PathLike[str], shards: int,
               *, extra: dict[str, bytes] | None = None) -> list[Path]:
    """Every file under ``root`` (sorted by relative path) packed into ``shards`` tars
    ``pattern_dir/000000.tar`` ..., as webdataset writers lay samples out; ``extra`` maps a
    file name suffix (``.json``) to bytes added beside each file as ``KEY.suffix``."""
    root = Path(root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    per = -(-len(files) // shards)
    out = []
    for i in range(shards):
        members: list[tuple[str, Any]] = []
        for rel in files[i * per:(i + 1) * per]:
            members.append((rel, (root / rel).read_bytes()))
            for suffix, data in (extra or {}).items():
                members.append((rel.split(".", 1)[0] + suffix, data))
        out.append(make_tar(Path(pattern_dir) / f"{i:06d}.tar", members))
    return out


def parquet_folder(root: str | os.PathLike[str], path: str | os.PathLike[str], *,
                   row_group_size: int = 5) -> Path:
    """Every file under ``root`` (sorted by relative path) as one parquet row: ``image``
    a struct of ``bytes`` and ``path`` (the datasets ``Image`` type), ``name`` its relative
    path, ``n`` its index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": (root / f).read_bytes(), "path": f} for f in files],
                          type=image),
        "name": files,
        "n": list(range(len(files))),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_fifo(path: str | os.PathLike[str]) -> Path:
    """A named pipe (opening it for reading would block forever)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def make_hostile_tree(root: str | os.PathLike[str]) -> dict[str, str]:
    """Fill ``root`` with good, odd and hostile inputs; return {relative path: expectation}.

    Expectations, for a folder walk with the usual image extensions (case-insensitive):

    * ``"ok"`` - must decode (with the default ``max_pixels``) into the reference pixels;
    * ``"fail"`` - must end up as a failure record (never hang, never crash the run); a walker
      may report it itself (FIFO, dangling symlink, symlink loop) or leave it to the decoder;
    * ``"not-an-input"`` - must not be treated as an image at all (no image extension, or a
      directory whose name looks like an image).

    Relative paths use "/" separators. The unreadable file is ``"fail"`` unless running as
    root (root reads it fine, so it is ``"ok"`` then).
    """
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    exp: dict[str, str] = {}

    def add(rel: str, outcome: str) -> Path:
        exp[rel] = outcome
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    # Good inputs, many modes/formats.
    make_image(add("ok/rgb.jpg", "ok"), "RGB", (64, 48), quality=90)
    make_image(add("ok/gray.png", "ok"), "L", (33, 47))
    make_image(add("ok/palette_transparent.png", "ok"), "P", (40, 30), transparency=0)
    make_image(add("ok/rgba.png", "ok"), "RGBA", (30, 41))
    make_image(add("ok/cmyk.jpg", "ok"), "CMYK", (50, 20))
    make_image(add("ok/sixteen_bit.tiff", "ok"), "I;16", (20, 25))
    make_image(add("ok/bilevel.bmp", "ok"), "1", (17, 9))
    make_image(add("ok/tiny_1x1.png", "ok"), "RGB", (1, 1))
    make_image(add("ok/tall_1x40.png", "ok"), "RGB", (1, 40))
    make_image(add("ok/wide_40x1.webp", "ok"), "RGB", (40, 1), lossless=True)
    make_image(add("ok/UPPER.JPG", "ok"), "RGB", (20, 30))
    make_image(add("ok/png_named.jpg", "ok"), "RGB", (31, 29), fmt="PNG")
    make_animated(add("ok/animated.gif", "ok"))
    make_animated(add("ok/animated.webp", "ok"))
    make_multipage_tiff(add("ok/multipage.tif", "ok"))
    make_exif_rotated_jpeg(add("ok/exif_rotated.jpg", "ok"))
    make_image(add("nested/deeper/inner.png", "ok"), "RGB", (25, 25))
    make_image(add("ok/space name \u00e9.png", "ok"), "RGB", (26, 22))
    exp["ok/link_to_rgb.jpg"] = "ok"
    os.symlink("rgb.jpg", root / "ok/link_to_rgb.jpg")

    # Hostile inputs.
    add("bad/empty.jpg", "fail").write_bytes(b"")
    make_truncated(add("bad/truncated.jpg", "fail"), keep=0.4)
    make_truncated(add("bad/truncated.png", "fail"), keep=0.5)
    add("bad/text.jpg", "fail").write_text("this is not an image\n" * 20)
    add("bad/html.png", "fail").write_text("<!DOCTYPE html><html><body>404</body></html>\n")
    add("bad/gzip.jpg", "fail").write_bytes(zlib.compress(b"x" * 1000))
    make_bomb_png(add("bad/bomb.png", "fail"))
    os.symlink("does-not-exist.jpg", add("bad/dangling.jpg", "fail"))
    os.symlink("self_loop.jpg", add("bad/self_loop.jpg", "fail"))
    make_fifo(add("bad/fifo.jpg", "fail"))
    unreadable = add("bad/unreadable.jpg", "ok" if os.geteuid() == 0 else "fail")
    Image.fromarray(photo_array(20, 20)).save(unreadable, "JPEG")
    os.chmod(unreadable, 0)

    # Not inputs at all.
    add("notes.txt", "not-an-input").write_text("hello\n")
    add("ok/metadata.json", "not-an-input").write_text("{}\n")
    (root / "dir.jpg").mkdir()
    exp["dir.jpg"] = "not-an-input"
    make_image(add("dir.jpg/inside.png", "ok"), "RGB", (21, 23))
    return exp


# --------------------------------------------------------------------------------------------
# A decode function that misbehaves on request (runs inside decode workers).

_decoded_here = 0


def misbehaving_decode(path: str, spec: Any, aspect: str, exif_transpose: bool,
                       max_pixels: int | None) -> np.ndarray:
    """``clipfeat.decode.decode_file`` unless the file name asks for trouble.

    Name contains ``__segv__``: the process kills itself with SIGSEGV; ``__exit__``:
    ``os._exit(3)``; ``__hang__``: sleeps 30 s first; ``__raise__``: always raises;
    ``__stateful__``: raises unless it is the first file this process decodes (like Pillow
    state left behind by a broken file: it must succeed when retried in a fresh process);
    ``__mark__``: leaves an empty file ``<path>.<pid>.<n>`` behind for each decode;
    ``__hangonce__``: sleeps 30 s the first time (it leaves ``<path>.hung``), then decodes;
    ``__stderr__``: writes a libtiff-like warning to fd 2 first (as C libraries do).
    """
    import signal
    import time

    from clipfeat.decode import decode_file

    global _decoded_here
    name = os.path.basename(path)
    first = _decoded_here == 0
    _decoded_here += 1
    if "__segv__" in name:
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(60)
    if "__exit__" in name:
        os._exit(3)
    if "__stderr__" in name:
        os.write(2, f"TIFFReadDirectory: Warning, {name}: unknown field with tag 317\n".encode())
    if "__hang__" in name:
        time.sleep(30)  # far beyond the tests' timeouts; ends by itself if a bug lets it
        return decode_file(path, spec, aspect, exif_transpose, max_pixels)
    if "__hangonce__" in name and not os.path.exists(path + ".hung"):
        open(path + ".hung", "w").close()
        time.sleep(30)
    if "__raise__" in name:
        raise OSError("simulated broken file")
    if "__stateful__" in name and not first:
        raise OSError("simulated state left by an earlier file")
    if "__mark__" in name:
        open(f"{path}.{os.getpid()}.{_decoded_here}", "w").close()
    return decode_file(path, spec, aspect, exif_transpose, max_pixels)
