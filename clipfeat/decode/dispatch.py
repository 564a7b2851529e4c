"""The decode pool's manager thread: feeds the workers, watches them, reorders results.

Every item holds a slot of shared memory from the moment it is taken from the input until
the consumer releases its result, so the free slots bound the items in flight. Results are
handed out in input order; a crash, a timeout or a decoder error becomes a failed result
(retried once in a fresh process where that can help), never a hang.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from clipfeat.decode.result import DecodeResult
from clipfeat.decode.slots import Slots
from clipfeat.decode.worker import PIXELS
from clipfeat.decode.workers import WorkerProc, WorkerSet, startup_hint
from clipfeat.errors import ExtractionError

log = logging.getLogger(__name__)

#: Items queued per worker: one being decoded, the rest waiting. A deep queue keeps a worker
#: busy while the parent's threads cannot run (a long import holds the GIL for up to half a
#: second); the items are answered in order, so the one a crash interrupts is still known.
PER_WORKER = 32


class Dispatch:
    """One ``imap`` call: runs in the manager thread, owns dispatch, waiting and reordering.

    It sees the pool only through what it is given: the worker set, the shared-memory slots
    and the counters.
    """

    def __init__(self, workers: WorkerSet, slots: Slots, stats: Any,
                 items: Iterator[tuple[int, str, str]], *, max_pending: int, timeout: float,
                 startup_timeout: float) -> None:
        self.workers = workers
        self.slots = slots
        self.stats = stats
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.items = items
        self.out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        # Every item from the input holds a slot of shared memory until the consumer is done
        # with its result; so the free slots bound the items in flight.
        self._free = list(range(max_pending - 1, -1, -1))
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
            if not self._stop and not self.workers.closed:
                self.out.put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.out.put(("error", e))

    def _loop(self) -> None:
        from multiprocessing.connection import wait

        while not self._stop and not self.workers.closed:
            self._pull()
            self._emit()
            if self.exhausted and self.next_out == self.next_seq:
                return
            self._dispatch()
            if self.meta and not self.pending and not any(w.queue for w in self.workers.procs):
                raise RuntimeError(  # a bookkeeping bug must fail loudly, not hang
                    f"decode pool lost track of {len(self.meta)} item(s)"
                )

            now = time.monotonic()
            deadlines = []
            for w in self.workers.procs:
                if not w.ready:
                    deadlines.append(w.started + self.startup_timeout)
                elif w.queue and w.since is not None:
                    deadlines.append(w.since + self.timeout)
            wait_for = max(0.0, min(deadlines) - now) if deadlines else None

            objs: dict[Any, tuple[WorkerProc, str]] = {}
            for w in self.workers.procs:
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
                    if isinstance(path, os.PathLike):  # a tar member or parquet row stays
                        path = os.fspath(path)  # as it is; a Path becomes its str
                    self.meta[seq] = (index, key, path)
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
            open_ = [w for w in self.workers.procs if w.alive and len(w.queue) < PER_WORKER]
            if not open_:
                return
            self._send(min(open_, key=lambda w: len(w.queue)), self.pending.popleft())

    def _send(self, w: WorkerProc, seq: int) -> None:
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
        stats = self.stats
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

    def _on_message(self, w: WorkerProc, msg: Any) -> None:
        now = time.monotonic()
        if msg[0] == "ready":
            w.ready = True
            self.startup_failures = 0
            w.since = now if w.queue else None
            return
        seq, array, error, retryable, said = msg
        if said:  # a decoder's stderr for an image it decoded: the log, not the terminal
            log.debug("decoder wrote to stderr for %s: %s", self.meta[seq][2], said)
        if not w.queue or w.queue[0] != seq:
            raise RuntimeError(f"decode worker answered item {seq}, expected {list(w.queue)[:1]}")
        if isinstance(array, str) and array == PIXELS:
            array = self.slots.view(self.slot_of[seq])
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
        self._fail_or_retry(w, seq, error, fresh=was_fresh)

    def _fail_or_retry(self, w: WorkerProc, seq: int, error: str, *, fresh: bool) -> None:
        """Replace ``w``; record ``error`` for ``seq`` if it already ran in a fresh process
        (or twice), else give it to the new worker first."""
        if fresh or self.attempts[seq] >= 2:
            self._record(seq, None, error)
            self._replace(w)
        else:
            self.attempts[seq] += 1
            self.stats.retries += 1
            self._replace(w, first=seq)

    def _drain_then_exit(self, w: WorkerProc) -> None:
        """The process ended: read what it managed to send, then account for the rest."""
        try:
            while w.alive and w.conn.poll():
                self._on_message(w, w.conn.recv())
        except (EOFError, OSError):
            pass
        if w.alive:
            self._on_exit(w)

    def _on_exit(self, w: WorkerProc) -> None:
        """A worker died (or its pipe broke): fail or retry its head item, requeue the rest."""
        if not w.alive:
            return
        w.proc.join(1.0)
        code = w.proc.exitcode
        if not w.ready:
            self.startup_failures += 1
            if self.startup_failures > 3:
                raise ExtractionError(
                    f"decode workers fail to start (last exit code {code}); "
                    + startup_hint()
                )
            log.warning("decode worker failed to start (exit code %s); restarting", code)
            self._replace(w)
            return
        if not w.queue:
            log.warning("idle decode worker exited (exit code %s); restarting", code)
            self._replace(w)
            return
        seq = w.queue.popleft()
        self.stats.crashes += 1
        if code is not None and code < 0:
            reason = f"decoder crashed (signal {-code})"
        else:
            reason = f"decoder crashed (exit code {code})"
        self._fail_or_retry(w, seq, reason, fresh=w.done == 0)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.procs):
            if not w.alive:
                continue
            if not w.ready and now - w.started > self.startup_timeout:
                log.warning("decode worker did not start within %.0fs; restarting",
                            self.startup_timeout)
                self._on_exit(w)
            elif w.queue and w.since is not None and now - w.since > self.timeout:
                seq = w.queue.popleft()
                self.stats.timeouts += 1
                self._record(seq, None, f"decode timed out after {self.timeout:g}s")
                self._replace(w)

    def _replace(self, w: WorkerProc, first: int | None = None) -> None:
        """Kill ``w``, requeue the items it had not started, start a fresh worker in its place.

        ``first`` (an item needing a fresh process) becomes the new worker's first item.
        """
        rest = [s for s in w.queue if s != first]
        w.queue.clear()
        self.pending.extendleft(reversed(rest))
        new = self.workers.replace(w)
        if new is None:
            self._stop = True  # the pool was closed under us: nothing left to run
            return
        self.stats.restarts += 1
        if first is not None:
            self._send(new, first)
