"""The feeding stage: the decode pool over a run's chunks, and the thread that drives it.

The feeder thread pulls results from the pool in plan order into a bounded queue; the
arrays stay in the pool's shared memory (borrowed) until the batch they go into is stacked,
which releases them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from clipfeat.specset import pixel_bytes

#: The feeder's end-of-input mark.
END = object()

#: Memory for decoded images waiting for the device (shared memory the workers write into).
#: 384 MiB was no faster on the 2-core benchmark (four interleaved pairs of runs).
QUEUE_BYTES = 256 << 20


class Feeder(threading.Thread):
    """Drives the decode pool and queues its results, in plan order, for the device loop."""

    def __init__(self, pool: Any, tasks: Iterator[tuple[int, str, str]], depth: int):
        super().__init__(name="clipfeat-feeder", daemon=True)
        self.pool = pool
        self.tasks = tasks
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.waited = 0.0  # seconds the device loop waited for decoded images
        self.drained = False  # every image is decoded (the rest is in the queue)

    def run(self) -> None:
        try:
            # Borrowed: the arrays stay in the pool's shared memory until the batch they go
            # into is stacked (see _run_chunks), which releases them.
            for res in self.pool.imap(self.tasks, borrow=True):
                self._put(res)
                if self.stop.is_set():
                    return
            self.drained = True
            self._put(END)
        except BaseException as err:
            self._put(err)

    def _put(self, obj: Any) -> None:
        while not self.stop.is_set():
            try:
                self.q.put(obj, timeout=0.2)
                return
            except queue.Full:
                continue

    def backlog(self) -> float:
        """How full the queue of decoded images is (0 to 1)."""
        return self.q.qsize() / self.q.maxsize

    def get(self) -> Any:
        t = time.perf_counter()
        obj = self.q.get()
        self.waited += time.perf_counter() - t
        if isinstance(obj, BaseException):
            raise obj
        return obj


class DecodeFeed:
    """The decode worker pool and its feeder thread over the items of some chunks."""

    def __init__(self, cfg: Any, spec: Any, plan: Any, chunks: list[Any]) -> None:
        from clipfeat.decode import DecodePool

        self.chunk_ids = [c.id for c in chunks]
        # Room for a few batches, more while the model loads, at most QUEUE_BYTES of pixels
        # (792 images at 336 px, which a 2-core CPU run decodes before torch has loaded).
        # ``extra["queue_bytes"]`` overrides the budget (tests squeeze it).
        image_bytes = pixel_bytes(spec)
        budget = int(cfg.extra.get("queue_bytes", QUEUE_BYTES))
        depth = max(2 * cfg.batch_size, 4 * max(1, cfg.num_workers),
                    min(1024, budget // image_bytes))
        self.pool = DecodePool(
            spec,
            aspect=cfg.aspect,
            workers=cfg.num_workers,
            exif_transpose=cfg.exif_transpose,
            max_pixels=cfg.max_pixels,
            timeout=cfg.decode_timeout,
            # Tests inject a misbehaving decoder here ("module:function", see DecodePool).
            decode_fn=cfg.extra.get("decode_fn"),
            # Every decoded image waits in one of these slots until its batch is stacked:
            # the feeder's queue, the batch being gathered, and the items in the workers.
            max_pending=depth + cfg.batch_size + 2 * max(1, cfg.num_workers),
        )

        def tasks() -> Iterator[tuple[int, str, str]]:
            for c in chunks:
                for it in plan.chunk_items(c):
                    if not it.error:
                        yield (it.index, it.key, it.source)

        self.feeder = Feeder(self.pool, tasks(), depth=depth)
        self.feeder.start()

    def stop(self) -> None:
        """Stop feeding (the pool keeps its workers until `close`)."""
        self.feeder.stop.set()

    def close(self) -> None:
        self.feeder.stop.set()
        self.pool.close()
