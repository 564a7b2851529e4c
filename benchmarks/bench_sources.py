"""Input sources benchmark: the same photos from a folder, from tar shards, from parquet.

The same JPEG photos (640x480, photo-like; bench_extract's cache) are laid out as

  folder   one file per image (hard links to the cached photos: real files, no symlinks)
  tar      --shards webdataset tar shards, each image with a .json beside it, as
           img2dataset writes them
  parquet  (with --parquet) --shards parquet files, the datasets Image struct, 100 rows
           per row group as datasets writes them

and each round extracts every source once, in an order that rotates from round to round
(so that a drift of the machine spreads over all of them), with the tiny336 tower (patch
14, 336-px input: decoding and resizing dominate):

  e2e      images / seconds of the whole `python -m clipfeat extract` process
  loop     images / seconds of its extraction loop (start-up and model load excluded)

Whole runs take seconds each, and on a shared machine the load changes between them; so the
decode workers alone (read + decode + resize to 336x336 uint8, no model, one pool) are also
timed with the sources interleaved finely: blocks of --block images, one source after the
other, over every image of each source --passes times; for each source the wall time and
the workers' CPU time (from /proc) are summed over its blocks:

  decode   images / wall second, and worker CPU milliseconds per image

All files are written out (sync) and read once first, so every source is served from the
page cache; the pool decodes a block of each source before timing (a parquet worker imports
pyarrow on its first row). Nothing is asserted.

    python benchmarks/bench_sources.py --images 2000 --shards 10 --rounds 3 [--parquet]
    python benchmarks/bench_sources.py --rounds 0 --passes 3   # the decode figures only
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench_extract import make_photos, time_cmd

from clipfeat.testing import tower_checkpoint


def build_folder(photos: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True)
    for p in photos:
        try:
            os.link(p, folder / p.name)
        except OSError:  # another file system
            shutil.copy(p, folder / p.name)


def build_tars(photos: list[Path], folder: Path, shards: int) -> str:
    folder.mkdir(parents=True)
    per = -(-len(photos) // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:06d}.tar", "w") as tf:
            for p in photos[s * per:(s + 1) * per]:
                tf.add(p, arcname=p.name)
                meta = json.dumps({"caption": f"photo {p.stem}"}).encode()
                info = tarfile.TarInfo(p.stem + ".json")
                info.size = len(meta)
                tf.addfile(info, io.BytesIO(meta))
    return f"{folder}/{{000000..{shards - 1:06d}}}.tar"


def build_parquet(photos: list[Path], folder: Path, shards: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    per = -(-len(photos) // shards)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for s in range(shards):
        part = photos[s * per:(s + 1) * per]
        table = pa.table({
            "image": pa.array([{"bytes": p.read_bytes(), "path": p.name} for p in part],
                              type=image),
            "key": [p.stem for p in part],
        })
        pq.write_table(table, folder / f"train-{s:05d}.parquet", row_group_size=100)
    return str(folder)


def warm(path: Path) -> None:
    """Read every file under ``path`` once (into the page cache)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                while fh.read(1 << 20):
                    pass


def run_extract(root: str, out: Path, ckpt: Path, args: argparse.Namespace,
                extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "clipfeat", "extract", root, "--out", str(out), "--model",
           str(ckpt), "--batch-size", str(args.batch_size), "--device", "cpu", "--quiet",
           "--json", *extra]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    wall, stdout = time_cmd(cmd, env)
    summary = json.loads(stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    loop = summary["stats"]["seconds"]["loop"]
    n = summary["extracted"]
    return {"e2e": n / wall, "loop": n / loop, "extracted": n}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes ``pids`` so far (Linux /proc)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def decode_interleaved(roots: dict[str, str], ckpt: Path, workers: int | None, block: int,
                       passes: int) -> dict[str, tuple[float, float]]:
    """Source -> (images per wall second, worker CPU ms per image) of one decode pool fed
    blocks of each source in turn."""
    from clipfeat.decode import DecodePool
    from clipfeat.modelref import resolve_model
    from clipfeat.preprocess import PreprocessSpec
    from clipfeat.sources import read_roots

    ref = resolve_model(str(ckpt))
    spec = PreprocessSpec.from_processor_config(ref.preprocessor_config, family=ref.family,
                                                image_size=ref.image_size)
    items = {s: [it.member or it.path for it in read_roots([r]) if not it.error]
             for s, r in roots.items()}
    wall = dict.fromkeys(roots, 0.0)
    cpu = dict.fromkeys(roots, 0.0)
    done = dict.fromkeys(roots, 0)
    with DecodePool(spec, workers=workers) as pool:
        pool.start()

        def decode(what: list) -> tuple[float, float, int]:
            pids = pool.worker_pids()
            c0, t0 = cpu_seconds(pids), time.perf_counter()
            n = sum(1 for r in pool.imap((i, "k", x) for i, x in enumerate(what)) if r.ok)
            dt = time.perf_counter() - t0
            assert pool.worker_pids() == pids, "a worker was replaced: CPU time incomplete"
            return dt, cpu_seconds(pids) - c0, n

        for s in roots:  # warm-up (not timed)
            decode(items[s][:block])
        blocks = max(-(-len(v) // block) for v in items.values())
        for b in range(blocks * passes):
            order = list(roots)[b % len(roots):] + list(roots)[:b % len(roots)]
            for s in order:
                part = items[s][(b % blocks) * block:(b % blocks + 1) * block]
                dt, dc, n = decode(part)
                assert n == len(part), (s, n, len(part))
                wall[s] += dt
                cpu[s] += dc
                done[s] += n
    return {s: (done[s] / wall[s], 1000 * cpu[s] / done[s]) for s in roots}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="whole extract runs per source")
    ap.add_argument("--passes", type=int, default=2, help="decode passes over each source")
    ap.add_argument("--block", type=int, default=100, help="images per interleaved block")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--parquet", action="store_true", help="also read the photos from parquet")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "clipfeat-bench"))
    args = ap.parse_args()

    cache = Path(args.cache)
    photos = make_photos(cache / "photos-640x480", args.images)
    ckpt = tower_checkpoint(cache, "tiny336")
    work = Path(tempfile.mkdtemp(prefix="clipfeat-bench-sources-"))
    try:
        build_folder(photos, work / "folder")
        sources = {"folder": (str(work / "folder"), []),
                   "tar": (build_tars(photos, work / "tars", args.shards), [])}
        if args.parquet:
            sources["parquet"] = (build_parquet(photos, work / "parquet", args.shards),
                                  ["--key-column", "key"])
        os.sync()  # no writeback of the new tars and parquet files during the rounds
        warm(work)
        names = list(sources)
        runs: dict[str, dict[str, list[float]]] = {s: {"e2e": [], "loop": []} for s in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for s in order:
                root, extra = sources[s]
                got = run_extract(root, work / f"out-{s}", ckpt, args, extra)
                assert got["extracted"] == len(photos), (s, got)
                runs[s]["e2e"].append(got["e2e"])
                runs[s]["loop"].append(got["loop"])
                print(f"round {r + 1} {s:8s} e2e {got['e2e']:7.1f}  loop {got['loop']:7.1f} "
                      "img/s", flush=True)
        dec = decode_interleaved({s: sources[s][0] for s in names}, ckpt, args.workers,
                                 args.block, args.passes) if args.passes else {}
        print(f"\n{len(photos)} photos 640x480 JPEG, tiny336 tower, batch {args.batch_size}, "
              f"{args.shards} shards, {os.cpu_count()} CPUs; extract: median (min-max) img/s "
              f"of {args.rounds} rounds; decode: {args.passes} interleaved passes")
        print(f"{'source':8s} {'extract e2e':>22s} {'extract loop':>22s} "
              f"{'decode img/s':>13s} {'decode CPU ms/img':>18s}")
        for s in names:
            cells = [f"{statistics.median(v):7.1f} ({min(v):6.1f}-{max(v):6.1f})" if v else "-"
                     for v in (runs[s]["e2e"], runs[s]["loop"])]
            d = dec.get(s, (float("nan"), float("nan")))
            print(f"{s:8s} " + " ".join(f"{c:>22s}" for c in cells)
                  + f" {d[0]:13.1f} {d[1]:18.3f}")
        for s in names[1:]:
            med = {k: statistics.median(runs[s][k]) / statistics.median(runs["folder"][k])
                   for k in ("e2e", "loop") if runs[s][k]}
            said = [f"{k} {v:.3f}" for k, v in med.items()]
            if dec:
                said.append(f"decode img/s {dec[s][0] / dec['folder'][0]:.3f}, "
                            f"CPU per image {dec[s][1] / dec['folder'][1]:.3f}")
            print(f"{s} / folder: " + ", ".join(said))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
