"""Exact LLaVA preprocessing: image file -> RGB PIL image -> uint8 (3, H, W) -> float32.

The reference is what LLaVA trains with: ``Image.open(path).convert('RGB')``, optionally
``expand2square`` onto the processor's mean colour, then the checkpoint's image processor with
the PIL backend (resize with PIL, centre crop with floor offsets, ``x * rescale_factor`` in
float64 cast to float32, ``(x - mean) / std`` in float32). The work is split in two so that
the heavy part can run in decode workers without torch:

* :func:`to_uint8` reproduces everything up to and including the crop, as uint8 pixels;
* :class:`Normalizer` turns a uint8 batch into the processor's float32 ``pixel_values`` with a
  per-channel lookup table, on any torch device, bit for bit.

The processor resizes the whole image with ``PIL.Image.resize`` and then crops. When the C
accelerator is built, :mod:`clipfeat.fastresize` computes only the kept window with Pillow's
own fixed-point arithmetic (the same pixels); otherwise Pillow does it as the processor does.
Pillow's ``resize(box=...)`` is *not* a way to do that exactly: the box reaches C as
single-precision floats and moves the filter taps. Pathological aspect ratios, where the
reference would allocate a huge intermediate image, are refused against ``max_pixels``.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Union

from clipfeat import families
from clipfeat.config import ASPECTS, DEFAULT_MAX_PIXELS
from clipfeat.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from PIL import Image

__all__ = [
    "ASPECTS",
    "DEFAULT_MAX_PIXELS",
    "FAMILIES",
    "ImageRejected",
    "Normalizer",
    "PreprocessSpec",
    "check_resize_budget",
    "expand2square",
    "load_image",
    "normalization_table",
    "open_regular",
    "to_uint8",
]


FAMILIES = tuple(families.FAMILIES)
_SIZE_KEY_SETS = ({"shortest_edge"}, {"height", "width"})

# Serialises the temporary change of Pillow's global pixel limit in load_image.
_PIL_LIMIT_LOCK = threading.Lock()

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO, bytes, bytearray, memoryview]


class ImageRejected(ValueError):
    """An input refused on purpose (not a regular file, decompression bomb, too large).

    ``str(exc)`` is a one-line reason fit for ``failures.jsonl``.
    """


# --------------------------------------------------------------------------------------------
# Spec


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to reproduce a checkpoint's image processor; picklable, JSON-able.

    ``resize_mode`` is ``"shortest_edge"`` (resize the short side to ``shortest_edge``, long
    side ``int(shortest_edge * long / short)``) or ``"exact"`` (to ``resize_height`` x
    ``resize_width``). ``out_height`` x ``out_width`` is the final pixel size.
    """

    family: str
    do_resize: bool
    resize_mode: str
    shortest_edge: int | None
    resize_height: int | None
    resize_width: int | None
    resample: int
    do_center_crop: bool
    crop_height: int | None
    crop_width: int | None
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    out_height: int
    out_width: int

    def __post_init__(self) -> None:
        families.family(self.family)
        if self.resize_mode not in ("shortest_edge", "exact"):
            raise ConfigError(
                f"unsupported resize mode {self.resize_mode!r}; expected 'shortest_edge' or 'exact'"
            )
        for name in ("shortest_edge", "resize_height", "resize_width", "crop_height",
                     "crop_width", "out_height", "out_width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"preprocessing {name} must be a positive integer, got {value!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"image_mean/image_std need 3 values, got {self.mean} / {self.std}")
        if self.do_normalize and any(s == 0 for s in self.std):
            raise ConfigError(f"image_std must not contain 0, got {self.std}")

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_processor_config(
        cls, cfg: dict[str, Any] | None, *, family: str, image_size: int
    ) -> PreprocessSpec:
        """Build from a ``preprocessor_config.json`` dict, resolved like transformers does.

        Keys missing from ``cfg`` take the family's processor class defaults (as transformers
        would: `clipfeat.families.processor_defaults`; for DINOv2 those of BitImageProcessor,
        which are CLIP's); ``cfg=None`` means the family's defaults at ``image_size``
        (`clipfeat.families.missing_processor_config`: CLIP: shortest edge + centre crop to
        ``image_size``; SigLIP: plain resize to ``image_size`` squared; DINOv2: its own
        recipe, shortest edge 8/7 of ``image_size``, centre crop, ImageNet mean/std).
        """
        families.family(family)
        if not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
        if cfg is None:
            cfg = families.missing_processor_config(family, image_size)
        elif not isinstance(cfg, dict):
            raise ConfigError(f"preprocessor config must be a dict, got {type(cfg).__name__}")
        return _spec_from_config(cfg, family)

    @classmethod
    def from_processor(cls, proc: Any) -> PreprocessSpec:
        """Build from a transformers image processor instance (4.x or 5.x; CLIP, SigLIP or
        DINOv2's BitImageProcessor)."""
        family = families.family_of_processor(type(proc).__name__)
        return _spec_from_config(proc.to_dict(), family)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        """Inverse of :meth:`to_dict` (e.g. to compare with what a store was made with)."""
        fields = dict(d)
        fields.pop("resample_name", None)
        fields["mean"] = tuple(float(x) for x in fields["mean"])
        fields["std"] = tuple(float(x) for x in fields["std"])
        return cls(**fields)

    # -- views -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (for shard attributes and the manifest)."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["resample_name"] = _resample_name(self.resample)
        return d

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """LLaVA's ``expand2square`` background: ``tuple(int(m * 255) for m in image_mean)``."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes an image of this size to (before the crop)."""
        if not self.do_resize:
            return height, width
        if self.resize_mode == "exact":
            return self.resize_height, self.resize_width  # type: ignore[return-value]
        size = self.shortest_edge
        # transformers' get_resize_output_image_size(default_to_square=False): float division,
        # truncated; an image whose short side already equals `size` keeps its size.
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)  # type: ignore[operator]
        return (new_long, size) if width <= height else (size, new_long)  # type: ignore[return-value]


def size_mismatch(out_size: tuple[int, int], image_size: int, *, key: str,
                  path: Any) -> str | None:
    """Why a processor making ``out_size`` (height, width) images cannot feed a tower of
    ``image_size`` px, naming both sizes and the fix; None if it can. ``key`` is the
    preprocessor_config.json entry that decides the size (``crop_size`` or ``size``)."""
    height, width = out_size
    if (height, width) == (image_size, image_size):
        return None
    return (f"{path}: {key} gives {height}x{width} px images but the model takes "
            f"{image_size}x{image_size} (image_size {image_size} in config.json): set {key} to "
            f"{image_size} in preprocessor_config.json, or pass the checkpoint it belongs to")


def check_spec_fits(spec: PreprocessSpec, image_size: int, *, path: Any) -> None:
    """ModelError unless ``spec`` makes ``image_size`` square images (see `size_mismatch`)."""
    key = "crop_size" if spec.do_center_crop else "size"
    msg = size_mismatch((spec.out_height, spec.out_width), image_size, key=key, path=path)
    if msg is not None:
        raise ModelError(msg)


def _resample_name(code: int) -> str:
    try:
        from PIL import Image

        return Image.Resampling(code).name
    except Exception:  # noqa: BLE001 - informative only
        return str(code)


def _size_dict(value: Any, *, default_to_square: bool, what: str) -> dict[str, int]:
    """transformers' get_size_dict for the shapes CLIP/SigLIP configs use."""
    if isinstance(value, bool):
        raise ConfigError(f"preprocessor {what} must be an int or a dict, got {value!r}")
    if isinstance(value, int):
        if default_to_square:
            return {"height": value, "width": value}
        return {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        d = {k: v for k, v in value.items() if v is not None}
        if set(d) in _SIZE_KEY_SETS:
            return {k: int(v) for k, v in d.items()}
        raise ConfigError(
            f"unsupported preprocessor {what} {value!r}: clipfeat supports "
            "{'shortest_edge': N} or {'height': H, 'width': W}"
        )
    raise ConfigError(f"preprocessor {what} must be an int or a dict, got {value!r}")


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3  # type: ignore[return-value]
    try:
        t = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"preprocessor {what} must be a number or 3 numbers, got {value!r}"
        ) from None
    if len(t) != 3:
        raise ConfigError(f"preprocessor {what} must have 3 values (RGB), got {value!r}")
    return t  # type: ignore[return-value]


def _spec_from_config(cfg: dict[str, Any], family: str) -> PreprocessSpec:
    defaults = families.processor_defaults(family)

    def get(key: str) -> Any:
        value = cfg.get(key)
        return defaults[key] if value is None else value

    do_resize = bool(get("do_resize"))
    do_center_crop = bool(get("do_center_crop"))
    # Every family's processor (CLIP, SigLIP, Bit) uses default_to_square=False for `size`.
    size = _size_dict(get("size"), default_to_square=False, what="size")
    if "shortest_edge" in size:
        mode, shortest, rh, rw = "shortest_edge", size["shortest_edge"], None, None
    else:
        mode, shortest, rh, rw = "exact", None, size["height"], size["width"]

    ch = cw = None
    if do_center_crop:
        crop = get("crop_size")
        if crop is None:
            raise ConfigError("preprocessor has do_center_crop=true but no crop_size")
        crop = _size_dict(crop, default_to_square=True, what="crop_size")
        if "height" not in crop:
            raise ConfigError(f"crop_size must be {{'height', 'width'}} or an int, got {crop}")
        ch, cw = crop["height"], crop["width"]

    if do_center_crop:
        out_h, out_w = ch, cw
    elif do_resize and mode == "exact":
        out_h, out_w = rh, rw
    else:
        raise ConfigError(
            f"preprocessor config gives a variable output size (do_resize={do_resize}, "
            f"size={size}, do_center_crop={do_center_crop}); batching needs a fixed size: "
            "use size {'height', 'width'} or a crop_size"
        )

    resample = get("resample")
    try:
        resample = int(resample)
    except (TypeError, ValueError):
        raise ConfigError(
            f"preprocessor resample must be a PIL filter code, got {resample!r}"
        ) from None
    if resample not in range(6):
        raise ConfigError(
            f"unsupported resample filter {resample!r}; expected a PIL code 0-5 (3 = bicubic)"
        )

    factor = get("rescale_factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ConfigError(f"preprocessor rescale_factor must be a number, got {factor!r}")

    return PreprocessSpec(
        family=family,
        do_resize=do_resize,
        resize_mode=mode,
        shortest_edge=shortest,
        resize_height=rh,
        resize_width=rw,
        resample=resample,
        do_center_crop=do_center_crop,
        crop_height=ch,
        crop_width=cw,
        do_rescale=bool(get("do_rescale")),
        rescale_factor=float(factor),
        do_normalize=bool(get("do_normalize")),
        mean=_triple(get("image_mean"), "image_mean"),
        std=_triple(get("image_std"), "image_std"),
        out_height=out_h,
        out_width=out_w,
    )


# --------------------------------------------------------------------------------------------
# Loading


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (FIFOs/devices are never opened).

    ImageRejected for anything else; FileNotFoundError etc. as ``os.stat`` raises them.
    """
    try:
        st = os.stat(path)  # follows symlinks; FileNotFoundError for missing or dangling
    except ValueError as e:  # e.g. an embedded NUL byte
        raise ImageRejected(f"invalid path: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageRejected("not a regular file")
    # O_NONBLOCK: if the path was swapped for a FIFO after the stat, open() must not block.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageRejected("not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def _pillow_pixel_limit(limit: int | None) -> Iterator[None]:
    """Temporarily set ``PIL.Image.MAX_IMAGE_PIXELS`` (process-global) under a lock."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS == limit:
        yield
        return
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _bomb_message(w: int, h: int, max_pixels: int) -> str:
    return f"decompression bomb: {w}x{h} = {w * h} pixels > --max-pixels {max_pixels}"


def load_image(
    path: PathOrFile,
    *,
    exif_transpose: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Open an image exactly as LLaVA does (``Image.open(p).convert('RGB')``, first frame).

    ``path`` is a path, an open binary file or the file's bytes: after opening,
    all three take the same steps, so the same bytes give the same pixels. Refuses
    non-regular files without opening them, and images over ``max_pixels`` (None: no
    limit) from the header alone, before any pixel is decoded; Pillow's
    ``DecompressionBombWarning`` counts as an error. ``exif_transpose`` applies the EXIF
    orientation first (LLaVA does not). No file handle outlives the call.

    Raises :class:`ImageRejected` for refusals, ``OSError``/``PIL.UnidentifiedImageError``
    etc. for unreadable files. Not parallel across threads when ``max_pixels`` differs from
    Pillow's global limit (use processes, as :class:`clipfeat.decode.DecodePool` does).
    """
    from PIL import Image, ImageOps

    if max_pixels is not None and (isinstance(max_pixels, bool) or max_pixels < 1):
        raise ConfigError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    if isinstance(path, (bytes, bytearray, memoryview)):
        fp: Any = io.BytesIO(path)
    elif hasattr(path, "read"):
        fp = path
    else:
        fp = open_regular(path)  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's own header check is off while opening so that ours (which names the
            # size) decides; it is back on, at max_pixels, for checks made while decoding
            # (GIF frames, TIFF tiles, ...).
            with _pillow_pixel_limit(None):
                img = Image.open(fp)  # type: ignore[arg-type]
            rgb = None
            try:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageRejected(_bomb_message(w, h, max_pixels))
                with _pillow_pixel_limit(max_pixels):
                    try:
                        img.load()
                    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                        raise ImageRejected(f"decompression bomb: {e}") from None
                    w, h = img.size
                    if max_pixels is not None and w * h > max_pixels:
                        raise ImageRejected(_bomb_message(w, h, max_pixels))
                    src = ImageOps.exif_transpose(img) if exif_transpose else img
                    # convert('RGB') of an RGB image is a copy: the loaded image is returned
                    # as it is (its pixels are in memory; the file is closed below).
                    rgb = src if src.mode == "RGB" else src.convert("RGB")
            finally:
                if rgb is not img:
                    img.close()
    finally:
        if fp is not path:
            fp.close()  # type: ignore[union-attr]
    return rgb


# --------------------------------------------------------------------------------------------
# Pixels


def expand2square(img: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: paste onto a square canvas of ``color``, floor-centred.

    A square image is returned unchanged (the same object).
    """
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _crop_window(size: int, crop: int) -> tuple[int, int, int]:
    """transformers' center_crop along one axis: (src_start, length, dst_offset).

    An image smaller than the crop is zero-padded with ceil((crop - size) / 2) before it.
    """
    if size >= crop:
        return (size - crop) // 2, crop, 0
    return 0, size, -((size - crop) // 2)  # ceil((crop - size) / 2)


def check_resize_budget(
    width: int, height: int, spec: PreprocessSpec, aspect: str, max_pixels: int | None
) -> None:
    """Raise :class:`ImageRejected` if preprocessing this size would allocate > max_pixels.

    The reference resizes the whole (padded) image: for extreme aspect ratios (1x5000 -> a
    336x1680000 intermediate) that is a multi-GB allocation, so such images are refused.
    """
    if max_pixels is None:
        return
    if aspect == "pad" and width != height:
        side = max(width, height)
        if side * side > max_pixels:
            raise ImageRejected(
                f"padded canvas {side}x{side} = {side * side} pixels > --max-pixels {max_pixels}"
            )
        width = height = side
    rh, rw = spec.resized_size(height, width)
    if (rw, rh) == (width, height):
        return
    need = max(rw * rh, rw * height, width * rh)  # output and either one-pass intermediate
    if need > max_pixels:
        raise ImageRejected(
            f"extreme aspect ratio: resizing {width}x{height} to {rw}x{rh} needs {need} pixels "
            f"> --max-pixels {max_pixels}"
        )


def to_uint8(
    img: Image.Image,
    spec: PreprocessSpec,
    aspect: str = "square",
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """The processor's pixels after resize + crop, as uint8 C-contiguous (3, out_h, out_w).

    ``img`` should be RGB (anything else is ``.convert('RGB')``-ed, as LLaVA does). ``aspect``
    ``"pad"`` applies :func:`expand2square` with ``spec.pad_color`` first. With ``max_pixels``
    set, sizes whose resize would allocate more are refused (:func:`check_resize_budget`).
    """
    import numpy as np

    if aspect not in ASPECTS:
        raise ConfigError(f"unknown aspect {aspect!r}; expected one of {ASPECTS}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    check_resize_budget(img.width, img.height, spec, aspect, max_pixels)
    if aspect == "pad":
        img = expand2square(img, spec.pad_color)

    from clipfeat.fastresize import resize_crop

    rh, rw = spec.resized_size(img.height, img.width)
    if spec.do_center_crop:  # the kept window (x0, y0, nx, ny), placed at (dx, dy) in the crop
        ch, cw = spec.crop_height, spec.crop_width
        y0, ny, dy = _crop_window(rh, ch)  # type: ignore[arg-type]
        x0, nx, dx = _crop_window(rw, cw)  # type: ignore[arg-type]
    else:
        (ch, cw), (y0, ny, dy), (x0, nx, dx) = (rh, rw), (0, rh, 0), (0, rw, 0)

    kept = None
    if (rw, rh) != img.size:  # (an equal size is a copy in PIL: skipped)
        # The C resize computes the kept window only (None: not built, or not reproducible).
        kept = resize_crop(img, (rw, rh), (x0, y0, nx, ny), spec.resample)
        if kept is None:
            img = img.resize((rw, rh), resample=spec.resample)
    if kept is None:
        if (ny, nx) != (rh, rw):  # crop in PIL: only the kept pixels become an array
            img = img.crop((x0, y0, x0 + nx, y0 + ny))
        kept = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
    if (ny, nx) == (ch, cw):
        return kept
    out = np.zeros((3, ch, cw), dtype=np.uint8)  # type: ignore[arg-type]
    out[:, dy:dy + ny, dx:dx + nx] = kept  # a crop larger than the image: zero-padded
    return out


# --------------------------------------------------------------------------------------------
# Normalisation


def normalization_table(spec: PreprocessSpec) -> np.ndarray:
    """(3, 256) float32: the processor's output value for each channel and uint8 input.

    Computed as transformers does: ``(v.astype(float64) * rescale_factor).astype(float32)``,
    then ``(x - mean32) / std32`` in float32.
    """
    import numpy as np

    v = np.arange(256, dtype=np.uint8)
    if spec.do_rescale:
        x = (v.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    else:
        x = v.astype(np.float32)
    x = np.broadcast_to(x, (3, 256))
    if spec.do_normalize:
        mean = np.array(spec.mean, dtype=np.float32)[:, None]
        std = np.array(spec.std, dtype=np.float32)[:, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


class Normalizer:
    """uint8 (..., 3, H, W) torch tensor -> float32 ``pixel_values``, bit-identical to HF PIL.

    On a CPU the values are computed as ``((x / 255) - mean) / std`` in float32 when that
    gives the table's value for all 256 inputs of every channel (checked once per spec; true
    for CLIP's and SigLIP's constants); otherwise, and on other devices, through a per-channel
    256-entry lookup table (a gather, cheap on a GPU, about 4x slower than the arithmetic on
    a CPU). Either way the result equals :func:`normalization_table`. ``out`` (float32, the
    shape of ``x``, same device) is filled instead of allocating a new tensor.
    """

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.table = normalization_table(spec)
        self._device_tables: dict[str, torch.Tensor] = {}
        self._cpu_arith: tuple[torch.Tensor, ...] | None | bool = False  # False: not checked

    def _table(self, device: torch.device) -> torch.Tensor:
        import torch

        key = str(device)
        t = self._device_tables.get(key)
        if t is None:
            t = torch.from_numpy(self.table).to(device)
            self._device_tables[key] = t
        return t

    def to(self, device: str | torch.device) -> Normalizer:
        """Put the table on ``device`` now (it is also moved lazily on first use)."""
        import torch

        self._table(torch.device(device))
        return self

    @staticmethod
    def _apply_arith(x: torch.Tensor, out: torch.Tensor, consts: tuple[torch.Tensor, ...]) -> None:
        """``out = ((x / divisor) - mean) / std`` with (3, 1, 1) float32 tensors (never
        Python scalars, which some kernels turn into a multiplication by the reciprocal)."""
        divisor, mean, std = consts
        out.copy_(x)
        if divisor is not None:
            out.div_(divisor)
        if mean is not None:
            out.sub_(mean).div_(std)

    @property
    def uses_cpu_arithmetic(self) -> bool:
        """Whether CPU batches are computed with the arithmetic (True) or the lookup table
        (False): the arithmetic is used only where it reproduces the table exactly."""
        return self._arith_consts() is not None

    def _arith_consts(self) -> tuple[torch.Tensor, ...] | None:
        """The CPU arithmetic's constants if it reproduces the table exactly, else None."""
        import torch

        if self._cpu_arith is not False:
            return self._cpu_arith  # type: ignore[return-value]
        spec = self.spec

        def per_channel(values: Any) -> torch.Tensor:
            return torch.tensor([float(v) for v in values], dtype=torch.float32).view(3, 1, 1)

        divisor = per_channel([1.0 / spec.rescale_factor] * 3) if spec.do_rescale else None
        mean = per_channel(spec.mean) if spec.do_normalize else None
        std = per_channel(spec.std) if spec.do_normalize else None
        consts = (divisor, mean, std)
        probe = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
        got = torch.empty(probe.shape, dtype=torch.float32)
        self._apply_arith(probe, got, consts)
        exact = torch.equal(got.view(3, 256), torch.from_numpy(self.table))
        self._cpu_arith = consts if exact else None
        return self._cpu_arith

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        if x.dtype != torch.uint8:
            raise TypeError(f"Normalizer expects a uint8 tensor, got {x.dtype}")
        if x.dim() < 3 or x.shape[-3] != 3:
            raise ValueError(f"Normalizer expects (..., 3, H, W), got shape {tuple(x.shape)}")
        if out is None:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        elif out.shape != x.shape or out.dtype != torch.float32 or out.device != x.device:
            raise ValueError(
                f"out must be float32 {tuple(x.shape)} on {x.device}, got {out.dtype} "
                f"{tuple(out.shape)} on {out.device}"
            )
        if x.device.type == "cpu":
            consts = self._arith_consts()
            if consts is not None:
                self._apply_arith(x, out, consts)
                return out
        table = self._table(x.device)
        for c in range(3):
            idx = x[..., c, :, :].reshape(-1).to(torch.int32)
            out[..., c, :, :] = table[c].index_select(0, idx).view(x[..., c, :, :].shape)
        return out
