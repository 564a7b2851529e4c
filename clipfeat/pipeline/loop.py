"""The device loop: feeder -> batcher -> device -> sink over this rank's chunks.

`run_chunks` sets the stages up (the decode feed, the device, the shard sink, the CPU thread
tuner), `ChunkLoop` moves every planned item through them in plan order, and the stats of
each stage (time waiting for pixels, on the device, in the writer) go into the summary.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

from clipfeat.errors import ExtractionError
from clipfeat.pipeline.device import Device, raise_range
from clipfeat.pipeline.feed import END, DecodeFeed
from clipfeat.pipeline.signals import check_signal
from clipfeat.pipeline.sink import ShardSink
from clipfeat.pipeline.tuning import ThreadTuner, torch_threads

logger = logging.getLogger(__name__)

def failure_record(it: Any, path: str, error: str) -> dict[str, Any]:
    """The failures.jsonl record of plan item ``it``."""
    return {"key": it.key, "path": path, "error": error, "index": it.index, "shard": it.chunk}


class Committed:
    """The shards finished so far (those found at start and those this run commits); the
    main process rewrites manifest.json and failures.jsonl after each commit, so that a run
    stopped at any moment leaves its finished shards readable."""

    def __init__(self, run: Any, plan: Any, finished: dict[int, Any], summary: Any,
                 refresh: bool) -> None:
        self.run = run
        self.plan = plan
        self.shards = dict(finished)
        self.summary = summary
        self.refresh = refresh
        self._lock = threading.Lock()

    def __call__(self, info: Any) -> None:  # from the sink's committer thread
        from clipfeat.store import finalize

        with self._lock:
            self.shards[info.shard_id] = info
            self.summary.shards_written += 1
            if not self.refresh:
                return
            try:
                finalize(self.run.out, meta=self.run.settings.shard_attrs(),
                         plan=self.plan.info(), shards=list(self.shards.values()),
                         complete=False, outputs=self.run.settings.manifest_outputs())
            except ExtractionError as err:  # the next commit or the final one reports it
                logger.warning("could not update the manifest: %s", err)


class ChunkLoop:
    """Moves every item of ``mine`` (this rank's chunks) through the stages, in plan order.

    Decoded images gather into batches of ``batch_size``; a batch is launched on the device,
    and (on CUDA, one batch later) its features go to the sink, split by chunk; a chunk
    whose rows are all queued is ended, which seals and commits its shard.
    """

    def __init__(self, *, run: Any, plan: Any, mine: list[Any], others: dict[int, int],
                 summary: Any, progress: Any, is_main: bool, feed: DecodeFeed, device: Device,
                 sink: ShardSink, tuner: ThreadTuner | None) -> None:
        self.run = run
        self.plan = plan
        self.mine = mine
        self.others = others  # chunk id -> items, of the chunks other ranks do
        self.summary = summary
        self.progress = progress
        self.is_main = is_main
        self.feed = feed
        self.device = device
        self.sink = sink
        self.tuner = tuner
        self.batch_size = run.cfg.batch_size
        self.batch: list[tuple[int, str, Any]] = []  # (chunk, key, pixels)
        self.ended: list[int] = []  # chunks whose items are all in `batch` or earlier
        self.in_flight: deque[tuple[Any, list[tuple[int, str]], list[int]]] = deque()
        self.device_seconds = 0.0
        self._next_poll = 0.0

    def run_all(self) -> None:
        for c in self.mine:
            self._chunk(c)
        self._flush()
        while self.in_flight:
            self._drain_one()
        self.sink.finish()
        self._poll_others(force=True)

    def _chunk(self, c: Any) -> None:
        items = self.plan.chunk_items(c)
        self.sink.begin(c.id, len(items))
        for it in items:
            if it.error:
                self._failed(c.id, it, it.path, it.error)
                continue
            res = self.feed.feeder.get()
            if res is END or res.index != it.index:
                raise ExtractionError(f"internal error: decode results out of order at {it.key!r}")
            if res.error is not None:
                self._failed(c.id, it, it.path, res.error)
                continue
            self.batch.append((c.id, it.key, res.array))
            if len(self.batch) >= self.batch_size:
                self._flush()
        self.ended.append(c.id)
        if not self.batch:
            self._flush()

    def _failed(self, chunk: int, it: Any, path: str, error: str) -> None:
        self.sink.fail(chunk, failure_record(it, path, error))
        self.summary.failed += 1
        if self.progress is not None:
            self.progress.advance(1, 1)

    def _flush(self) -> None:
        """Launch the gathered batch (or just pass on the chunks that ended)."""
        check_signal()
        if self.batch:
            t = time.perf_counter()
            handle = self.device.launch([b[2] for b in self.batch], self.batch_size)
            self.device_seconds += time.perf_counter() - t
            for b in self.batch:  # stacked into the device's buffer: their slots can be reused
                self.feed.pool.release(b[2])
            self.in_flight.append((handle, [(b[0], b[1]) for b in self.batch], self.ended))
        elif self.ended:
            self.in_flight.append(((None, False, None, None), [], self.ended))
        self.batch, self.ended = [], []
        while len(self.in_flight) > (1 if self.device.cuda else 0):
            self._drain_one()
        if self.tuner is not None:
            self.tuner.step(self.feed.feeder.backlog(), decoding=not self.feed.feeder.drained)

    def _drain_one(self) -> None:
        """Collect the oldest batch from the device and hand its rows to the sink."""
        self._poll_others()
        handle, rows, ends = self.in_flight.popleft()
        t = time.perf_counter()
        feats, bad, release = self.device.collect(handle)
        self.device_seconds += time.perf_counter() - t
        if bad:
            if release:
                release()
            raise_range(feats, rows, self.run.settings.store_dtype,
                        self.run.settings.compute_dtype)
        ends = list(ends)  # ascending chunk ids, like the rows
        start = 0
        while start < len(rows):
            chunk = rows[start][0]
            while ends and ends[0] < chunk:  # all its rows are queued: commit it before
                self.sink.end(ends.pop(0))  # opening the next shard
            stop = start
            while stop < len(rows) and rows[stop][0] == chunk:
                stop += 1
            last = stop == len(rows)
            part = [f[start:stop] for f in feats]  # one array per output
            self.sink.rows(chunk, [r[1] for r in rows[start:stop]],
                           part[0] if len(part) == 1 else part, release if last else None)
            start = stop
        if not rows and release:
            release()
        for c in ends:
            self.sink.end(c)
        self.summary.extracted += len(rows)
        if self.progress is not None:
            self.progress.advance(len(rows), 0)

    def _poll_others(self, force: bool = False) -> None:
        """Rank 0's bar counts the whole job: add the chunks other ranks have finished."""
        if self.progress is None or not self.others or not self.is_main:
            return
        now = time.monotonic()
        if not force and now < self._next_poll:
            return
        self._next_poll = now + 2.0
        from clipfeat.store import parse_shard_id

        for name in os.listdir(self.run.out):
            sid = parse_shard_id(name)
            if sid is not None and sid in self.others:
                self.progress.advance(self.others.pop(sid), 0)


def run_chunks(run: Any, plan: Any, mine: list[Any], todo_all: list[Any],
               finished: dict[int, Any], summary: Any, progress: Any, dist: Any,
               feed: DecodeFeed | None) -> DecodeFeed:
    """Extract this rank's chunks ``mine`` (of the unfinished ``todo_all``) into shards.

    ``feed`` is a decode feed started early over the same chunks (or None); the feed used
    is returned, for the caller to close. Torch's thread count is what it was once this
    returns.
    """
    cfg = run.cfg
    if progress is not None:
        progress.start(total=len(plan.items), done=summary.skipped)
    cpu = not run.device.startswith("cuda")
    with torch_threads(cfg.torch_threads if cpu else None) as threads:
        tuner = None
        if cpu and cfg.torch_threads is None and threads > 1 and cfg.num_workers > 0:
            tuner = ThreadTuner(threads, cfg.num_workers)
        if feed is None or feed.chunk_ids != [c.id for c in mine]:
            if feed is not None:
                feed.close()
            feed = DecodeFeed(cfg, run.spec, plan, mine)
        if tuner is not None:
            tuner.step(feed.feeder.backlog(), decoding=not feed.feeder.drained)
        pool = feed.pool
        device = Device(run.towers, run.tower_specs, run.spec, run.device,
                        run.settings.compute_dtype, run.settings.store_dtype)
        committed = Committed(run, plan, finished, summary, refresh=dist.is_main)
        sink = ShardSink(run.out, run.settings.shard_attrs(), committed,
                         run.settings.output_layouts()).start()
        loop = ChunkLoop(run=run, plan=plan, mine=mine,
                         others={c.id: len(c) for c in todo_all if not dist.mine(c.id)},
                         summary=summary, progress=progress, is_main=dist.is_main, feed=feed,
                         device=device, sink=sink, tuner=tuner)
        t_loop = time.perf_counter()
        decoded_before_loop = pool.stats.decoded + pool.stats.failed  # done while torch loaded
        try:
            loop.run_all()
        except BaseException:
            feed.close()  # this function's feed if it made one; closing twice is harmless
            sink.stop()
            raise
        finally:
            feed.stop()
            summary.stats = pool.stats.as_dict()
            summary.stats["seconds"] = {
                "loop": round(time.perf_counter() - t_loop, 3),
                "waiting_for_decode": round(feed.feeder.waited, 3),
                "device_launch_and_collect": round(loop.device_seconds, 3),
                **{k: round(v, 3) for k, v in sink.seconds.items()},
            }
            summary.stats["decoded_before_loop"] = decoded_before_loop
            if tuner is not None:
                summary.stats["torch_threads"] = tuner.threads
        summary.bytes_written = sink.bytes_written
    return feed
