"""One frozen record of a run's settings; shard attributes and the store identity both come
from it, so the two cannot drift."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

#: The settings a store is made with: a rerun into an OUT made with other values is refused.
IDENTITY_FIELDS = (
    "model", "model_revision", "model_weights", "layer", "feature", "aspect", "compute_dtype",
    "store_dtype", "exif_transpose", "preprocessing", "sources",
)
#: Identity fields that stores made by earlier clipfeat versions lack: accepted (and then
#: recorded) when absent, compared from then on.
ADDED_IDENTITY_FIELDS = ("model_weights",)


def _abs(p: str | None) -> str | None:
    return os.path.abspath(p) if p else None


def source_record(cfg: Any, exts: tuple[str, ...]) -> dict[str, Any]:
    """Where the inputs come from, as the plan and the store identity record it."""
    record = {
        "roots": [_abs(r) for r in cfg.roots],
        "files_from": _abs(cfg.files_from),
        "llava_json": _abs(cfg.llava_json),
        "image_folder": _abs(cfg.image_folder),
        "exts": list(exts) if not (cfg.llava_json or cfg.files_from) else None,
    }
    if not cfg.follow_outside:  # absent by default: stores made before the flag still match
        record["follow_outside"] = False
    for name in ("image_column", "key_column"):  # parquet; absent unless given, likewise
        if getattr(cfg, name, None) is not None:
            record[name] = getattr(cfg, name)
    return record


@dataclass(frozen=True)
class RunSettings:
    """What decides the numbers a run writes, and how its rows are shaped."""

    model: str
    model_revision: str
    model_weights_revision: str
    model_type: str
    family: str
    layer: int
    layer_index: int
    num_layers: int
    feature: str
    aspect: str
    image_size: int
    patch_size: int
    hidden_size: int
    tokens: int
    has_cls_token: bool
    store_dtype: str
    exif_transpose: bool
    preprocessing: dict[str, Any] = field(hash=False)
    sources: dict[str, Any] = field(hash=False)
    model_weights: str = ""  # xxh3_128 of the weight files (clipfeat.provenance)
    versions: dict[str, Any] = field(default_factory=dict, hash=False)  # packages that compute
    compute_dtype: str | None = None  # known once torch has chosen the device
    device: str | None = None  # the same

    @classmethod
    def of(cls, cfg: Any, ref: Any, spec: Any, sources: dict[str, Any]) -> RunSettings:
        """The settings of ``cfg`` for the resolved model ``ref`` and its preprocessing."""
        from clipfeat import provenance
        from clipfeat.tower import resolve_layer, tokens_per_image

        return cls(
            model=cfg.model,
            model_revision=ref.revision or "",
            model_weights_revision=getattr(ref, "weights_revision", None) or "",
            model_type=ref.model_type,
            family=ref.family,
            layer=cfg.layer,
            layer_index=resolve_layer(cfg.layer, ref.num_hidden_layers),
            num_layers=ref.num_hidden_layers,
            feature=cfg.feature,
            aspect=cfg.aspect,
            image_size=int(ref.image_size),
            patch_size=int(ref.patch_size),
            hidden_size=int(ref.hidden_size),
            tokens=int(tokens_per_image(ref, cfg.feature)),
            has_cls_token=bool(ref.has_cls_token),
            store_dtype=cfg.store_dtype,
            exif_transpose=cfg.exif_transpose,
            preprocessing=spec.to_dict(),
            sources=sources,
            model_weights=provenance.weights_digest(ref.weights_file),
            versions=provenance.versions(),
        )

    def on_device(self, device: str, dtype: str) -> RunSettings:
        """These settings on ``device`` (with its name) computing in ``dtype``."""
        from clipfeat import provenance

        return dataclasses.replace(self, compute_dtype=dtype,
                                   device=provenance.device_name(device))

    def shard_attrs(self) -> dict[str, Any]:
        """The attributes every shard of the run carries (and manifest.json's ``config``)."""
        from clipfeat import __version__

        attrs: dict[str, Any] = {"clipfeat_version": __version__}
        for f in dataclasses.fields(self):
            if f.name != "sources":
                attrs[f.name] = getattr(self, f.name)
        return attrs

    def identity(self) -> dict[str, Any]:
        """The settings an existing OUT must have been made with to be resumed."""
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}

    def identity_against(self, old: dict[str, Any]) -> dict[str, Any]:
        """`identity`, less the `ADDED_IDENTITY_FIELDS` that ``old`` (an existing OUT's)
        does not record: comparable with it."""
        return {k: v for k, v in self.identity().items()
                if k not in ADDED_IDENTITY_FIELDS or old.get(k) is not None}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dicts only; other values as they are)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, name) if isinstance(v, dict) and v else {name: v})
    return out


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``field: old -> new`` for each setting that differs, nested settings (preprocessing,
    sources) by their own fields, each value cut to a few dozen characters."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {_short(a.get(k))} in OUT -> {_short(b.get(k))} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
