"""Peak memory of `clipfeat extract` for a small and a 10x larger run: it must not grow.

    python benchmarks/bench_memory.py --images 400 4000

Runs the whole command as a subprocess and samples /proc every 0.1 s: the main process's
own peak (VmHWM) and the peak of the summed memory of the process tree (main process,
forkserver, decode workers). The sum is of proportional set sizes (Pss): the decoded-image
slots are shared memory, written by a worker and read by the main process, and summing
resident sizes would count them twice. Prints one line per size.

    python benchmarks/bench_memory.py --images 8000 --trace 3

also prints the main process's resident memory every 3 s (VmRSS, and its anonymous and
shared parts), to tell a peak that keeps growing from one that has levelled off.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import make_photos  # noqa: E402

from clipfeat.testing import tower_checkpoint  # noqa: E402


def _status(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
    except OSError:
        pass
    return 0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])  # kB
    except OSError:
        pass
    return _status(pid, "VmRSS")  # no smaps_rollup (kernel < 4.14)


def _children(pid: int) -> list[int]:
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            out = [int(x) for x in fh.read().split()]
    except OSError:
        return []
    for c in list(out):
        out += _children(c)
    return out


def measure(cmd: list[str], env: dict[str, str], trace: float = 0.0) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hwm = tree = 0
    next_trace = t0 + trace
    while proc.poll() is None:
        hwm = max(hwm, _status(proc.pid, "VmHWM"))
        total = sum(_pss(p) for p in [proc.pid] + _children(proc.pid))
        tree = max(tree, total)
        now = time.perf_counter()
        if trace and now >= next_trace:
            next_trace += trace
            parts = "  ".join(f"{f} {_status(proc.pid, f) / 1024:6.0f}"
                              for f in ("VmRSS", "RssAnon", "RssShmem"))
            print(f"    {now - t0:6.1f} s  main MiB: {parts}", flush=True)
        time.sleep(0.1)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"clipfeat failed ({proc.returncode}): {err}")
    return time.perf_counter() - t0, hwm, tree


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[400, 4000])
    ap.add_argument("--tower", default="tiny336")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "clipfeat-bench"))
    ap.add_argument("--trace", type=float, default=0.0, metavar="SECONDS",
                    help="print the main process's memory every SECONDS (0: never)")
    args = ap.parse_args()
    cache = Path(args.cache)
    photos = make_photos(cache / "photos-640x480", max(args.images))
    ckpt = tower_checkpoint(cache, args.tower)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print(f"{args.tower} tower, 640x480 JPEGs, shard size {args.shard_size}")
    print(f"{'images':>8s} {'seconds':>8s} {'main peak MiB':>14s} {'tree peak MiB':>14s}")
    for n in args.images:
        with tempfile.TemporaryDirectory() as work:
            lst = Path(work) / "list.txt"
            lst.write_text("\n".join(str(p) for p in photos[:n]))
            cmd = [sys.executable, "-m", "clipfeat", "extract", str(cache / "photos-640x480"),
                   "--files-from", str(lst),
                   "--out", str(Path(work) / "out"), "--model", str(ckpt), "--quiet",
                   "--device", "cpu", "--shard-size", str(args.shard_size)]
            dt, hwm, tree = measure(cmd, env, args.trace)
        print(f"{n:8d} {dt:8.1f} {hwm / 1024:14.1f} {tree / 1024:14.1f}")


if __name__ == "__main__":
    main()
