"""The child side of the decode pool: what a worker process runs.

A worker receives ``(seq, path, slot)`` messages, decodes the file exactly as LLaVA does
(`decode_file`), writes the pixels into its slot of the shared memory (`slots`) and answers
``(seq, PIXELS, None, False, stderr)``, or ``(seq, None, error, retryable, stderr)``, where
``stderr`` is what the decoder wrote to fd 2 meanwhile (C libraries do; it never reaches the
terminal, see `StderrCapture`). Workers never import torch, ignore SIGINT (the parent
decides), dump no core, run niced, and exit on their own when the parent disappears (EOF on the pipe, ``PR_SET_PDEATHSIG``, and a watchdog).
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from clipfeat.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    PreprocessSpec,
    load_image,
    to_uint8,
)
from clipfeat.sources import opened
from clipfeat.specset import SpecSet, pixel_shape

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from clipfeat.decode.slots import Slots

DecodeFn = Callable[[str, PreprocessSpec, str, bool, "int | None"], "np.ndarray"]


def decode_file(
    path: str,
    spec: PreprocessSpec | SpecSet,
    aspect: str = "square",
    exif_transpose: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one file exactly as LLaVA does and return uint8 (3, out_h, out_w); for a
    `SpecSet` (several towers), decode it once and return every spec's pixels, flat.

    ``path`` may also be an image inside a tar or parquet file (`clipfeat.sources`): its
    bytes are read where they are and decoded as the same file on disk would be."""
    with opened(path) as src:
        img = load_image(src, exif_transpose=exif_transpose, max_pixels=max_pixels)
    if isinstance(spec, SpecSet):
        return spec.pixels(img, aspect, max_pixels)
    return to_uint8(img, spec, aspect, max_pixels=max_pixels)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(exc: BaseException) -> str:
    """A short one-line reason for ``failures.jsonl``."""
    try:
        from PIL import UnidentifiedImageError
    except ImportError:  # pragma: no cover
        UnidentifiedImageError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, ImageRejected):
        return _one_line(str(exc))
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return "not a regular file"
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file"
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "symlink loop"
    msg = _one_line(str(exc))
    if isinstance(exc, (OSError, EOFError, SyntaxError)) and "truncat" in msg.lower():
        return f"truncated image: {msg}"
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def is_final(exc: BaseException) -> bool:
    """True for refusals that never involve the decoder's state (no retry needed)."""
    if isinstance(exc, (ImageRejected, FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ELOOP, errno.ENAMETOOLONG)


def resolve_decoder(fn: DecodeFn | str) -> DecodeFn:
    if callable(fn):
        return fn
    module, _, name = fn.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


WORKER_NICENESS = 10


def harden_worker(main_pid: int) -> None:
    """Make a worker die with its parent, ignore Ctrl-C and hang-ups, never dump core.

    Workers also run at a lower priority: the main process (the device loop and, on a
    CPU run, torch's intra-op threads, which stall as a group when one is preempted) gets
    the cores first, and decoding fills the time they leave.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A closed terminal hangs up the whole process group: the parent stops the run.
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    except (ImportError, ValueError, OSError):
        pass
    # PR_SET_PDEATHSIG follows the *thread* that forked us: only safe when that is the
    # forkserver's main thread, not a manager thread of the main process (spawn).
    if sys.platform.startswith("linux") and os.getppid() != main_pid:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed when our parent exits
        except (OSError, AttributeError):
            pass
    keep_heap()
    ppid = os.getppid()

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(1)
            try:
                os.kill(main_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()
    try:
        os.kill(main_pid, 0)  # the parent may have died before the death signal was armed
    except ProcessLookupError:
        os._exit(1)
    except PermissionError:
        pass


def keep_heap() -> None:
    """Stop glibc from handing each image's buffers back to the OS.

    A worker allocates and frees the same few buffers per image (the decoded image, the
    resize output, the pixels sent back). With glibc's defaults they are unmapped on free
    and faulted in again, page by page, for the next image: about 400 page faults and a
    fifth of the worker's time for a 640x480 photo. Buffers below 32 MiB (every Pillow
    block) now come from the heap, and up to 128 MiB of free heap is kept for reuse.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 128 << 20)
    mallopt(m_top_pad, 16 << 20)


#: Marks a reply whose pixels are in the item's slot.
PIXELS = "pixels"

#: The most of a decoder's stderr kept per item (C libraries can be chatty).
STDERR_LIMIT = 300


class StderrCapture:
    """The worker's fd 2, redirected into an anonymous file and read back after each item.

    C libraries (libtiff's "WEBP compression support is not configured", libpng warnings)
    write to fd 2 directly; in a worker that is the parent's terminal, where the text would
    land over the progress bar. Here it is kept per item instead: appended to the item's
    error, or sent to the parent's log for an item that decoded fine.
    """

    def __init__(self) -> None:
        try:
            fd = os.memfd_create("clipfeat-decode-stderr", getattr(os, "MFD_CLOEXEC", 0))
        except (AttributeError, OSError):
            import tempfile

            fh = tempfile.TemporaryFile()
            fd = os.dup(fh.fileno())
            fh.close()
        sys.stderr.flush()
        os.dup2(fd, 2)
        os.close(fd)

    def take(self) -> str:
        """What was written to fd 2 since the last call, as one line ('' if nothing)."""
        try:
            sys.stderr.flush()
            if os.fstat(2).st_size == 0:
                return ""
            os.lseek(2, 0, os.SEEK_SET)
            data = os.read(2, 64 * 1024)
            os.ftruncate(2, 0)
            os.lseek(2, 0, os.SEEK_SET)
        except (OSError, ValueError):
            return ""
        return _one_line(data.decode("utf-8", "replace"), STDERR_LIMIT)


def with_stderr(error: str, said: str) -> str:
    """``error`` with what the decoder wrote to stderr, e.g. "cannot identify image file
    (TIFFReadDirectory: ...)"."""
    return f"{error} ({said})" if said else error


def worker_main(conn: Any, main_pid: int, decode_fn: DecodeFn | str,
                spec: PreprocessSpec | SpecSet,
                aspect: str, exif_transpose: bool, max_pixels: int | None,
                 slots: Slots) -> None:
    """Worker loop: receive (seq, path, slot); write the pixels into the slot and send
    (seq, PIXELS, None, False, stderr), or send (seq, None, error, retryable, stderr)."""
    import warnings

    import numpy as np

    harden_worker(main_pid)
    stderr = StderrCapture()  # nothing a decoder writes to fd 2 reaches the terminal
    warnings.simplefilter("ignore")  # Pillow's chatter; decompression bombs are handled
    fn = resolve_decoder(decode_fn)
    shape = pixel_shape(spec)
    try:
        conn.send(("ready", os.getpid()))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            seq, path, slot = msg
            try:
                arr = fn(path, spec, aspect, exif_transpose, max_pixels)
                if getattr(arr, "shape", None) != shape or str(arr.dtype) != "uint8":
                    raise TypeError(f"decoder returned {getattr(arr, 'shape', type(arr))}, "
                                    f"expected uint8 {shape}")
            except Exception as exc:  # noqa: BLE001 - every failure becomes data
                said = stderr.take()
                conn.send((seq, None, with_stderr(describe_error(exc), said), not is_final(exc),
                           ""))
                continue
            np.copyto(slots.view(slot), arr)  # all written before the reply says so
            conn.send((seq, PIXELS, None, False, stderr.take()))
    except (EOFError, OSError):
        pass  # parent gone
