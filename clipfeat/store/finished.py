"""Which finished shards a rerun may trust, and what a shard says about its chunk.

A finished shard is kept on resume only if it still is what its run committed: its keys and
failure records match the checksums in its attributes, every output dataset is there with
one row per key and its id agrees, keys plus
failures are exactly the plan's items of its chunk, and its size and user-block checksum
are those manifest.json lists (where it lists the shard). The feature bytes are not re-hashed
here (that reads the whole store; ``clipfeat verify`` does it). A shard that fails is
deleted (it is derived data; one warning line names it) and its chunk is redone.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipfeat.errors import StoreError
from clipfeat.store.attrs import decode_attr
from clipfeat.store.checksum import shard_checksum
from clipfeat.store.h5file import open_shard
from clipfeat.store.io import unlink_quietly
from clipfeat.store.keys import key_bytes, key_str, seq_sha256
from clipfeat.store.layout import list_shard_files
from clipfeat.store.manifest import read_manifest
from clipfeat.store.outputs import output_attrs, shard_rows
from clipfeat.store.shard import ShardInfo

log = logging.getLogger(__name__)


@dataclass
class ShardContent:
    """What one finished shard holds besides its features: keys in row order, failure
    records, attributes (the root's; for a several-output shard ``output_attrs`` holds each
    output's own, by name); ``problem`` says why it cannot be trusted (None when it can)."""

    shard_id: int
    path: Path
    keys: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    output_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: ShardInfo | None = None
    problem: str | None = None


def _raw(values) -> list[bytes]:
    return [r if isinstance(r, bytes) else key_bytes(r) for r in values]


def _content_problem(f, sid: int, attrs: dict, keys_raw: list[bytes],
                     fail_raw: list[bytes]) -> str | None:
    try:
        n = shard_rows(f)  # every output present, shaped as its attributes say
    except ValueError as err:
        return f"its features are not sound ({err})"
    if attrs.get("keys_sha256") is not None and seq_sha256(keys_raw) != attrs["keys_sha256"]:
        return "its keys changed since it was written (keys checksum differs)"
    if (attrs.get("failures_sha256") is not None
            and seq_sha256(fail_raw) != attrs["failures_sha256"]):
        return "its failure records changed since it was written (checksum differs)"
    if len(keys_raw) != n or int(attrs.get("num_rows", n)) != n:
        return f"{len(keys_raw)} keys, {n} feature rows, num_rows={attrs.get('num_rows')}"
    if int(attrs.get("shard_id", sid)) != sid:
        return f"its shard_id attribute is {attrs.get('shard_id')}"
    return None


def read_shard_content(path: str | os.PathLike, shard_id: int) -> ShardContent:
    """Keys, failures and attributes of a finished shard, checked against its own
    attributes; an unreadable or inconsistent shard comes back with ``problem`` set."""
    path = Path(path)
    res = ShardContent(shard_id, path)
    try:
        with open_shard(path) as f:
            attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
            keys_raw = _raw(f["keys"][...])
            fail_raw = _raw(f["failures"][...]) if "failures" in f else []
            res.problem = _content_problem(f, shard_id, attrs, keys_raw, fail_raw)
            res.failures = [json.loads(key_str(r)) for r in fail_raw]
            if res.problem is None:
                res.output_attrs = output_attrs(f)
        recorded = shard_checksum(path)
        size = os.stat(path).st_size
    except Exception as err:  # noqa: BLE001 - h5py raises many types for damaged files
        text = str(err).strip().splitlines()
        res.problem = f"it cannot be read ({text[0] if text else type(err).__name__})"
        return res
    if any(not isinstance(r, dict) or "key" not in r for r in res.failures):
        res.problem = res.problem or "a failure record is not an object with a key"
    res.attrs = attrs
    res.keys = [key_str(r) for r in keys_raw]
    res.info = ShardInfo(shard_id=shard_id, file=path.name, num_rows=len(keys_raw),
                         num_failures=len(res.failures), bytes=size, failures=res.failures,
                         checksum=recorded[0] if recorded else None)
    return res


def read_finished(out_dir: str | os.PathLike) -> dict[int, ShardContent]:
    """`read_shard_content` of every finished shard in OUT, by id."""
    return {sid: read_shard_content(p, sid) for sid, p in list_shard_files(out_dir).items()}


@dataclass
class FinishedCheck:
    """`check_finished`'s verdict: the shards a rerun keeps, and the damaged ones with why."""

    trusted: dict[int, ShardInfo]
    damaged: list[tuple[Path, str]]


def _manifest_entries(out: Path) -> dict[str, ShardInfo]:
    try:
        man = read_manifest(out)
    except StoreError:
        return {}  # rewritten at the end of the run; the shards' own checks still apply
    return {e["file"]: ShardInfo.from_manifest(e) for e in man["shards"]}


def _against_plan(content: ShardContent, chunk_keys: Sequence[str] | None,
                  listed: ShardInfo | None) -> str | None:
    if chunk_keys is None:
        return "the plan has no chunk of that id"
    got = Counter(content.keys) + Counter(str(r.get("key")) for r in content.failures)
    if got != Counter(chunk_keys):
        missing, extra = Counter(chunk_keys) - got, got - Counter(chunk_keys)
        return (f"its keys are not its chunk's ({sum(missing.values())} missing, "
                f"{sum(extra.values())} unexpected or repeated)")
    info = content.info
    if listed is not None and ((listed.bytes and listed.bytes != info.bytes) or (
            listed.checksum and listed.checksum != info.checksum)):
        return "it is not the file manifest.json lists (size or checksum differs)"
    return None


def check_finished(out_dir: str | os.PathLike,
                   chunk_keys: Mapping[int, Sequence[str]]) -> FinishedCheck:
    """Which finished shards of OUT to trust on resume, given the plan's keys of each chunk
    (chunk id -> keys). Nothing is changed on disk (see `discard_damaged`)."""
    out = Path(out_dir)
    listed = _manifest_entries(out)
    check = FinishedCheck({}, [])
    for sid, content in read_finished(out).items():
        problem = content.problem or _against_plan(content, chunk_keys.get(sid),
                                                   listed.get(content.path.name))
        if problem is None:
            check.trusted[sid] = content.info
        else:
            check.damaged.append((content.path, problem))
    return check


def discard_damaged(damaged: Sequence[tuple[Path, str]]) -> None:
    """Delete the damaged shards `check_finished` found, one warning line each."""
    for path, why in damaged:
        log.warning("%s: damaged finished shard (%s); deleted, its chunk is redone", path, why)
        unlink_quietly(path)
