"""The end of the device loop: rows go to shards in a writer thread, shards are committed
in a committer thread.

`ShardSink` owns every open `ShardWriter`. The device loop calls its typed methods
(`begin`, `rows`, `fail`, `end`), which only queue the call; the writer thread appends the
rows (``os.pwrite`` into the shard, no Python per byte) and seals a shard when its chunk
ends. Sealed shards go to the committer thread, which checksums, fsyncs and renames them,
so the next chunk's rows are written while the previous shard is being synced.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfeat.errors import ExtractionError


@dataclass(frozen=True)
class _Begin:
    chunk: int
    rows: int


@dataclass(frozen=True)
class _Rows:
    chunk: int
    keys: list[str]
    features: Any
    release: Callable[[], None] | None  # hands the features' buffer back once written


@dataclass(frozen=True)
class _Fail:
    chunk: int
    record: dict[str, Any]


@dataclass(frozen=True)
class _End:
    chunk: int


_STOP = object()


class ShardSink:
    """Writes the rows and failures of each chunk into its shard, in background threads.

    ``attrs`` are the shards' attributes (tokens, hidden_size and store_dtype among them);
    ``on_commit(info)`` is called from the committer thread after each shard is in place.
    An error in either thread is raised by the next call from the device loop, or by
    `finish`.
    """

    def __init__(self, out: Path, attrs: dict[str, Any], on_commit: Callable[[Any], None],
                 outputs: list[Any] | None = None):
        self.out = out
        self.attrs = attrs
        self.outputs = outputs  # several outputs: their `OutputLayout`s (None: one, in attrs)
        self.on_commit = on_commit
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._sealed: queue.Queue = queue.Queue(maxsize=2)
        self._writer = threading.Thread(target=self._write_loop, name="clipfeat-writer",
                                        daemon=True)
        self._committer = threading.Thread(target=self._commit_loop, name="clipfeat-committer",
                                           daemon=True)
        self.error: BaseException | None = None
        self._open: dict[int, Any] = {}
        self._expected: dict[int, int] = {}
        self._commit_failed = False
        self._lock = threading.Lock()
        self.bytes_written = 0
        self.seconds = {"append": 0.0, "seal": 0.0, "commit": 0.0, "main_waits_writer": 0.0}

    def start(self) -> ShardSink:
        self._writer.start()
        self._committer.start()
        return self

    # -- called by the device loop

    def begin(self, chunk: int, rows: int) -> None:
        """Chunk ``chunk`` starts; it has (at most) ``rows`` rows."""
        self._put(_Begin(chunk, rows))

    def rows(self, chunk: int, keys: list[str], features: Any,
             release: Callable[[], None] | None = None) -> None:
        """Rows of ``chunk`` (range-checked on the device, already in the store dtype)."""
        self._put(_Rows(chunk, keys, features, release))

    def fail(self, chunk: int, record: dict[str, Any]) -> None:
        """An input of ``chunk`` that could not be used (see failures.jsonl)."""
        self._put(_Fail(chunk, record))

    def end(self, chunk: int) -> None:
        """Every row of ``chunk`` has been given: seal it and commit it."""
        self._put(_End(chunk))

    def finish(self) -> None:
        """Wait until every shard is committed; raise the first error of either thread."""
        self._put(_STOP)
        self._writer.join()
        self._committer.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """After a failure: let the writer finish what it holds, then drop unfinished shards."""
        # Not _put(): once the writer has failed, _put() re-raises its error instead of
        # queueing, and the writer (still draining its queue) would never see the stop.
        deadline = time.monotonic() + 60
        while self._writer.is_alive() and time.monotonic() < deadline:
            try:
                self._q.put(_STOP, timeout=0.2)
                break
            except queue.Full:
                continue
        self._writer.join(max(0.0, deadline - time.monotonic()))
        self._committer.join(max(0.0, deadline - time.monotonic()))
        self._abort_open()

    def _put(self, msg: Any) -> None:
        t = time.perf_counter()
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._q.put(msg, timeout=0.2)
                self.seconds["main_waits_writer"] += time.perf_counter() - t
                return
            except queue.Full:
                if not self._writer.is_alive():
                    raise ExtractionError("the shard writer stopped unexpectedly") from None

    # -- writer thread

    def _shard(self, chunk: int) -> Any:
        w = self._open.get(chunk)
        if w is None:
            from clipfeat.store import ShardWriter

            shape = ({"outputs": self.outputs} if self.outputs is not None else
                     {"tokens": self.attrs["tokens"], "hidden": self.attrs["hidden_size"]})
            w = ShardWriter(self.out, chunk, **shape, store_dtype=self.attrs["store_dtype"],
                            attrs=self.attrs, expected_rows=self._expected.get(chunk))
            self._open[chunk] = w
        return w

    def _write_loop(self) -> None:
        try:
            while True:
                msg = self._q.get()
                if msg is _STOP:
                    return
                if self.error is not None:  # drain: hand buffers back, write nothing
                    if isinstance(msg, _Rows) and msg.release is not None:
                        msg.release()
                    continue
                try:
                    self._handle(msg)
                except BaseException as err:  # surfaced to the device loop by _put/finish
                    self.error = err
                    self._abort_open()
        finally:
            self._sealed.put(None)  # let the committer finish what it holds, then stop

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, _Rows):
            t = time.perf_counter()
            try:
                # the device loop checked these values before casting them
                self._shard(msg.chunk).append(msg.keys, msg.features, checked=True)
            finally:
                if msg.release is not None:
                    msg.release()
            self.seconds["append"] += time.perf_counter() - t
        elif isinstance(msg, _Fail):
            self._shard(msg.chunk).add_failures([msg.record])
        elif isinstance(msg, _Begin):
            self._expected[msg.chunk] = msg.rows
        elif isinstance(msg, _End):
            self._seal(msg.chunk)

    def _seal(self, chunk: int) -> None:
        t = time.perf_counter()
        w = self._shard(chunk)
        w.seal()
        self.seconds["seal"] += time.perf_counter() - t
        with self._lock:
            del self._open[chunk]
        while self.error is None:
            try:
                self._sealed.put(w, timeout=0.2)
                return
            except queue.Full:
                continue
        w.abort()  # the committer failed meanwhile: nobody will commit this one

    def _abort_open(self) -> None:
        """Drop the shards still being written (sealed ones are left to the committer)."""
        with self._lock:
            writers = list(self._open.values())
            self._open.clear()
        for w in writers:
            w.abort()

    # -- committer thread

    def _commit_loop(self) -> None:
        while True:
            w = self._sealed.get()
            if w is None:
                return
            # A sealed shard is complete: commit it even if a later chunk failed; but once a
            # commit itself failed (disk full, read-only...), commit nothing after it.
            if self._commit_failed:
                w.abort()
                continue
            try:
                t = time.perf_counter()
                info = w.commit()
                self.seconds["commit"] += time.perf_counter() - t
                self.bytes_written += info.bytes
                self.on_commit(info)
            except BaseException as err:
                self._commit_failed = True
                if self.error is None:
                    self.error = err
                w.abort()
