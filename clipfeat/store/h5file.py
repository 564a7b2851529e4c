"""HDF5 files of shards: the guarded file HDF5 writes its metadata through, the features
datasets with their chunks allocated up front, and where each row's chunk lies in the file.

HDF5 itself never writes a feature byte. A features dataset (``features``, or one
``features/NAME`` per output of a several-output shard) is chunked one row per
chunk, unfiltered, with early allocation and no fill: growing it by n rows makes HDF5
reserve n chunks (metadata only) and `RowSpace` asks where they are, so the rows can go to
disk with ``os.pwrite`` (which releases the GIL) and no Python callback per byte.
"""

from __future__ import annotations

import errno
import os
from typing import Any

# HDF5 >= 1.10 file format: checksummed superblock, object headers and chunk index.
LIBVER = ("v110", "v110")


class GuardedFile:
    """A file for HDF5's ``fileobj`` driver that never lets an OS error reach HDF5.

    With HDF5's own driver a failed write (ENOSPC, EIO, ...) leaves dirty metadata that
    HDF5 retries on close and at interpreter exit, where it crashes the process. Here the
    first error is remembered in ``error`` and every later write is discarded, so HDF5
    carries on and closes cleanly; ShardWriter checks ``error`` after each HDF5 call,
    removes the partial file and raises ExtractionError.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.error: OSError | None = None
        self.discard = False
        self._pos = 0
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def _failed(self, err: OSError) -> None:
        if self.error is None:
            self.error = err
        self.discard = True

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = pos
        elif whence == 1:
            self._pos += pos
        else:
            self._pos = os.fstat(self._fd).st_size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = os.preadv(self._fd, [view], self._pos)
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(os.fstat(self._fd).st_size - self._pos, 0)
        data = os.pread(self._fd, size, self._pos)
        self._pos += len(data)
        return data

    def write(self, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        if not self.discard:
            try:
                while done < len(view):
                    n = os.pwrite(self._fd, view[done:], self._pos + done)
                    if n <= 0:
                        raise OSError(errno.EIO, "short write")
                    done += n
            except OSError as err:
                self._failed(err)
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if not self.discard:
            try:
                os.ftruncate(self._fd, size)
            except OSError as err:
                self._failed(err)
        return size

    def flush(self) -> None:
        pass

    def fsync(self) -> None:
        if self.error is not None:
            raise self.error
        try:
            os.fsync(self._fd)
        except OSError as err:
            self._failed(err)
            raise

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def open_shard(path: str | os.PathLike):
    """Open a finished shard read-only: no HDF5 file locking (NFS/Lustre), no chunk cache
    (reads are whole one-image chunks)."""
    import h5py

    try:
        return h5py.File(path, "r", locking=False, rdcc_nbytes=0)
    except OSError as err:
        # The same file is already open in this process with locking on (HDF5 shares one
        # handle per file and refuses a different locking flag): open it the same way.
        if "locking flag" not in str(err):
            raise
        return h5py.File(path, "r", rdcc_nbytes=0)


def _parent_groups(f: Any, name: str) -> None:
    """Create the groups above dataset path ``name`` that do not exist yet, without
    timestamps (so a shard's bytes depend only on what it holds)."""
    import h5py

    parts = name.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        path = "/".join(parts[:i])
        if path in f:
            continue
        gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
        gcpl.set_obj_track_times(False)
        h5py.h5g.create(f.id, path.encode(), gcpl=gcpl)


def create_rows_dataset(f: Any, name: str, tokens: int, hidden: int, dtype: Any) -> Any:
    """An empty (0, tokens, hidden) dataset in ``f`` at path ``name`` (groups above it are
    created), one chunk per row, chunks allocated as the dataset grows and never filled by
    HDF5, no timestamps."""
    import h5py
    import numpy as np

    if "/" in name:
        _parent_groups(f, name)

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((1, tokens, hidden))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)
    space = h5py.h5s.create_simple((0, tokens, hidden), (h5py.h5s.UNLIMITED, tokens, hidden))
    tid = h5py.h5t.py_create(np.dtype(dtype))
    dsid = h5py.h5d.create(f.id, name.encode(), tid, space, dcpl=dcpl)
    return h5py.Dataset(dsid)


class RowSpace:
    """Grows a `create_rows_dataset` dataset and says where its new rows lie in the file.

    `grow(n)` extends the dataset by n rows and returns the file runs they occupy, as
    ``(first row of the n, file offset, rows)``: HDF5 allocates the chunks one after the
    other at the end of the file, with an occasional block of chunk-index metadata between
    two of them, so a run's extent is checked (its first and last chunk) and split where
    it does not tile. `check` compares every recorded offset with HDF5's chunk index.
    ``direct`` is False when this HDF5 cannot say where chunks are (before 1.10.5): the
    caller then writes rows through h5py.
    """

    def __init__(self, ds: Any, row_bytes: int) -> None:
        import numpy as np

        self.ds = ds
        self.row_bytes = row_bytes
        self.rows = 0
        self.offsets = np.zeros(0, dtype=np.int64)
        self.direct = hasattr(ds.id, "get_chunk_info_by_coord")

    def _offset(self, row: int) -> int:
        info = self.ds.id.get_chunk_info_by_coord((row, 0, 0))
        if info.byte_offset is None or info.size != self.row_bytes or info.filter_mask:
            raise OSError(errno.EIO, f"HDF5 did not allocate row {row} as one raw chunk")
        return int(info.byte_offset)

    def _runs(self, lo: int, hi: int, first: int, last: int) -> list[tuple[int, int, int]]:
        """Runs of rows ``lo < hi`` (inclusive), whose chunks lie at ``first`` and ``last``."""
        if last - first == (hi - lo) * self.row_bytes:
            return [(lo, first, hi - lo + 1)]
        if hi == lo + 1:
            return [(lo, first, 1), (hi, last, 1)]
        mid = (lo + hi) // 2
        left = self._runs(lo, mid, first, self._offset(mid))
        right = self._runs(mid + 1, hi, self._offset(mid + 1), last) if mid + 1 < hi \
            else [(hi, last, 1)]
        (a, off, n), (_, nxt, m) = left[-1], right[0]
        if off + n * self.row_bytes == nxt:  # the split fell inside one run: join it again
            left[-1] = (a, off, n + m)
            right = right[1:]
        return left + right

    def grow(self, n: int) -> list[tuple[int, int, int]]:
        """Extend by ``n`` rows; their runs, with rows counted from the first new row."""
        import numpy as np

        start = self.rows
        self.ds.id.set_extent((start + n, *self.ds.shape[1:]))
        self.rows = start + n
        if not self.direct or n == 0:
            return []
        lo, hi = start, start + n - 1
        first = self._offset(lo)
        runs = [(lo, first, 1)] if hi == lo else self._runs(lo, hi, first, self._offset(hi))
        offsets = np.empty(n, dtype=np.int64)
        for row, off, count in runs:
            offsets[row - start:row - start + count] = off + self.row_bytes * np.arange(count)
        self.offsets = np.concatenate([self.offsets, offsets])
        return [(row - start, off, count) for row, off, count in runs]

    def check(self) -> None:
        """OSError unless HDF5's chunk index puts every row where it was written."""
        import numpy as np

        if not self.direct or not self.rows:
            return
        found = np.full(self.rows, -1, dtype=np.int64)

        def visit(info: Any) -> None:
            found[int(info.chunk_offset[0])] = -1 if info.byte_offset is None \
                else int(info.byte_offset)

        try:
            self.ds.id.chunk_iter(visit)
        except AttributeError:  # HDF5 < 1.14: one query per chunk
            for row in range(self.rows):
                found[row] = self._offset(row)
        if not np.array_equal(found, self.offsets):
            raise OSError(errno.EIO, "HDF5's chunk index disagrees with where rows were written")


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (os.pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n
