"""Run settings as a frozen dataclass, validated at the edge with clear messages."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipfeat.errors import ConfigError

DEFAULT_MODEL = "openai/clip-vit-large-patch14-336"
#: ``patch``: every patch token (CLS dropped where the tower has one); ``cls_patch``: all tokens.
FEATURES = ("patch", "cls_patch")
#: ``square``: resize + crop as LLaVA pretraining; ``pad``: ``expand2square`` first (LLaVA-1.5).
ASPECTS = ("square", "pad")
DTYPES = ("auto", "float16", "bfloat16", "float32")
STORE_DTYPES = ("float16", "float32")  # clipfeat.store.attrs maps each to its bytes on disk
#: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (1 GiB of 24-bit pixels / 4 / 3).
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def default_workers() -> int:
    """Decode processes to start when the user does not say: one per core, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `clipfeat.extract` needs. Build it with keyword arguments; see `validate()`."""

    roots: tuple[str, ...] = ()
    out: str = ""
    model: str = DEFAULT_MODEL
    revision: str | None = None
    layer: int = -2
    feature: str = "patch"
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
    exif_transpose: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode_timeout: float = 60.0
    strict: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    no_lock: bool = False  # run without OUT's lock (file systems that cannot lock)
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
        for name, value, choices in (
            ("--feature", self.feature, FEATURES),
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
        """Check the sizes, counts and limits."""
        for name, value, low in (
            ("--batch-size", self.batch_size, 1),
            ("--shard-size", self.shard_size, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} {value!r} is invalid: it must be an integer >= {low}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers {self.workers} is invalid: use 0 (in-process) or more")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit {self.limit} is invalid: it must be >= 1")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(f"--max-pixels {self.max_pixels} is invalid: it must be >= 1")
        if not self.decode_timeout > 0:
            raise ConfigError(f"--decode-timeout {self.decode_timeout} is invalid: it must be > 0")

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
            raise ConfigError("no input given: pass one or more image folders (ROOT...)")
        if self.files_from and len(self.roots) > 1:
            raise ConfigError("--files-from takes at most one ROOT (paths are relative to it)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def out_path(self) -> Path:
        return Path(self.out)
