"""Feature stores for tests: read one back with plain h5py, or build a small finished one.

Reading goes straight to the HDF5 files (``keys``, ``features``, ``failures`` datasets) and
failures.jsonl, independently of ``clipfeat.store.FeatureStore``. Building goes through the
public writer API: ``ShardWriter(out, shard_id, tokens=, hidden=, store_dtype=, attrs=,
expected_rows=)`` with ``append`` / ``add_failures`` / ``commit``, then ``finalize``.

    rows = read_rows(out)               # {key: row}, in shard then row order
    fails = read_failures(out)          # failures.jsonl records, in file order
    infos = build_store(out, [Shard(keys, feats, failures), ...], meta=meta, plan={})

Import it from tests as ``import stores`` (like ``imagegen``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Shard", "build_store", "read_failures", "read_rows", "read_shards", "shard_files",
           "write_shard"]


def shard_files(out: Path) -> list[str]:
    """The finished shard files in ``out`` (``shard-*.h5``), sorted by name (= shard id)."""
    return sorted(p.name for p in Path(out).glob("shard-*.h5"))


def read_shards(out: Path) -> dict[str, tuple[list[str], Any, list[dict]]]:
    """shard file -> (keys in row order, features array, failure records), with h5py."""
    import h5py

    shards = {}
    for name in shard_files(out):
        with h5py.File(Path(out) / name, "r") as f:
            keys = list(f["keys"].asstr()[()])
            feats = f["features"][()]
            fails = [json.loads(x) for x in f["failures"].asstr()[()]]
        shards[name] = (keys, feats, fails)
    return shards


def read_rows(out: Path) -> dict[str, Any]:
    """key -> stored row of every shard in ``out`` (shard order, then row order), read with
    h5py; fails if any key is stored twice."""
    import h5py

    rows: dict[str, Any] = {}
    for name in shard_files(out):
        with h5py.File(Path(out) / name, "r") as f:
            keys = list(f["keys"].asstr()[()])
            feats = f["features"][()]
        for k, v in zip(keys, feats, strict=True):
            assert k not in rows, f"key {k!r} stored twice"
            rows[k] = v
    return rows


def read_failures(out: Path) -> list[dict]:
    """The records of ``out/failures.jsonl``, in file order (every line must be JSON)."""
    text = (Path(out) / "failures.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


@dataclass
class Shard:
    """One shard to write: ``features`` is (rows, tokens, hidden), numpy or torch (an empty
    shard still needs the shape (0, tokens, hidden)). ``attrs`` defaults to the store's;
    ``expected_rows`` is passed to ``ShardWriter``."""

    keys: Sequence[str]
    features: Any
    failures: Sequence[dict] = field(default_factory=list)
    attrs: dict | None = None
    expected_rows: int | None = None


def write_shard(out: Path, shard_id: int, shard: Shard, *, store_dtype: str = "float16",
                attrs: dict | None = None, batch: int | None = None) -> Any:
    """Write and commit one shard; returns its ``ShardInfo``. The rows go in one ``append``
    or, with ``batch``, in appends of ``batch`` rows (none for an empty shard)."""
    from clipfeat.store import ShardWriter

    tokens, hidden = (int(n) for n in shard.features.shape[1:])
    shard_attrs = shard.attrs if shard.attrs is not None else (attrs or {})
    keys = list(shard.keys)
    with ShardWriter(out, shard_id, tokens=tokens, hidden=hidden, store_dtype=store_dtype,
                     attrs=shard_attrs, expected_rows=shard.expected_rows) as w:
        if batch is None:
            w.append(keys, shard.features)
        else:
            for start in range(0, len(keys), batch):
                w.append(keys[start:start + batch], shard.features[start:start + batch])
        if shard.failures:
            w.add_failures(list(shard.failures))
        return w.commit()


def build_store(out: Path, shards: Sequence[Shard], *, meta: dict, plan: dict | None = None,
                store_dtype: str = "float16", attrs: dict | None = None,
                batch: int | None = None, complete: bool = True) -> list[Any]:
    """A finished store: ``shards[i]`` written as shard ``i`` (:func:`write_shard`; shard
    attrs default to ``attrs``, else ``meta``), then ``finalize(out, meta=meta, plan=plan,
    shards=..., complete=complete)``. Returns the ``ShardInfo`` list."""
    from clipfeat.store import finalize

    attrs = dict(meta) if attrs is None else attrs
    infos = [write_shard(out, sid, shard, store_dtype=store_dtype, attrs=attrs, batch=batch)
             for sid, shard in enumerate(shards)]
    finalize(out, meta=meta, plan=plan if plan is not None else {}, shards=infos,
             complete=complete)
    return infos
