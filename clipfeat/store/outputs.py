"""The outputs of a shard: what the writer is given for each (`OutputLayout`), where each
lies in a shard, and how manifest.json lists them.

A shard holds one output or several (several layers and towers of one run):

- one output: the dataset ``features`` (n, tokens, hidden), its attributes merged into the
  shard's root attributes: exactly the shards of format 2, whatever clipfeat wrote before;
- several: output NAME (`clipfeat.outputs.output_name`, ``TOWER/LAYER``) is the dataset
  ``features/NAME`` (n, tokens_i, hidden_i) carrying that output's own attributes (model,
  layer, feature, tokens, hidden_size, preprocessing, ..., ``output``: its name); the root
  attributes are the run's (store_dtype, aspect, versions, ...) plus ``outputs``, the JSON
  list of the names in order. Every output has the same rows (the shard's keys) and dtype.

This module reads only what it is handed (an open h5py file, attribute dicts); the names
and dataset paths come from `clipfeat.outputs`, their one owner.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clipfeat.errors import ConfigError
from clipfeat.outputs import FEATURES_DATASET, LayerSel, dataset_path, output_name
from clipfeat.store.attrs import OUTPUTS_ATTR, decode_attr, encode_attr

#: Keys of a manifest ``outputs`` entry that are not attributes of the output.
ENTRY_KEYS = ("name", "dataset")


@dataclass(frozen=True)
class OutputLayout:
    """One output a `ShardWriter` writes: its name, row shape and attributes (JSON-able
    values; ``tokens``/``hidden_size``/``output`` are set from the fields)."""

    name: str
    tokens: int
    hidden: int
    attrs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def manifest_entry(self, num_outputs: int) -> dict[str, Any]:
        """This output's entry in manifest.json's ``outputs`` list (JSON-able)."""
        entry: dict[str, Any] = {"name": self.name,
                                 "dataset": dataset_path(self.name, num_outputs),
                                 "tokens": self.tokens, "hidden_size": self.hidden}
        for k, v in self.attrs.items():
            if k not in entry and k != "output":
                entry[k] = _json_value(v)
        return entry


def _json_value(value: Any) -> Any:
    """An attribute value as JSON (dicts and lists stay structured, as in ``config``)."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (dict, list, str, int, float, bool)) or value is None:
        return value
    return encode_attr(value)  # numpy scalars, paths; ConfigError for anything else


def check_name(name: Any) -> str | None:
    """Why ``name`` cannot be an output name (an HDF5 path below ``features/``), or None."""
    if not isinstance(name, str) or not name:
        return f"output name {name!r} is not a non-empty str"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"output name {name!r} has an empty, '.' or '..' component"
    if any(ord(c) < 32 for c in name):
        return f"output name {name!r} has a control character"
    return None


def check_names(names: Sequence[str]) -> str | None:
    """Why ``names`` cannot be the outputs of one shard (bad, repeated, or one the group
    of another: ``a`` and ``a/b``), or None."""
    for n in names:
        problem = check_name(n)
        if problem:
            return problem
    seen: set[str] = set()
    for n in names:
        if n in seen:
            return f"output {n!r} is given twice"
        seen.add(n)
    for n in names:
        for m in names:
            if m != n and m.startswith(n + "/"):
                return f"output {n!r} would be the HDF5 group of output {m!r}: rename one"
    return None


# --------------------------------------------------------------------------- reading shards


def names_of(root_attrs: Mapping[str, Any]) -> list[str] | None:
    """The output names a shard's root attributes list (``outputs``), or None for a shard
    of one output (no such attribute). ValueError when the attribute is malformed."""
    raw = root_attrs.get(OUTPUTS_ATTR)
    if raw is None:
        return None
    try:
        names = json.loads(decode_attr(raw))
    except (TypeError, ValueError):
        names = None
    if not isinstance(names, list) or len(names) < 2:
        raise ValueError(f"attribute {OUTPUTS_ATTR}={raw!r} is not a JSON list of 2 or more "
                         "output names")
    problem = check_names(names)
    if problem:
        raise ValueError(f"attribute {OUTPUTS_ATTR}: {problem}")
    return names


def dataset_paths(root_attrs: Mapping[str, Any]) -> list[str]:
    """The feature datasets of a shard, in output order (``["features"]`` for one output)."""
    names = names_of(root_attrs)
    if names is None:
        return [FEATURES_DATASET]
    return [dataset_path(n, len(names)) for n in names]


def output_datasets(f: Any) -> list[tuple[str, Any]]:
    """``(dataset path, h5py dataset)`` of every output of an open shard, in order, checked:
    each is present, (n, tokens, hidden) with the same n, and its shape agrees with the
    ``tokens``/``hidden_size`` attributes that describe it. ValueError naming what is wrong."""
    root = {k: decode_attr(v) for k, v in f.attrs.items()}
    several = names_of(root) is not None
    found: list[tuple[str, Any]] = []
    for path in dataset_paths(root):
        obj = f.get(path)
        if obj is None or not hasattr(obj, "shape") or not hasattr(obj, "dtype"):
            raise ValueError(f"dataset {path!r} is missing" if obj is None
                             else f"{path!r} is not a dataset")
        if len(obj.shape) != 3:
            raise ValueError(f"dataset {path!r} has shape {obj.shape}, not (n, tokens, hidden)")
        attrs = {k: decode_attr(v) for k, v in obj.attrs.items()} if several else root
        for label, key, have in (("tokens", "tokens", obj.shape[1]),
                                 ("hidden size", "hidden_size", obj.shape[2])):
            want = attrs.get(key)
            if want is not None and (isinstance(want, bool) or want != int(have)):
                raise ValueError(f"dataset {path!r} has {label} {int(have)} but its attribute "
                                 f"{key} is {want!r}")
        found.append((path, obj))
    if len({ds.dtype for _, ds in found}) > 1:
        kinds = ", ".join(f"{p} {ds.dtype}" for p, ds in found)
        raise ValueError(f"its outputs have different dtypes ({kinds})")
    rows = {int(ds.shape[0]) for _, ds in found}
    if len(rows) > 1:
        counts = ", ".join(f"{p} {int(ds.shape[0])}" for p, ds in found)
        raise ValueError(f"its outputs hold different numbers of rows ({counts})")
    return found


def shard_rows(f: Any) -> int:
    """Rows of an open shard, every output checked (`output_datasets`)."""
    return int(output_datasets(f)[0][1].shape[0])


def output_attrs(f: Any) -> dict[str, dict[str, Any]]:
    """name -> decoded attributes of each output dataset of a several-output shard; {} for
    a shard of one output (its attributes are the root's)."""
    root = {k: decode_attr(v) for k, v in f.attrs.items()}
    names = names_of(root)
    if names is None:
        return {}
    out = {}
    for n in names:
        ds = f[dataset_path(n, len(names))]
        out[n] = {k: decode_attr(v) for k, v in ds.attrs.items()}
    return out


# --------------------------------------------------------------------------- manifest


def config_output(config: Mapping[str, Any]) -> dict[str, Any]:
    """The one output of a store whose manifest lists none (written before outputs were
    listed), from its ``config``: named ``TOWER/LAYER`` from its model and layer (just
    ``features`` when the config records neither)."""
    model, layer = config.get("model"), config.get("layer")
    name = FEATURES_DATASET
    if model and layer is not None:
        try:
            name = output_name(str(model), LayerSel.parse(layer))
        except ConfigError:
            pass
    entry = {"name": name, "dataset": FEATURES_DATASET}
    for k in ("tokens", "hidden_size", "model", "layer", "feature"):
        if config.get(k) is not None:
            entry[k] = config[k]
    return entry


def manifest_outputs(outputs: Sequence[OutputLayout | Mapping[str, Any]] | None,
                     config: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The ``outputs`` list manifest.json records: from `OutputLayout` objects or entries given
    by the pipeline, else the one output of ``config`` when it records tokens and hidden
    size (None otherwise). ConfigError when the given list is not sound."""
    if outputs is None:
        if config.get("tokens") is None or config.get("hidden_size") is None:
            return None
        return [config_output(config)]
    outputs = list(outputs)
    entries = [o.manifest_entry(len(outputs)) if isinstance(o, OutputLayout) else dict(o)
               for o in outputs]
    problem = entries_problem(entries)
    if problem:
        raise ConfigError(f"finalize: outputs: {problem}")
    return entries


def entries_problem(entries: Any) -> str | None:
    """What makes ``entries`` not a manifest ``outputs`` list, or None."""
    if not isinstance(entries, list) or not entries:
        return "outputs is not a non-empty JSON list"
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            return f"output entry {str(e)[:80]} is not an object with a name"
    names = [e["name"] for e in entries]
    problem = check_names(names) if len(names) > 1 else check_name(names[0])
    if problem:
        return problem
    for e in entries:
        want = dataset_path(e["name"], len(entries))
        if e.get("dataset") != want:
            return f"output {e['name']!r} has dataset {e.get('dataset')!r}, not {want!r}"
        for k in ("tokens", "hidden_size"):
            v = e.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                return f"output {e['name']!r} has {k}={v!r}, not a count"
    return None


def entry_attrs(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of an output that its manifest entry records (less name and dataset)."""
    return {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
