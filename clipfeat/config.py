"""Run settings as a frozen dataclass, validated at the edge with clear messages."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipfeat.errors import ConfigError
from clipfeat.units import human_bytes

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-large-patch14-336"
#: ``patch``: every patch token (CLS dropped where the tower has one); ``cls_patch``: all tokens.
FEATURES = ("patch", "cls_patch")
#: ``square``: resize + crop as LLaVA pretraining; ``pad``: ``expand2square`` first (LLaVA-1.5).
ASPECTS = ("square", "pad")
DTYPES = ("auto", "float16", "bfloat16", "float32")
STORE_DTYPES = ("float16", "float32")  # clipfeat.store.attrs maps each to its bytes on disk
#: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (1 GiB of 24-bit pixels / 4 / 3).
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
#: Rows `clipfeat verify --model` re-extracts when no --sample is given.
DEFAULT_VERIFY_SAMPLE = 8

#: Upper bounds of flags whose larger values can only be mistakes.
MAX_SHARD_SIZE = 1_000_000
MAX_MAX_PIXELS = 10_000_000_000  # 10 gigapixels: 30 GB of RGB
MAX_DECODE_TIMEOUT = 86400.0  # one day
#: The share of physical RAM a batch's pixels and features may take (`check_batch_memory`).
MEMORY_SHARE = 0.5


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, n)


def default_workers() -> int:
    """Decode processes to start when the user does not say: one per core, at most 16."""
    return min(16, available_cpus())


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    """ConfigError unless ``value`` is an integer in [low, high] (no upper bound if None)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} {value!r} is invalid: it must be an integer >= {low}")
    if high is not None and value > high:
        raise ConfigError(f"{name} {value:,} is too large: it must be between {low} and "
                          f"{high:,}")


def physical_memory() -> int | None:
    """This machine's physical RAM in bytes, or None if the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def check_batch_memory(batch_size: int, *, image_bytes: int, feature_bytes: int,
                       what: str) -> None:
    """ConfigError if ``batch_size`` images cannot be held in `MEMORY_SHARE` of the RAM.

    A run holds about three batches of uint8 pixels in shared memory (the decode slots: the
    feeder's queue of two batches and the batch being gathered) and two batches of float32
    features (one on the device, one going to the writer); ``image_bytes`` is 3*H*W and
    ``feature_bytes`` tokens*hidden*4 of one image; ``what`` names the model's sizes.
    """
    ram = physical_memory()
    if not ram:
        return
    per_image = 3 * image_bytes + 2 * feature_bytes
    budget = int(ram * MEMORY_SHARE)
    largest = max(1, budget // per_image)
    if batch_size > largest:
        raise ConfigError(
            f"--batch-size {batch_size:,} is too large for this machine: {what} it needs about "
            f"{human_bytes(batch_size * per_image)} of pixels and features, more than half of "
            f"the {human_bytes(ram)} of RAM; use at most --batch-size {largest:,}"
        )


def _check_timeout(value: Any) -> None:
    """--decode-timeout: a finite number of seconds in (0, MAX_DECODE_TIMEOUT]."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and 0 < value <= MAX_DECODE_TIMEOUT)
    if not ok:
        raise ConfigError(f"--decode-timeout {value!r} is invalid: it must be a number of "
                          f"seconds > 0 and at most {MAX_DECODE_TIMEOUT:g} (one day)")


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `clipfeat.extract` needs. Build it with keyword arguments; see `validate()`."""

    roots: tuple[str, ...] = ()
    out: str = ""
    #: One tower: a name, an int layer, a feature. Several towers or layers: sequences, and
    #: ``"MODEL=VALUE"`` entries for what one tower does differently (`clipfeat.outputs`).
    model: str | tuple[str, ...] = DEFAULT_MODEL
    revision: str | tuple[str, ...] | None = None
    layer: int | str | tuple[int | str, ...] = -2
    feature: str | tuple[str, ...] = "patch"
    aspect: str = "square"
    device: str = "auto"
    dtype: str = "auto"
    store_dtype: str = "float16"
    batch_size: int = 64
    workers: int | None = None
    shard_size: int = 1000
    files_from: str | None = None
    llava_json: str | None = None
    image_folder: str | None = None
    limit: int | None = None
    exts: tuple[str, ...] | None = None
    image_column: str | None = None  # parquet: the column of encoded images (None: found)
    key_column: str | None = None  # parquet: the column of keys (None: FILE_STEM/ROW)
    exif_transpose: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode_timeout: float = 60.0
    strict: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    no_lock: bool = False  # run without OUT's lock (file systems that cannot lock)
    follow_outside: bool = True  # follow symlinks out of ROOT / --image-folder
    retry_failed: bool = False  # redo finished chunks whose failures were timeouts/crashes
    torch_threads: int | None = None
    #: Developer knobs for tests and benchmarks: ``decode_fn`` ("module:function", a decoder
    #: with `clipfeat.decode.decode_file`'s signature), ``queue_bytes`` (the budget of
    #: decoded images waiting for the device, `clipfeat.pipeline.feed.QUEUE_BYTES`).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.roots, (str, os.PathLike)):
            object.__setattr__(self, "roots", (str(self.roots),))
        else:
            object.__setattr__(self, "roots", tuple(str(r) for r in self.roots))
        object.__setattr__(self, "out", str(self.out) if self.out else "")
        for name in ("model", "revision", "layer", "feature"):  # lists from callers: tuples
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def towers(self) -> tuple[Any, ...]:
        """The towers of this run with their layers and feature (`clipfeat.outputs`);
        ConfigError for a bad ``--model/--layer/--feature/--revision`` value."""
        from clipfeat.outputs import tower_requests

        return tower_requests(self.model, layers=self.layer, features=self.feature,
                              revisions=self.revision)

    @property
    def model_names(self) -> str:
        """The --model value(s), for messages."""
        return self.model if isinstance(self.model, str) else ", ".join(self.model)

    @property
    def num_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers

    def validate(self) -> "ExtractConfig":
        """Raise ConfigError naming the first bad value and the fix; return self."""
        self._validate_choices()
        self._validate_numbers()
        self._validate_inputs()
        return self

    def _validate_choices(self) -> None:
        """Check the output folder, the roots and the named choices (feature ... device)."""
        if not self.out:
            raise ConfigError("no output folder given: pass --out DIR")
        if any(not r for r in self.roots):
            raise ConfigError("an empty ROOT ('') was given: pass an existing image folder")
        self.towers()  # --model, --layer, --feature, --revision
        for name, value, choices in (
            ("--aspect", self.aspect, ASPECTS),
            ("--dtype", self.dtype, DTYPES),
            ("--store-dtype", self.store_dtype, STORE_DTYPES),
        ):
            if value not in choices:
                raise ConfigError(f"{name} {value!r} is not one of {', '.join(choices)}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"--device {dev!r} is not valid: use auto, cpu, cuda or cuda:N")

    def _validate_numbers(self) -> None:
        """Check the sizes, counts and limits (types and ranges)."""
        _check_int("--batch-size", self.batch_size, 1, None)
        _check_int("--shard-size", self.shard_size, 1, MAX_SHARD_SIZE)
        for name, value, low, high in (
            ("--workers", self.workers, 0, None),
            ("--limit", self.limit, 1, None),
            ("--max-pixels", self.max_pixels, 1, MAX_MAX_PIXELS),
        ):
            if value is not None:
                _check_int(name, value, low, high)
        _check_timeout(self.decode_timeout)

    def capped_workers(self, images: int | None) -> int:
        """The decode processes to start: `num_workers`, at most one per available CPU and
        one per image to decode (``images``, None if unknown); a notice says when capped."""
        n = self.num_workers
        if n == 0:
            return 0
        limits = [(available_cpus(), "CPUs available")]
        if images is not None:
            limits.append((max(1, images), "images to decode"))
        for cap, what in limits:
            if n > cap:
                # A notice for a count the user asked for; the default is capped quietly.
                level = logging.INFO if self.workers is None else logging.WARNING
                logger.log(level, "--workers %d capped at %d (the %s)", n, cap, what)
                n = cap
        return n

    def _validate_inputs(self) -> None:
        """Check that the input options (ROOTs, --files-from, --llava-json) fit together."""
        if self.llava_json and self.files_from:
            raise ConfigError("--llava-json and --files-from cannot be used together: pick one")
        if self.llava_json:
            if self.roots:
                raise ConfigError(
                    "--llava-json takes its images from --image-folder: drop the ROOT arguments"
                )
            if not self.image_folder:
                raise ConfigError("--llava-json needs --image-folder DIR (where its images live)")
        elif self.image_folder:
            raise ConfigError("--image-folder is only used with --llava-json")
        elif not self.roots and not self.files_from:
            raise ConfigError("no input given: pass one or more image folders, .tar or "
                              ".parquet files (ROOT...)")
        if self.files_from and len(self.roots) > 1:
            raise ConfigError("--files-from takes at most one ROOT (paths are relative to it)")
        for flag, value in (("--image-column", self.image_column),
                            ("--key-column", self.key_column)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{flag} {value!r} is not a column name: pass the name of "
                                  "a column of the parquet files")
            if value is not None and (self.llava_json or self.files_from):
                raise ConfigError(f"{flag} is for parquet ROOTs, not --llava-json or "
                                  "--files-from: drop it")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def out_path(self) -> Path:
        return Path(self.out)
