"""manifest.json and failures.jsonl: the index of finished shards, rewritten atomically."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from clipfeat.errors import ConfigError, StoreError
from clipfeat.store.attrs import FORMAT_VERSION
from clipfeat.store.index import write_index
from clipfeat.store.io import atomic_write_json, atomic_write_lines, read_json
from clipfeat.store.keys import json_line
from clipfeat.store.layout import FAILURES, MANIFEST
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


def write_manifest(
    out_dir: str | os.PathLike,
    *,
    meta: dict,
    plan: dict,
    shards: Iterable[ShardInfo],
    complete: bool,
) -> None:
    """Write manifest.json (atomically) listing ``shards``: cheap enough to call after every
    commit, so that the finished shards of a run stopped at any moment can be read."""
    from clipfeat import __version__

    ordered = _ordered(shards)
    manifest = {
        "format": "clipfeat",
        "format_version": FORMAT_VERSION,
        "clipfeat_version": __version__,
        "complete": bool(complete),
        "config": meta,
        "plan": plan,
        "num_images": sum(s.num_rows for s in ordered),
        "num_failures": sum(s.num_failures for s in ordered),
        "num_shards": len(ordered),
        "shards": [s.to_manifest() for s in ordered],
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(Path(out_dir) / MANIFEST, manifest)


def finalize(
    out_dir: str | os.PathLike,
    *,
    meta: dict,
    plan: dict,
    shards: Iterable[ShardInfo],
    complete: bool,
) -> None:
    """Write failures.jsonl, (when complete) the key index, and manifest.json, each
    atomically: at the end of a run, or when it stops."""
    out = Path(out_dir)
    ordered = _ordered(shards)

    def failure_lines() -> Iterator[str]:
        for info in ordered:
            for rec in _shard_failures(out, info):
                yield json_line(rec)

    atomic_write_lines(out / FAILURES, failure_lines())
    if complete:
        write_index(out, ordered)
    write_manifest(out, meta=meta, plan=plan, shards=ordered, complete=complete)


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """The parsed manifest.json of a store. StoreError if missing or unreadable."""
    path = Path(out_dir) / MANIFEST
    man = read_json(path, "the manifest")
    if not isinstance(man, dict) or man.get("format") != "clipfeat" or not isinstance(
        man.get("shards"), list
    ):
        raise StoreError(f"{path}: not a clipfeat manifest")
    return man
