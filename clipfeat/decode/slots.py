"""Shared memory for decoded pixels: one uint8 image slot per item in flight.

The parent creates it; each worker maps the same memory (the descriptor travels with the
process arguments), writes a decoded image into the slot it was given, and only a short
message goes over the pipe.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


def _shared_fd(size: int) -> int:
    """A file descriptor of ``size`` bytes of shared memory that vanishes with its last user
    (no name to leak in /dev/shm if the run is killed)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("clipfeat-pixels", os.MFD_CLOEXEC)
    else:  # pragma: no cover - macOS and others: an unlinked temporary file
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


class Slots:
    """Shared memory for decoded pixels: ``count`` slots of one uint8 ``shape`` array each
    (an image (3, H, W), or the flat pixels of several preprocessings).

    The parent creates it; each worker maps the same memory (the descriptor travels with the
    process arguments). Pages are only backed once written, so unused slots cost nothing.
    """

    def __init__(self, count: int, shape: tuple[int, ...], fd: int | None = None) -> None:
        import math

        import numpy as np

        self.count = count
        self.shape = tuple(shape)
        self.nbytes = math.prod(shape)
        size = count * self.nbytes
        self.fd = _shared_fd(size) if fd is None else fd
        try:
            self._mm: mmap.mmap | None = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self._all: Any = np.frombuffer(self._mm, dtype=np.uint8).reshape(count, *shape)
        self._base = self._all.__array_interface__["data"][0]

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        return (_attach_slots, (reduction.DupFd(self.fd), self.count, self.shape))

    def view(self, slot: int) -> np.ndarray:
        return self._all[slot]

    def slot_of(self, array: Any) -> int:
        """The slot ``array`` (a view from :meth:`view`) lives in; ValueError otherwise."""
        try:
            addr = array.__array_interface__["data"][0]
        except (AttributeError, KeyError, TypeError):
            raise ValueError("not an array from this pool") from None
        slot, rest = divmod(addr - self._base, self.nbytes)
        if rest or not 0 <= slot < self.count or array.shape != self.shape:
            raise ValueError("not an array from this pool")
        return slot

    def close(self) -> None:
        """Release the descriptor and, unless arrays still point into it, the mapping."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        mm, self._mm = self._mm, None
        if mm is not None:
            self._all = None
            try:
                mm.close()
            except BufferError:  # views still held by the caller: freed with the last one
                pass


def _attach_slots(fd: Any, count: int, shape: tuple[int, ...]) -> Slots:
    return Slots(count, shape, fd=fd.detach())
