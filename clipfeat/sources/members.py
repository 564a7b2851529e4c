"""Images inside other files: the file they live in (`SourceFile`), and opening one.

A tar member (`clipfeat.sources.tar.TarMember`) or a parquet row
(`clipfeat.sources.parquet.ParquetRow`) names its `SourceFile` and where the image is in
it; the decode worker opens it with `opened` and reads only that range or row, straight
from the file. Nothing is unpacked, and no path is ever made from a name inside a file.

Each `SourceFile` records the size and modification time the file had when it was listed:
the frozen plan keeps them, a rerun refuses a file that changed since (`check_unchanged`:
a rewritten tar moves its members' offsets), and a worker refuses to read from one that
changed during the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, NamedTuple

from clipfeat.errors import ConfigError

TAR = "tar"
PARQUET = "parquet"
#: How a member's display path joins the file and the name (or row) inside it.
SEPARATOR = "::"


class SourceFile(NamedTuple):
    """A tar or parquet file that images are read from, as it was when it was listed."""

    path: str  # absolute
    kind: str  # TAR or PARQUET
    size: int
    mtime_ns: int
    column: str | None = None  # parquet: the image column

    def changed(self, st: os.stat_result) -> str | None:
        """How the file with stat ``st`` differs from this one (None: it is the same)."""
        said = []
        if st.st_size != self.size:
            said.append(f"size {self.size:,} -> {st.st_size:,} bytes")
        if st.st_mtime_ns != self.mtime_ns:
            said.append("modification time changed")
        return ", ".join(said) or None

    def open(self) -> BinaryIO:
        """The file, opened for reading if it is still the regular file that was planned
        (ImageRejected otherwise; FileNotFoundError if it is gone)."""
        from clipfeat.preprocess import ImageRejected, open_regular

        fh = open_regular(self.path)
        try:
            change = self.changed(os.fstat(fh.fileno()))
        except BaseException:
            fh.close()
            raise
        if change:
            fh.close()
            raise ImageRejected(f"{self.kind} file changed since it was planned ({change})")
        return fh


class OpenFile:
    """The source file a process last read a member from, kept open for the next member
    (consecutive items of a plan share their file): each use checks it is unchanged with
    one ``fstat``, instead of a stat, an open and a close per image."""

    def __init__(self) -> None:
        self._file: SourceFile | None = None
        self._fh: BinaryIO | None = None

    def get(self, file: SourceFile) -> BinaryIO:
        """``file`` opened (ImageRejected if it changed since it was planned)."""
        if self._file == file and self._fh is not None:
            if file.changed(os.fstat(self._fh.fileno())) is None:
                return self._fh
            self.release()  # changed in place: open() says how
        fh = file.open()
        self.release()
        self._file, self._fh = file, fh
        return fh

    def release(self) -> None:
        """Close the file kept open."""
        if self._fh is not None:
            self._fh.close()
        self._file = self._fh = None


#: This process's open tar file (each decode worker is a process of its own).
TAR_FILE = OpenFile()


def source_file(path: str, kind: str, st: os.stat_result, column: str | None = None
                ) -> SourceFile:
    """The `SourceFile` of ``path`` (made absolute) with stat ``st``."""
    return SourceFile(os.path.abspath(path), kind, st.st_size, st.st_mtime_ns, column)


def display_path(file: str, inside: str) -> str:
    """How a member is named in the plan and in failures.jsonl: ``FILE::NAME``."""
    return f"{file}{SEPARATOR}{inside}"


@contextlib.contextmanager
def opened(where: Any) -> Iterator[Any]:
    """What to decode: a path as it is, or a member opened as a binary file (closed after)."""
    if isinstance(where, (str, bytes, os.PathLike)):
        yield where
        return
    fh = where.open()
    try:
        yield fh
    finally:
        fh.close()


def files_of(members: Sequence[Any]) -> list[SourceFile]:
    """The distinct source files of ``members`` (None for plain paths), in first-seen order."""
    seen: dict[SourceFile, None] = {}
    for m in members:
        if m is not None:
            seen.setdefault(m.file, None)
    return list(seen)


def check_unchanged(files: Sequence[SourceFile], out: Any) -> None:
    """ConfigError naming the first of ``files`` (a plan's) that is gone or changed since
    OUT was planned: a changed tar moves its members' offsets, so its planned items cannot
    be read; restoring the file, or planning again, is the fix."""
    for f in files:
        try:
            change = f.changed(os.stat(f.path))
        except OSError as err:
            change = "it is gone" if isinstance(err, FileNotFoundError) else err.strerror
        if change:
            raise ConfigError(
                f"{f.path} changed since --out {out} was planned ({change}): the plan "
                f"records where each image is inside it; restore that {f.kind} file, or "
                "rerun with --overwrite to plan again"
            )
