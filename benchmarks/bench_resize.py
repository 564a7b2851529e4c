"""Resize + centre crop to uint8 (3, S, S): Pillow's whole-image resize vs clipfeat's C resize.

For a few source sizes (random pixels, RGB, bicubic, shortest side to S, centre crop), the ms
per image of

  pillow    img.resize(...).crop(...) -> CHW array (what the processor does)
  clipfeat  clipfeat.fastresize.resize_crop (the kept window only; the same pixels; sources
            over fastresize.MAX_SOURCE_PIXELS are left to Pillow: "(Pillow)")

and a check that the two are equal, in one process with the decode workers' malloc settings.

    python benchmarks/bench_resize.py --size 336

Nothing is asserted beyond the equality; prints one table.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from clipfeat import fastresize
from clipfeat.decode import keep_heap
from clipfeat.preprocess import PreprocessSpec

SOURCES = [(640, 480), (480, 640), (500, 375), (1024, 768), (1920, 1080), (4000, 3000),
           (6000, 4000), (6000, 4500)]


def best_ms(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t) / repeat * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=336)
    args = ap.parse_args()
    keep_heap()  # as the decode workers do (else glibc maps and faults fresh buffers per call)
    s = args.size
    spec = PreprocessSpec.from_processor_config(None, family="clip", image_size=s)
    rng = np.random.default_rng(0)
    print(f"resize + centre crop to {s}x{s}, bicubic, one process; {fastresize.status()}")
    print(f"{'source':>11s} {'resized':>11s} {'pillow ms':>10s} {'clipfeat ms':>12s} {'equal':>6s}")
    for w, h in SOURCES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        rh, rw = spec.resized_size(h, w)
        x0, y0 = (rw - s) // 2, (rh - s) // 2

        def pillow(img=img, rw=rw, rh=rh, x0=x0, y0=y0) -> np.ndarray:
            out = img.resize((rw, rh), Image.BICUBIC).crop((x0, y0, x0 + s, y0 + s))
            return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))

        def ours(img=img, rw=rw, rh=rh, x0=x0, y0=y0) -> np.ndarray | None:
            return fastresize.resize_crop(img, (rw, rh), (x0, y0, s, s), Image.BICUBIC)

        got = ours()
        repeat = max(2, int(2e7 // (w * h)))
        t_p = best_ms(pillow, repeat)
        if got is None:
            print(f"{w:>5d}x{h:<5d} {rw:>5d}x{rh:<5d} {t_p:10.2f} {'(Pillow)':>12s} {'-':>6s}")
            continue
        t_c = best_ms(ours, repeat)
        same = np.array_equal(got, pillow())
        print(f"{w:>5d}x{h:<5d} {rw:>5d}x{rh:<5d} {t_p:10.2f} {t_c:12.2f} {str(same):>6s}")


if __name__ == "__main__":
    main()
