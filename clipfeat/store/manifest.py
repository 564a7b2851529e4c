"""manifest.json and failures.jsonl: the index of finished shards, rewritten atomically."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipfeat.errors import ConfigError, StoreError
from clipfeat.store.attrs import format_version
from clipfeat.store.index import write_index
from clipfeat.store.io import atomic_write_json, atomic_write_lines, read_json
from clipfeat.store.keys import json_line
from clipfeat.store.layout import FAILURES, MANIFEST
from clipfeat.store.outputs import OutputLayout, entries_problem, manifest_outputs
from clipfeat.store.shard import ShardInfo, read_shard_info


def _shard_failures(out: Path, info: ShardInfo) -> list[dict]:
    if info.num_failures and not info.failures:
        return read_shard_info(out / info.file).failures
    return info.failures


def _ordered(shards: Iterable[ShardInfo]) -> list[ShardInfo]:
    by_id: dict[int, ShardInfo] = {}
    for info in shards:
        if info.shard_id in by_id:
            raise ConfigError(f"finalize: shard {info.shard_id} listed twice")
        by_id[info.shard_id] = info
    return [by_id[k] for k in sorted(by_id)]


def _write_manifest(out: Path, meta: dict, plan: dict, ordered: list[ShardInfo],
                    complete: bool, outputs: list[dict] | None = None) -> None:
    """manifest.json; ``outputs`` are its `manifest_outputs` entries (None: none listed)."""
    from clipfeat import __version__

    manifest = {
        "format": "clipfeat",
        "format_version": format_version(len(outputs or ())),
        "clipfeat_version": __version__,
        "complete": bool(complete),
        "config": meta,
    }
    if outputs is not None:
        manifest["outputs"] = outputs
    manifest.update({
        "plan": plan,
        "num_images": sum(s.num_rows for s in ordered),
        "num_failures": sum(s.num_failures for s in ordered),
        "num_shards": len(ordered),
        "shards": [s.to_manifest() for s in ordered],
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    atomic_write_json(out / MANIFEST, manifest)


def finalize(
    out_dir: str | os.PathLike,
    *,
    meta: dict,
    plan: dict,
    shards: Iterable[ShardInfo],
    complete: bool,
    outputs: Sequence[OutputLayout | Mapping[str, Any]] | None = None,
) -> None:
    """Write failures.jsonl, (when complete) the key index, and manifest.json, each
    atomically: at the end of a run, or when it stops.

    ``meta`` is manifest.json's ``config`` (the run's settings; for one output, its
    attributes as well). ``outputs`` lists the store's outputs in shard order, as the
    `OutputLayout` objects the shards were written with (or their manifest entries); None for a
    one-output store derives its one entry from ``meta``."""
    out = Path(out_dir)
    ordered = _ordered(shards)
    entries = manifest_outputs(outputs, meta)

    def failure_lines() -> Iterator[str]:
        for info in ordered:
            for rec in _shard_failures(out, info):
                yield json_line(rec)

    atomic_write_lines(out / FAILURES, failure_lines())
    if complete:
        write_index(out, ordered, datasets=[e["dataset"] for e in entries or ()] or None)
    _write_manifest(out, meta, plan, ordered, complete, entries)


MANIFEST_FIX = "rerun the extract command (same settings) to rewrite it, or delete it"


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """The parsed manifest.json of a store, checked: every field clipfeat reads has its type
    and every shard entry is well-formed (`ShardInfo.from_manifest`), each shard listed
    once. StoreError (one line: the file, what is wrong, the fix) otherwise."""
    path = Path(out_dir) / MANIFEST
    try:
        man = read_json(path, "the manifest")
    except StoreError as err:
        raise StoreError(f"{err}; {MANIFEST_FIX}") from None
    problem = _manifest_problem(man)
    if problem is not None:
        raise StoreError(f"{path}: damaged manifest ({problem}); {MANIFEST_FIX}")
    return man


def _manifest_problem(man: Any) -> str | None:
    """What makes ``man`` not a clipfeat manifest, or None."""
    if not isinstance(man, dict):
        return f"a JSON {type(man).__name__}, not an object"
    if man.get("format") != "clipfeat":
        return "format is not 'clipfeat'"
    kinds = (("shards", list, True), ("config", dict, False), ("plan", dict, False),
             ("complete", bool, False))
    for name, kind, required in kinds:
        if (required or man.get(name) is not None) and not isinstance(man.get(name), kind):
            return f"{name} is {_kind(man.get(name))}, not a JSON {kind.__name__}"
    if "outputs" in man:
        problem = entries_problem(man["outputs"])
        if problem:
            return problem
    for name in ("num_images", "num_failures", "num_shards"):
        value = man.get(name)
        if name in man and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{name}={value!r} is not a count"
    seen: set[int] = set()
    for entry in man["shards"]:
        try:
            info = ShardInfo.from_manifest(entry)
        except ValueError as err:
            return str(err)
        if info.shard_id in seen:
            return f"shard {info.file} listed twice"
        seen.add(info.shard_id)
    return None


def _kind(value: Any) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"
