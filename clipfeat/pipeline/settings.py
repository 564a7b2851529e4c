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


#: Per output in a several-output store's identity (the run-level fields stay top-level).
OUTPUT_IDENTITY_FIELDS = ("model", "model_revision", "model_weights", "layer", "feature",
                          "preprocessing")
#: The run-level identity fields of a several-output store.
RUN_IDENTITY_FIELDS = ("aspect", "compute_dtype", "store_dtype", "exif_transpose", "sources")


@dataclass(frozen=True)
class TowerSetup:
    """One tower of a run as `prepare` resolved it: the request, its model and its spec."""

    request: Any  # clipfeat.outputs.TowerRequest
    ref: Any  # clipfeat.modelref.ModelRef
    spec: Any  # clipfeat.preprocess.PreprocessSpec


@dataclass(frozen=True)
class OutputSettings:
    """What decides the numbers of one output (one layer selection of one tower)."""

    name: str
    model: str
    model_revision: str
    model_weights_revision: str
    model_type: str
    family: str
    layer: int | str  # as given: -2, or "mean(0:12)"
    layer_indices: tuple[int, ...]  # the hidden states it reads (one for a plain layer)
    num_layers: int
    feature: str
    image_size: int
    patch_size: int
    hidden_size: int
    tokens: int
    has_cls_token: bool
    num_registers: int
    preprocessing: dict[str, Any] = field(hash=False)
    model_weights: str = ""  # xxh3_128 of the weight files (clipfeat.provenance)

    @classmethod
    def of(cls, tower: TowerSetup, sel: Any, weights: str) -> OutputSettings:
        from clipfeat.outputs import output_name
        from clipfeat.tower import tokens_per_image

        ref, req = tower.ref, tower.request
        return cls(
            name=output_name(req.model, sel),
            model=req.model,
            model_revision=ref.revision or "",
            model_weights_revision=getattr(ref, "weights_revision", None) or "",
            model_type=ref.model_type,
            family=ref.family,
            layer=sel.attr_value(),
            layer_indices=sel.indices(ref.num_hidden_layers),
            num_layers=ref.num_hidden_layers,
            feature=req.feature,
            image_size=int(ref.image_size),
            patch_size=int(ref.patch_size),
            hidden_size=int(ref.hidden_size),
            tokens=int(tokens_per_image(ref, req.feature)),
            has_cls_token=bool(ref.has_cls_token),
            num_registers=int(getattr(ref, "num_registers", 0) or 0),
            preprocessing=tower.spec.to_dict(),
            model_weights=weights,
        )

    def attrs(self) -> dict[str, Any]:
        """The attributes of this output's dataset in a several-output shard."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        d["layer_indices"] = list(self.layer_indices)
        return d  # ShardWriter adds ``output`` (the name)

    def manifest_entry(self, num_outputs: int) -> dict[str, Any]:
        """This output in manifest.json's ``outputs`` list."""
        from clipfeat.outputs import dataset_path

        entry = {"name": self.name, "dataset": dataset_path(self.name, num_outputs)}
        entry.update(self.attrs())
        return entry


@dataclass(frozen=True)
class RunSettings:
    """What decides the numbers a run writes, and how its rows are shaped: the run-level
    settings and one `OutputSettings` per output."""

    outputs: tuple[OutputSettings, ...]
    aspect: str
    store_dtype: str
    exif_transpose: bool
    sources: dict[str, Any] = field(hash=False)
    versions: dict[str, Any] = field(default_factory=dict, hash=False)  # packages that compute
    compute_dtype: str | None = None  # known once torch has chosen the device
    device: str | None = None  # the same

    @classmethod
    def of(cls, cfg: Any, towers: Any, sources: dict[str, Any]) -> RunSettings:
        """The settings of ``cfg`` for its resolved towers (`TowerSetup`s)."""
        from clipfeat import provenance

        outputs = []
        for t in towers:
            weights = provenance.weights_digest(t.ref.weights_file)
            outputs.extend(OutputSettings.of(t, sel, weights) for sel in t.request.layers)
        return cls(
            outputs=tuple(outputs),
            aspect=cfg.aspect,
            store_dtype=cfg.store_dtype,
            exif_transpose=cfg.exif_transpose,
            sources=sources,
            versions=provenance.versions(),
        )

    @property
    def single(self) -> OutputSettings | None:
        """The one output of a one-output run (stored as today's ``features``), else None."""
        return self.outputs[0] if len(self.outputs) == 1 else None

    def on_device(self, device: str, dtype: str) -> RunSettings:
        """These settings on ``device`` (with its name) computing in ``dtype``."""
        from clipfeat import provenance

        return dataclasses.replace(self, compute_dtype=dtype,
                                   device=provenance.device_name(device))

    def shard_attrs(self) -> dict[str, Any]:
        """The root attributes of every shard of the run (and manifest.json's ``config``).
        One output: exactly the attributes of a one-tower store (in that order); several:
        the run-level settings and ``outputs``, each output's own on its dataset."""
        from clipfeat import __version__

        attrs: dict[str, Any] = {"clipfeat_version": __version__}
        one = self.single
        if one is None:
            attrs.update(aspect=self.aspect, store_dtype=self.store_dtype,
                         exif_transpose=self.exif_transpose, versions=self.versions,
                         compute_dtype=self.compute_dtype, device=self.device)
            return attrs  # ShardWriter adds ``outputs`` (the names), each output's on its dataset
        o = one
        attrs.update(
            model=o.model, model_revision=o.model_revision,
            model_weights_revision=o.model_weights_revision, model_type=o.model_type,
            family=o.family, layer=o.layer, layer_index=o.layer_indices[0],
            num_layers=o.num_layers, feature=o.feature, aspect=self.aspect,
            image_size=o.image_size, patch_size=o.patch_size, hidden_size=o.hidden_size,
            tokens=o.tokens, has_cls_token=o.has_cls_token, store_dtype=self.store_dtype,
            exif_transpose=self.exif_transpose, preprocessing=o.preprocessing,
            model_weights=o.model_weights, versions=self.versions,
            compute_dtype=self.compute_dtype, device=self.device,
        )
        if isinstance(o.layer, str):  # a mean: the hidden states it averages
            del attrs["layer_index"]
            attrs["layer_indices"] = list(o.layer_indices)
        if o.num_registers:
            attrs["num_registers"] = o.num_registers
        return attrs

    def output_layouts(self) -> list[Any] | None:
        """What `ShardWriter` makes of several outputs (None for one: today's ``features``)."""
        if self.single is not None:
            return None
        from clipfeat.store import OutputLayout

        return [OutputLayout(o.name, o.tokens, o.hidden_size, o.attrs()) for o in self.outputs]

    def manifest_outputs(self) -> list[dict[str, Any]]:
        """manifest.json's ``outputs``: one entry per output, in order."""
        return [o.manifest_entry(len(self.outputs)) for o in self.outputs]

    def identity(self) -> dict[str, Any]:
        """The settings an existing OUT must have been made with to be resumed (one output:
        the flat record of a one-tower store; several: ``outputs`` by name)."""
        one = self.single
        if one is not None:
            run = {name: getattr(self, name) for name in RUN_IDENTITY_FIELDS}
            mine = {name: getattr(one, name) for name in OUTPUT_IDENTITY_FIELDS}
            return {name: {**run, **mine}[name] for name in IDENTITY_FIELDS}
        ident: dict[str, Any] = {
            "outputs": {o.name: {k: getattr(o, k) for k in OUTPUT_IDENTITY_FIELDS}
                        for o in self.outputs}}
        ident.update({name: getattr(self, name) for name in RUN_IDENTITY_FIELDS})
        return ident

    def identity_against(self, old: dict[str, Any]) -> dict[str, Any]:
        """`identity`, less the `ADDED_IDENTITY_FIELDS` that ``old`` (an existing OUT's)
        does not record: comparable with it."""
        return {k: v for k, v in self.identity().items()
                if k not in ADDED_IDENTITY_FIELDS or old.get(k) is not None}


def identity_from_attrs(attrs: dict[str, Any], output_attrs: dict[str, dict[str, Any]]
                        ) -> dict[str, Any]:
    """The identity (less ``sources``) a finished shard's attributes record: the root's for
    a one-output shard, each output's own (by name) for a several-output one."""
    import json

    def pick(src: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        d = {k: src.get(k) for k in names if k != "sources"}
        if isinstance(d.get("preprocessing"), str):
            d["preprocessing"] = json.loads(d["preprocessing"])
        return d

    if not output_attrs:
        return pick(attrs, IDENTITY_FIELDS)
    ident: dict[str, Any] = {"outputs": {name: pick(a, OUTPUT_IDENTITY_FIELDS)
                                         for name, a in output_attrs.items()}}
    ident.update(pick(attrs, RUN_IDENTITY_FIELDS))
    return ident


def identity_outputs(ident: dict[str, Any]) -> list[str]:
    """The output names an identity record describes (a one-tower record: its one)."""
    from clipfeat.outputs import LayerSel, output_name

    if isinstance(ident.get("outputs"), dict):
        return list(ident["outputs"])
    if ident.get("model") is None:
        return []
    try:
        return [output_name(str(ident["model"]), LayerSel.parse(ident.get("layer")))]
    except Exception:  # noqa: BLE001 - a damaged record: compared field by field anyway
        return []


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
    sources, outputs) by their own fields, each value cut to a few dozen characters. When
    the outputs themselves differ (one added or dropped), that comes first, and a one-output
    record is not compared field by field with a several-output one."""
    lines = []
    was, now = identity_outputs(old), identity_outputs(new)
    if was != now:
        lines.append(f"outputs: {_short(was, 120)} in OUT -> {_short(now, 120)} now")
        if ("outputs" in old) != ("outputs" in new):
            old = {k: v for k, v in old.items() if k in RUN_IDENTITY_FIELDS}
            new = {k: v for k, v in new.items() if k in RUN_IDENTITY_FIELDS}
        else:
            old, new = dict(old), dict(new)
            for d in (old, new):
                if isinstance(d.get("outputs"), dict):
                    d["outputs"] = {k: v for k, v in d["outputs"].items()
                                    if k in was and k in now}
    a, b = _flat(old), _flat(new)
    return lines + [f"{k}: {_short(a.get(k))} in OUT -> {_short(b.get(k))} now"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
