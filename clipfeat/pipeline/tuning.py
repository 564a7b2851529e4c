"""CPU runs: how many intra-op threads torch gets while the decode workers share the cores."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


@contextmanager
def torch_threads(count: int | None) -> Iterator[int]:
    """Set torch's intra-op thread count for the block (None: keep it) and put the caller's
    back afterwards, so that `extract` called from Python leaves no process state behind.
    Yields the count in force."""
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(max(1, count))
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class ThreadTuner:
    """On a CPU run, share the cores between torch's intra-op threads and the decode workers.

    While the workers have images to decode, torch gets the cores they leave
    (``threads - workers``, at least one): torch's threads stall as a group when a worker
    preempts one, the niced workers get little of a core that torch wants, and one thread
    does more per CPU-second than two anyway (the tiny 336-px tower's forward: 3.6 vs 4.2
    CPU-ms per image, ``benchmarks/bench_cpu_budget.py``). All threads go to torch when the
    workers have nothing to do: the queue of decoded images is (nearly) full, which is where
    a compute-bound run lives, or every image is decoded. Back to the smaller number when
    the queue falls under half full, so that decoding catches up.
    """

    HIGH, LOW = 0.9, 0.5  # queue fill at which torch takes all threads / gives some back

    def __init__(self, threads: int, workers: int) -> None:
        self.max = self.threads = threads
        self.min = max(1, threads - workers)

    def step(self, backlog: float, decoding: bool = True) -> None:
        """``backlog``: how full the decoded-image queue is (0-1); called before each batch."""
        import torch

        if not decoding or backlog >= self.HIGH:
            want = self.max
        elif backlog < self.LOW:
            want = self.min
        else:
            return
        if want != self.threads:
            self.threads = want
            torch.set_num_threads(want)
            logger.debug("torch intra-op threads -> %d (decoded-image queue %.0f%% full%s)",
                         want, 100 * backlog, "" if decoding else ", decoding done")
