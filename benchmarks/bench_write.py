"""Shard writing speed and GIL use: os.write + fsync vs clipfeat's ShardWriter vs bare h5py.

    python benchmarks/bench_write.py --rows 768 --rounds 3 --dir /tmp
    python benchmarks/bench_write.py --rows 768 --rounds 3 --busy 2   # both cores kept busy

Each round writes the same `rows` ViT-L/14-336 patch rows (576 x 1024 float16 = 1.125 MiB
each, 906 MB for 768 rows) in batches of 128 three ways, in an order that rotates from round
to round:

- raw: ``os.write`` of the bytes to one file, then ``fsync`` (what the disk does);
- ShardWriter: clipfeat's writer as the pipeline drives it (``append(..., checked=True)``,
  then ``commit()``: checksum, fsync, rename);
- h5py: a bare chunked h5py dataset, resized and written per batch, closed and fsynced.

While each one runs, a ticker thread in the same process sleeps 1 ms at a time and records
how late it wakes: a writer that holds the GIL makes it late. ``--busy N`` starts N
processes that spin for the whole run (the GPU machine's decode workers keep its cores busy).
Prints every round, then the median MB/s and the ticker's p99 lateness of each way, and
ShardWriter's rate as a fraction of raw.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path


class Ticker(threading.Thread):
    """Sleeps 1 ms at a time; records how late each wake-up is while `recording` is set."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.recording = threading.Event()
        self.stop = threading.Event()
        self.late: list[float] = []

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            time.sleep(0.001)
            if self.recording.is_set():
                self.late.append(time.perf_counter() - t - 0.001)

    def measure(self, fn, *args) -> tuple[float, float, float]:
        """(seconds, p99 lateness ms, max lateness ms) of ``fn(*args)``."""
        self.late = []
        self.recording.set()
        t = time.perf_counter()
        fn(*args)
        seconds = time.perf_counter() - t
        self.recording.clear()
        late = sorted(self.late) or [0.0]
        p99 = late[min(len(late) - 1, int(0.99 * len(late)))]
        return seconds, p99 * 1e3, late[-1] * 1e3


def write_raw(path: Path, batches) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for b in batches:
            view = memoryview(b).cast("B")
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(folder: Path, batches) -> None:
    from clipfeat.store import ShardWriter

    _, tokens, hidden = batches[0].shape
    rows = sum(len(b) for b in batches)
    with ShardWriter(folder, 0, tokens=tokens, hidden=hidden, store_dtype="float16",
                     attrs={"model": "bench"}, expected_rows=rows) as w:
        n = 0
        for b in batches:
            # as the pipeline does: rows were range-checked on the device before the cast
            w.append([f"k{n + j}" for j in range(len(b))], b, checked=True)
            n += len(b)
        w.commit()


def write_h5py(path: Path, batches) -> None:
    import h5py

    _, tokens, hidden = batches[0].shape
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", shape=(0, tokens, hidden),
                              maxshape=(None, tokens, hidden), dtype="f2",
                              chunks=(1, tokens, hidden))
        n = 0
        for b in batches:
            ds.resize(n + len(b), axis=0)
            ds[n:n + len(b)] = b
            n += len(b)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=576)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", type=int, default=0, help="spinning processes during the run")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()

    import numpy as np

    rng = np.random.default_rng(0)
    batches = []
    for i in range(0, args.rows, args.batch):
        m = min(args.batch, args.rows - i)
        batches.append(rng.standard_normal((m, args.tokens, args.hidden), dtype=np.float32)
                       .astype(np.float16))
    nbytes = sum(b.nbytes for b in batches)
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="clipfeat-wbench-"))
    ways = {
        "raw os.write+fsync": lambda: write_raw(work / "raw.bin", batches),
        "ShardWriter": lambda: write_shard(work, batches),
        "bare h5py": lambda: write_h5py(work / "bare.h5", batches),
    }
    spinners = [mp.get_context("spawn").Process(target=spin, daemon=True)
                for _ in range(args.busy)]
    for p in spinners:
        p.start()
    ticker = Ticker()
    ticker.start()
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in ways}
    print(f"{args.rows} rows of {args.tokens}x{args.hidden} float16 ({nbytes / 1e6:.0f} MB) "
          f"in {args.dir}, {args.rounds} rounds, {args.busy} spinning processes")
    try:
        names = list(ways)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                res = ticker.measure(ways[name])
                results[name].append(res)
                print(f"  round {r + 1} {name:20s} {nbytes / res[0] / 1e6:7.0f} MB/s  "
                      f"ticker late p99 {res[1]:6.2f} ms, max {res[2]:7.2f} ms")
                for p in work.iterdir():
                    p.unlink()
    finally:
        ticker.stop.set()
        for p in spinners:
            p.kill()
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    print("median over rounds:")
    med = {}
    for name, rs in results.items():
        med[name] = statistics.median(nbytes / s / 1e6 for s, _, _ in rs)
        p99 = statistics.median(p for _, p, _ in rs)
        print(f"  {name:20s} {med[name]:7.0f} MB/s  {med[name] * 1e6 / (nbytes / args.rows):6.0f}"
              f" rows/s  ticker late p99 {p99:6.2f} ms")
    print(f"ShardWriter / raw: {med['ShardWriter'] / med['raw os.write+fsync']:.2f}")


if __name__ == "__main__":
    main()
