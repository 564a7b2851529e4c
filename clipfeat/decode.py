"""Decode worker processes: files -> uint8 (3, H, W) arrays; nothing can stall or crash the run.

:class:`DecodePool` runs :func:`decode_file` (or a given ``decode_fn``) in separate processes,
each talking to the parent over its own pipe. A manager thread in the parent keeps every
worker fed (a queue of up to :data:`PER_WORKER` items each), watches pipes and process
sentinels with ``multiprocessing.connection.wait``, and hands results back **in input order**,
with a bounded number of items in flight however long the input is.

Pixels do not travel through the pipes: every item in flight owns a slot of a shared-memory
buffer (:class:`_Slots`), the worker writes the decoded image into it, and only a short
message goes over the pipe. So a worker never waits for the parent to read its pixels, and
the parent needs its GIL for a few microseconds per image, not for a 0.3 MB read; while the
main thread is busy (importing torch, say), the workers keep decoding into their slots.

Failure handling, per item (each failure becomes a :class:`DecodeResult` with ``error`` set):

* a decode that runs longer than ``timeout``: the worker is killed and replaced;
* a worker that dies holding an item (segfault, ``os._exit``, OOM kill): replaced; the item is
  retried once in a fresh process, unless it already ran in one; items the worker had queued
  but not started are re-dispatched, not failed;
* an error from the decoder: Pillow keeps state between files, so the worker is replaced and,
  unless it was already fresh, the item is retried once in a fresh process; that second
  answer is the one reported. File-level refusals (missing, not a regular file, decompression
  bomb) are final at once.

Workers never import torch, ignore SIGINT (the parent decides), dump no core, and exit on
their own when the parent disappears (EOF on the pipe, ``PR_SET_PDEATHSIG``, and a watchdog
that polls the parent pid).
"""

from __future__ import annotations

import errno
import importlib
import logging
import mmap
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from clipfeat.errors import ConfigError, ExtractionError
from clipfeat.preprocess import (
    ASPECTS,
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    PreprocessSpec,
    load_image,
    to_uint8,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "DecodePool",
    "DecodeResult",
    "DecodeStats",
    "decode_file",
    "default_workers",
    "describe_error",
]

log = logging.getLogger(__name__)

DecodeFn = Callable[[str, PreprocessSpec, str, bool, "int | None"], "np.ndarray"]

#: Items queued per worker: one being decoded, the rest waiting. A deep queue keeps a worker
#: busy while the parent's threads cannot run (a long import holds the GIL for up to half a
#: second); the items are answered in order, so the one a crash interrupts is still known.
PER_WORKER = 32

# Modules the forkserver imports once so that each new worker starts warm (~10 ms). With
# "__main__" listed, the main script is imported once there (as __mp_main__) instead of once
# per worker, which matters when it imports torch.
_PRELOAD = [
    "__main__", "clipfeat.decode", "numpy", "PIL.Image", "PIL.ImageOps", "PIL.JpegImagePlugin",
    "PIL.PngImagePlugin", "PIL.GifImagePlugin", "PIL.WebPImagePlugin", "PIL.TiffImagePlugin",
    "PIL.BmpImagePlugin",
]


class DecodeResult(NamedTuple):
    """One input's outcome: ``array`` (uint8 (3, H, W)) or a one-line ``error``."""

    index: int
    key: str
    path: str
    array: np.ndarray | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class DecodeStats:
    """Counters for the run summary."""

    decoded: int = 0
    failed: int = 0
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0
    retries: int = 0
    recovered: int = 0  # items that failed once and succeeded when retried in a fresh process

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def default_workers() -> int:
    """CPUs available to this process minus one for the parent, at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n - 1)


# --------------------------------------------------------------------------------------------
# What a worker runs


def decode_file(
    path: str,
    spec: PreprocessSpec,
    aspect: str = "square",
    exif_transpose: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one file exactly as LLaVA does and return uint8 (3, out_h, out_w)."""
    img = load_image(path, exif_transpose=exif_transpose, max_pixels=max_pixels)
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


def _is_final(exc: BaseException) -> bool:
    """True for refusals that never involve the decoder's state (no retry needed)."""
    if isinstance(exc, (ImageRejected, FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ELOOP, errno.ENAMETOOLONG)


def _resolve(fn: DecodeFn | str) -> DecodeFn:
    if callable(fn):
        return fn
    module, _, name = fn.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


WORKER_NICENESS = 10


def _harden_worker(main_pid: int) -> None:
    """Make a worker die with its parent, ignore Ctrl-C and never dump core.

    Workers also run at a lower priority: the main process (the device loop and, on a
    CPU run, torch's intra-op threads, which stall as a group when one is preempted) gets
    the cores first, and decoding fills the time they leave.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    _keep_heap()
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


def _keep_heap() -> None:
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


class _Slots:
    """Shared memory for decoded pixels: ``count`` slots of one uint8 ``shape`` image each.

    The parent creates it; each worker maps the same memory (the descriptor travels with the
    process arguments). Pages are only backed once written, so unused slots cost nothing.
    """

    def __init__(self, count: int, shape: tuple[int, int, int], fd: int | None = None) -> None:
        import numpy as np

        self.count = count
        self.shape = shape
        self.nbytes = shape[0] * shape[1] * shape[2]
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


def _attach_slots(fd: Any, count: int, shape: tuple[int, int, int]) -> _Slots:
    return _Slots(count, shape, fd=fd.detach())


def _worker_main(conn: Any, main_pid: int, decode_fn: DecodeFn | str, spec: PreprocessSpec,
                 aspect: str, exif_transpose: bool, max_pixels: int | None,
                 slots: _Slots) -> None:
    """Worker loop: receive (seq, path, slot); write the pixels into the slot and send
    (seq, PIXELS, None, False), or send (seq, None, error, retryable)."""
    import warnings

    import numpy as np

    _harden_worker(main_pid)
    warnings.simplefilter("ignore")  # Pillow's chatter; decompression bombs are handled
    fn = _resolve(decode_fn)
    shape = (3, spec.out_height, spec.out_width)
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
                conn.send((seq, None, describe_error(exc), not _is_final(exc)))
                continue
            np.copyto(slots.view(slot), arr)  # all written before the reply says so
            conn.send((seq, PIXELS, None, False))
    except (EOFError, OSError):
        pass  # parent gone


# --------------------------------------------------------------------------------------------
# The parent side


def _startup_hint() -> str:
    """What to do when workers die before they are ready.

    The usual cause: a script calling clipfeat at its top level without a
    ``if __name__ == "__main__":`` guard. Workers re-import the main script (as
    multiprocessing's spawn and forkserver do), which calls clipfeat again in the worker.
    """
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if script and getattr(getattr(main, "__spec__", None), "name", None) is None:
        return (f"if {os.path.basename(script)} calls clipfeat at its top level, put the call "
                "under `if __name__ == \"__main__\":` (workers re-import the main script); "
                "otherwise run with --workers 0 to see the error")
    return "run with --workers 0 to see the error"


class _Worker:
    """A worker process, its pipe, and the items it holds (head = being decoded)."""

    def __init__(self, proc: Any, conn: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.queue: deque[int] = deque()
        self.ready = False
        self.since: float | None = None  # when the head item started (worker ready)
        self.done = 0  # items this process has answered
        self.started = time.monotonic()
        self.alive = True


class DecodePool:
    """Decode files into uint8 arrays in worker processes; results come back in input order.

    Use as a context manager; call :meth:`imap` once or several times (one at a time)::

        with DecodePool(spec, aspect="pad", workers=8) as pool:
            for r in pool.imap((i, key, path) for i, (key, path) in enumerate(items)):
                ...  # r.array (uint8 (3, H, W)) or r.error

    ``workers=0`` decodes in the calling thread (no timeout or crash isolation).
    ``max_pending`` bounds the items taken from the input but not yet handed out (default
    ``max(32, 8 * workers)``; pass about twice the consumer's batch size); it is also the
    number of image slots of shared memory the workers decode into. ``decode_fn`` is a
    module-level function (or ``"module:function"``) with :func:`decode_file`'s signature.
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        aspect: str = "square",
        *,
        workers: int | None = None,
        exif_transpose: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        timeout: float = 60.0,
        max_pending: int | None = None,
        decode_fn: DecodeFn | str | None = None,
        start_method: str | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        if not isinstance(spec, PreprocessSpec):
            raise ConfigError(f"spec must be a PreprocessSpec, got {type(spec).__name__}")
        if aspect not in ASPECTS:
            raise ConfigError(f"unknown aspect {aspect!r}; expected one of {ASPECTS}")
        workers = default_workers() if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"workers must be an integer >= 0, got {workers!r}")
        if not timeout or timeout <= 0:
            raise ConfigError(f"decode timeout must be > 0 seconds, got {timeout!r}")
        if max_pixels is not None and (isinstance(max_pixels, bool) or max_pixels < 1):
            raise ConfigError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
        if max_pending is None:
            max_pending = max(32, 8 * workers)
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        fn: DecodeFn | str = decode_file if decode_fn is None else decode_fn
        try:
            resolved = _resolve(fn)
            if workers:
                pickle.dumps(resolved)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"decode_fn {fn!r} must be an importable module-level function: {e}"
            ) from None

        self.spec = spec
        self.aspect = aspect
        self.workers = workers
        self.exif_transpose = exif_transpose
        self.max_pixels = max_pixels
        self.timeout = float(timeout)
        self.max_pending = max_pending
        self.startup_timeout = float(startup_timeout)
        self.stats = DecodeStats()
        self._decode_fn = fn
        self._start_method = start_method
        self._ctx: Any = None
        self._slots: list[_Worker] = []
        self._pixels: _Slots | None = None  # shared memory the workers write pixels into
        self._running = False
        self._active: tuple[_Run, threading.Thread] | None = None
        self._closed = False
        # Held to start or replace workers and to close: close() may come from another
        # thread (the pipeline's, while its feeder thread is still starting the pool), and
        # no worker may be started after it, nor with the shared memory already released.
        self._life = threading.RLock()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> DecodePool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker processes (done by ``with`` and on first use)."""
        with self._life:
            self._start()

    def _start(self) -> None:
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        if self.workers == 0:
            return
        if self._ctx is None:
            import multiprocessing as mp

            method = self._start_method
            if method is None:
                method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            if method not in ("forkserver", "spawn"):
                # fork would copy the parent's torch/CUDA threads and locks into the worker
                raise ConfigError(
                    f"start_method must be 'forkserver' or 'spawn', got {method!r}"
                )
            self._ctx = mp.get_context(method)
            if method == "forkserver":
                self._ctx.set_forkserver_preload(_PRELOAD)
        if self._pixels is None:
            self._pixels = _Slots(self.max_pending,
                                  (3, self.spec.out_height, self.spec.out_width))
        while len(self._slots) < self.workers:
            self._slots.append(self._spawn())

    def close(self) -> None:
        """Stop every worker (politely, then by force). Idempotent; callable from any thread."""
        with self._life:
            if self._closed:
                return
            self._closed = True
            active = self._active
        if active is not None:  # a run abandoned without closing its iterator
            run, thread = active
            run.stop()
            thread.join(10.0)
        with self._life:  # a worker being started right now is in the list once this returns
            slots, self._slots = self._slots, []
        for w in slots:
            if w.alive and not w.queue:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + 2.0
        for w in slots:
            if w.alive and not w.queue:
                w.proc.join(max(0.0, deadline - time.monotonic()))
            self._kill(w)
        with self._life:
            if self._pixels is not None:
                self._pixels.close()

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (for diagnostics and tests)."""
        return [w.proc.pid for w in self._slots if w.alive]

    def _spawn(self) -> _Worker:
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, os.getpid(), self._decode_fn, self.spec, self.aspect,
                  self.exif_transpose, self.max_pixels, self._pixels),
            name="clipfeat-decode",
            daemon=True,
        )
        proc.start()
        child_conn.close()  # so that the worker's death reads as EOF here
        return _Worker(proc, parent_conn)

    def _kill(self, w: _Worker) -> None:
        w.alive = False
        try:
            if w.proc.exitcode is None:
                w.proc.kill()
            w.proc.join(5.0)
            w.proc.close()
        except (ValueError, OSError):  # still running after SIGKILL+5 s: leave it to the OS
            pass
        try:
            w.conn.close()
        except OSError:
            pass

    # -- decoding ----------------------------------------------------------------------------

    def imap(self, items: Iterable[tuple[int, str, str]], *,
             borrow: bool = False) -> Iterator[DecodeResult]:
        """Decode ``(index, key, path)`` items; yield one :class:`DecodeResult` each, in order.

        Each array is the caller's own copy. With ``borrow=True`` it is a read-only view of
        the pool's shared memory instead (no copy): pass it to :meth:`release` once done with
        it. Until then its slot stays taken, and with all ``max_pending`` slots taken the
        workers wait. Borrowed arrays stay valid until released or until the next ``imap``.
        """
        if self.workers == 0:
            yield from self._imap_inline(items)
            return
        if self._running:
            raise RuntimeError("DecodePool.imap is already running; finish the other one first")
        with self._life:  # close() sees no run, or a started one
            self._start()
            self._running = True
            run = _Run(self, iter(items))
            thread = threading.Thread(target=run.main, name="clipfeat-decode-manager",
                                      daemon=True)
            self._active = (run, thread)
            thread.start()
        try:
            while True:
                try:
                    kind, payload = run.out.get(timeout=1.0)
                except queue.Empty:
                    if self._closed:
                        raise RuntimeError("DecodePool was closed during imap") from None
                    if not thread.is_alive():
                        raise RuntimeError("decode manager thread died") from None
                    continue
                if kind == "result":
                    res, slot = payload
                    if res.array is None:
                        run.release(slot)
                    elif not borrow:
                        res = res._replace(array=res.array.copy())
                        run.release(slot)
                    yield res
                elif kind == "done":
                    break
                else:
                    raise payload
        finally:
            run.stop()
            thread.join()
            self._active = None
            run.close()
            # Workers still holding items of an abandoned run are replaced, so that the next
            # run starts clean.
            with self._life:
                for i, w in enumerate(self._slots):
                    if w.alive and w.queue:
                        self._kill(w)
                    if not w.alive and not self._closed:
                        self._slots[i] = self._spawn()
                        self.stats.restarts += 1
            self._running = False

    def release(self, array: Any) -> None:
        """Give back the slot of an array borrowed from ``imap(..., borrow=True)``.

        Releasing an array twice, or one whose run is over, does nothing; an array not from
        this pool is a ValueError. Arrays of ``workers=0`` pools are ordinary: nothing to do.
        """
        if self.workers == 0:
            return
        if self._pixels is None:
            raise ValueError("not an array from this pool")
        slot = self._pixels.slot_of(array)
        active = self._active
        if active is not None:
            active[0].release(slot, array)

    def _imap_inline(self, items: Iterable[tuple[int, str, str]]) -> Iterator[DecodeResult]:
        fn = _resolve(self._decode_fn)
        for index, key, path in items:
            try:
                arr = fn(path, self.spec, self.aspect, self.exif_transpose, self.max_pixels)
                err = None
                self.stats.decoded += 1
            except Exception as exc:  # noqa: BLE001 - every failure becomes data
                arr, err = None, describe_error(exc)
                self.stats.failed += 1
            yield DecodeResult(index, key, path, arr, err)


class _Run:
    """One ``imap`` call: runs in the manager thread, owns dispatch, waiting and reordering."""

    def __init__(self, pool: DecodePool, items: Iterator[tuple[int, str, str]]) -> None:
        self.pool = pool
        self.items = items
        self.out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        # Every item from the input holds a slot of shared memory until the consumer is done
        # with its result; so the free slots bound the items in flight.
        self._free = list(range(pool.max_pending - 1, -1, -1))
        self._lent: dict[int, int] = {}  # slot -> id of the array handed out from it
        self.slot_of: dict[int, int] = {}
        self._throttled = False  # the manager waits for the consumer to free a slot
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.meta: dict[int, tuple[int, str, str]] = {}
        self.attempts: dict[int, int] = {}
        self.results: dict[int, DecodeResult] = {}
        self.pending: deque[int] = deque()
        self.next_seq = 0
        self.next_out = 0
        self.exhausted = False
        self.startup_failures = 0

    # -- called from the consumer thread ----------------------------------------------------

    def release(self, slot: int, array: Any = None) -> None:
        """Free ``slot``; with ``array``, only if that very array is what the slot lent."""
        # Wake the manager only when it stopped pulling items for want of room: a wake-up
        # per result would cost a round of its loop (and a GIL hand-off) per image.
        with self._lock:
            if array is not None and self._lent.get(slot) != id(array):
                return  # released twice: the slot may already hold another image
            self._lent.pop(slot, None)
            self._free.append(slot)
            wake, self._throttled = self._throttled, False
        if wake:
            self._wake()

    def stop(self) -> None:
        self._stop = True
        self._wake()

    def _wake(self) -> None:
        with self._lock:  # never write to a closed (possibly reused) descriptor
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:  # full (BlockingIOError) is fine: a wake-up is pending anyway
                pass

    def close(self) -> None:
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    # -- manager thread ----------------------------------------------------------------------

    def main(self) -> None:
        try:
            self._loop()
            if not self._stop and not self.pool._closed:
                self.out.put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.out.put(("error", e))

    def _loop(self) -> None:
        from multiprocessing.connection import wait

        pool = self.pool
        while not self._stop and not pool._closed:
            self._pull()
            self._emit()
            if self.exhausted and self.next_out == self.next_seq:
                return
            self._dispatch()
            if self.meta and not self.pending and not any(w.queue for w in pool._slots):
                raise RuntimeError(  # a bookkeeping bug must fail loudly, not hang
                    f"decode pool lost track of {len(self.meta)} item(s)"
                )

            now = time.monotonic()
            deadlines = []
            for w in pool._slots:
                if not w.ready:
                    deadlines.append(w.started + pool.startup_timeout)
                elif w.queue and w.since is not None:
                    deadlines.append(w.since + pool.timeout)
            wait_for = max(0.0, min(deadlines) - now) if deadlines else None

            objs: dict[Any, tuple[_Worker, str]] = {}
            for w in pool._slots:
                objs[w.conn] = (w, "conn")
                objs[w.proc.sentinel] = (w, "exit")
            ready = wait([*objs, self._wake_r], timeout=wait_for)
            for obj in ready:
                if obj == self._wake_r:
                    self._drain_wake()
                    continue
                w, what = objs[obj]
                if not w.alive:
                    continue  # replaced while handling an earlier event of this round
                if what == "conn":
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        self._on_exit(w)
                        continue
                    self._on_message(w, msg)
                else:
                    self._drain_then_exit(w)
            self._check_deadlines()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _pull(self) -> None:
        while True:
            with self._lock:  # decided under the lock that release() holds: no lost wake-up
                if self.exhausted or not self._free:
                    self._throttled = not self.exhausted
                    return
                self._throttled = False
                slots, self._free = self._free, []
            try:
                while slots:
                    try:
                        item = next(self.items)
                    except StopIteration:
                        self.exhausted = True
                        break
                    index, key, path = item
                    seq = self.next_seq
                    self.next_seq += 1
                    self.meta[seq] = (index, key, os.fspath(path))
                    self.attempts[seq] = 1
                    self.slot_of[seq] = slots.pop()
                    self.pending.append(seq)
            finally:
                with self._lock:
                    self._free.extend(slots)

    def _emit(self) -> None:
        while self.next_out in self.results:
            res, slot = self.results.pop(self.next_out)
            if res.array is not None:
                with self._lock:
                    self._lent[slot] = id(res.array)
            self.out.put(("result", (res, slot)))
            self.next_out += 1

    def _dispatch(self) -> None:
        # One item at a time to the least loaded worker: results come back nearly in order.
        while self.pending:
            open_ = [w for w in self.pool._slots if w.alive and len(w.queue) < PER_WORKER]
            if not open_:
                return
            self._send(min(open_, key=lambda w: len(w.queue)), self.pending.popleft())

    def _send(self, w: _Worker, seq: int) -> None:
        w.queue.append(seq)
        if len(w.queue) == 1 and w.ready:
            w.since = time.monotonic()
        try:
            w.conn.send((seq, self.meta[seq][2], self.slot_of[seq]))
        except OSError:  # the worker is gone: this item never started
            w.queue.pop()
            self.pending.appendleft(seq)
            self._on_exit(w)

    def _record(self, seq: int, array: Any, error: str | None) -> None:
        index, key, path = self.meta.pop(seq)
        stats = self.pool.stats
        if error is None:
            stats.decoded += 1
            if self.attempts[seq] > 1:
                stats.recovered += 1
        else:
            stats.failed += 1
            log.debug("decode failed: %s: %s", path, error)
        del self.attempts[seq]
        self.results[seq] = (DecodeResult(index, key, path, array, error),
                             self.slot_of.pop(seq))

    def _on_message(self, w: _Worker, msg: Any) -> None:
        now = time.monotonic()
        if msg[0] == "ready":
            w.ready = True
            self.startup_failures = 0
            w.since = now if w.queue else None
            return
        seq, array, error, retryable = msg
        if not w.queue or w.queue[0] != seq:
            raise RuntimeError(f"decode worker answered item {seq}, expected {list(w.queue)[:1]}")
        if isinstance(array, str) and array == PIXELS:
            array = self.pool._pixels.view(self.slot_of[seq])
            array.flags.writeable = False  # a view of the slot, for reading
        w.queue.popleft()
        was_fresh = w.done == 0
        w.done += 1
        w.since = now if w.queue else None
        if error is None or not retryable:
            self._record(seq, array, error)
            return
        # The decoder failed: this process may carry state from an earlier file, so it is
        # never reused, and the item gets one more try in a fresh process unless it had one.
        if was_fresh or self.attempts[seq] >= 2:
            self._record(seq, None, error)
            self._replace(w)
        else:
            self.attempts[seq] += 1
            self.pool.stats.retries += 1
            self._replace(w, first=seq)

    def _drain_then_exit(self, w: _Worker) -> None:
        """The process ended: read what it managed to send, then account for the rest."""
        try:
            while w.alive and w.conn.poll():
                self._on_message(w, w.conn.recv())
        except (EOFError, OSError):
            pass
        if w.alive:
            self._on_exit(w)

    def _on_exit(self, w: _Worker) -> None:
        """A worker died (or its pipe broke): fail or retry its head item, requeue the rest."""
        pool = self.pool
        if not w.alive:
            return
        w.proc.join(1.0)
        code = w.proc.exitcode
        if not w.ready:
            self.startup_failures += 1
            if self.startup_failures > 3:
                raise ExtractionError(
                    f"decode workers fail to start (last exit code {code}); "
                    + _startup_hint()
                )
            log.warning("decode worker failed to start (exit code %s); restarting", code)
            self._replace(w)
            return
        if not w.queue:
            log.warning("idle decode worker exited (exit code %s); restarting", code)
            self._replace(w)
            return
        seq = w.queue.popleft()
        pool.stats.crashes += 1
        if code is not None and code < 0:
            reason = f"decoder crashed (signal {-code})"
        else:
            reason = f"decoder crashed (exit code {code})"
        if w.done == 0 or self.attempts[seq] >= 2:
            self._record(seq, None, reason)
            self._replace(w)
        else:
            self.attempts[seq] += 1
            pool.stats.retries += 1
            self._replace(w, first=seq)

    def _check_deadlines(self) -> None:
        pool = self.pool
        now = time.monotonic()
        for w in list(pool._slots):
            if not w.alive:
                continue
            if not w.ready and now - w.started > pool.startup_timeout:
                log.warning("decode worker did not start within %.0fs; restarting",
                            pool.startup_timeout)
                self._on_exit(w)
            elif w.queue and w.since is not None and now - w.since > pool.timeout:
                seq = w.queue.popleft()
                pool.stats.timeouts += 1
                self._record(seq, None, f"decode timed out after {pool.timeout:g}s")
                self._replace(w)

    def _replace(self, w: _Worker, first: int | None = None) -> None:
        """Kill ``w``, requeue the items it had not started, start a fresh worker in its place.

        ``first`` (an item needing a fresh process) becomes the new worker's first item.
        """
        pool = self.pool
        rest = [s for s in w.queue if s != first]
        w.queue.clear()
        pool._kill(w)
        self.pending.extendleft(reversed(rest))
        with pool._life:
            if pool._closed or w not in pool._slots:
                self._stop = True  # the pool was closed under us: nothing left to run
                return
            new = pool._spawn()
            pool.stats.restarts += 1
            idx = next(i for i, s in enumerate(pool._slots) if s is w)
            pool._slots[idx] = new
        if first is not None:
            self._send(new, first)
