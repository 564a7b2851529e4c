"""Atomic file writes, fsync, and one-line messages for OS errors."""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clipfeat.errors import ExtractionError, StoreError

_ERRNO_RE = re.compile(r"errno\s*=\s*(\d+)")


def errno_of(err: BaseException) -> int | None:
    code = getattr(err, "errno", None)
    if code:
        return int(code)
    m = _ERRNO_RE.search(str(err))  # HDF5 reports the OS errno inside its message
    return int(m.group(1)) if m else None


_CAUSES = {
    errno.ENOSPC: ("disk full (ENOSPC)", "free space and rerun the same command to resume"),
    errno.EDQUOT: ("disk quota exceeded (EDQUOT)",
                   "free space and rerun the same command to resume"),
    errno.EACCES: ("permission denied (EACCES)",
                   "make the output folder writable and rerun the same command to resume"),
    errno.EPERM: ("operation not permitted (EPERM)",
                  "make the output folder writable and rerun the same command to resume"),
    errno.EROFS: ("read-only file system (EROFS)",
                  "write to a writable file system and rerun the same command to resume"),
    errno.EIO: ("I/O error (EIO)", "check the disk and rerun the same command to resume"),
    errno.EFBIG: ("file too large (EFBIG)",
                  "raise the file size limit (ulimit -f) or use smaller shards, then rerun"),
}


def os_error_message(err: BaseException, path: str | os.PathLike, action: str = "writing") -> str:
    """One line naming the OS cause of ``err``, the path, and what to do."""
    code = errno_of(err)
    if code in _CAUSES:
        cause, fix = _CAUSES[code]
    else:
        text = str(err).strip()
        detail = getattr(err, "strerror", None) or (text.splitlines()[0] if text else "")
        cause = f"OS error ({detail or type(err).__name__})"
        fix = "fix the cause and rerun the same command to resume"
    return f"{cause} while {action} {os.fspath(path)}: {fix}"


def fsync_path(path: str | os.PathLike, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fsync_path(path, directory=True)
    except OSError as err:  # some file systems cannot fsync a directory
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR):
            raise


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_lines_atomically(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Write text lines to ``path`` atomically: temp file in the same folder, fsync,
    ``os.replace``, fsync the folder. OSError propagates (the temp file is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for line in lines:
                fh.write(line)
                fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """`write_lines_atomically`, raising ExtractionError (one line, cause and fix) on OS errors."""
    try:
        write_lines_atomically(path, lines)
    except OSError as err:
        raise ExtractionError(os_error_message(err, path)) from err


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document to ``path`` atomically (see atomic_write_lines)."""
    text = json.dumps(obj, indent=2, ensure_ascii=True, default=str)
    atomic_write_lines(path, [text])


def unlink_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise StoreError(f"{path}: {what} is missing") from None
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: cannot read {what} ({err})") from err


def remove_tree(path: Path) -> None:
    try:
        for entry in os.scandir(path):
            unlink_quietly(entry.path)
        os.rmdir(path)
    except OSError:
        pass
