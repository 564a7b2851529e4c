"""Several outputs in one pass against one run per output, interleaved in one run.

Whole `clipfeat extract` processes on the same photos, alternating candidate and baseline in
every round (this machine is noisy):

  layers   one tower: ``--layer -1`` (the deepest alone) vs ``--layer -1,-2,-3,mean(0:3)``
           (four outputs from one forward), on the compute-bound ``vitb32`` tower
  same     two towers with the same preprocessing (two random CLIPs at 336 px) in one run
           vs two separate runs: one decode and one resize per image instead of two each
  mixed    two towers with different preprocessing (CLIP 336 shortest-edge + crop, SigLIP
           336 plain resize) in one run vs two separate runs: one decode instead of two,
           each tower still its own resize

Towers are tiny random checkpoints (``clipfeat.testing``), so preprocessing dominates the
``same``/``mixed`` pairs, as the issue asks (preprocessing-bound tiny towers at 336 px).

    python benchmarks/bench_outputs.py --images 2000 --rounds 3
    python benchmarks/bench_outputs.py --only layers --layer-images 300

Prints one line per run and a table of medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import make_photos, time_cmd  # noqa: E402

from clipfeat.testing import save_tiny_clip, save_tiny_siglip, tower_checkpoint  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1)


def _towers(cache: Path, *, vitb32: bool) -> dict[str, Path]:
    """The checkpoints, made once in ``cache`` (``vitb32`` only when the layers pair runs)."""
    out = {"clip_a": tower_checkpoint(cache, "tiny336")}
    if vitb32:
        out["vitb32"] = tower_checkpoint(cache, "vitb32")
    b = cache / "tower-tiny336-seed1"
    if not (b / "config.json").exists():
        save_tiny_clip(b, image_size=336, patch_size=14, seed=1, **TINY)
    s = cache / "tower-siglip336"
    if not (s / "config.json").exists():
        save_tiny_siglip(s, image_size=336, patch_size=14, **TINY)
    out.update(clip_b=b, siglip=s)
    return out


def _run(images: Path, out: Path, flags: list[str], env: dict[str, str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "clipfeat", "extract", str(images), "--out", str(out),
           "--quiet", *flags]
    dt, _ = time_cmd(cmd, env)
    shutil.rmtree(out, ignore_errors=True)
    return dt


def _folder(work: Path, photos: list[Path], name: str) -> Path:
    folder = work / name
    folder.mkdir()
    for p in photos:
        (folder / p.name).symlink_to(p)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="photos for the tower pairs")
    ap.add_argument("--layer-images", type=int, default=300, help="photos for the layers pair")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["layers", "same", "mixed"], action="append")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "clipfeat-bench"))
    args = ap.parse_args()

    cache = Path(args.cache)
    chosen = args.only or ["layers", "same", "mixed"]
    towers = _towers(cache, vitb32="layers" in chosen)
    photos = make_photos(cache / "photos-640x480", max(args.images, args.layer_images))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    work = Path(tempfile.mkdtemp(prefix="clipfeat-bench-outputs-"))
    many = _folder(work, photos[: args.images], "imgs")
    few = _folder(work, photos[: args.layer_images], "imgs-few")
    out = work / "out"
    a, b, s = (str(towers[k]) for k in ("clip_a", "clip_b", "siglip"))
    vitb32 = str(towers.get("vitb32"))
    pairs = {
        # name: (images, [baseline runs], candidate run)
        "layers": (few, [["--model", vitb32, "--layer", "-1"]],
                   ["--model", vitb32, "--layer", "-1,-2,-3,mean(0:3)"]),
        "same": (many, [["--model", a], ["--model", b]], ["--model", a, "--model", b]),
        "mixed": (many, [["--model", a], ["--model", s]], ["--model", a, "--model", s]),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"separate": [], "one pass": []}
                                                for k in chosen}
    for r in range(args.rounds):
        for name in chosen:
            images, baseline, candidate = pairs[name]
            order = [("separate", baseline), ("one pass", [candidate])]
            if r % 2:
                order.reverse()
            for label, runs in order:
                dt = sum(_run(images, out, flags, env) for flags in runs)
                times[name][label].append(dt)
                print(f"round {r + 1} {name:6s} {label:9s} {dt:7.2f} s", flush=True)
    print()
    print(f"{'pair':8s} {'separate (median s)':>20s} {'one pass (median s)':>20s} "
          f"{'speed-up':>9s}")
    for name in chosen:
        sep = statistics.median(times[name]["separate"])
        one = statistics.median(times[name]["one pass"])
        print(f"{name:8s} {sep:20.2f} {one:20.2f} {sep / one:9.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
