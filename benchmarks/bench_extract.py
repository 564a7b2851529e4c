"""End-to-end extraction benchmark: clipfeat vs the hand-written script vs the model alone.

In one run, on the same photos and the same random checkpoint, it times:

  clipfeat   `clipfeat extract` as a whole process (start-up, model load, decode, forward, write)
  (a) naive  the script users write by hand, as a whole process: one process, the HF image
             processor, a batched forward with output_hidden_states, hidden_states[-2][:, 1:],
             h5py append into one file
  (b) model  the tower alone on ready random tensors (the compute ceiling), in-process

Towers (random weights, saved with save_pretrained, no download; clipfeat.testing.TOWERS):
  tiny336  hidden 32, 1 head, 3 blocks, patch 14, 336-px input: preprocessing-bound
  vitb32   ViT-B/32-sized (hidden 768, 12 layers, 224 px): compute-bound on a CPU
  vitl336  ViT-L/14-336 (LLaVA-1.5's tower): for a GPU

    python benchmarks/bench_extract.py --tower tiny336 --images 2000
    python benchmarks/bench_extract.py --tower vitl336 --images 4000 --device cuda --batch-size 128

Prints one table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from clipfeat.testing import TOWERS, tower_checkpoint


def _make_photo(args: tuple[str, int, int, int]) -> None:
    import numpy as np
    from PIL import Image

    path, seed, w, h = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(0.2, 1.0, 3)
    base = np.stack([
        128 + 100 * np.sin(xx / (40 * a) + c),
        128 + 100 * np.cos(yy / (50 * b) - c),
        128 + 80 * np.sin((xx + yy) / (60 * c + 10)),
    ], axis=-1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def make_photos(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """Photo-like JPEGs (smooth gradients + noise), made once (in parallel) and cached."""
    from multiprocessing import get_context

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:06d}.jpg" for i in range(n)]
    todo = [(str(p), i, size[0], size[1]) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        with get_context("spawn").Pool(os.cpu_count() or 1) as pool:
            pool.map(_make_photo, todo, chunksize=16)
    return paths


NAIVE = textwrap.dedent(
    """
    import sys, time, torch, h5py
    from PIL import Image
    from transformers import CLIPVisionModel
    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc
    ckpt, listfile, out, bs, device = sys.argv[1:6]
    bs = int(bs)
    paths = open(listfile).read().split("\\n")
    proc = Proc.from_pretrained(ckpt)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = CLIPVisionModel.from_pretrained(ckpt).to(device, dtype).eval()
    with h5py.File(out, "w") as f:
        ds = None
        for i in range(0, len(paths), bs):
            imgs = [Image.open(p).convert("RGB") for p in paths[i:i + bs]]
            px = proc(imgs, return_tensors="pt")["pixel_values"].to(device, dtype)
            with torch.no_grad():
                feats = model(px, output_hidden_states=True).hidden_states[-2][:, 1:]
            arr = feats.half().cpu().numpy()
            if ds is None:
                ds = f.create_dataset("features", shape=(0,) + arr.shape[1:],
                                      maxshape=(None,) + arr.shape[1:], dtype="float16",
                                      chunks=(1,) + arr.shape[1:])
                keys = f.create_dataset("keys", shape=(0,), maxshape=(None,),
                                        dtype=h5py.string_dtype())
            n = ds.shape[0]
            ds.resize(n + len(arr), axis=0)
            ds[n:] = arr
            keys.resize(n + len(arr), axis=0)
            keys[n:] = paths[i:i + bs]
    """
)


def time_cmd(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return dt, proc.stdout


def model_only(ckpt: Path, n: int, bs: int, device: str) -> float:
    """Seconds for the tower alone on ready random tensors (after one warm-up batch)."""
    import torch

    from clipfeat.tower import CLIPVisionTower

    class Args:
        mm_vision_select_layer = -2
        mm_vision_select_feature = "patch"

    tower = CLIPVisionTower(str(ckpt), Args())
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    tower.vision_tower.to(device=device, dtype=dtype)
    s = tower.config.image_size
    x = torch.randn(bs, 3, s, s, device=device, dtype=dtype)
    with torch.inference_mode():
        tower.forward_features(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < n:
            m = min(bs, n - done)
            f = tower.forward_features(x[:m])
            f.to(torch.float16)
            done += m
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def decode_only(ckpt: Path, photos: list[Path], workers: int | None) -> float:
    """Seconds for the decode workers alone (file -> uint8 336x336), no model."""
    from clipfeat.decode import DecodePool
    from clipfeat.modelref import resolve_model
    from clipfeat.preprocess import PreprocessSpec

    ref = resolve_model(str(ckpt))
    spec = PreprocessSpec.from_processor_config(ref.preprocessor_config, family=ref.family,
                                                image_size=ref.image_size)
    with DecodePool(spec, workers=workers) as pool:
        pool.start()
        t0 = time.perf_counter()
        n = sum(1 for r in pool.imap((i, p.name, str(p)) for i, p in enumerate(photos)) if r.ok)
        dt = time.perf_counter() - t0
    assert n == len(photos)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", choices=sorted(TOWERS), default="tiny336")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "clipfeat-bench"))
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--extra", default="", help="extra flags for clipfeat extract")
    ap.add_argument("--json", dest="json_out", default=None, help="also write figures here")
    args = ap.parse_args()

    cache = Path(args.cache)
    photos = make_photos(cache / "photos-640x480", args.images)
    ckpt = tower_checkpoint(cache, args.tower)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    work = Path(tempfile.mkdtemp(prefix="clipfeat-bench-"))
    listfile = work / "list.txt"
    listfile.write_text("\n".join(str(p) for p in photos))
    img_dir = work / "imgs"
    img_dir.mkdir()
    for p in photos:  # a folder with exactly these images, via symlinks
        (img_dir / p.name).symlink_to(p)

    rows = []
    n = len(photos)
    cmd = [sys.executable, "-m", "clipfeat", "extract", str(img_dir), "--out", str(work / "cf"),
           "--model", str(ckpt), "--batch-size", str(args.batch_size), "--device", args.device,
           "--quiet", "--json"]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    cmd += args.extra.split()
    t_cf, out = time_cmd(cmd, env)
    rows.append(("clipfeat extract (whole process)", t_cf))
    cf_summary = json.loads(out.strip().splitlines()[-1])
    stages = cf_summary.get("stats", {}).get("seconds", {})
    loop = stages.get("loop")
    if not args.skip_naive:
        script = work / "naive.py"
        script.write_text(NAIVE)
        t_naive, _ = time_cmd([sys.executable, str(script), str(ckpt), str(listfile),
                            str(work / "naive.h5"), str(args.batch_size), args.device], env)
        rows.append(("(a) hand-written script (whole process)", t_naive))
    t_model = model_only(ckpt, n, args.batch_size, args.device)
    rows.append(("(b) tower alone on ready tensors", t_model))
    t_dec = decode_only(ckpt, photos, args.workers)
    rows.append(("decode workers alone (file -> uint8)", t_dec))

    print(f"\n{args.tower} tower, {n} photos 640x480 JPEG, batch {args.batch_size}, "
          f"device {args.device}, {os.cpu_count()} CPUs")
    print(f"{'':44s} {'seconds':>9s} {'img/s':>9s}")
    for name, t in rows:
        print(f"{name:44s} {t:9.2f} {n / t:9.1f}")
    figures = {"tower": args.tower, "images": n, "batch_size": args.batch_size,
               "device": args.device, "seconds": {k: round(v, 3) for k, v in rows}}
    if not args.skip_naive:
        print(f"speed-up of clipfeat over (a): {t_naive / t_cf:.2f}x")
        figures["speedup_vs_naive"] = round(t_naive / t_cf, 3)
    print(f"clipfeat end-to-end as a share of (b), the model alone: {t_model / t_cf:.1%}")
    figures["share_of_model_only"] = round(t_model / t_cf, 4)
    if loop:
        print(f"clipfeat steady state (images / extraction loop, start-up excluded): "
              f"{n / loop:.1f} img/s = {t_model / loop:.1%} of (b)")
        print("clipfeat stages (s): " + ", ".join(f"{k} {v}" for k, v in stages.items()))
        figures["steady_state_share_of_model_only"] = round(t_model / loop, 4)
        figures["clipfeat_stages_s"] = stages
        before = cf_summary.get("stats", {}).get("decoded_before_loop")
        if before is not None:
            print(f"clipfeat images decoded before the extraction loop started: {before}")
            figures["decoded_before_loop"] = before
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
