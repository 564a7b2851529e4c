"""On a CUDA device: clipfeat's stored features vs LLaVA's path computed with transformers.

LLaVA's path: Image.open(p).convert('RGB') (+ expand2square for pad), the checkpoint's PIL
image processor, CLIPVisionModel in float16 on the GPU, hidden_states[-2][:, 1:]. The
reference runs the same batches (same images, same order, same batch size) so the same
kernels are used, and also one image at a time. Prints the differences; asserts nothing.

    python benchmarks/gpu_exactness.py --tower vitl336 --images 48 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from clipfeat.testing import tower_checkpoint


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

    import h5py
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPVisionModel

    import clipfeat
    from clipfeat.preprocess import Normalizer, PreprocessSpec

    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc

    ckpt = tower_checkpoint(Path(args.cache), args.tower)
    work = Path(tempfile.mkdtemp(prefix="clipfeat-gpu-"))
    make_inputs(work / "imgs", args.images)
    proc = Proc.from_pretrained(ckpt)
    dev = args.device
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    model = CLIPVisionModel.from_pretrained(ckpt).to(dev, dtype).eval()

    spec = PreprocessSpec.from_processor(proc)
    x = torch.randint(0, 256, (4, 3, spec.out_height, spec.out_width), dtype=torch.uint8)
    same = torch.equal(Normalizer(spec)(x.to(dev)).cpu(), Normalizer(spec)(x))
    print(f"Normalizer on {dev} equals CPU bit for bit: {same}")

    for aspect in ("square", "pad"):
        out = work / f"out-{aspect}"
        clipfeat.extract(roots=[str(work / "imgs")], out=str(out), model=str(ckpt),
                         device=dev, dtype=str(dtype).split(".")[1], store_dtype="float32",
                         batch_size=args.batch_size, aspect=aspect, workers=4)
        rows = {}
        for shard in sorted(out.glob("shard-*.h5")):
            with h5py.File(shard, "r") as f:
                for k, v in zip(f["keys"].asstr()[()], f["features"][()]):
                    rows[k] = v
        keys = sorted(rows)
        color = tuple(int(m * 255) for m in proc.image_mean)

        def load(k: str) -> Image.Image:
            img = Image.open(work / "imgs" / k).convert("RGB")
            if aspect == "pad":
                w, h = img.size
                if w != h:
                    s = max(w, h)
                    canvas = Image.new(img.mode, (s, s), color)
                    canvas.paste(img, ((s - w) // 2, (s - h) // 2))
                    img = canvas
            return img

        def ref(batch: list[str]) -> np.ndarray:
            imgs = []
            for k in batch:
                im = load(k)
                im.info.pop("transparency", None)  # as transformers 4.x (LLaVA) treats RGB input
                imgs.append(im)
            px = proc.preprocess(imgs, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                hs = model(px.to(dev, dtype), output_hidden_states=True).hidden_states
            return hs[-2][:, 1:].float().cpu().numpy()

        equal = 0
        worst = 0.0
        for i in range(0, len(keys), args.batch_size):
            batch = keys[i:i + args.batch_size]
            r = ref(batch)
            for k, v in zip(batch, r):
                equal += int(np.array_equal(rows[k], v))
                worst = max(worst, float(np.abs(rows[k] - v).max()))
        single = max(float(np.abs(rows[k] - ref([k])[0]).max()) for k in keys[:8])
        scale = max(float(np.abs(v).max()) for v in rows.values())
        print(f"aspect={aspect}: {len(keys)} images; same batches as clipfeat: {equal} rows "
              f"bit-identical, max |diff| {worst:.3g}; one image at a time: max |diff| "
              f"{single:.3g}; feature scale max |x| {scale:.3g}")


if __name__ == "__main__":
    main()
