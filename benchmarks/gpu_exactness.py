"""On a CUDA device: clipfeat's stored features vs LLaVA's path computed with transformers.

LLaVA's path (tests/llava_reference.py): Image.open(p).convert('RGB') (+ expand2square for
pad), the checkpoint's PIL image processor, CLIPVisionModel in float16 on the GPU,
hidden_states[-2][:, 1:]. The reference runs the same batches (same images, same order, same
batch size) so the same kernels are used, and also one image at a time. Prints the
differences; asserts nothing.

    python benchmarks/gpu_exactness.py --tower vitl336 --images 48 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from clipfeat.testing import tower_checkpoint

# LLaVA's path and the store reader of the test suite (independent of clipfeat)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_inputs(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    modes = [("RGB", "JPEG", ".jpg"), ("RGBA", "PNG", ".png"), ("L", "PNG", ".png"),
             ("P", "GIF", ".gif"), ("CMYK", "TIFF", ".tiff"), ("RGB", "WEBP", ".webp")]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mode, fmt, ext = modes[i % len(modes)]
        w, h = int(rng.integers(200, 900)), int(rng.integers(150, 700))
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(root / f"img{i:04d}{ext}", format=fmt)


def main() -> None:  # noqa: C901
    ap = argparse.ArgumentParser()
    ap.add_argument("--tower", default="vitl336")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="cpu for a dry run of this script")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "clipfeat-bench"))
    args = ap.parse_args()

    import numpy as np
    import torch
    from llava_reference import LlavaReference
    from stores import read_rows

    import clipfeat
    from clipfeat.preprocess import Normalizer, PreprocessSpec

    ckpt = tower_checkpoint(Path(args.cache), args.tower)
    work = Path(tempfile.mkdtemp(prefix="clipfeat-gpu-"))
    make_inputs(work / "imgs", args.images)
    dev = args.device
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    # transparency hidden from the processor, as transformers 4.x (LLaVA) treats RGB input
    llava = LlavaReference(ckpt, family="clip", layer=-2, feature="patch", device=dev,
                           dtype=dtype, hide_transparency=True)
    proc = llava.processor

    spec = PreprocessSpec.from_processor(proc)
    x = torch.randint(0, 256, (4, 3, spec.out_height, spec.out_width), dtype=torch.uint8)
    same = torch.equal(Normalizer(spec)(x.to(dev)).cpu(), Normalizer(spec)(x))
    print(f"Normalizer on {dev} equals CPU bit for bit: {same}")

    for aspect in ("square", "pad"):
        out = work / f"out-{aspect}"
        clipfeat.extract(roots=[str(work / "imgs")], out=str(out), model=str(ckpt),
                         device=dev, dtype=str(dtype).split(".")[1], store_dtype="float32",
                         batch_size=args.batch_size, aspect=aspect, workers=4)
        rows = read_rows(out)
        keys = sorted(rows)

        def ref(batch: list[str], aspect: str = aspect) -> np.ndarray:
            return llava.features([work / "imgs" / k for k in batch], aspect=aspect)

        equal = 0
        worst = 0.0
        for i in range(0, len(keys), args.batch_size):
            batch = keys[i:i + args.batch_size]
            r = ref(batch)
            for k, v in zip(batch, r, strict=False):
                equal += int(np.array_equal(rows[k], v))
                worst = max(worst, float(np.abs(rows[k] - v).max()))
        single = max(float(np.abs(rows[k] - ref([k])[0]).max()) for k in keys[:8])
        scale = max(float(np.abs(v).max()) for v in rows.values())
        print(f"aspect={aspect}: {len(keys)} images; same batches as clipfeat: {equal} rows "
              f"bit-identical, max |diff| {worst:.3g}; one image at a time: max |diff| "
              f"{single:.3g}; feature scale max |x| {scale:.3g}")


if __name__ == "__main__":
    main()
