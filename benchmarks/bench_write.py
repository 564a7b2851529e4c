"""Shard writing speed: clipfeat's ShardWriter vs a bare h5py append, on the same disk.

    python benchmarks/bench_write.py --rows 1024 --dir /tmp

Writes `rows` ViT-L/14-336 patch rows (576 x 1024 float16 = 1.125 MiB each) in batches of
128, including clipfeat's commit (flush, checksum, fsync, rename). Prints rows/s and MB/s.
(Figures recorded before this script imported torch up front included torch's import.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=576)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()

    import h5py
    import numpy as np

    import torch  # noqa: F401  (imported up front so the timing excludes the import)

    from clipfeat.store import ShardWriter

    feats = np.random.default_rng(0).standard_normal(
        (args.batch, args.tokens, args.hidden)).astype(np.float16)
    nbytes = args.rows * args.tokens * args.hidden * 2
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="clipfeat-wbench-"))

    t0 = time.perf_counter()
    with ShardWriter(work, 0, tokens=args.tokens, hidden=args.hidden, store_dtype="float16",
                     attrs={"model": "bench"}, expected_rows=args.rows) as w:
        for i in range(0, args.rows, args.batch):
            m = min(args.batch, args.rows - i)
            # as the pipeline does: rows were range-checked on the device before the cast
            w.append([f"k{i + j}" for j in range(m)], feats[:m], checked=True)
        w.commit()
    t_cf = time.perf_counter() - t0

    path = work / "bare.h5"
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", shape=(0, args.tokens, args.hidden),
                              maxshape=(None, args.tokens, args.hidden), dtype="f2",
                              chunks=(1, args.tokens, args.hidden))
        for i in range(0, args.rows, args.batch):
            m = min(args.batch, args.rows - i)
            ds.resize(i + m, axis=0)
            ds[i:i + m] = feats[:m]
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    t_bare = time.perf_counter() - t0

    print(f"{args.rows} rows of {args.tokens}x{args.hidden} float16 ({nbytes / 2**20:.0f} MiB) "
          f"in {args.dir}")
    for name, t in (("clipfeat ShardWriter (+commit)", t_cf), ("bare h5py append + fsync", t_bare)):
        print(f"{name:34s} {t:7.2f} s {args.rows / t:8.0f} rows/s {nbytes / t / 1e6:8.0f} MB/s")
    for p in work.iterdir():
        p.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
