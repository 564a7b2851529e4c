"""Read-side benchmark: random access through FeatureStore vs the usual hand-written reader.

Builds a synthetic store with ShardWriter (random float16 rows), then reads random keys
through a torch DataLoader with 0 and N workers:

  featurestore   clipfeat.FeatureStore as the dataset (index lookup, cached handles)
  naive-scan     open the HDF5 file on every __getitem__ and look the key up in its
                 ``keys`` dataset (the common hand-written approach)
  naive-open     open the file on every __getitem__, row already known (scan removed)

Optionally (``--index-keys N``) builds a store of N tiny rows and times finalize's index
build, opening it through the index, lookups, and the fallback scan without the index.

Prints figures; asserts nothing about time. Example:

  python benchmarks/bench_read.py --rows 2000 --tokens 576 --hidden 1024 --workers 0 4 \\
      --reads 2000 --cold --index-keys 1000000
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch

from clipfeat.store import FeatureStore, ShardWriter, finalize, list_shard_files


def build_store(out: Path, *, rows: int, tokens: int, hidden: int, shard_size: int,
                batch: int = 16, seed: int = 0) -> float:
    """Write ``rows`` float16 rows into shards of ``shard_size``; return the writing seconds.
    Four random batches are made up front and cycled, so the time is the writer's alone."""
    rng = np.random.default_rng(seed)
    pool = [rng.standard_normal((batch, tokens, hidden), dtype=np.float32).astype(np.float16)
            for _ in range(4)]
    t0 = time.perf_counter()
    infos = []
    done = 0
    for sid in range(-(-rows // shard_size)):
        n = min(shard_size, rows - done)
        with ShardWriter(out, sid, tokens=tokens, hidden=hidden, store_dtype="float16",
                         attrs={"tokens": tokens, "hidden_size": hidden}, expected_rows=n) as w:
            for start in range(0, n, batch):
                b = min(batch, n - start)
                x = pool[(start // batch) % len(pool)][:b]
                w.append([f"images/{done + start + i:08d}.jpg" for i in range(b)], x)
            infos.append(w.commit())
        done += n
    finalize(out, meta={"tokens": tokens, "hidden_size": hidden, "store_dtype": "float16"},
             plan={"num_items": rows, "shard_size": shard_size}, shards=infos, complete=True)
    return time.perf_counter() - t0


class NaiveScan(torch.utils.data.Dataset):
    """Open the shard on every item and find the key in its ``keys`` dataset."""

    def __init__(self, out: Path) -> None:
        self.file_of: dict[str, str] = {}
        for path in list_shard_files(out).values():
            with h5py.File(path, "r") as f:
                for k in f["keys"].asstr()[...]:
                    self.file_of[k] = str(path)

    def __getitem__(self, key: str) -> torch.Tensor:
        with h5py.File(self.file_of[key], "r") as f:
            keys = f["keys"].asstr()[...]
            row = int(np.nonzero(keys == key)[0][0])
            return torch.from_numpy(f["features"][row])


class NaiveOpen(torch.utils.data.Dataset):
    """Open the shard on every item; the row is known in advance."""

    def __init__(self, out: Path) -> None:
        self.where: dict[str, tuple[str, int]] = {}
        for path in list_shard_files(out).values():
            with h5py.File(path, "r") as f:
                for i, k in enumerate(f["keys"].asstr()[...]):
                    self.where[k] = (str(path), i)

    def __getitem__(self, key: str) -> torch.Tensor:
        path, row = self.where[key]
        with h5py.File(path, "r") as f:
            return torch.from_numpy(f["features"][row])


def drop_page_cache(out: Path) -> None:
    """Ask the kernel to forget the shards' cached pages (clean pages only; no root)."""
    for path in list_shard_files(out).values():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fill_page_cache(out: Path) -> None:
    """Read every shard once so the run starts with the store in the page cache."""
    for path in list_shard_files(out).values():
        with open(path, "rb") as fh:
            while fh.read(16 << 20):
                pass


def time_loader(dataset, keys: list[str], *, workers: int, batch: int) -> tuple[float, float]:
    """(rows/s, seconds) reading ``keys`` in order through a DataLoader, timed from the
    first batch on (worker start-up excluded)."""
    loader = torch.utils.data.DataLoader(dataset, sampler=keys, batch_size=batch,
                                         num_workers=workers)
    it = iter(loader)
    total = next(it).shape[0]
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += b.shape[0]
    dt = time.perf_counter() - t0
    assert n + total == len(keys)
    return n / dt, dt


def bench_reads(args, out: Path) -> None:
    store = FeatureStore(out)
    rng = random.Random(args.seed)
    all_keys = store.keys()
    keys = [rng.choice(all_keys) for _ in range(args.reads)]
    row_mb = args.tokens * args.hidden * 2 / 2**20
    # correctness of the baselines against FeatureStore on a few keys
    for k in keys[:5]:
        assert torch.equal(NaiveScan(out)[k], store[k]) and torch.equal(NaiveOpen(out)[k], store[k])
    print(f"\nrandom reads: {len(keys)} keys, batch {args.batch_size}, "
          f"row {row_mb:.3f} MiB ({args.tokens}x{args.hidden} float16)")
    print(f"median of {args.repeat} rounds (min-max); each round runs every configuration "
          "once, interleaved; rows/s counted from the first batch on")
    print(f"{'cache':<6} {'dataset':<13} {'workers':>7} {'rows/s':>17} {'MiB/s':>8}")
    makers = {"featurestore": lambda: FeatureStore(out), "naive-scan": lambda: NaiveScan(out),
              "naive-open": lambda: NaiveOpen(out)}
    configs = [(name, w) for name in makers for w in args.workers]
    for cache in (["warm", "cold"] if args.cold else ["warm"]):
        rates: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
        for _ in range(args.repeat):
            for name, workers in configs:
                ds = makers[name]()
                if cache == "cold":
                    drop_page_cache(out)
                else:
                    fill_page_cache(out)
                rates[(name, workers)].append(
                    time_loader(ds, keys, workers=workers, batch=args.batch_size)[0])
        for (name, workers), got in rates.items():
            rate = float(np.median(got))
            spread = f"({min(got):.0f}-{max(got):.0f})"
            print(f"{cache:<6} {name:<13} {workers:>7} {rate:>6.0f} {spread:>10} "
                  f"{rate * row_mb:>8.0f}")


def bench_index(args, base: Path) -> None:
    out = base / f"index-{args.index_keys}"
    shutil.rmtree(out, ignore_errors=True)
    per = args.index_shard_size
    n_shards = -(-args.index_keys // per)
    t0 = time.perf_counter()
    infos = []
    for sid in range(n_shards):
        n = min(per, args.index_keys - sid * per)
        with ShardWriter(out, sid, tokens=1, hidden=1, store_dtype="float16",
                         attrs={}) as w:
            w.append([f"coco/train2017/{sid * per + i:012d}.jpg" for i in range(n)],
                     np.zeros((n, 1, 1), np.float32))
            infos.append(w.commit())
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    finalize(out, meta={"tokens": 1, "hidden_size": 1, "store_dtype": "float16"}, plan={},
             shards=infos, complete=True)
    t_final = time.perf_counter() - t0
    t0 = time.perf_counter()
    store = FeatureStore(out)
    t_open = time.perf_counter() - t0
    probe = [f"coco/train2017/{i:012d}.jpg" for i in
             random.Random(1).sample(range(args.index_keys), 10000)]
    t0 = time.perf_counter()
    store[probe[0]]
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in probe:
        store.locate(k)
    t_lookup = (time.perf_counter() - t0) / len(probe)
    t0 = time.perf_counter()
    assert f"coco/train2017/{args.index_keys - 1:012d}.jpg" in store
    len(store.keys())
    t_keys = time.perf_counter() - t0
    (out / ".clipfeat" / "index.json").unlink()
    logging.getLogger("clipfeat.store").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    scanned = FeatureStore(out)
    scanned.locate(probe[0])
    t_scan = time.perf_counter() - t0
    print(f"\nkey index: {args.index_keys} keys in {n_shards} shards "
          f"(writing them took {t_write:.1f} s)")
    print(f"  finalize (index build, complete=True)   {t_final:8.2f} s")
    print(f"  FeatureStore open via index             {t_open * 1e3:8.1f} ms")
    print(f"  first read (opens one shard)            {t_first * 1e3:8.1f} ms")
    print(f"  key -> (shard, row) lookup              {t_lookup * 1e6:8.1f} us")
    print(f"  keys() + contains                       {t_keys:8.2f} s")
    print(f"  open without index (scan every shard)   {t_scan:8.2f} s")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/clipfeat-bench-read", help="scratch folder")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--reads", type=int, default=1000, help="random keys read per run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    p.add_argument("--cold", action="store_true", help="also run with the page cache dropped")
    p.add_argument("--index-keys", type=int, default=0, help="also time a key index this big")
    p.add_argument("--index-shard-size", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    p.add_argument("--reuse", action="store_true", help="reuse a store kept by --keep")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    base = Path(args.dir)
    out = base / f"store-{args.rows}x{args.tokens}x{args.hidden}"
    print(f"python {platform.python_version()}, torch {torch.__version__}, h5py {h5py.__version__}"
          f" (HDF5 {h5py.version.hdf5_version}), {os.cpu_count()} CPUs, {sys.platform}")
    if args.rows:
        if not (args.reuse and (out / "manifest.json").exists()):
            shutil.rmtree(out, ignore_errors=True)
            secs = build_store(out, rows=args.rows, tokens=args.tokens, hidden=args.hidden,
                               shard_size=args.shard_size, seed=args.seed)
            size = sum(p.stat().st_size for p in list_shard_files(out).values())
            print(f"wrote {args.rows} rows ({size / 2**30:.2f} GiB, {args.shard_size} per "
                  f"shard) in {secs:.1f} s: {args.rows / secs:.0f} rows/s, "
                  f"{size / 2**20 / secs:.0f} MiB/s (ShardWriter, float16 input, fsync per shard)")
        if args.reads:
            bench_reads(args, out)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if args.index_keys:
        bench_index(args, base)


if __name__ == "__main__":
    main()
