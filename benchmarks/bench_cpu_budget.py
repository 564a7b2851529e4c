"""Where a CPU run's time goes, per image: the budget behind the tiny336 figures.

Prints, for the benchmark photos (640x480 JPEG) and the tiny336 tower (336 px):

  decode      Pillow open + decode, the bicubic resize to 448x336, the resize + centre crop
              to uint8 (3, 336, 336) by Pillow and by clipfeat's C resize (kept window
              only, same pixels), and clipfeat's whole file -> uint8 path, in this process
  pool        the decode workers: wall time, and CPU time and page faults per image in the
              workers and in the main process (where the manager thread receives pixels)
  normalise   uint8 -> float32 pixel values for a batch of 64: the lookup table vs the
              float32 arithmetic clipfeat uses on a CPU (both bit-identical to the processor)
  forward     the truncated tower on ready tensors, batch 64, at 1 and 2 torch threads

    python benchmarks/bench_cpu_budget.py --images 600

Nothing is asserted; the photos and the tower are made as bench_extract.py makes them.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import make_photos  # noqa: E402

from clipfeat.testing import tower_checkpoint  # noqa: E402


def _ticks(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor faults) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz, int(fields[7])


def per_image(fn, items, repeat: int = 2) -> float:
    """Best ms per item over `repeat` passes."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, (time.perf_counter() - t) / len(items) * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "clipfeat-bench"))
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from clipfeat import fastresize
    from clipfeat.decode import DecodePool, decode_file
    from clipfeat.fastresize import resize_crop
    from clipfeat.preprocess import Normalizer, PreprocessSpec, load_image
    from clipfeat.tower import CLIPVisionTower

    cache = Path(args.cache)
    photos = [str(p) for p in make_photos(cache / "photos-640x480", args.images)]
    ckpt = tower_checkpoint(cache, "tiny336")
    spec = PreprocessSpec.from_processor_config(None, family="clip", image_size=336)

    print(f"{len(photos)} photos 640x480 JPEG, tiny336 tower, {os.cpu_count()} CPUs")
    print("decode, one process (ms per image):")

    def pillow_crop(img: Image.Image) -> np.ndarray:
        out = img.resize((448, 336), Image.BICUBIC).crop((56, 0, 392, 336))
        return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))

    def open_decode(p: str) -> None:
        with Image.open(p) as im:
            im.load()

    loaded = [load_image(p) for p in photos[:200]]
    it = iter(loaded * 4)
    print(f"  Pillow open + decode              {per_image(open_decode, photos):6.2f}")
    print(f"  bicubic resize 640x480 -> 448x336 "
          f"{per_image(lambda _: next(it).resize((448, 336), Image.BICUBIC), loaded):6.2f}")
    it = iter(loaded * 4)
    print(f"  resize + crop + CHW, Pillow       "
          f"{per_image(lambda _: pillow_crop(next(it)), loaded):6.2f}")
    it = iter(loaded * 4)
    window = (56, 0, 336, 336)
    print(f"  resize + crop + CHW, clipfeat C   "
          f"{per_image(lambda _: resize_crop(next(it), (448, 336), window, 3), loaded):6.2f}"
          f"   ({fastresize.status()})")
    print(f"  clipfeat file -> uint8            "
          f"{per_image(lambda p: decode_file(p, spec), photos):6.2f}")

    with DecodePool(spec, workers=args.workers) as pool:
        list(pool.imap([(0, "warm", photos[0])]))
        pids = pool.worker_pids()
        w0 = [_ticks(p) for p in pids]
        m0 = _ticks(os.getpid())
        t = time.perf_counter()
        n = sum(1 for _ in pool.imap((i, str(i), p) for i, p in enumerate(photos)))
        wall = time.perf_counter() - t
        w1 = [_ticks(p) for p in pids]
        m1 = _ticks(os.getpid())
    wu = sum(b[0] - a[0] for a, b in zip(w0, w1, strict=False))
    ws = sum(b[1] - a[1] for a, b in zip(w0, w1, strict=False))
    wf = sum(b[2] - a[2] for a, b in zip(w0, w1, strict=False))
    print(f"pool, {args.workers} workers: {wall:.2f} s for {n} images ({n / wall:.0f} img/s); "
          "per image:")
    print(f"  workers  user {wu / n * 1000:5.2f} ms  system {ws / n * 1000:5.2f} ms  "
          f"page faults {wf / n:6.1f}")
    print(f"  main     user {(m1[0] - m0[0]) / n * 1000:5.2f} ms  system "
          f"{(m1[1] - m0[1]) / n * 1000:5.2f} ms  page faults {(m1[2] - m0[2]) / n:6.1f}")

    x = torch.randint(0, 256, (64, 3, 336, 336), dtype=torch.uint8)
    norm = Normalizer(spec)
    out = torch.empty(x.shape, dtype=torch.float32)
    table = torch.from_numpy(norm.table)

    def lut() -> torch.Tensor:
        for c in range(3):
            idx = x[:, c].reshape(-1).to(torch.int32)
            out[:, c] = table[c].index_select(0, idx).view(64, 336, 336)
        return out

    assert torch.equal(lut().clone(), norm(x, out=out))
    print("normalise a batch of 64 (ms per image, reused output buffer):")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t_lut = per_image(lambda _: lut(), range(4), repeat=3) / 64
        t_ar = per_image(lambda _: norm(x, out=out), range(4), repeat=3) / 64
        print(f"  {threads} thread(s): lookup table {t_lut:5.2f}   float32 arithmetic {t_ar:5.2f}")

    class Args:
        mm_vision_select_layer = -2
        mm_vision_select_feature = "patch"

    tower = CLIPVisionTower(str(ckpt), Args())
    pix = norm(x)
    print("forward, batch 64 (ms per image):")
    with torch.inference_mode():
        tower.forward_features(pix)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ms = per_image(lambda _: tower.forward_features(pix), range(3), repeat=2) / 64
            print(f"  {threads} thread(s): {ms:5.2f}  ({ms * threads:5.2f} CPU-ms)")


if __name__ == "__main__":
    main()
