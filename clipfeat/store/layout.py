"""Every name clipfeat writes in OUT: shards, partials, manifest, failures, bookkeeping."""

from __future__ import annotations

import os
import re
from pathlib import Path

from clipfeat.store.io import unlink_quietly

SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".h5"
PARTIAL_SUFFIX = ".partial"


MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
META_DIR = ".clipfeat"
PLAN_FILE = "plan.jsonl"
INDEX_FILE = "index.json"
LOCK_FILE = "lock"  # in META_DIR: who is writing OUT (store.lock)
INDEX_FORMAT = "clipfeat-index"


_SHARD_RE = re.compile(r"^shard-(\d{6,})\.h5$")


def shard_name(shard_id: int) -> str:
    """File name of finished shard ``shard_id``: ``shard-000003.h5``."""
    return f"{SHARD_PREFIX}{int(shard_id):06d}{SHARD_SUFFIX}"


def parse_shard_id(name: str | os.PathLike) -> int | None:
    """Shard id of a finished shard's file name (or path), else None (partials, others)."""
    m = _SHARD_RE.match(os.path.basename(os.fspath(name)))
    return int(m.group(1)) if m else None


def remove_partials(out_dir: str | os.PathLike) -> int:
    """Remove unfinished shards (``*.h5.partial``) and stale temp files; return how many
    partial shards were removed."""
    out = Path(out_dir)
    if not out.is_dir():
        return 0
    removed = 0
    for entry in os.scandir(out):
        name = entry.name
        if name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX + PARTIAL_SUFFIX):
            unlink_quietly(entry.path)
            removed += 1
        elif name.startswith(".") and ".tmp-" in name and entry.is_file():
            unlink_quietly(entry.path)
    return removed


def list_shard_files(out_dir: str | os.PathLike) -> dict[int, Path]:
    """Finished shard files in ``out_dir`` by id (no file is opened)."""
    out = Path(out_dir)
    found: dict[int, Path] = {}
    if not out.is_dir():
        return found
    for entry in os.scandir(out):
        sid = parse_shard_id(entry.name)
        if sid is not None:
            found[sid] = Path(entry.path)
    return dict(sorted(found.items()))


def is_store(out_dir: str | os.PathLike) -> bool:
    """True if ``out_dir`` is a clipfeat output folder: it has a manifest, a plan (a run
    stopped before its first shard) or finished shards. The one test of "is this a store"."""
    out = Path(out_dir)
    if not out.is_dir():
        return False
    return ((out / MANIFEST).is_file() or (out / META_DIR / PLAN_FILE).is_file()
            or bool(list_shard_files(out)))
