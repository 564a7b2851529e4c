"""What a store holds, for ``clipfeat info OUT``: a JSON-able summary and its text."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from clipfeat.errors import StoreError
from clipfeat.outputs import dataset_path
from clipfeat.store.attrs import PER_SHARD_ATTRS, decode_attr
from clipfeat.store.layout import FAILURES, MANIFEST, is_store
from clipfeat.store.manifest import read_manifest
from clipfeat.store.outputs import config_output, output_attrs
from clipfeat.store.shard import ShardInfo, open_shard, scan_shards
from clipfeat.units import human_bytes, plural

#: What ``describe_store`` says of each output.
OUTPUT_FIELDS = ("name", "dataset", "model", "model_revision", "layer", "feature", "tokens",
                 "hidden_size")


def _first_int(d: dict | None, *names: str) -> int | None:
    for name in names:
        if d and isinstance(d.get(name), int) and not isinstance(d.get(name), bool):
            return int(d[name])
    return None


def planned_chunks(out_dir: str | os.PathLike, plan: dict | None = None) -> int | None:
    """Number of chunks (= shards) the frozen plan holds, or None when unknown."""
    from clipfeat.plan import count_items, read_header

    out = Path(out_dir)
    header = read_header(out)
    for d in (plan, header):
        n = _first_int(d, "num_chunks", "chunks", "num_shards")
        if n is not None:
            return n
    size = _first_int(plan, "shard_size", "chunk_size") or _first_int(
        header, "shard_size", "chunk_size")
    items = _first_int(plan, "num_items", "items", "total") or _first_int(
        header, "num_items", "items", "total")
    if size and items is None:
        items = count_items(out)
    if size and items is not None:
        return -(-items // size)
    return None


def failure_reason(error: str) -> str:
    """A failure's error string reduced to its reason (no paths, quotes or numbers)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else "unknown"
    head = text.split(": ", 1)[0].strip() or text
    head = re.sub(r"'[^']*'|\"[^\"]*\"", "…", head)
    head = re.sub(r"(?:/|[A-Za-z]:\\)\S+", "…", head)
    head = re.sub(r"\d+", "N", head)
    return head[:80]


def describe_store(out_dir: str | os.PathLike) -> dict:
    """A summary of a store for ``clipfeat info OUT`` (JSON-able). StoreError if OUT is
    not a clipfeat store."""
    out = Path(out_dir)
    if not is_store(out):
        raise StoreError(f"{out}: not a clipfeat store (no manifest.json, plan or shards)")
    if (out / MANIFEST).is_file():
        man = read_manifest(out)
        shards = [ShardInfo.from_manifest(e) for e in man["shards"]]
        meta, plan, complete = man.get("config") or {}, man.get("plan") or {}, man.get("complete")
        updated = man.get("updated")
        entries = man.get("outputs") or [config_output(meta)]
    else:
        shards = list(scan_shards(out).values())
        meta, plan, complete, updated = {}, {}, False, None
        entries = []
        if shards:
            with open_shard(out / shards[0].file) as f:
                meta = {k: decode_attr(v) for k, v in f.attrs.items()
                        if k not in PER_SHARD_ATTRS}
                own = output_attrs(f)
            entries = [dict(a, name=n, dataset=dataset_path(n, len(own)))
                       for n, a in own.items()] or [config_output(meta)]
    reasons: dict[str, int] = {}
    failures_path = out / FAILURES
    num_failures = 0
    if failures_path.is_file():
        with open(failures_path, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                if not line.strip():
                    continue
                num_failures += 1
                try:
                    err = json.loads(line).get("error", "")
                except (ValueError, AttributeError):
                    err = "unreadable failure record"
                r = failure_reason(err)
                reasons[r] = reasons.get(r, 0) + 1
    else:
        num_failures = sum(s.num_failures for s in shards)
    # A shard the manifest lists but that is gone (deleted, moved) is not done: the store
    # is then incomplete, whatever manifest.json says, and a rerun redoes it.
    missing = [s.file for s in shards if not (out / s.file).is_file()]
    shards = [s for s in shards if s.file not in set(missing)]
    done = {s.shard_id for s in shards}
    total_chunks = planned_chunks(out, plan)
    pending = (sorted(set(range(total_chunks)) - done) if total_chunks is not None else None)
    disk = 0
    for p in [out / s.file for s in shards] + [out / MANIFEST, failures_path]:
        try:
            disk += p.stat().st_size
        except OSError:
            pass
    tokens, hidden = meta.get("tokens"), meta.get("hidden_size")
    return {
        "path": str(out),
        "complete": bool(complete) and not missing,
        "missing_shards": len(missing),
        "missing_shard_files": missing[:20],
        "images": sum(s.num_rows for s in shards),
        "failures": num_failures,
        "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "shards": len(shards),
        "planned_shards": total_chunks,
        "pending_shards": len(pending) if pending is not None else None,
        "pending_shard_ids": pending[:20] if pending is not None else None,
        "bytes": disk,
        "updated": updated,
        "outputs": [{k: e.get(k) for k in OUTPUT_FIELDS} for e in entries],
        "config": {
            "model": meta.get("model"),
            "model_revision": meta.get("model_revision"),
            "layer": meta.get("layer"),
            "layer_index": meta.get("layer_index"),
            "feature": meta.get("feature"),
            "aspect": meta.get("aspect"),
            "compute_dtype": meta.get("compute_dtype"),
            "store_dtype": meta.get("store_dtype"),
            "tokens": tokens,
            "hidden_size": hidden,
        },
    }


def _unknown(value: Any) -> Any:
    return "?" if value is None else value


def _output_lines(d: dict) -> list[str]:
    """The lines saying what a store holds: its one output's model, layer and shape, or a
    line per output of a several-output store."""
    c = d.get("config") or {}

    def v(key: str) -> Any:
        return _unknown(c.get(key))

    outputs = d.get("outputs") or []
    if len(outputs) < 2:
        return [
            f"model      {v('model')}"
            + (f" @ {c['model_revision']}" if c.get("model_revision") else ""),
            f"layer      {v('layer')}"
            + (f" (hidden_states[{c['layer_index']}])" if c.get("layer_index") is not None
               else "")
            + f", feature {v('feature')}, aspect {v('aspect')}",
            f"features   {v('tokens')} x {v('hidden_size')} {v('store_dtype')}"
            f" (computed in {v('compute_dtype')})",
        ]
    width = max(len(str(o.get("name"))) for o in outputs)
    lines = [f"outputs    {len(outputs)}, {v('store_dtype')} (computed in "
             f"{v('compute_dtype')}), aspect {v('aspect')}"]
    for o in outputs:
        lines.append(
            f"  {str(o.get('name')):<{width}}  {_unknown(o.get('tokens'))} x "
            f"{_unknown(o.get('hidden_size'))}, layer {_unknown(o.get('layer'))}, feature "
            f"{_unknown(o.get('feature'))}, model {_unknown(o.get('model'))}"
            + (f" @ {o['model_revision']}" if o.get("model_revision") else ""))
    return lines


def format_store(d: dict) -> str:
    """Human-readable text of ``describe_store``'s dict (missing entries show as '?')."""
    state = "complete" if d.get("complete") else "INCOMPLETE"
    lines = [
        f"store      {d.get('path', '?')} ({state})",
        f"images     {d.get('images', '?')} in "
        + (plural(d["shards"], "shard") if isinstance(d.get("shards"), int) else "? shards")
        + (f", {human_bytes(d['bytes'])} on disk" if d.get("bytes") is not None else ""),
        *_output_lines(d),
    ]
    if d.get("missing_shards"):
        names = ", ".join(d.get("missing_shard_files") or [])
        more = "" if d["missing_shards"] <= len(d.get("missing_shard_files") or []) else ", ..."
        lines.append(f"missing    {plural(d['missing_shards'], 'shard')} listed in {MANIFEST} "
                     f"but not on disk ({names}{more}): rerun the same extract command to "
                     "redo " + ("it" if d["missing_shards"] == 1 else "them"))
    if d.get("pending_shards"):
        ids = ", ".join(str(i) for i in d.get("pending_shard_ids") or [])
        more = "" if d["pending_shards"] <= len(d.get("pending_shard_ids") or []) else ", ..."
        planned = d.get("planned_shards")
        lines.append(f"pending    {d['pending_shards']} of "
                     + (plural(planned, "shard") if isinstance(planned, int) else "? shards")
                     + f" ({ids}{more}): rerun the same extract command to finish")
    lines.append(f"failures   {d.get('failures', '?')}")
    for reason, count in (d.get("failure_reasons") or {}).items():
        lines.append(f"  {count:>8}  {reason}")
    if d.get("updated"):
        lines.append(f"updated    {d['updated']}")
    return "\n".join(lines)
