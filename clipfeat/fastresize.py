"""Pillow's resize + centre crop, bit for bit, computing only the pixels the crop keeps.

The processor resizes the whole image with ``PIL.Image.resize`` and then crops: for a 640x480
photo at 336 px a quarter of the resized pixels are thrown away, and Pillow's scalar loops
are most of a decode worker's time. This module reproduces Pillow's arithmetic exactly and
asks the C accelerator (``clipfeat._resample``, built when clipfeat is installed with a C
compiler) for the kept window only:

* Pillow computes, per output column (row), a window of source pixels and double-precision
  filter weights, normalises them and rounds them to 22-bit fixed point
  (``precompute_coeffs`` / ``normalize_coeffs_8bpc`` in ``libImaging/Resample.c``).
  :func:`coefficients` does the same operations in the same order on IEEE doubles, so the
  integers are Pillow's.
* Each pass is an integer sum, rounded to uint8 between the passes, so the result depends on
  the pass order. Pillow up to 12.1 always runs the horizontal pass first; 12.2 runs the
  vertical one first for images over 100 times taller than wide; 13 does when the height
  shrinks by more than twice as many pixels as the width. Which rule the installed Pillow
  follows is found by comparing with Pillow itself, once per process (:func:`status`), on
  small probes that tell the rules apart.

If the accelerator is missing, the probes disagree, the platform is not x86-64 (where
Pillow's builds may fuse multiply-adds in the weights) or ``CLIPFEAT_NATIVE_RESIZE=0`` is set,
:func:`resize_crop` returns None and the caller resizes with Pillow: same pixels, slower.
Only bilinear and bicubic (CLIP's and SigLIP's filter) are reproduced; the other filters go to
Pillow.

For tests and benchmarks: :func:`force_pillow` (Pillow does every resize inside a ``with``
block), :func:`probing` (the self-check runs again inside a ``with`` block, reading
``CLIPFEAT_NATIVE_RESIZE`` again, optionally against other pass-order rules) and
:func:`accelerator` (the C module in use, or None). Each restores the process's state on exit.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import threading
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from PIL import Image

__all__ = ["MAX_SOURCE_PIXELS", "accelerator", "coefficients", "force_pillow", "probing",
           "resize_crop", "status"]

_BILINEAR, _BICUBIC = 2, 3  # PIL.Image.Resampling codes
#: Larger sources go to Pillow: the C path works on a copy of the source pixels (3 bytes a
#: pixel, 75 MB at this size), which per worker should stay small next to the image itself.
#: Read on every call of :func:`resize_crop` (tests may lower it).
MAX_SOURCE_PIXELS = 25_000_000
_SUPPORT = {_BILINEAR: 1.0, _BICUBIC: 2.0}
_PRECISION = float(1 << 22)  # Pillow's PRECISION_BITS for 8-bit images


def _filter(code: int, x: np.ndarray) -> np.ndarray:
    """Pillow's ``bilinear_filter`` / ``bicubic_filter`` (a = -0.5), same operation order."""
    import numpy as np

    x = np.abs(x)
    if code == _BILINEAR:
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=256)
def coefficients(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Pillow's source windows and fixed-point weights for resizing one axis.

    Returns ``(bounds, weights, ksize)``: int32 ``(out_size, 2)`` rows of (first source pixel,
    count) and int32 ``(out_size, ksize)`` weights, zero past each count. The arrays are
    shared by the cache: do not modify them.
    """
    import numpy as np

    scale = float(in_size) / out_size  # (double)(box[2] - box[0]) / outSize, box = (0, W)
    filterscale = max(scale, 1.0)
    support = _SUPPORT[resample] * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    inv = 1.0 / filterscale
    k = np.zeros((out_size, ksize), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for t in range(ksize):  # summed tap by tap, as the C loop does (not pairwise)
        x = ((t + first).astype(np.float64) - center + 0.5) * inv
        w = np.where(t < count, _filter(resample, x), 0.0)
        k[:, t] = w
        total = total + w
    nz = total != 0.0
    k[nz] = k[nz] / total[nz, None]
    fixed = np.where(k < 0, np.trunc(-0.5 + k * _PRECISION), np.trunc(0.5 + k * _PRECISION))
    bounds = np.stack([first, count], axis=1).astype(np.int32)
    weights = fixed.astype(np.int32)
    bounds.flags.writeable = weights.flags.writeable = False
    return bounds, weights, ksize


@lru_cache(maxsize=256)
def _window(in_size: int, out_size: int, resample: int, first: int, count: int
            ) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`coefficients` of outputs ``first .. first + count`` only, contiguous (cached:
    every image of a size needs the same ones)."""
    import numpy as np

    bounds, weights, ksize = coefficients(in_size, out_size, resample)
    b = np.ascontiguousarray(bounds[first:first + count])
    w = np.ascontiguousarray(weights[first:first + count])
    b.flags.writeable = w.flags.writeable = False
    return b, w, ksize


def _horizontal_first_13(w_in: int, h_in: int, w_out: int, h_out: int) -> bool:
    """Pillow >= 13: vertical pass first when the height shrinks by > 2x the width's shrink."""
    return not (h_in - h_out > 0 and h_in - h_out > (w_in - w_out) * 2)


def _horizontal_first_12_2(w_in: int, h_in: int, w_out: int, h_out: int) -> bool:
    """Pillow 12.2 (in Python, ``Image.resize``): vertical first for images over 100 times
    taller than wide whose height shrinks."""
    return not (h_in > w_in * 100 and h_out < h_in)


def _horizontal_first_old(w_in: int, h_in: int, w_out: int, h_out: int) -> bool:
    """Pillow up to 12.1: always the horizontal pass first."""
    return True


#: A pass-order rule: (source w, h, resized w, h) -> whether the horizontal pass runs first.
Rule = Callable[[int, int, int, int], bool]

_RULES: dict[str, Rule] = {"pillow>=13": _horizontal_first_13, "pillow 12.2": _horizontal_first_12_2,
          "pillow<12.2": _horizontal_first_old}

# (source w, h), (resized w, h), kept window (x0, y0, w, h): downscales, upscales, mixed, and
# shapes where the two pass-order rules disagree.
_PROBES = (
    ((64, 48), (45, 34), (5, 0, 34, 34)),
    ((12, 60), (10, 15), (0, 2, 10, 11)),
    ((30, 20), (50, 12), (3, 0, 40, 12)),
    ((20, 30), (35, 50), (0, 7, 35, 35)),
    ((47, 47), (34, 26), (0, 0, 34, 26)),
    ((9, 90), (6, 20), (1, 3, 4, 15)),
    ((40, 25), (40, 16), (4, 0, 30, 16)),
    ((2, 333), (28, 28), (0, 0, 28, 28)),
)


def _calibrate(native: Any, rules: Mapping[str, Rule]) -> str | None:
    """The name of the pass-order rule in ``rules`` under which the accelerator reproduces
    this Pillow, or None."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    candidates = dict(rules)
    for (w, h), size, window in _PROBES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for code in (_BILINEAR, _BICUBIC):
            x0, y0, cw, ch = window
            ref = np.asarray(img.resize(size, resample=code).crop((x0, y0, x0 + cw, y0 + ch)))
            ref = ref.transpose(2, 0, 1)
            for name, rule in list(candidates.items()):
                got = _run(native, img, size, window, code, rule(w, h, *size))
                if not np.array_equal(got, ref):
                    del candidates[name]
    return next(iter(candidates), None)


def _run(native: Any, img: Image.Image, size: tuple[int, int], window: tuple[int, int, int, int],
         resample: int, horizontal_first: bool) -> np.ndarray:
    import numpy as np

    (w, h), (rw, rh), (x0, y0, cw, ch) = img.size, size, window
    hb, hk, hks = _window(w, rw, resample, x0, cw)
    vb, vk, vks = _window(h, rh, resample, y0, ch)
    out = np.empty((3, ch, cw), dtype=np.uint8)
    native.resample(img.tobytes(), w, h, w * 3, hb, hk, hks, vb, vk, vks, horizontal_first, out)
    return out


_lock = threading.Lock()
_state: tuple[Any, Any, str] | None = None  # (module or None, rule or None, description)
_rules: Mapping[str, Rule] | None = None  # the candidates of the next probe; None: _RULES


def status() -> str:
    """How this process resizes: ``"native (...)"``, or ``"pillow (<why>)"``."""
    return _load()[2]


def accelerator() -> Any:
    """The C accelerator module :func:`resize_crop` uses, or None when Pillow resizes."""
    return _load()[0]


@contextlib.contextmanager
def _swap(state: tuple[Any, Any, str] | None, rules: Mapping[str, Rule] | None) -> Iterator[None]:
    global _state, _rules
    with _lock:
        saved = _state, _rules
        _state, _rules = state, rules
    try:
        yield
    finally:
        with _lock:
            _state, _rules = saved


def force_pillow(reason: str = "forced") -> contextlib.AbstractContextManager[None]:
    """Inside the ``with`` block :func:`resize_crop` returns None (Pillow resizes) and
    :func:`status` is ``"pillow (<reason>)"``; the previous state is back on exit."""
    return _swap((None, None, f"pillow ({reason})"), None)


def probing(rules: Mapping[str, Rule] | None = None) -> contextlib.AbstractContextManager[None]:
    """Inside the ``with`` block the accelerator is probed again on first use (reading
    ``CLIPFEAT_NATIVE_RESIZE`` again), choosing among ``rules`` (name -> pass-order rule)
    instead of the known Pillow versions' when given; the previous state is back on exit."""
    return _swap(None, dict(rules) if rules is not None else None)


def _load() -> tuple[Any, Any, str]:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _probe()
    return _state


def _probe() -> tuple[Any, Any, str]:
    if os.environ.get("CLIPFEAT_NATIVE_RESIZE", "").strip() == "0":
        return None, None, "pillow (CLIPFEAT_NATIVE_RESIZE=0)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, None, f"pillow (native resize is only enabled on x86-64, not {platform.machine()})"
    try:
        from clipfeat import _resample as native
    except ImportError:
        return None, None, "pillow (the C accelerator clipfeat._resample is not built)"
    rules = _RULES if _rules is None else _rules
    try:
        rule = _calibrate(native, rules)
    except Exception as exc:  # pragma: no cover - a broken build must not stop extraction
        return None, None, f"pillow (the C accelerator failed its self-check: {exc})"
    if rule is None:
        return None, None, "pillow (the C accelerator does not reproduce this Pillow's resize)"
    return native, rules[rule], f"native ({rule} pass order)"


def resize_crop(
    img: Image.Image,
    size: tuple[int, int],
    window: tuple[int, int, int, int],
    resample: int,
) -> np.ndarray | None:
    """``img.resize(size, resample).crop(window)`` as uint8 (3, h, w), or None.

    ``img`` must be RGB; ``window`` is (x0, y0, width, height) inside the resized image.
    None means "use Pillow": no accelerator, an unsupported filter, nothing to resize, or a
    source over :data:`MAX_SOURCE_PIXELS`.
    """
    native, rule, _ = _load()
    if (native is None or resample not in _SUPPORT or img.mode != "RGB" or size == img.size
            or img.width * img.height > MAX_SOURCE_PIXELS):
        return None
    x0, y0, cw, ch = window
    rw, rh = size
    if not (0 <= x0 and 0 <= y0 and cw > 0 and ch > 0 and x0 + cw <= rw and y0 + ch <= rh):
        return None
    return _run(native, img, size, window, resample, rule(img.width, img.height, rw, rh))
