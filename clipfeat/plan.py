"""The frozen work list: ordered items cut into fixed chunks; chunk i becomes shard i.

The plan is written once into ``OUT/.clipfeat/plan.jsonl`` (a header line, then one line per
item with its chunk id) and only ever extended: inputs found later are appended as new
chunks, so finished chunks and their shards never change. Every process (rank) derives the
same chunks from the same file, which is what makes resume and scale-out need no
coordinator.

An item inside a tar or parquet file also records where it is: the header lists those
files (``files``: path, kind, size, mtime_ns, image column) and the item names its file by
index (``f``) with the tar member's offset and size (``o``, ``n``) or the parquet row group
and row (``g``, ``r``). Such plans are version 2; plans of plain paths stay version 1, as
earlier clipfeat wrote them, and both are read.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from clipfeat.errors import ConfigError, StoreError
from clipfeat.store.layout import META_DIR, PLAN_FILE

PLAN_FORMAT = "clipfeat-plan"
PLAN_VERSION = 1
#: The version of a plan whose items include tar members or parquet rows.
PLAN_VERSION_MEMBERS = 2


@dataclass(frozen=True)
class PlanItem:
    index: int
    chunk: int
    key: str
    path: str
    error: str | None = None
    member: Any = None  # a TarMember or ParquetRow (clipfeat.sources); None for a path

    @property
    def source(self) -> Any:
        """What to decode: the member, or the path."""
        return self.path if self.member is None else self.member


@dataclass(frozen=True)
class Chunk:
    id: int
    start: int  # index of its first item in Plan.items
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class Plan:
    header: dict[str, Any]
    items: list[PlanItem]
    chunks: list[Chunk]
    appended: int = 0  # items added by this call (0 on a plain resume)
    dirty: bool = False  # differs from what OUT holds: `save` must write it

    @property
    def shard_size(self) -> int:
        return int(self.header["shard_size"])

    def chunk_items(self, chunk: Chunk) -> list[PlanItem]:
        return self.items[chunk.start : chunk.stop]

    def source_files(self) -> list[Any]:
        """The tar and parquet files its items are read from (`clipfeat.sources.SourceFile`)."""
        from clipfeat.sources import files_of

        return files_of([it.member for it in self.items])

    def info(self) -> dict[str, Any]:
        return {
            "shard_size": self.shard_size,
            "num_items": len(self.items),
            "num_chunks": len(self.chunks),
            "created": self.header.get("created"),
            "sources": self.header.get("sources"),
        }


def plan_path(out: Path) -> Path:
    """Where OUT's plan lives: ``OUT/.clipfeat/plan.jsonl``."""
    return Path(out) / META_DIR / PLAN_FILE


def read_header(out: Path) -> dict[str, Any] | None:
    """The header line of OUT's plan (cheap: one line), or None if absent or unreadable."""
    try:
        with open(plan_path(out), encoding="utf-8") as fh:
            head = json.loads(fh.readline())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) and head.get("format") == PLAN_FORMAT else None


def count_items(out: Path) -> int | None:
    """How many items OUT's plan lists (its lines, without reading them), or None."""
    try:
        with open(plan_path(out), "rb") as fh:
            return max(sum(1 for line in fh if line.strip()) - 1, 0)
    except OSError:
        return None


def find_sources(out: Path, keys: set[str]) -> dict[str, Any]:
    """What to decode for each of ``keys`` found in OUT's plan (its path, or its tar member
    or parquet row), read until all are found."""
    found: dict[str, Any] = {}
    with open(plan_path(out), encoding="utf-8", errors="surrogateescape") as fh:
        files = _files(json.loads(fh.readline()))
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            key = rec.get("k", rec.get("key"))  # hand-written plans may use long names
            if key in keys:
                member = _member(rec, files)
                found[key] = rec.get("p", rec.get("path")) if member is None else member
                if len(found) == len(keys):
                    break
    return found


def _dumps(obj: Any) -> str:
    # ensure_ascii keeps lone surrogates (undecodable file names) representable
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


def _cut(items: list[PlanItem]) -> list[Chunk]:
    chunks: list[Chunk] = []
    start = 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i].chunk != items[start].chunk:
            chunks.append(Chunk(items[start].chunk, start, i))
            start = i
    return chunks


def load_plan(out: Path) -> Plan | None:
    """Read the frozen plan of OUT, or None when there is none yet."""
    path = plan_path(out)
    if not path.exists():
        return None
    items: list[PlanItem] = []
    try:
        with open(path, encoding="utf-8") as fh:
            header = json.loads(fh.readline())
            if header.get("format") != PLAN_FORMAT:
                raise StoreError(f"{path} is not a clipfeat plan")
            if int(header.get("version", PLAN_VERSION)) > PLAN_VERSION_MEMBERS:
                raise StoreError(f"{path} was written by a newer clipfeat (plan version "
                                 f"{header['version']}): upgrade clipfeat, or rerun with "
                                 "--overwrite to start over")
            files = _files(header)
            for line in fh:
                d = json.loads(line)
                items.append(PlanItem(d["i"], d["c"], d["k"], d["p"], d.get("e"),
                                      _member(d, files)))
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise StoreError(
            f"the plan {path} is damaged ({err}); rerun with --overwrite to start over"
        ) from None
    return Plan(header, items, _cut(items))


def _files(header: dict[str, Any]) -> list[Any]:
    """The source files a plan's header lists (`clipfeat.sources.SourceFile`)."""
    from clipfeat.sources import SourceFile

    return [SourceFile(f["path"], f["kind"], int(f["size"]), int(f["mtime_ns"]),
                       f.get("column")) for f in header.get("files", ())]


def _member(d: dict[str, Any], files: list[Any]) -> Any:
    """The tar member or parquet row of item line ``d`` (None for a plain path)."""
    if "f" not in d:
        return None
    from clipfeat.sources import ParquetRow, TarMember

    file = files[int(d["f"])]
    if file.kind == "tar":
        return TarMember(file, int(d["o"]), int(d["n"]))
    return ParquetRow(file, int(d["g"]), int(d["r"]))


def extend(
    existing: Plan | None,
    items: Sequence[Any],
    *,
    shard_size: int,
    sources: dict[str, Any],
    identity: dict[str, Any] | None = None,
) -> Plan:
    """The plan made from `items` (objects with key/path/error), in memory: nothing is written.

    An existing plan keeps its items and chunks; keys it does not know are appended as new
    chunks of its own shard size. Items already planned are never re-ordered or removed
    (a file gone since is recorded as a failure when its chunk runs).
    """
    if existing is None:
        header = _new_header(shard_size, sources, identity)
        planned: list[PlanItem] = []
        next_chunk = 0
        known: set[str] = set()
    else:
        header = existing.header
        if int(header["shard_size"]) != shard_size:
            raise ConfigError(
                f"--shard-size {shard_size} differs from the {header['shard_size']} this output "
                f"was planned with: rerun with --shard-size {header['shard_size']}, "
                "or --overwrite to start over"
            )
        planned = list(existing.items)
        next_chunk = (existing.chunks[-1].id + 1) if existing.chunks else 0
        known = {it.key for it in planned}

    new = [it for it in items if it.key not in known]
    size = int(header["shard_size"])
    base = len(planned)
    for j, it in enumerate(new):
        planned.append(PlanItem(base + j, next_chunk + j // size, it.key, it.path,
                                getattr(it, "error", None), getattr(it, "member", None)))
    plan = Plan(header, planned, _cut(planned), appended=len(new))
    plan.dirty = existing is None or existing.dirty or bool(new)
    return plan


def _new_header(shard_size: int, sources: dict[str, Any], identity: dict[str, Any] | None
                ) -> dict[str, Any]:
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "shard_size": shard_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": sources,
        "identity": identity or {},
    }


def _entry(it: Any) -> tuple[str, str, str | None, Any]:
    return (it.key, it.path, getattr(it, "error", None), getattr(it, "member", None))


def _finished_entries(cid: int, keys: Sequence[str], failures: Sequence[dict],
                      by_key: dict[str, Any], shard_size: int, problems: list[str]
                      ) -> list[tuple[str, str, str | None, Any]]:
    """(key, path, error, member) of finished chunk ``cid``'s items, or [] with
    ``problems`` said."""
    n = len(keys) + len(failures)
    if not 0 < n <= shard_size:
        problems.append(f"shard {cid} holds {n} inputs, not 1 to --shard-size {shard_size}")
    lost = [k for k in keys if k not in by_key]
    if lost:
        problems.append(f"shard {cid} holds {len(lost)} keys the sources do not list "
                        f"(first {lost[0]!r})")
        return []
    entries = [_entry(by_key[k]) for k in keys]
    for rec in failures:
        key = str(rec.get("key"))
        it = by_key.get(key)  # a failed input may be gone from the sources since
        if it is None:
            entries.append((key, str(rec.get("path")), None, None))
        else:
            entries.append((key, it.path, None, getattr(it, "member", None)))
    return entries


def rebuild(
    finished: Mapping[int, tuple[Sequence[str], Sequence[dict]]],
    items: Sequence[Any],
    *,
    shard_size: int,
    sources: dict[str, Any],
    identity: dict[str, Any] | None = None,
) -> Plan:
    """The plan of an OUT whose plan.jsonl was lost, made again in memory from its finished
    shards (chunk id -> (row keys, failure records)) and the sources' ``items``.

    Each finished chunk holds exactly what its shard says (items in source order); the
    other items, in source order, fill the chunk ids no shard holds, then new chunks
    after them. ValueError (its problems, "; "-joined) when the shards and the sources
    disagree: a stored key the sources do not list, a key in two shards, a chunk larger
    than ``shard_size``.
    """
    by_key = {it.key: it for it in items}
    order = {it.key: i for i, it in enumerate(items)}
    problems: list[str] = []
    chunks: dict[int, list[tuple[str, str, str | None, Any]]] = {}
    owner: dict[str, int] = {}
    for cid, (keys, failures) in sorted(finished.items()):
        entries = _finished_entries(cid, keys, failures, by_key, shard_size, problems)
        for key, *_ in entries:
            if key in owner:
                problems.append(f"key {key!r} is in shards {owner[key]} and {cid}")
            owner.setdefault(key, cid)
        chunks[cid] = sorted(entries, key=lambda e: order.get(e[0], len(order)))
    if problems:
        raise ValueError("; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
    rest = [_entry(it) for it in items if it.key not in owner]
    free = (cid for cid in itertools.count() if cid not in chunks)  # gaps first
    for start in range(0, len(rest), shard_size):
        chunks[next(free)] = rest[start:start + shard_size]
    planned = [PlanItem(0, cid, key, path, error, member)
               for cid in sorted(chunks) for key, path, error, member in chunks[cid]]
    planned = [dataclasses.replace(it, index=i) for i, it in enumerate(planned)]
    plan = Plan(_new_header(shard_size, sources, identity), planned, _cut(planned),
                appended=len(rest))
    plan.dirty = True
    return plan


def save(out: Path, plan: Plan) -> None:
    """Write the plan into OUT atomically (temp file, fsync, rename) if it changed."""
    if not getattr(plan, "dirty", True):
        return
    from clipfeat.store import write_lines_atomically

    files = plan.source_files()
    index = {f: i for i, f in enumerate(files)}
    header = dict(plan.header)
    header.pop("files", None)
    if files:  # a plan of plain paths stays as earlier clipfeat wrote it (version 1)
        header["version"] = PLAN_VERSION_MEMBERS
        header["files"] = [f._asdict() for f in files]
    write_lines_atomically(
        plan_path(out),
        [_dumps(header)] + [_dumps(_item_dict(it, index)) for it in plan.items],
    )
    plan.dirty = False


def freeze(
    out: Path,
    items: Sequence[Any],
    *,
    shard_size: int,
    sources: dict[str, Any],
    identity: dict[str, Any] | None = None,
) -> Plan:
    """Create or extend the plan of OUT from `items` and write it: `extend` + `save`."""
    plan = extend(load_plan(out), items, shard_size=shard_size, sources=sources,
                  identity=identity)
    save(out, plan)
    return plan


def _item_dict(it: PlanItem, files: dict[Any, int]) -> dict[str, Any]:
    d: dict[str, Any] = {"i": it.index, "c": it.chunk, "k": it.key, "p": it.path}
    if it.error:
        d["e"] = it.error
    m = it.member
    if m is not None:
        d["f"] = files[m.file]
        if hasattr(m, "offset"):
            d.update(o=m.offset, n=m.size)
        else:
            d.update(g=m.row_group, r=m.row)
    return d
