"""What every source shares: the `Item` type, names as store keys, what a path's mode or
stat error means, and the `--ext` list. Nothing here opens an input."""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from typing import Any, Iterable, NamedTuple, Sequence

from clipfeat.errors import ConfigError

DEFAULT_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

OUTSIDE_ROOT = "outside ROOT"
OUTSIDE_IMAGE_FOLDER = "outside --image-folder"
#: With --no-follow-outside: a link (or a path through one) that leads out of the input folders.
LINK_OUTSIDE = "symlink points outside the input folder (--no-follow-outside): not followed"


class Item(NamedTuple):
    """One input: `key` is valid UTF-8 (the store key), `path` is what to open.

    `error` is set when the input is known to be unusable before decoding
    (e.g. "file not found", "dangling symlink", "not a regular file (fifo)").
    `member` is set for an image inside a tar or parquet file (a `TarMember` or a
    `ParquetRow`: what the decode worker reads); `path` then names it for people
    (``FILE::MEMBER`` or ``FILE::ROW``) and is never opened.
    """

    key: str
    path: str
    error: str | None = None
    member: Any = None


def fs_key(name: str) -> str:
    """A file-system name as valid UTF-8: undecodable bytes become `\\xNN` escapes."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def text_key(text: str) -> str:
    """A string as valid UTF-8: lone surrogates become `\\udNNN` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def mode_error(mode: int) -> str | None:
    """None for a regular file, else the reason it must not be opened."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "not a regular file (directory)"
    if stat.S_ISFIFO(mode):
        return "not a regular file (fifo)"
    if stat.S_ISSOCK(mode):
        return "not a regular file (socket)"
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        return "not a regular file (device)"
    return "not a regular file"


def stat_error(exc: OSError, path: str) -> str:
    """The reason string for a failed (link-following) stat of `path`."""
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return "dangling symlink" if os.path.islink(path) else "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot stat: {exc.strerror or exc}"


def check_path(path: str) -> str | None:
    """Why `path` cannot be used as an input, or None; stats only, never opens."""
    try:
        st = os.stat(path)
    except ValueError:  # embedded NUL byte
        return "invalid path (NUL byte)"
    except OSError as exc:
        return stat_error(exc, path)
    err = mode_error(st.st_mode)
    if err is None and not os.access(path, os.R_OK):
        return "permission denied"
    return err


def normalise_ext(ext: str) -> str:
    e = ext.strip().lstrip(".").lower()
    if not e or any(c in e for c in "/\\\0") or any(c.isspace() for c in e):
        raise ConfigError(
            f"invalid extension {ext!r}: use names like 'jpg' or '.png' (comma-separated)"
        )
    return e


def image_suffixes(exts: Sequence[str]) -> tuple[str, ...]:
    """The name endings ('.jpg', ...) that `exts` takes; ConfigError when there are none."""
    suffixes = tuple("." + normalise_ext(e) for e in exts)
    if not suffixes:
        raise ConfigError("no image extensions given: pass --ext such as 'jpg,png'")
    return suffixes


def parse_exts(s: str | None) -> tuple[str, ...]:
    """Extensions from a comma-separated `--ext` value ('JPG,.png'); None -> DEFAULT_EXTS."""
    if s is None:
        return DEFAULT_EXTS
    parts = [p for p in s.split(",") if p.strip()]
    if not parts:
        raise ConfigError(
            f"--ext {s!r} names no extension: give a comma-separated list such as 'jpg,png'"
        )
    out: list[str] = []
    for p in parts:
        e = normalise_ext(p)
        if e not in out:
            out.append(e)
    return tuple(out)


def dir_ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def count_by_error(items: Iterable[Item]) -> dict[str, int]:
    """How many items failed, by reason (the part of `error` before any ':')."""
    counts = Counter(it.error.split(":", 1)[0] for it in items if it.error is not None)
    return dict(sorted(counts.items()))
