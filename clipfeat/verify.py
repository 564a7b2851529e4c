"""``clipfeat verify``: check that a store is sound, optionally against a fresh extraction.

Checks, each problem naming the file: manifest.json present and parseable; every listed
shard exists, has the size the manifest recorded and opens; no finished shard missing
from the manifest; ``features`` (every ``features/NAME`` of a several-output store, each
against its own attributes and its entry in manifest.json's ``outputs``), ``keys`` and
``failures`` agree with each other, with the manifest and with the shard's attributes; settings agree across shards and with the
manifest config; keys unique across shards; the whole-file checksum in each shard's user
block still matches (catches truncation and a flipped byte anywhere, raw float data
included); failures.jsonl parses; the key index matches the checksums its header records and points
every key at its own shard row and row offset. Rows are scanned for NaN/Inf (in memory-bounded blocks)
only when a shard's checksum does not match: an intact shard holds exactly the bytes the
writer committed, and the writer refuses non-finite values.
With ``model`` and ``sample > 0``, K random rows are re-extracted and compared.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from clipfeat.errors import ClipfeatError, ConfigError, StoreError
from clipfeat.outputs import FEATURES_DATASET, tower_slug
from clipfeat.store import (
    FAILURES,
    MANIFEST,
    META_DIR,
    PARTIAL_SUFFIX,
    PER_SHARD_ATTRS,
    PLAN_FILE,
    SHARD_PREFIX,
    STORE_DTYPES,
    ShardInfo,
    check_index,
    check_shard_bytes,
    config_output,
    dataset_paths,
    decode_attr,
    encode_attr,
    entry_attrs,
    is_store,
    key_bytes,
    key_hash,
    key_str,
    list_shard_files,
    open_shard,
    parse_shard_id,
    planned_chunks,
    read_manifest,
    read_shard_row,
    seq_sha256,
    shard_checksum,
)
from clipfeat.units import plural

log = logging.getLogger(__name__)

BLOCK_BYTES = 64 * 1024 * 1024  # features are read in blocks of about this size
MAX_LISTED = 10  # duplicate keys / bad rows listed per kind before "and N more"


@dataclass
class VerifyReport:
    """Outcome of ``verify_store``: ``ok`` when no problem was found."""

    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked_shards: int = 0
    checked_rows: int = 0
    sampled: int = 0
    max_sample_error: float | None = None
    #: Why sampled rows could not be compared at all (another tower: other shape), or None.
    sample_mismatch: str | None = None

    @property
    def ok(self) -> bool:
        """True when the store is sound (no problems; notes do not count)."""
        return not self.problems

    def to_dict(self) -> dict:
        """JSON-able form (for ``--json``)."""
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "checked_shards": self.checked_shards,
            "checked_rows": self.checked_rows,
            "sampled": self.sampled,
            "max_sample_error": self.max_sample_error,
            "sample_mismatch": self.sample_mismatch,
        }

    def format(self) -> str:
        """Human-readable report: a verdict line, then problems, then notes."""
        what = f"{plural(self.checked_rows, 'row')} in {plural(self.checked_shards, 'shard')}"
        if self.sampled:
            what += f", {plural(self.sampled, 'row')} re-extracted"
            if self.sample_mismatch:
                what += f" ({self.sample_mismatch})"
            elif self.max_sample_error is not None:
                what += f" (max relative error {self.max_sample_error:.2e})"
        if self.ok:
            lines = [f"OK: {self.path}: {what} checked, no problems"]
        else:
            lines = [f"FAILED: {self.path}: {plural(len(self.problems), 'problem')} "
                     f"({what} checked)"]
            lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _same_setting(stored: Any, configured: Any) -> bool:
    """Does a shard attribute value match the manifest config value?"""
    try:
        if encode_attr(configured) == stored:
            return True
    except ClipfeatError:
        pass
    if isinstance(stored, str) and isinstance(configured, (dict, list, tuple)):
        try:
            return json.loads(stored) == json.loads(json.dumps(configured, default=str))
        except ValueError:
            return False
    return False


def _sample_tolerance(meta: dict) -> float:
    """Relative L2 error allowed between stored and re-extracted features."""
    compute = str(meta.get("compute_dtype", "float16")).lower()
    store = str(meta.get("store_dtype", "float16")).lower()
    if compute in ("bfloat16", "bf16"):
        return 3e-2
    if store in ("float16", "fp16", "half") or compute in ("float16", "fp16", "half"):
        return 1e-2
    return 1e-4


class _ShardResult:
    """What one shard contributed: settings, key hashes, rows."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.settings: dict[str, Any] | None = None
        self.hashes: list[int] = []
        self.rows = 0
        self.readable = False
        self.findings: list[str] = []  # what the checks of this shard found, in order


REDO = "delete it and rerun the extract command to redo it"
_REDO_SUFFIXES = (f"; {REDO}", "; delete it and rerun to redo it")


def _report_shard(res: _ShardResult, report: VerifyReport) -> None:
    """One problem per shard, however many checks failed on it: its findings in the order
    found (size, checksum, HDF5, contents), the fix said once."""
    if not res.findings:
        return
    prefix, fix, texts = f"{res.name}: ", "", []
    for text in res.findings:
        text = text.removeprefix(prefix)
        for suffix in _REDO_SUFFIXES:
            if text.endswith(suffix):
                text, fix = text[: -len(suffix)], f"; {REDO}"
        texts.append(text)
    report.problems.append(prefix + "; ".join(texts) + fix)


@dataclass
class _Expected:
    """What manifest.json says every shard holds: the run's config and the outputs it lists
    (None where it lists none: a one-output store of an earlier clipfeat, or no manifest)."""

    config: dict
    outputs: list[dict] | None = None

    def output_entry(self, dataset: str) -> dict:
        """The manifest entry of the output in ``dataset`` ({} when not listed)."""
        for e in self.outputs or ():
            if e.get("dataset") == dataset:
                return e
        return {}


def _check_shard(out: Path, name: str, entry: dict | None, expected: _Expected) -> _ShardResult:
    res = _ShardResult(name)
    problems = res.findings
    path = out / name
    sid = parse_shard_id(name)
    size = path.stat().st_size
    try:
        damage = check_shard_bytes(path)
        recorded = shard_checksum(path)
    except OSError as err:
        problems.append(f"{name}: cannot be read ({_first_line(err)})")
        return res
    if damage is not None:  # its own size and checksum: says it better than the manifest
        problems.append(f"{name}: {damage}; {REDO}")
    elif entry is not None and entry.get("bytes") and int(entry["bytes"]) != size:
        problems.append(f"{name}: {size} bytes on disk but manifest.json recorded "
                        f"{entry['bytes']} (truncated or modified); {REDO}")
    if damage is None and entry is not None and entry.get("checksum") and recorded and (
            recorded[0] != entry["checksum"]):
        problems.append(f"{name}: not the file manifest.json lists (checksum differs); "
                        "delete it and rerun the extract command to redo it")
    # An intact checksum means the bytes are those the writer committed, and the writer
    # refuses NaN/Inf: the row-by-row scan below is then only needed without one.
    intact = damage is None
    try:
        f = open_shard(path)
    except OSError as err:
        problems.append(f"{name}: cannot be opened as HDF5 ({_first_line(err)}); delete it "
                        "and rerun the extract command to redo it")
        return res
    try:
        with f:
            _check_contents(f, name, sid, entry, expected, intact, res, problems)
    except Exception as err:  # noqa: BLE001 - h5py raises many types for damaged files
        problems.append(f"{name}: damaged HDF5 structure ({type(err).__name__}: "
                        f"{_first_line(err)}); delete it and rerun the extract command to "
                        "redo it")
    return res


def _feature_datasets(f, name: str, attrs: dict, expected: _Expected,
                      problems: list[str]) -> list[str] | None:
    """The shard's feature datasets in output order, present and as manifest.json lists
    them; None (with the problem) when they are not."""
    try:
        paths = dataset_paths(attrs)
    except ValueError as err:
        problems.append(f"{name}: {err}")
        return None
    if expected.outputs is not None:
        listed = [e.get("dataset") for e in expected.outputs]
        if listed != paths:
            problems.append(f"{name}: holds the feature datasets {paths} but manifest.json "
                            f"lists the outputs {listed}; {REDO}")
            return None
    missing = [d for d in paths + ["keys"] if d not in f]
    if missing:
        problems.append(f"{name}: dataset(s) {missing} missing")
        return None
    return paths


def _check_contents(f, name: str, sid: int | None, entry: dict | None, expected: _Expected,
                    intact: bool, res: _ShardResult, problems: list[str]) -> None:
    attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
    paths = _feature_datasets(f, name, attrs, expected, problems)
    if paths is None:
        return
    kds = f["keys"]
    datasets = [f[p] for p in paths]
    if kds.ndim != 1 or any(ds.ndim != 3 for ds in datasets):
        shapes = " / ".join(f"{p} shape {ds.shape}" for p, ds in zip(paths, datasets,
                                                                     strict=True))
        problems.append(f"{name}: {shapes} / keys shape {kds.shape} are not (n, tokens, "
                        "hidden) / (n,)")
        return
    n = int(datasets[0].shape[0])
    res.rows = n
    for p, ds in zip(paths[1:], datasets[1:], strict=True):
        if int(ds.shape[0]) != n:
            problems.append(f"{name}: {p} has {ds.shape[0]} rows but {paths[0]} {n}")
    _check_row_counts(name, sid, entry, attrs, n, kds.shape[0], problems)
    settings = {k: v for k, v in attrs.items() if k not in PER_SHARD_ATTRS}
    for p, ds in zip(paths, datasets, strict=True):
        if len(paths) == 1:  # one output: its attributes are the root's
            _check_layout(name, ds, attrs, expected.config, problems)
            continue
        own = {k: decode_attr(v) for k, v in ds.attrs.items()}
        listed = expected.output_entry(p)
        _check_layout(name, ds, dict(own, store_dtype=attrs.get("store_dtype")),
                      dict(listed, store_dtype=expected.config.get("store_dtype")), problems, p,
                      "manifest.json outputs entry")
        settings.update({f"{p}:{k}": v for k, v in own.items()})
    _check_keys(name, kds, attrs, res, problems)
    _check_failure_records(f, name, entry, attrs, problems)
    res.readable = all([
        _check_rows(name, ds, 0 if intact else n, problems,
                    f" of {p}" if len(paths) > 1 else "")
        for p, ds in zip(paths, datasets, strict=True)])
    res.settings = settings


def _check_row_counts(name: str, sid: int | None, entry: dict | None, attrs: dict, n: int,
                      nkeys: int, problems: list[str]) -> None:
    """Keys, the num_rows attribute and manifest entry, the shard_id attribute: against ``n``
    rows and the file name."""
    if nkeys != n:
        problems.append(f"{name}: {nkeys} keys for {n} feature rows")
    if "num_rows" in attrs and int(attrs["num_rows"]) != n:
        problems.append(f"{name}: attribute num_rows={attrs['num_rows']} but {n} rows")
    if entry is not None and int(entry.get("num_rows", -1)) != n:
        problems.append(f"{name}: {n} rows but manifest.json lists {entry.get('num_rows')}")
    if sid is not None and "shard_id" in attrs and int(attrs["shard_id"]) != sid:
        problems.append(f"{name}: attribute shard_id={attrs['shard_id']} does not match "
                        "the file name")


def _check_layout(name: str, ds, attrs: dict, config: dict, problems: list[str],
                  label: str = "features", listed_as: str = "manifest config") -> None:
    """Tokens, hidden size and dtype of the features dataset ``label`` against the
    attributes and the manifest's record (``listed_as``) that describe it."""
    import numpy as np

    tokens, hidden = int(ds.shape[1]), int(ds.shape[2])
    dtype_name = {np.dtype("float16"): "float16", np.dtype("float32"): "float32"}.get(
        ds.dtype, str(ds.dtype))
    dataset = label
    for what, have, keys in (("tokens", tokens, ("tokens",)),
                             ("hidden size", hidden, ("hidden_size",)),
                             ("dtype", dtype_name, ("store_dtype",))):
        for src_name, src in (("attribute", attrs), (listed_as, config)):
            for k in keys:
                if k in src and src[k] is not None and src[k] != have:
                    problems.append(f"{name}: {dataset} have {what} {have} but the "
                                    f"{src_name} {k} is {src[k]!r}")
    if dtype_name not in STORE_DTYPES:
        problems.append(f"{name}: {dataset} dtype {ds.dtype} is not float16/float32")


def _check_keys(name: str, kds, attrs: dict, res: _ShardResult, problems: list[str]) -> None:
    """Keys readable and matching their checksum; their hashes into ``res``."""
    try:
        raw_keys = [r if isinstance(r, bytes) else key_bytes(r) for r in kds[...]]
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        problems.append(f"{name}: keys unreadable ({_first_line(err)})")
        return
    want = attrs.get("keys_sha256")
    if want is not None and seq_sha256(raw_keys) != want:
        problems.append(f"{name}: keys checksum mismatch (keys changed since the "
                        "shard was written); delete it and rerun to redo it")
    res.hashes = [key_hash(r) for r in raw_keys]


def _check_failure_records(f, name: str, entry: dict | None, attrs: dict,
                           problems: list[str]) -> None:
    """Failure records well-formed, matching their checksum and the recorded counts."""
    nfail = 0
    if "failures" in f:
        try:
            raw_fail = [r if isinstance(r, bytes) else key_bytes(r)
                        for r in f["failures"][...]]
            nfail = len(raw_fail)
            for r in raw_fail:
                rec = json.loads(key_str(r))
                if not isinstance(rec, dict) or "key" not in rec or "error" not in rec:
                    raise ValueError(f"bad failure record {rec!r}")
            want = attrs.get("failures_sha256")
            if want is not None and seq_sha256(raw_fail) != want:
                problems.append(f"{name}: failures checksum mismatch")
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            problems.append(f"{name}: failure records unreadable ({_first_line(err)})")
    if "num_failures" in attrs and int(attrs["num_failures"]) != nfail:
        problems.append(f"{name}: attribute num_failures={attrs['num_failures']} but "
                        f"{nfail} failure records")
    if entry is not None and int(entry.get("num_failures", nfail)) != nfail:
        problems.append(f"{name}: {nfail} failure records but manifest.json lists "
                        f"{entry.get('num_failures')}")


def _check_rows(name: str, ds, scan: int, problems: list[str], where: str = "") -> bool:
    """The first ``scan`` feature rows readable and finite, in memory-bounded blocks;
    False if a block could not be read. ``where`` names the output in messages."""
    import numpy as np
    import torch

    n = int(ds.shape[0])
    row_bytes = max(int(ds.shape[1]) * int(ds.shape[2]) * ds.dtype.itemsize, 1)
    block = max(1, BLOCK_BYTES // row_bytes)
    bad_rows: list[int] = []
    readable = True
    for start in range(0, scan, block):
        stop = min(n, start + block)
        try:
            data = np.ascontiguousarray(ds[start:stop])
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            problems.append(f"{name}: rows {start}..{stop - 1}{where} unreadable "
                            f"({_first_line(err)}); delete it and rerun to redo it")
            readable = False
            break
        t = torch.from_numpy(data)
        if t.numel():
            lo, hi = (float(v) for v in t.aminmax())
            if not (np.isfinite(lo) and np.isfinite(hi)):
                finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
                bad_rows.extend(start + int(i) for i in torch.nonzero(~finite).flatten())
    if bad_rows:
        listed = ", ".join(str(r) for r in bad_rows[:MAX_LISTED])
        problems.append(f"{name}: NaN/Inf in {len(bad_rows)} rows{where} ({listed}"
                        f"{', ...' if len(bad_rows) > MAX_LISTED else ''})")
    return readable


def _check_settings(results: list[_ShardResult], expected: _Expected,
                    problems: list[str]) -> None:
    """Settings alike in every shard, and as manifest.json records them (its config, and
    each output's entry; an output's attributes are the settings ``DATASET:NAME``)."""
    ref = next((r for r in results if r.settings is not None), None)
    if ref is None:
        return
    for res in results:
        if res.settings is None or res is ref:
            continue
        keys = set(ref.settings) | set(res.settings)
        diff = sorted(k for k in keys if ref.settings.get(k) != res.settings.get(k))
        if diff:
            k = diff[0]
            problems.append(f"{res.name}: attribute {k}={res.settings.get(k)!r} differs from "
                            f"{ref.name} ({ref.settings.get(k)!r})"
                            + (f" and {len(diff) - 1} more" if len(diff) > 1 else ""))
    for k in sorted(ref.settings):
        path, _, attr = k.rpartition(":")  # attribute names hold no ':', dataset paths may
        listed = expected.output_entry(path) if path else expected.config
        if attr in listed and attr not in (("tokens", "hidden_size") if path else ()) and (
                not _same_setting(ref.settings[k], listed[attr])):
            where = "its entry in manifest.json outputs" if path else "manifest.json config"
            problems.append(f"{ref.name}: attribute {k}={ref.settings[k]!r} differs from "
                            f"{where} ({listed[attr]!r})")


def _check_duplicates(out: Path, results: list[_ShardResult], problems: list[str]) -> None:
    import numpy as np

    hashes = [np.asarray(r.hashes, dtype=np.uint64) for r in results]
    if not hashes:
        return
    all_h = np.concatenate(hashes)
    owner = np.concatenate([np.full(len(h), i, dtype=np.int64) for i, h in enumerate(hashes)])
    row = np.concatenate([np.arange(len(h), dtype=np.int64) for h in hashes])
    order = np.argsort(all_h, kind="stable")
    sorted_h = all_h[order]
    dup = np.nonzero(sorted_h[1:] == sorted_h[:-1])[0]
    if not len(dup):
        return
    key_cache: dict[int, list[bytes]] = {}

    def key_of(i: int) -> bytes:
        shard = int(owner[order[i]])
        if shard not in key_cache:
            with open_shard(out / results[shard].name) as f:
                key_cache[shard] = [r if isinstance(r, bytes) else key_bytes(r)
                                    for r in f["keys"][...]]
        return key_cache[shard][int(row[order[i]])]

    found = 0
    for i in dup.tolist():
        a, b = key_of(i), key_of(i + 1)
        if a != b:
            continue  # 64-bit hash collision of two different keys
        found += 1
        if found <= MAX_LISTED:
            ra, rb = results[int(owner[order[i]])], results[int(owner[order[i + 1]])]
            problems.append(f"{rb.name}: key {key_str(a)!r} duplicated (row "
                            f"{int(row[order[i + 1]])}; also {ra.name} row "
                            f"{int(row[order[i]])})")
    if found > MAX_LISTED:
        problems.append(f"{found - MAX_LISTED} more duplicated keys")


def _check_failures_file(out: Path, man: dict | None, problems: list[str]) -> None:
    path = out / FAILURES
    if not path.is_file():
        if man is not None:
            problems.append(f"{FAILURES}: missing")
        return
    count = 0
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not all(k in rec for k in ("key", "path", "error")):
                    raise ValueError("not an object with key, path, error")
            except ValueError as err:
                problems.append(f"{FAILURES}: line {lineno} does not parse ({_first_line(err)})")
                return
            count += 1
    if man is not None and int(man.get("num_failures", count)) != count:
        problems.append(f"{FAILURES}: {count} records but manifest.json counts "
                        f"{man.get('num_failures')}")


def _sample(out: Path, report: VerifyReport, entries: list[dict], config: dict, *,
            output: dict, model: str, sample: int, device: str, seed: int,
            allow_pickle: bool) -> None:
    """Re-extract ``sample`` random rows of ``output`` (its manifest entry: name, dataset)
    with ``model`` and the settings ``config`` (that output's), and compare."""
    import numpy as np

    several = output.get("dataset") != FEATURES_DATASET
    of = f" of output {output['name']}" if several else ""

    counts = [int(e.get("num_rows", 0)) for e in entries]
    total = sum(counts)
    if total == 0:
        report.notes.append("no rows to sample")
        return
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(sample, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    chosen: list[tuple[str, str, Any]] = []  # (key, shard file, stored float32 row)
    for p in picks.tolist():
        idx = int(np.searchsorted(starts, p, side="right")) - 1
        name, r = entries[idx]["file"], p - int(starts[idx])
        try:
            key, row = read_shard_row(out / name, r, output["dataset"])
            stored = np.asarray(row, dtype=np.float32)
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            report.problems.append(f"{name}: cannot read sampled row {r}{of} "
                                   f"({_first_line(err)})")
            continue
        chosen.append((key, name, stored))
    from clipfeat.plan import find_sources, plan_path

    if not plan_path(out).is_file():
        report.problems.append(f"{META_DIR}/{PLAN_FILE}: missing, cannot find the images of "
                               "sampled rows")
        return
    paths = find_sources(out, {k for k, _, _ in chosen})
    items = []
    for key, name, _ in chosen:
        if paths.get(key) is None:
            report.problems.append(f"{name}: sampled key {key!r} is not in {PLAN_FILE}")
        else:
            items.append((key, paths[key]))
    if not items:
        return
    fresh = compute_features(items, config, model=model, device=device,
                             allow_pickle=allow_pickle)
    tol = _sample_tolerance(config)
    worst: float | None = None
    shapes: dict[tuple, tuple] = {}  # re-extracted shape -> stored shape, when they differ
    for key, name, stored in chosen:
        if key not in paths:
            continue
        ref = fresh.get(key)
        report.sampled += 1
        if ref is None or isinstance(ref, str):
            report.problems.append(f"{name}: re-extracting {key!r} failed ({ref or 'no result'})")
            continue
        ref = np.asarray(ref, dtype=np.float32)
        if ref.shape != stored.shape:
            shapes.setdefault(tuple(ref.shape), tuple(stored.shape))
            continue
        err = float(np.linalg.norm(stored - ref) / max(float(np.linalg.norm(ref)), 1e-12))
        worst = err if worst is None else max(worst, err)
        if not err <= tol:
            report.problems.append(
                f"{name}: {key!r}{of} differs from a fresh extraction with {model} (relative error "
                f"{err:.2e} > {tol:.0e}; max abs diff {float(np.abs(stored - ref).max()):.3g}): "
                "made with another model, layer or preprocessing?")
    if worst is not None:
        report.max_sample_error = max(worst, report.max_sample_error or 0.0)
    for fresh_shape, stored_shape in shapes.items():  # one tower, so one shape: once
        report.sample_mismatch = (f"shape mismatch: {model} gives {_shape(fresh_shape)}, "
                                  f"the store{of} holds {_shape(stored_shape)}")
        report.problems.append(
            f"re-extracting with --model {model} gives features of shape "
            f"{_shape(fresh_shape)} but the store{of} holds {_shape(stored_shape)}: it was made "
            f"with another model or --feature (manifest.json: model "
            f"{config.get('model', '?')}, feature {config.get('feature', '?')})")


def _shape(shape: tuple) -> str:
    return " x ".join(str(int(d)) for d in shape)


def _manifest_entries(out: Path, man: dict, problems: list[str]) -> list[dict]:
    """The manifest's shard entries that are well-formed, listed once and on disk."""
    entries: list[dict] = []
    seen: set[str] = set()
    for e in man["shards"]:
        if not isinstance(e, dict) or "file" not in e or "num_rows" not in e:
            problems.append(f"{MANIFEST}: bad shard entry {e!r}")
            continue
        if e["file"] in seen:
            problems.append(f"{MANIFEST}: {e['file']} listed twice")
            continue
        seen.add(e["file"])
        if parse_shard_id(e["file"]) is None:
            problems.append(f"{MANIFEST}: {e['file']!r} is not a shard file name")
            continue
        if not (out / e["file"]).is_file():
            problems.append(f"{e['file']}: listed in {MANIFEST} but missing; rerun the "
                            "extract command to redo it")
            continue
        entries.append(e)
    return entries


def _check_manifest_listing(man: dict, on_disk: dict[int, Path], complete: bool,
                            report: VerifyReport) -> list[str]:
    """Finished shards the manifest does not list (returned), and its recorded totals."""
    listed = {e["file"] for e in man["shards"] if isinstance(e, dict) and "file" in e}
    stray = [p.name for p in on_disk.values() if p.name not in listed]
    for name in stray:
        msg = (f"{name}: finished shard not listed in {MANIFEST}; rerun the extract "
               "command to resume, which lists it")
        (report.problems if complete else report.notes).append(msg)
    totals = {
        "num_images": sum(int(e["num_rows"]) for e in man["shards"] if isinstance(e, dict)
                          and "num_rows" in e),
        "num_shards": len(man["shards"]),
    }
    for k, v in totals.items():
        if k in man and int(man[k]) != v:
            report.problems.append(f"{MANIFEST}: {k}={man[k]} but its shard list adds up to {v}")
    return stray


def _sampled_outputs(expected: _Expected, models: Sequence[str], report: VerifyReport
                     ) -> list[tuple[dict, dict, str]]:
    """(manifest entry, settings, model) of each output the ``--model`` values re-extract.
    A store of one tower: every output, with the one ``--model`` (another tower shows as a
    mismatch). Several towers: each output with the ``--model`` of the same name
    (`tower_slug`); the outputs of a tower no ``--model`` names are noted, not sampled."""
    outputs = expected.outputs or [config_output(expected.config)]
    metas = [(o, {**expected.config, **entry_attrs(o)}) if len(outputs) > 1
             else (o, expected.config) for o in outputs]
    towers = list(dict.fromkeys(str(m.get("model")) for _, m in metas))
    if len(towers) == 1 and len(models) == 1:
        return [(o, m, models[0]) for o, m in metas]
    by_slug = {tower_slug(m): m for m in models}
    picked = []
    for o, m in metas:
        model = by_slug.get(tower_slug(str(m.get("model"))))
        if model is None:
            report.notes.append(f"output {o['name']}: not re-extracted (no --model names its "
                                f"tower {m.get('model')})")
        else:
            picked.append((o, m, model))
    unused = [m for m in models if m not in {p[2] for p in picked}]
    for m in unused:
        report.notes.append(f"--model {m} names no tower of the store (towers: "
                            f"{', '.join(towers)}); not used")
    return picked


def _note_unfinished(out: Path, man: dict | None, complete: bool, entries: list[dict],
                     expected: _Expected, report: VerifyReport) -> None:
    """Notes on leftovers of an interrupted run, an incomplete store, a stale key index."""
    partials = [p for p in os.listdir(out)
                if p.startswith(SHARD_PREFIX) and p.endswith(PARTIAL_SUFFIX)]
    if partials:
        report.notes.append(f"{plural(len(partials), 'unfinished shard')} (*{PARTIAL_SUFFIX}) "
                            "from an interrupted run; the next extract run removes "
                            + ("it" if len(partials) == 1 else "them"))
    if man is None:
        return
    if not complete:
        total = planned_chunks(out, man.get("plan") or {})
        report.notes.append(
            "store is incomplete: " + (f"{len(entries)} of {plural(total, 'shard')} finished; "
                                       if total is not None else "")
            + "rerun the extract command to finish it")
    else:
        shards = [ShardInfo.from_manifest(e) for e in entries]
        if len(shards) != len(man["shards"]):
            return
        try:
            index_problems = check_index(out, shards, datasets=[
                o["dataset"] for o in expected.outputs or [config_output(expected.config)]])
        except StoreError:  # a shard that cannot be read: reported with the shard
            return
        if index_problems is None:
            report.notes.append("key index missing or stale: FeatureStore will read the "
                                "keys of every shard when it opens")
        else:
            report.problems.extend(index_problems)


def verify_store(
    out_dir: str | os.PathLike,
    *,
    model: str | Sequence[str] | None = None,
    sample: int = 0,
    device: str = "cpu",
    seed: int = 0,
    allow_pickle: bool = False,
) -> VerifyReport:
    """Check the store in ``out_dir``; return a report (``report.ok``; the CLI exits 1
    unless ok). With ``model`` and ``sample > 0`` also re-extract ``sample`` random rows
    (``allow_pickle``: as in extract, for a model with only pickle weights).

    ConfigError when ``out_dir`` is missing, not a folder or not a clipfeat store."""
    out = Path(out_dir)
    if not out.exists():
        raise ConfigError(f"{out}: no such folder; pass the OUT folder of clipfeat extract")
    if not out.is_dir():
        raise ConfigError(f"{out}: not a folder; pass the OUT folder of clipfeat extract")
    if not is_store(out):
        raise ConfigError(f"{out}: not a clipfeat store (no manifest.json, plan or shards); "
                          "pass the OUT folder of clipfeat extract")
    report = VerifyReport(path=str(out))
    problems = report.problems
    man: dict | None
    try:
        man = read_manifest(out)
    except StoreError as err:
        problems.append(f"{MANIFEST}: {err}".replace(f"{out / MANIFEST}: ", ""))
        man = None
    config = dict((man or {}).get("config") or {})
    expected = _Expected(config, (man or {}).get("outputs"))
    complete = bool((man or {}).get("complete"))
    on_disk = list_shard_files(out)

    if man is not None:
        entries = _manifest_entries(out, man, problems)
        stray = _check_manifest_listing(man, on_disk, complete, report)
        names = [e["file"] for e in entries] + stray
    else:
        entries = []
        names = [p.name for p in on_disk.values()]

    by_name = {e["file"]: e for e in entries}
    results: list[_ShardResult] = []
    for name in names:
        res = _check_shard(out, name, by_name.get(name), expected)
        _report_shard(res, report)
        results.append(res)
        report.checked_shards += 1
        report.checked_rows += res.rows
    after_shards = len(problems)
    _check_settings(results, expected, problems)
    _check_duplicates(out, results, problems)
    _check_failures_file(out, man, problems)
    _note_unfinished(out, man, complete, entries, expected, report)

    if model and sample > 0:
        if man is None:
            problems.append("cannot sample rows without a readable manifest.json")
        models = [model] if isinstance(model, str) else list(model)
        for output, meta, one in (_sampled_outputs(expected, models, report) if man else []):
            _sample(out, report, [e for e in entries if e["file"] in
                                  {r.name for r in results if r.readable}],
                    meta, output=output, model=one, sample=sample, device=device,
                    seed=seed, allow_pickle=allow_pickle)
    elif sample > 0:
        report.notes.append("--sample needs --model to re-extract rows; skipped")
    # A damaged shard is reported once, by its own checks: what later checks (key index,
    # sampling) say about it follows from that.
    damaged = {r.name for r in results if r.findings}
    problems[after_shards:] = [p for p in problems[after_shards:]
                               if p.split(": ", 1)[0] not in damaged]
    return report


def compute_features(
    items: list[tuple[str, Any]],
    meta: dict[str, Any],
    *,
    model: str,
    device: str = "cpu",
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Re-extract ``(key, path)`` items with the settings in ``meta`` (a store's config);
    key -> float32 array, or the error text of an image that cannot be read. A path may
    also be a tar member or parquet row (`clipfeat.sources`), read where it lives.

    The tower comes from `clipfeat.tower.load_tower`, as in extract, at the revision the
    store records when ``model`` is the store's own model; CPU computes in float32.
    """
    import numpy as np
    import torch

    from clipfeat.outputs import LayerSel
    from clipfeat.preprocess import Normalizer, PreprocessSpec, load_image, to_uint8
    from clipfeat.sources import opened, release_readers
    from clipfeat.tower import load_tower

    dtype = str(meta.get("compute_dtype") or "float32")
    if device == "cpu" and dtype == "float16":
        dtype = "float32"
    revision = (meta.get("model_revision") or None) if model == meta.get("model") else None
    layer = LayerSel.parse(meta["layer"])  # an int, or "mean(A:B)"
    tower = load_tower(model, layers=(layer,), feature=str(meta["feature"]),
                       revision=revision, device=device, dtype=dtype,
                       allow_pickle=allow_pickle)
    spec = PreprocessSpec.from_processor_config(
        tower.model_ref.preprocessor_config, family=tower.family,
        image_size=int(tower.model_ref.image_size),  # DINOv2: its crop, not config's 518
    )
    norm = Normalizer(spec)
    out: dict[str, Any] = {}
    try:
        for key, path in items:
            try:
                with opened(path) as src:
                    img = load_image(src,
                                     exif_transpose=bool(meta.get("exif_transpose", False)))
                arr = to_uint8(img, spec, meta.get("aspect", "square"))
            except Exception as err:  # noqa: BLE001 - per-item failures are data here
                out[key] = f"{type(err).__name__}: {err}"
                continue
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(arr))[None].to(device)
                (feats,) = tower.forward_outputs(norm(x).to(tower.dtype))
            out[key] = feats[0].float().cpu().numpy()
    finally:
        release_readers()  # the tar or parquet file read last stays open otherwise
    return out
