"""clipfeat.fastresize (and its C accelerator) against Pillow's own resize + crop."""

from __future__ import annotations

import numpy as np
import PIL
import pytest
from PIL import Image

from clipfeat import fastresize
from clipfeat.preprocess import PreprocessSpec, to_uint8

BILINEAR, BICUBIC = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC


@pytest.fixture
def native():
    """The accelerator, calibrated afresh; skipped where it is not built."""
    with fastresize.probing():
        if not fastresize.status().startswith("native"):
            pytest.skip(fastresize.status())
        yield fastresize.accelerator()


def pillow_crop(img: Image.Image, size, window, resample) -> np.ndarray:
    x0, y0, w, h = window
    out = img.resize(size, resample=resample).crop((x0, y0, x0 + w, y0 + h))
    return np.asarray(out).transpose(2, 0, 1)


def test_calibration_finds_the_installed_pillows_pass_order(native):
    version = tuple(int(p) for p in PIL.__version__.split(".")[:2])
    expected = ("pillow>=13" if version >= (13, 0) else
                "pillow 12.2" if version >= (12, 2) else "pillow<12.2")
    assert fastresize.status() == f"native ({expected} pass order)"


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC])
def test_random_sizes_and_windows_equal_pillow(native, resample):
    rng = np.random.default_rng(int(resample))
    checked = 0
    for _ in range(150):
        w, h = (int(v) for v in rng.integers(1, 400, 2))
        rw, rh = (int(v) for v in rng.integers(1, 400, 2))
        if (rw, rh) == (w, h):
            continue
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        cw, ch = int(rng.integers(1, rw + 1)), int(rng.integers(1, rh + 1))
        window = (int(rng.integers(0, rw - cw + 1)), int(rng.integers(0, rh - ch + 1)), cw, ch)
        got = fastresize.resize_crop(img, (rw, rh), window, resample)
        assert got is not None and got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, pillow_crop(img, (rw, rh), window, resample),
                                      err_msg=f"{w}x{h} -> {rw}x{rh} window {window}")
        checked += 1
    assert checked > 100


def test_shapes_where_pillow_runs_the_vertical_pass_first(native):
    """Pillow 13: height shrinking by more than twice the width's shrink (and the mirror
    image); Pillow 12.2: images over 100 times taller than wide."""
    rng = np.random.default_rng(7)
    cases = [((40, 300), (30, 40)), ((640, 4000), (336, 2100)), ((100, 900), (120, 50)),
             ((300, 40), (40, 30)), ((33, 500), (33, 100)), ((500, 33), (100, 33)),
             ((2, 333), (28, 28)), ((3, 300), (28, 28)), ((3, 301), (20, 300)),
             ((1, 1000), (336, 336))]  # and images over 100x taller than wide (Pillow 12.2)
    for (w, h), size in cases:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        window = (0, size[1] // 4, size[0], size[1] // 2)
        for resample in (BILINEAR, BICUBIC):
            np.testing.assert_array_equal(fastresize.resize_crop(img, size, window, resample),
                                          pillow_crop(img, size, window, resample))


def test_photo_sizes_at_336_equal_pillow(native):
    """The common case: shortest side to 336, centre crop, from real-world photo sizes."""
    rng = np.random.default_rng(3)
    spec = PreprocessSpec.from_processor_config(None, family="clip", image_size=336)
    for w, h in [(640, 480), (480, 640), (1920, 1080), (1080, 1920), (1024, 1024),
                 (500, 375), (3000, 2000), (338, 335), (335, 900), (200, 150)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        rh, rw = spec.resized_size(h, w)
        window = ((rw - 336) // 2, (rh - 336) // 2, 336, 336)
        np.testing.assert_array_equal(fastresize.resize_crop(img, (rw, rh), window, BICUBIC),
                                      pillow_crop(img, (rw, rh), window, BICUBIC),
                                      err_msg=f"{w}x{h}")


def test_to_uint8_is_the_same_with_and_without_the_accelerator(native):
    rng = np.random.default_rng(11)
    specs = [PreprocessSpec.from_processor_config(None, family="clip", image_size=336),
             PreprocessSpec.from_processor_config(None, family="siglip", image_size=384),
             PreprocessSpec.from_processor_config(
                 {"size": {"shortest_edge": 20}, "crop_size": {"height": 24, "width": 12}},
                 family="clip", image_size=24)]  # a crop taller than the resized image: padded
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for w, h in [(640, 480), (31, 97), (97, 31), (5, 3), (336, 336), (384, 384)]]
    fast = [[to_uint8(im, spec, aspect) for im in images for aspect in ("square", "pad")]
            for spec in specs]
    with fastresize.force_pillow("test"):
        assert fastresize.status() == "pillow (test)"
        slow = [[to_uint8(im, spec, aspect) for im in images for aspect in ("square", "pad")]
                for spec in specs]
    for a_list, b_list in zip(fast, slow, strict=False):
        for a, b in zip(a_list, b_list, strict=False):
            assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
            np.testing.assert_array_equal(a, b)


def test_what_it_does_not_reproduce_goes_to_pillow(native):
    img = Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8))
    assert fastresize.resize_crop(img, (10, 8), (0, 0, 10, 8), Image.Resampling.LANCZOS) is None
    assert fastresize.resize_crop(img.convert("L"), (10, 8), (0, 0, 10, 8), BICUBIC) is None
    assert fastresize.resize_crop(img, (30, 20), (0, 0, 30, 20), BICUBIC) is None  # no resize
    assert fastresize.resize_crop(img, (10, 8), (5, 0, 10, 8), BICUBIC) is None  # outside


def test_large_sources_go_to_pillow(native, monkeypatch):
    """The C path copies the source; over the limit the (larger) image is Pillow's."""
    img = Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8))
    assert fastresize.resize_crop(img, (15, 10), (0, 0, 15, 10), BICUBIC) is not None
    monkeypatch.setattr(fastresize, "MAX_SOURCE_PIXELS", 599)
    assert fastresize.resize_crop(img, (15, 10), (0, 0, 15, 10), BICUBIC) is None
    spec = PreprocessSpec.from_processor_config(None, family="clip", image_size=12)
    expected = np.asarray(img.resize((18, 12), BICUBIC).crop((3, 0, 15, 12))).transpose(2, 0, 1)
    np.testing.assert_array_equal(to_uint8(img, spec), expected)


def test_a_pillow_it_does_not_reproduce_turns_it_off(native):
    """If no pass-order rule reproduces the probes (a future Pillow), Pillow does the work."""
    with fastresize.probing(rules={"never": lambda *a: False}):
        assert fastresize.status() == (
            "pillow (the C accelerator does not reproduce this Pillow's resize)")
        assert fastresize.accelerator() is None
        img = Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8))
        assert fastresize.resize_crop(img, (15, 10), (0, 0, 15, 10), BICUBIC) is None
    assert fastresize.accelerator() is native  # the previous state is back


def test_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("CLIPFEAT_NATIVE_RESIZE", "0")
    with fastresize.probing():
        assert fastresize.status() == "pillow (CLIPFEAT_NATIVE_RESIZE=0)"


def test_the_c_function_checks_its_arguments(native):
    src = np.zeros((4, 5, 3), dtype=np.uint8)
    hb, hk, hks = fastresize.coefficients(5, 3, BICUBIC)
    vb, vk, vks = fastresize.coefficients(4, 2, BICUBIC)
    out = np.empty((3, 2, 3), dtype=np.uint8)
    native.resample(src, 5, 4, 15, hb, hk, hks, vb, vk, vks, True, out)  # fine
    bad = hb.copy()
    bad[0, 0] = 4  # a window running past the right edge
    with pytest.raises(ValueError, match="horizontal bounds out of range"):
        native.resample(src, 5, 4, 15, bad, hk, hks, vb, vk, vks, True, out)
    with pytest.raises(ValueError, match="output buffer"):
        native.resample(src, 5, 4, 15, hb, hk, hks, vb, vk, vks, True, np.empty((3, 1, 3), np.uint8))
    with pytest.raises(ValueError, match="source buffer"):
        native.resample(src[:3], 5, 4, 15, hb, hk, hks, vb, vk, vks, True, out)
    with pytest.raises(ValueError, match="vertical coefficients"):
        native.resample(src, 5, 4, 15, hb, hk, hks, vb, vk[:1], vks, True, out)


def test_coefficients_are_pillows_fixed_point_weights():
    """Each output's weights sum to 1.0 in 22-bit fixed point (to rounding), within its window."""
    for n_in, n_out in [(640, 448), (480, 336), (10, 37), (1, 5), (999, 1)]:
        bounds, weights, ksize = fastresize.coefficients(n_in, n_out, BICUBIC)
        assert bounds.shape == (n_out, 2) and weights.shape == (n_out, ksize)
        first, count = bounds[:, 0], bounds[:, 1]
        assert (first >= 0).all() and (count >= 1).all() and (first + count <= n_in).all()
        assert np.abs(weights.sum(axis=1) - (1 << 22)).max() <= ksize
        for row, c in zip(weights, count, strict=False):
            assert not row[c:].any()
