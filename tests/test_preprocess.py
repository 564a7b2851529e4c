"""clipfeat.preprocess against transformers' own PIL image processors (the reference)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import imagegen
import numpy as np
import pytest
import torch
from llava_reference import LlavaReference, processor_class
from llava_reference import expand2square as llava_expand2square
from PIL import Image, ImageOps, UnidentifiedImageError

from clipfeat.errors import ConfigError
from clipfeat.preprocess import (
    ImageRejected,
    Normalizer,
    PreprocessSpec,
    expand2square,
    load_image,
    to_uint8,
)

# transformers' PIL image processors (the *Pil classes on transformers 5, the default ones on 4.x)
CLIPProc = processor_class("clip")
SiglipProc = processor_class("siglip")
BitProc = processor_class("dinov2")  # DINOv2's
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


# --------------------------------------------------------------------------------------------
# The reference, computed independently of clipfeat (llava_reference)


def reference_pixels(src, proc, aspect: str) -> torch.Tensor:
    """What LLaVA feeds the tower: open().convert('RGB') [-> expand2square] -> processor.

    Pillow keeps a palette/RGB image's transparent colour in info["transparency"] after
    convert('RGB'); transformers 5 (not 4.x, which LLaVA used) would then paint those pixels
    white. LLaVA's reference is "alpha dropped", so it is hidden from the processor."""
    return LlavaReference(processor=proc, hide_transparency=True).pixels(src, aspect)


def ours(path_or_img, spec: PreprocessSpec, aspect: str, **load_kw) -> torch.Tensor:
    img = path_or_img if isinstance(path_or_img, Image.Image) else load_image(path_or_img,
                                                                              **load_kw)
    u8 = to_uint8(img, spec, aspect)
    assert u8.dtype == np.uint8 and u8.flags["C_CONTIGUOUS"]
    assert u8.shape == (3, spec.out_height, spec.out_width)
    return Normalizer(spec)(torch.from_numpy(u8)[None])[0]


PROCESSORS = {
    "clip-shortest-edge": lambda: CLIPProc(size={"shortest_edge": 30},
                                           crop_size={"height": 30, "width": 30}),
    # non-square crop, wider than the resized short side: exercises zero padding
    "clip-rect-crop": lambda: CLIPProc(size={"shortest_edge": 24},
                                       crop_size={"height": 20, "width": 28}),
    "clip-exact-resize": lambda: CLIPProc(size={"height": 26, "width": 34},
                                          crop_size={"height": 24, "width": 24}),
    "siglip": lambda: SiglipProc(size={"height": 28, "width": 28}),
    "siglip-rect": lambda: SiglipProc(size={"height": 20, "width": 36}),
    # the fixed-resolution SigLIP2 checkpoints resize bilinearly
    "siglip2-bilinear": lambda: SiglipProc(size={"height": 28, "width": 28}, resample=2),
    # DINOv2: shortest edge 8/7 of the crop, ImageNet mean/std (facebook/dinov2-*)
    "dinov2": lambda: BitProc(size={"shortest_edge": 24}, crop_size={"height": 21, "width": 21},
                              **IMAGENET),
}

# (name, mode, format, size, save kwargs)
FILES = [
    ("bilevel.png", "1", "PNG", (23, 17), {}),
    ("bilevel.bmp", "1", "BMP", (17, 23), {}),
    ("gray.png", "L", "PNG", (33, 47), {}),
    ("gray.jpg", "L", "JPEG", (40, 25), {}),
    ("la.png", "LA", "PNG", (31, 22), {}),
    ("la.tiff", "LA", "TIFF", (22, 31), {}),
    ("palette.png", "P", "PNG", (37, 23), {}),
    ("palette.gif", "P", "GIF", (23, 37), {}),
    ("palette.bmp", "P", "BMP", (29, 29), {}),
    ("palette_trns.png", "P", "PNG", (40, 30), {"transparency": 0}),
    ("palette_trns.gif", "P", "GIF", (30, 40), {"transparency": 3}),
    ("rgb.png", "RGB", "PNG", (37, 23), {}),
    ("rgb.jpg", "RGB", "JPEG", (64, 48), {"quality": 90}),
    ("rgb.webp", "RGB", "WEBP", (48, 64), {}),
    ("rgb.bmp", "RGB", "BMP", (35, 35), {}),
    ("rgb.tiff", "RGB", "TIFF", (21, 50), {}),
    ("rgb_trns.png", "RGB", "PNG", (26, 19), {"transparency": (10, 20, 30)}),
    ("rgba.png", "RGBA", "PNG", (30, 41), {}),
    ("rgba.webp", "RGBA", "WEBP", (41, 30), {"lossless": True}),
    ("cmyk.jpg", "CMYK", "JPEG", (50, 20), {}),
    ("cmyk.tiff", "CMYK", "TIFF", (20, 50), {}),
    ("ycbcr.tiff", "YCbCr", "TIFF", (27, 33), {}),
    ("i16.png", "I;16", "PNG", (20, 25), {}),
    ("i16.tiff", "I;16", "TIFF", (25, 20), {}),
    ("i32.tiff", "I", "TIFF", (19, 21), {}),
    ("float.tiff", "F", "TIFF", (21, 19), {}),
    # sizes: tiny, one-pixel lines, 3 px high, odd, already at the target size
    ("one.png", "RGB", "PNG", (1, 1), {}),
    ("col_1x7.png", "RGB", "PNG", (1, 7), {}),
    ("row_7x1.png", "RGB", "PNG", (7, 1), {}),
    ("col_1x90.png", "RGB", "PNG", (1, 90), {}),
    ("row_90x1.png", "RGB", "PNG", (90, 1), {}),
    ("three_high.png", "RGB", "PNG", (41, 3), {}),
    ("three_wide.png", "RGB", "PNG", (3, 41), {}),
    ("at_target.png", "RGB", "PNG", (30, 30), {}),
    ("short_side_at_target.png", "RGB", "PNG", (30, 45), {}),
    ("odd.png", "RGB", "PNG", (97, 13), {}),
]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for i, (name, mode, fmt, size, kw) in enumerate(FILES):
        imagegen.make_image(d / name, mode, size, fmt, seed=i, **kw)
    imagegen.make_animated(d / "anim.gif")
    imagegen.make_animated(d / "anim.webp")
    imagegen.make_animated(d / "anim.png", fmt="PNG")  # APNG
    imagegen.make_multipage_tiff(d / "pages.tif")
    imagegen.make_exif_rotated_jpeg(d / "exif6.jpg", (48, 32), orientation=6)
    return d


ALL_FILES = [f[0] for f in FILES] + ["anim.gif", "anim.webp", "anim.png", "pages.tif",
                                     "exif6.jpg"]


@pytest.fixture(params=["native", "pillow"])
def resize_path(request):
    """Run a test with clipfeat's C resize (when built) and with Pillow's."""
    from clipfeat import fastresize

    if request.param == "pillow":
        with fastresize.force_pillow("test"):
            yield request.param
        return
    with fastresize.probing():
        if not fastresize.status().startswith("native"):
            pytest.skip(fastresize.status())
        yield request.param


@pytest.mark.parametrize("name", ALL_FILES)
def test_pixels_match_hf_processor_every_mode_format_and_size(image_dir, name, resize_path):
    path = image_dir / name
    if not imagegen.pillow_reads(path):  # LLaVA's path fails on it here: so must ours
        spec = PreprocessSpec.from_processor(next(iter(PROCESSORS.values()))())
        with pytest.raises(OSError):
            ours(path, spec, "square")
        return
    for pname, make in PROCESSORS.items():
        proc = make()
        spec = PreprocessSpec.from_processor(proc)
        for aspect in ("square", "pad"):
            ref = reference_pixels(path, proc, aspect)
            got = ours(path, spec, aspect)
            assert got.shape == ref.shape, (pname, aspect)
            assert torch.equal(got, ref), f"{name} {pname} {aspect}: max diff " \
                f"{(got - ref).abs().max().item()}"


def test_photo_640x480_at_336_matches_hf(tmp_path, config_only_vitl336, resize_path):
    """A real-size case (ViT-L/14-336 processor loaded from a checkpoint folder)."""
    path = tmp_path / "photo.jpg"
    Image.fromarray(imagegen.photo_array(640, 480, seed=5)).save(path, quality=92)
    proc = CLIPProc.from_pretrained(config_only_vitl336)
    cfg = json.loads((config_only_vitl336 / "preprocessor_config.json").read_text())
    spec = PreprocessSpec.from_processor_config(cfg, family="clip", image_size=336)
    assert spec == PreprocessSpec.from_processor(proc)
    for aspect in ("square", "pad"):
        assert torch.equal(ours(path, spec, aspect), reference_pixels(path, proc, aspect))


def test_dinov2_photos_at_224_match_its_processor(tmp_path, resize_path):
    """DINOv2's real proportions (shortest edge 256, crop 224, ImageNet mean/std) from a
    checkpoint folder, through the processor AutoImageProcessor picks."""
    from llava_reference import auto_processor

    from clipfeat.testing import save_tiny_dinov2

    ckpt = save_tiny_dinov2(tmp_path / "dinov2", image_size=518, patch_size=14, crop_size=224,
                            resize=256, registers=4, num_hidden_layers=1)
    proc = auto_processor(ckpt)
    cfg = json.loads((ckpt / "preprocessor_config.json").read_text())
    spec = PreprocessSpec.from_processor_config(cfg, family="dinov2", image_size=224)
    assert spec == PreprocessSpec.from_processor(proc)
    assert (spec.shortest_edge, spec.crop_height, spec.pad_color) == (256, 224, (123, 116, 103))
    for i, (w, h) in enumerate([(640, 480), (333, 517), (97, 301), (256, 255), (1, 9)]):
        path = tmp_path / f"photo{i}.jpg"
        Image.fromarray(imagegen.photo_array(w, h, seed=i)).save(path, quality=92)
        for aspect in ("square", "pad"):
            assert torch.equal(ours(path, spec, aspect), reference_pixels(path, proc, aspect)), \
                (w, h, aspect)


def test_random_sizes_match_hf_including_extreme_aspect_ratios(resize_path):
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 2), (2, 1), (1, 500), (500, 1), (2, 333), (333, 3), (5, 5),
             (29, 31), (31, 29), (17, 4), (4, 17)]
    sizes += [tuple(int(x) for x in rng.integers(1, 120, 2)) for _ in range(25)]
    procs = [PROCESSORS["clip-shortest-edge"](), PROCESSORS["clip-rect-crop"](),
             PROCESSORS["siglip"](), PROCESSORS["siglip2-bilinear"](), PROCESSORS["dinov2"](),
             CLIPProc(size={"shortest_edge": 7},
                                               crop_size={"height": 5, "width": 9})]
    for w, h in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for proc in procs:
            spec = PreprocessSpec.from_processor(proc)
            for aspect in ("square", "pad"):
                assert torch.equal(ours(img, spec, aspect),
                                   reference_pixels(img, proc, aspect)), (w, h, aspect)


def test_extreme_aspect_ratio_is_refused_against_max_pixels():
    spec = PreprocessSpec.from_processor_config(None, family="clip", image_size=336)
    img = Image.new("RGB", (1, 5000))  # the reference resizes this to 336 x 1680000
    with pytest.raises(ImageRejected, match=r"extreme aspect ratio: resizing 1x5000 to "
                                            r"336x1680000"):
        to_uint8(img, spec, "square", max_pixels=10_000_000)
    with pytest.raises(ImageRejected, match=r"padded canvas 5000x5000"):
        to_uint8(img, spec, "pad", max_pixels=10_000_000)
    # a normal photo is well within the budget
    assert to_uint8(Image.new("RGB", (640, 480)), spec, max_pixels=10_000_000).shape == \
        (3, 336, 336)


# --------------------------------------------------------------------------------------------
# Loading


def test_animated_and_multipage_give_the_first_frame(image_dir):
    for name in ("anim.gif", "anim.webp", "anim.png", "pages.tif"):
        with Image.open(image_dir / name) as im:
            assert getattr(im, "n_frames", 1) > 1, name
            first = np.asarray(im.convert("RGB"))
            im.seek(1)
            second = np.asarray(im.convert("RGB"))
        got = np.asarray(load_image(image_dir / name))
        assert np.array_equal(got, first), name
        assert got.shape != second.shape or not np.array_equal(got, second), name


def test_exif_orientation_ignored_by_default_and_applied_on_request(image_dir):
    path = image_dir / "exif6.jpg"
    plain = load_image(path)
    assert plain.size == (48, 32)  # stored size, as LLaVA sees it
    assert np.array_equal(np.asarray(plain), np.asarray(Image.open(path).convert("RGB")))
    turned = load_image(path, exif_transpose=True)
    assert turned.size == (32, 48)
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert np.array_equal(np.asarray(turned), np.asarray(expected))
    spec = PreprocessSpec.from_processor_config(None, family="clip", image_size=30)
    assert not np.array_equal(to_uint8(plain, spec), to_uint8(turned, spec))


def test_load_image_returns_rgb_and_leaks_no_file_handles(image_dir, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    fd_dir = Path("/proc/self/fd")
    before = len(os.listdir(fd_dir))
    for _ in range(3):
        for name in ALL_FILES:
            if not imagegen.pillow_reads(image_dir / name):  # see imagegen.pillow_reads
                with pytest.raises(OSError):
                    load_image(image_dir / name)
                continue
            img = load_image(image_dir / name)
            assert img.mode == "RGB"
        with pytest.raises(UnidentifiedImageError):
            load_image(bad)
    assert len(os.listdir(fd_dir)) == before


def test_decompression_bomb_refused_from_header(tmp_path):
    bomb = imagegen.make_bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageRejected, match=r"^decompression bomb: 100000x100000 = "
                                            r"10000000000 pixels > --max-pixels 89478485$"):
        load_image(bomb)


def test_max_pixels_is_ours_not_pillows(tmp_path, monkeypatch):
    path = imagegen.make_image(tmp_path / "a.png", "RGB", (64, 48))
    with pytest.raises(ImageRejected, match=r"64x48 = 3072 pixels > --max-pixels 3000"):
        load_image(path, max_pixels=3000)
    # Pillow's global limit (here far below the image) neither decides nor gets changed.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(path, max_pixels=None).size == (64, 48)
    assert load_image(path, max_pixels=5000).size == (64, 48)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_non_regular_files_are_never_opened(tmp_path):
    fifo = imagegen.make_fifo(tmp_path / "fifo.jpg")
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            load_image(fifo)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "load_image blocked on a FIFO"
    assert isinstance(outcome[0], ImageRejected) and str(outcome[0]) == "not a regular file"

    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageRejected, match="not a regular file"):
        load_image(tmp_path / "dir.jpg")
    os.symlink("missing.jpg", tmp_path / "dangling.jpg")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "dangling.jpg")


# --------------------------------------------------------------------------------------------
# Spec


@pytest.mark.parametrize("cfg, family", [
    ({"size": 336, "crop_size": 336}, "clip"),  # legacy ints
    ({"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
      "resample": 3, "rescale_factor": 0.00392156862745098}, "clip"),
    ({"size": {"height": 300, "width": 320}, "crop_size": {"height": 280, "width": 290}},
     "clip"),
    ({"size": {"shortest_edge": 224}, "crop_size": 224, "image_mean": [0.5, 0.4, 0.3],
      "image_std": [0.2, 0.25, 0.3], "resample": 2, "do_rescale": True}, "clip"),
    ({"size": {"height": 384, "width": 384}, "resample": 3}, "siglip"),
    ({}, "clip"),
    ({}, "siglip"),
])
def test_spec_from_config_resolves_like_transformers(cfg, family):
    proc = (CLIPProc if family == "clip" else SiglipProc)(**cfg)
    spec = PreprocessSpec.from_processor_config(cfg, family=family, image_size=999)
    assert spec == PreprocessSpec.from_processor(proc)
    if spec.resize_mode == "shortest_edge":
        assert spec.shortest_edge == proc.size["shortest_edge"]
    else:
        assert (spec.resize_height, spec.resize_width) == (proc.size["height"],
                                                           proc.size["width"])
    assert spec.mean == tuple(proc.image_mean) and spec.std == tuple(proc.image_std)
    assert spec.resample == int(proc.resample)


def test_spec_defaults_dict_and_pad_color():
    clip = PreprocessSpec.from_processor_config(None, family="clip", image_size=336)
    assert (clip.resize_mode, clip.shortest_edge, clip.crop_height, clip.crop_width) == \
        ("shortest_edge", 336, 336, 336)
    assert (clip.out_height, clip.out_width) == (336, 336)
    assert clip.pad_color == (122, 116, 104)  # LLaVA-1.5's background
    siglip = PreprocessSpec.from_processor_config(None, family="siglip", image_size=384)
    assert (siglip.resize_mode, siglip.resize_height, siglip.do_center_crop) == \
        ("exact", 384, False)
    assert siglip.pad_color == (127, 127, 127)
    for spec in (clip, siglip):
        d = json.loads(json.dumps(spec.to_dict()))
        assert d["resample_name"] == "BICUBIC"
        assert PreprocessSpec.from_dict(d) == spec
    import pickle
    assert pickle.loads(pickle.dumps(clip)) == clip


@pytest.mark.parametrize("cfg, family, match", [
    ({"size": {"shortest_edge": 336, "longest_edge": 500}}, "clip", "unsupported"),
    ({"size": 384}, "siglip", "variable output size"),
    ({"do_center_crop": False}, "clip", "variable output size"),
    ({"image_mean": [0.5, 0.5]}, "clip", "3 values"),
    ({"image_std": [0.5, 0.0, 0.5]}, "clip", "must not contain 0"),
    ({"resample": 42}, "clip", "unsupported resample"),
    ({}, "vit", "unknown model family 'vit'"),
])
def test_spec_rejects_what_it_cannot_reproduce(cfg, family, match):
    with pytest.raises(ConfigError, match=match):
        PreprocessSpec.from_processor_config(cfg, family=family, image_size=224)


def test_bad_aspect_is_a_config_error():
    spec = PreprocessSpec.from_processor_config(None, family="clip", image_size=30)
    with pytest.raises(ConfigError, match="unknown aspect 'wide'"):
        to_uint8(Image.new("RGB", (4, 4)), spec, "wide")


def test_expand2square_matches_llava():
    rng = np.random.default_rng(1)
    for w, h in [(5, 2), (2, 5), (6, 3), (3, 6), (7, 7), (1, 4)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        got = expand2square(img, (122, 116, 104))
        assert np.array_equal(np.asarray(got),
                              np.asarray(llava_expand2square(img, (122, 116, 104))))
    square = Image.new("RGB", (4, 4))
    assert expand2square(square, (0, 0, 0)) is square


# --------------------------------------------------------------------------------------------
# Normalizer


@pytest.mark.parametrize("make", [
    lambda: CLIPProc(size={"height": 16, "width": 16}, crop_size=16),
    lambda: SiglipProc(size={"height": 16, "width": 16}),
    lambda: CLIPProc(size={"height": 16, "width": 16}, crop_size=16,
                     rescale_factor=1 / 127.5, image_mean=[0.3, 0.1, 0.9],
                     image_std=[0.7, 0.11, 1.3]),
    lambda: SiglipProc(size={"height": 16, "width": 16}, do_normalize=False),
])
def test_normalizer_is_bit_exact_for_every_uint8_value(make):
    proc = make()
    spec = PreprocessSpec.from_processor(proc)
    norm = Normalizer(spec)
    assert norm.to("cpu") is norm
    rng = np.random.default_rng(0)
    # each channel of each 16x16 image holds all 256 values once
    imgs = [np.stack([rng.permutation(256).reshape(16, 16) for _ in range(3)], -1)
            .astype(np.uint8) for _ in range(2)]
    ref = torch.stack([proc(Image.fromarray(a), return_tensors="pt")["pixel_values"][0]
                       for a in imgs])
    batch = torch.from_numpy(np.stack([a.transpose(2, 0, 1) for a in imgs]))
    got = norm(batch)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref.float())
    assert torch.equal(norm(batch[1]), ref[1].float())  # unbatched (3, H, W) works too


@pytest.mark.parametrize("rescale, arithmetic", [(1 / 255, True), (0.0039, False)])
def test_normalizer_cpu_paths_match_the_processor(rescale, arithmetic):
    """On a CPU the arithmetic is used only where it reproduces every value; a rescale
    factor that is not 1/n falls back to the lookup table. Both equal the HF processor."""
    proc = CLIPProc(size={"height": 16, "width": 16}, crop_size=16, rescale_factor=rescale)
    norm = Normalizer(PreprocessSpec.from_processor(proc))
    assert norm.uses_cpu_arithmetic is arithmetic
    rng = np.random.default_rng(1)
    a = np.stack([rng.permutation(256).reshape(16, 16) for _ in range(3)], -1).astype(np.uint8)
    ref = proc(Image.fromarray(a), return_tensors="pt")["pixel_values"].float()
    batch = torch.from_numpy(a.transpose(2, 0, 1).copy())[None]
    out = torch.full((1, 3, 16, 16), float("nan"))
    got = norm(batch, out=out)
    assert got is out
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="out must be float32"):
        norm(batch, out=torch.empty(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be float32"):
        norm(batch, out=torch.empty(2, 3, 16, 16))


def test_normalizer_rejects_wrong_input():
    norm = Normalizer(PreprocessSpec.from_processor_config(None, family="clip", image_size=4))
    with pytest.raises(TypeError, match="uint8"):
        norm(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        norm(torch.zeros(1, 4, 4, 4, dtype=torch.uint8))
