"""`DecodePool`: files -> uint8 (3, H, W) arrays in worker processes, in input order.

The parent side of decoding. The pool owns the worker processes (`workers`), the shared
memory they write pixels into (`slots`) and, during an ``imap``, a manager thread
(`dispatch`) that keeps every worker fed, watches pipes and process sentinels, and hands
results back in input order with a bounded number of items in flight.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from clipfeat.config import default_workers
from clipfeat.decode.dispatch import Dispatch
from clipfeat.decode.result import DecodeResult, DecodeStats
from clipfeat.decode.slots import Slots
from clipfeat.decode.worker import (
    DecodeFn,
    decode_file,
    describe_error,
    resolve_decoder,
    worker_main,
)
from clipfeat.decode.workers import WorkerSet, check_main_guard
from clipfeat.errors import ConfigError
from clipfeat.preprocess import ASPECTS, DEFAULT_MAX_PIXELS, PreprocessSpec
from clipfeat.specset import SpecSet, pixel_shape

log = logging.getLogger(__name__)


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
    An item's path may be a tar member or parquet row (`clipfeat.sources`), which
    `decode_file` reads where it lives.
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
        if not isinstance(spec, (PreprocessSpec, SpecSet)):
            raise ConfigError(f"spec must be a PreprocessSpec or a SpecSet, got "
                              f"{type(spec).__name__}")
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
        if workers:
            check_main_guard("DecodePool")
        fn: DecodeFn | str = decode_file if decode_fn is None else decode_fn
        try:
            resolved = resolve_decoder(fn)
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
        self._workers: WorkerSet | None = None
        self._pixels: Slots | None = None  # shared memory the workers write pixels into
        self._running = False
        self._active: tuple[Dispatch, threading.Thread] | None = None
        self._closed = False
        # Held to start and to close: close() may come from another thread (the pipeline's,
        # while its feeder thread is still starting the pool), and no worker may be started
        # after it, nor with the shared memory already released.
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
        if self._pixels is None:
            self._pixels = Slots(self.max_pending, pixel_shape(self.spec))
        if self._workers is None:
            self._workers = WorkerSet(
                self.workers, worker_main,
                (self._decode_fn, self.spec, self.aspect, self.exif_transpose, self.max_pixels,
                 self._pixels),
                self._start_method,
            )
        self._workers.start()

    def close(self) -> None:
        """Stop every worker (politely, then by force). Idempotent; callable from any thread."""
        with self._life:
            if self._closed:
                return
            self._closed = True
            active = self._active
            if self._workers is not None:
                self._workers.mark_closed()
        if active is not None:  # a run abandoned without closing its iterator
            run, thread = active
            run.stop()
            thread.join(10.0)
        if self._workers is not None:
            self._workers.close()
        with self._life:
            if self._pixels is not None:
                self._pixels.close()

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (for diagnostics and tests)."""
        return self._workers.pids() if self._workers is not None else []

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
            run = Dispatch(self._workers, self._pixels, self.stats, iter(items),
                           max_pending=self.max_pending, timeout=self.timeout,
                           startup_timeout=self.startup_timeout)
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
            self.stats.restarts += self._workers.renew_busy()
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
        from clipfeat.sources import release_readers

        fn = resolve_decoder(self._decode_fn)
        try:
            for index, key, path in items:
                try:
                    arr = fn(path, self.spec, self.aspect, self.exif_transpose, self.max_pixels)
                    err = None
                    self.stats.decoded += 1
                except Exception as exc:  # noqa: BLE001 - every failure becomes data
                    arr, err = None, describe_error(exc)
                    self.stats.failed += 1
                yield DecodeResult(index, key, path, arr, err)
        finally:  # the tar or parquet file read last, by the thread that read it
            release_readers()
