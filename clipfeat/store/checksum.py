"""The shard checksum: a 512-byte HDF5 user block holding a tree hash of the rest of the file.

The checksum of a file is the sha256 of the concatenated sha256 digests of its consecutive
blocks from byte 512 on (the user block itself is not covered). The block size is part of
the checksum's kind, written in the user block: ``sha256-1MiB-tree`` since format 2,
``sha256-8MiB-tree`` in format-1 shards, which stay valid. Blocks hash independently, so
`hash_fd` hashes them in parallel threads, and `TreeHasher` hashes the blocks that feature
rows fill while they are written, leaving only the rest (metadata, the keys, the ends of
the row region) to be read back at commit.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Iterable

USERBLOCK = 512
USERBLOCK_MAGIC = b"clipfeat-shard 1\n"
MiB = 1024 * 1024
HASH_BLOCK = 1 * MiB
CHECKSUM_KIND = "sha256-1MiB-tree"
HASH_THREADS = 8
_KIND_RE = re.compile(r"^sha256-(\d{1,4})MiB-tree$")


def block_size_of(kind: str) -> int | None:
    """The block size of checksum ``kind`` (``sha256-<N>MiB-tree``), None if unknown."""
    m = _KIND_RE.match(kind)
    return int(m.group(1)) * MiB if m and int(m.group(1)) > 0 else None


def userblock_bytes(digest: str, size: int, kind: str = CHECKSUM_KIND) -> bytes:
    text = USERBLOCK_MAGIC + f"checksum {kind} {digest}\nbytes {size}\n".encode()
    return text.ljust(USERBLOCK, b"\0")


def parse_userblock_kind(block: bytes) -> tuple[str, int, str] | None:
    """(checksum, size, kind) recorded in a shard's user block, or None if it holds none. A
    block that is not byte-for-byte what the writer produced for those values is also None."""
    if len(block) != USERBLOCK or not block.startswith(USERBLOCK_MAGIC):
        return None
    try:
        lines = block.rstrip(b"\0").decode("ascii").splitlines()
        _, kind, digest = lines[1].split(" ")
        size = int(lines[2].split(" ", 1)[1])
    except (UnicodeDecodeError, IndexError, ValueError):
        return None
    if block_size_of(kind) is None or userblock_bytes(digest, size, kind) != block:
        return None
    return digest, size, kind


def parse_userblock(block: bytes) -> tuple[str, int] | None:
    """(checksum, size) recorded in a shard's user block, or None (see parse_userblock_kind)."""
    parsed = parse_userblock_kind(block)
    return None if parsed is None else parsed[:2]


def _block_digest(fd: int, offset: int, size: int, block: int) -> bytes:
    want = min(block, size - offset)
    h = hashlib.sha256()
    while want > 0:
        data = os.pread(fd, min(want, 8 * MiB), offset)
        if not data:
            raise OSError(errno.EIO, f"file shrank while hashing at byte {offset}")
        h.update(data)
        offset += len(data)
        want -= len(data)
    return h.digest()


def hash_fd(fd: int, start: int, block: int = HASH_BLOCK,
            known: dict[int, bytes] | None = None) -> tuple[str, int]:
    """Checksum of an open file's bytes from ``start`` to its end, and the file's size.

    ``known`` maps block numbers to digests already computed (by `TreeHasher`); the other
    blocks are read back and hashed in threads (hashlib and pread release the GIL).
    """
    size = os.fstat(fd).st_size
    known = known or {}
    offsets = range(start, size, block)
    digests: list[bytes | None] = [known.get(i) for i in range(len(offsets))]
    missing = [i for i, d in enumerate(digests) if d is None]
    threads = min(HASH_THREADS, os.cpu_count() or 1, len(missing))

    def fill(i: int) -> None:
        digests[i] = _block_digest(fd, offsets[i], size, block)

    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(fill, missing))
    else:
        for i in missing:
            fill(i)
    return hashlib.sha256(b"".join(digests)).hexdigest(), size  # type: ignore[arg-type]


class TreeHasher:
    """Digests of the checksum blocks that bytes written in file order fill completely.

    `feed` takes bytes with their file offset; a block is digested here only when every one
    of its bytes came through `feed`, in order and without a gap (bytes between two runs of
    rows are metadata that HDF5 writes later: such a block is left to `hash_fd`). Feed it
    from one thread at a time.
    """

    def __init__(self, start: int = USERBLOCK, block: int = HASH_BLOCK) -> None:
        self.start = start
        self.block = block
        self.digests: dict[int, bytes] = {}
        self._cur: int | None = None  # block being hashed
        self._h = None
        self._filled = 0

    def feed(self, offset: int, data: memoryview) -> None:
        """Hash ``data``, the bytes at file offset ``offset`` onwards."""
        view = memoryview(data).cast("B")
        pos = offset
        while len(view):
            b, inner = divmod(pos - self.start, self.block)
            if pos < self.start:  # pragma: no cover - rows never precede the user block end
                skip = self.start - pos
            elif self._cur == b and inner == self._filled:
                skip = 0
            elif inner == 0:  # a fresh block starts here
                self._cur, self._h, self._filled = b, hashlib.sha256(), 0
                skip = 0
            else:  # joins a block midway or after a gap: leave that block to hash_fd
                self._cur = None
                skip = self.block - inner
            if skip:
                view, pos = view[skip:], pos + skip
                continue
            n = min(len(view), self.block - self._filled)
            self._h.update(view[:n])
            self._filled += n
            view, pos = view[n:], pos + n
            if self._filled == self.block:
                self.digests[b] = self._h.digest()
                self._cur, self._h = None, None

    def feed_runs(self, runs: Iterable[tuple[int, memoryview]]) -> None:
        for offset, data in runs:
            self.feed(offset, data)


def shard_checksum(path: str | os.PathLike) -> tuple[str, int] | None:
    """(checksum, size) recorded in the user block of a finished shard (cheap: 512 bytes),
    or None if the shard has no valid checksum block."""
    with open(path, "rb") as fh:
        return parse_userblock(fh.read(USERBLOCK))


def check_shard_bytes(path: str | os.PathLike) -> str | None:
    """Re-hash a shard and compare with its user block: None when intact, else a reason."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, USERBLOCK, 0)
        recorded = parse_userblock_kind(head)
        if recorded is None:
            return "its checksum block (first 512 bytes) is missing or damaged"
        digest, size = hash_fd(fd, USERBLOCK, block_size_of(recorded[2]) or HASH_BLOCK)
    finally:
        os.close(fd)
    if size != recorded[1]:
        return f"it has {size} bytes but was written with {recorded[1]} (truncated or extended)"
    if digest != recorded[0]:
        return "its content changed since it was written (checksum mismatch, e.g. a flipped byte)"
    return None
