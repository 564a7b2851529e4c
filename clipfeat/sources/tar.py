"""Webdataset tar shards: their image members, keyed as webdataset keys its samples.

The standard library's `tarfile` lists a tar (headers only: it seeks past each member's
data) and gives each member's data offset and size; a decode worker then reads exactly
that range with ``pread``. No new dependency, nothing extracted, no path made from a
member name. (The `webdataset` package's reader streams each tar front to back; resume and
torchrun start at any chunk, so they need each member by its offset.)

Keys are webdataset's ``__key__``: `sample_key`. The members taken are those webdataset
yields (regular files, not its ``__...__`` metadata) whose name ends with a taken
extension (``--ext``, as for folders); other members (``.json``, ``.txt``, ``.cls``,
folders) are skipped. A member named like an image that webdataset would not yield (a
link, a device, a sparse file, a name without a key) is recorded as a failure instead.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from typing import BinaryIO, NamedTuple

from clipfeat.errors import ConfigError
from clipfeat.sources.common import Item, text_key
from clipfeat.sources.members import TAR, TAR_FILE, SourceFile, display_path, source_file

logger = logging.getLogger(__name__)

# webdataset's base_plus_ext: the key is the path up to the first dot of its last
# component (at least one character before that dot).
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset's metadata members (skipped): "__name__" at the top level, "__...__/..." paths.
_META = re.compile(r"__[^/]*__($|/)")

#: Magic numbers of compressed files: a compressed tar cannot be read by offset.
_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip"), (b"BZh", "bzip2", "bunzip2"),
               (b"\xfd7zXZ\x00", "xz", "unxz"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
               (b"\x04\x22\x4d\x18", "lz4", "unlz4"))
_BLOCK = tarfile.BLOCKSIZE
#: A member up to this size is read whole, with one ``pread`` (the size of a photo is far
#: less; a worker holds one at a time); a larger one is read as the decoder asks.
WHOLE_READ_BYTES = 64 << 20

_KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "device",
          tarfile.BLKTYPE: "device", tarfile.FIFOTYPE: "fifo", tarfile.DIRTYPE: "directory"}


def sample_key(name: str) -> str | None:
    """The webdataset key of member ``name`` (webdataset's ``base_plus_ext``): everything
    up to the first dot of the last path component, e.g. ``a/b/000123.jpg`` ->
    ``a/b/000123``, ``x.y.jpg`` -> ``x``; None when there is none (no dot, or nothing
    before it), and webdataset skips the member."""
    m = _KEY.match(name)
    return m.group(1) if m else None


def is_meta(name: str) -> bool:
    """True for the ``__...__`` metadata members webdataset skips."""
    top = "/" not in name and name.startswith("__") and name.endswith("__")
    return top or _META.match(name) is not None


class TarMember(NamedTuple):
    """A regular member of a tar file: ``size`` bytes of data at byte ``offset``."""

    file: SourceFile
    offset: int
    size: int

    def open(self) -> BinaryIO:
        """The member's data as a read-only, seekable binary file (its own bytes only),
        read from the tar this process keeps open (`members.TAR_FILE`): up to
        `WHOLE_READ_BYTES` in one ``pread``, a larger member as it is read."""
        fd = TAR_FILE.get(self.file).fileno()
        if self.size <= WHOLE_READ_BYTES:  # (short where the tar is cut, as a cut file is)
            return io.BytesIO(os.pread(fd, self.size, self.offset))
        return io.BufferedReader(_Range(fd, self.offset, self.size))


class _Range(io.RawIOBase):
    """``size`` bytes of the open file ``fd`` from ``start``, read with ``pread`` (the
    file's own position is never used, nor is it closed here); reads stop where the range
    or the file ends. It has no ``fileno``: a reader such as libtiff must not read the tar
    around it."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._start = start
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        view = memoryview(buf).cast("B")[:n]
        if hasattr(os, "preadv"):
            got = os.preadv(self._fd, [view], self._start + self._pos)
        else:  # pragma: no cover - not Linux
            data = os.pread(self._fd, n, self._start + self._pos)
            got = len(data)
            view[:got] = data
        self._pos += got
        return got

    def readall(self) -> bytes:
        """The rest of the range in one ``pread`` (not in small pieces)."""
        n = max(self._size - self._pos, 0)
        data = os.pread(self._fd, n, self._start + self._pos) if n else b""
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos


# -- listing -----------------------------------------------------------------------------


def compressed_kind(head: bytes) -> tuple[str, str] | None:
    """(format, tool to decompress) when ``head`` starts like a compressed file."""
    for magic, kind, tool in _COMPRESSED:
        if head.startswith(magic):
            return kind, tool
    return None


def _refuse_compressed(path: str, head: bytes) -> None:
    found = compressed_kind(head)
    if found:
        raise ConfigError(
            f"{path} is {found[0]}-compressed: clipfeat reads tar members in place by their "
            f"offset, which needs an uncompressed tar; decompress it first ({found[1]})"
        )


def _not_taken(info: tarfile.TarInfo) -> str | None:
    """Why a member named like an image is recorded instead of read (None: it is read)."""
    if info.issparse():
        return "sparse tar member: not read (webdataset skips it too)"
    if not info.isreg():
        kind = _KINDS.get(info.type, "special member")
        return f"not a regular tar member ({kind}): not read (webdataset skips it too)"
    return None


class _Listing:
    """One tar's members, read header by header (only the current header is kept)."""

    def __init__(self, path: str, suffixes: tuple[str, ...]) -> None:
        self.path = path
        self.suffixes = suffixes
        self.items: list[Item] = []

    def run(self) -> list[Item]:
        from clipfeat.preprocess import ImageRejected, open_regular

        try:
            fh = open_regular(self.path)
        except (OSError, ImageRejected) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise ConfigError(f"cannot read tar file {self.path}: {reason}") from None
        with fh:
            self.file = source_file(self.path, TAR, os.fstat(fh.fileno()))
            _refuse_compressed(self.path, fh.read(8))
            fh.seek(0)
            try:
                tf = tarfile.open(fileobj=fh, mode="r:", encoding="utf-8",
                                  errors="surrogateescape")
            except (tarfile.TarError, ValueError) as err:
                raise ConfigError(f"{self.path} is not a tar file ({err}): pass .tar files "
                                  "(uncompressed), or check that it is complete") from None
            except OSError as err:
                raise ConfigError(f"cannot read tar file {self.path}: {err}") from None
            self._members(tf, fh)
        return self.items

    def _members(self, tf: tarfile.TarFile, fh: BinaryIO) -> None:
        while True:
            try:
                info = tf.next()  # the first call returns the member open() read
            except (tarfile.TarError, ValueError) as err:  # e.g. cut inside a member's data
                self._warn_damage(tf.offset, str(err))
                return
            except OSError as err:
                raise ConfigError(f"cannot read tar file {self.path}: {err}") from None
            if info is None:
                break
            self._add(info)
            tf.members = []  # keep no header but the current one
        self._check_end(tf.offset, fh)

    def _add(self, info: tarfile.TarInfo) -> None:
        name = info.name
        if is_meta(name) or not name.lower().endswith(self.suffixes) or info.isdir():
            return
        shown = display_path(self.file.path, text_key(name))
        key = sample_key(name)
        if key is None:
            self.items.append(Item(text_key(name), shown, "no webdataset key: the member's "
                                   "name has nothing before its first dot (webdataset skips "
                                   "it)"))
            return
        error = _not_taken(info)
        end = info.offset_data + info.size
        if error is None and end > self.file.size:
            present = self.file.size - info.offset_data
            error = (f"truncated tar member: the tar file ends {present:,} bytes into its "
                     f"{info.size:,} bytes")
        member = None if error else TarMember(self.file, info.offset_data, info.size)
        self.items.append(Item(text_key(key), shown, error, member))

    def _check_end(self, offset: int, fh: BinaryIO) -> None:
        """The listing stopped at ``offset``: warn unless an end-of-archive block is there."""
        fh.seek(offset)
        block = fh.read(_BLOCK)
        if len(block) == _BLOCK and block.count(0) == _BLOCK:
            return
        what = ("ends without an end-of-archive block (truncated?)" if not block
                else "has a damaged or truncated header")
        self._warn_damage(offset, what)

    def _warn_damage(self, offset: int, what: str) -> None:
        logger.warning("%s %s at byte %d: its %d image members before that point are read, "
                       "anything after it is not", self.path, what, offset, len(self.items))


def list_tar(path: str, suffixes: tuple[str, ...]) -> list[Item]:
    """The image members of the tar file ``path`` in archive order (see the module doc).
    ConfigError if it cannot be opened or is not an (uncompressed) tar at all; damage
    after the first member is a warning, the members before it kept."""
    return _Listing(path, suffixes).run()
