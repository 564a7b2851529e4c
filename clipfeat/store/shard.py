"""Writing one shard atomically (`ShardWriter`) and reading what a finished shard holds.

A shard holds one output (dataset ``features``) or several (``features/NAME`` each, see
`clipfeat.store.outputs`), all with the same rows, one per key.

A shard is written as ``shard-NNNNNN.h5.partial`` and renamed into place after flush and
fsync; the rename is the completion mark. Each shard carries its chunk's failure records,
so one rename commits both. HDF5 writes only the metadata (through `_GuardedFile`, which
never lets an OS error reach HDF5); feature rows go to disk with ``os.pwrite`` at the file
offsets HDF5 allocated for their chunks, and are hashed as they are written (see
`checksum`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipfeat.errors import ConfigError, ExtractionError, StoreError
from clipfeat.outputs import FEATURES_DATASET, dataset_path
from clipfeat.store.attrs import (
    FLOAT16_MAX,
    FLOAT32_MAX,
    OUTPUT_ATTRS,
    OUTPUTS_ATTR,
    RESERVED_ATTRS,
    STORE_DTYPES,
    encode_attr,
    format_version,
)
from clipfeat.store.checksum import (
    USERBLOCK,
    BlockHasher,
    hash_fd,
    shard_checksum,
    userblock_bytes,
)
from clipfeat.store.h5file import (
    LIBVER,
    GuardedFile,
    RowSpace,
    create_rows_dataset,
    open_shard,
    pwrite_all,
)
from clipfeat.store.io import fsync_dir, os_error_message, unlink_quietly
from clipfeat.store.keys import json_line, key_bytes, key_str, seq_sha256
from clipfeat.store.layout import PARTIAL_SUFFIX, list_shard_files, parse_shard_id, shard_name
from clipfeat.store.outputs import OutputLayout, check_names, shard_rows

log = logging.getLogger(__name__)


@dataclass
class ShardInfo:
    """A finished shard: its id, file name, counts and size; ``failures`` are its chunk's
    failure records (empty when not loaded, e.g. when read from the manifest)."""

    shard_id: int
    file: str
    num_rows: int
    num_failures: int
    bytes: int
    failures: list[dict] = field(default_factory=list, repr=False)
    checksum: str | None = None  # of the file after its 512-byte user block (hash_fd)

    def to_manifest(self) -> dict:
        """The entry of this shard in manifest.json."""
        entry = {
            "file": self.file,
            "shard_id": self.shard_id,
            "num_rows": self.num_rows,
            "num_failures": self.num_failures,
            "bytes": self.bytes,
        }
        if self.checksum:
            entry["checksum"] = self.checksum
        return entry

    @classmethod
    def from_manifest(cls, entry: Any) -> ShardInfo:
        """A ShardInfo from a manifest.json entry (failures not loaded). ValueError naming
        what is wrong when the entry is not a well-formed shard entry."""
        if not isinstance(entry, dict):
            raise ValueError(f"shard entry {_short(entry)} is not an object")
        file = entry.get("file")
        if not isinstance(file, str) or parse_shard_id(file) is None:
            raise ValueError(f"shard entry {_short(entry)} has no shard file name 'file'")
        values = {name: _count(entry, name, required)
                  for name, required in (("shard_id", True), ("num_rows", True),
                                         ("num_failures", False), ("bytes", False))}
        if values["shard_id"] != parse_shard_id(file):
            raise ValueError(f"shard entry {_short(entry)}: shard_id does not match {file}")
        checksum = entry.get("checksum")
        if checksum is not None and not isinstance(checksum, str):
            raise ValueError(f"shard entry {_short(entry)}: checksum is not a string")
        return cls(shard_id=values["shard_id"], file=file, num_rows=values["num_rows"],
                   num_failures=values["num_failures"], bytes=values["bytes"],
                   checksum=checksum or None)


def _short(entry: Any) -> str:
    text = repr(entry)
    return text if len(text) <= 100 else text[:97] + "..."


def _count(entry: dict, name: str, required: bool) -> int:
    """``entry[name]`` as an int >= 0 (0 when absent and not ``required``); ValueError else."""
    if name not in entry:
        if required:
            raise ValueError(f"shard entry {_short(entry)} has no {name!r}")
        return 0
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"shard entry {_short(entry)}: {name}={value!r} is not a count")
    return value


# --------------------------------------------------------------------------- writer


def _as_array(features: Any):
    """numpy view of ``features`` (numpy array or torch tensor, any float dtype)."""
    import numpy as np

    if hasattr(features, "detach"):  # torch.Tensor, without importing torch here
        t = features.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(features)


def _is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _attrs_problems(attrs: Any, what: str, forbidden: Sequence[str]) -> list[str]:
    """Why ``attrs`` cannot be given as ``what``: not a dict of str keys, or setting a name
    in ``forbidden`` (set by the writer, or belonging elsewhere)."""
    if not isinstance(attrs, Mapping):
        return [f"{what} must be a dict, not {type(attrs).__name__}"]
    problems = []
    bad = [k for k in attrs if not isinstance(k, str)]
    if bad:
        problems.append(f"{what} keys must be str, got {bad[:3]!r}")
    taken = [k for k in forbidden if k in attrs]
    if taken:
        problems.append(f"{what} may not set {taken}")
    return problems


def _disagree(attrs: Mapping[str, Any], what: str, values: Sequence[tuple[str, Any]]
              ) -> list[str]:
    return [f"{what}[{name!r}]={attrs[name]!r} disagrees with {val!r}"
            for name, val in values if name in attrs and attrs[name] != val]


@dataclass(frozen=True)
class _Plan:
    """What `ShardWriter` writes besides the rows: the outputs, the root attributes, and
    each output dataset's own attributes (empty for one output: they are the root's)."""

    outputs: tuple[OutputLayout, ...]
    root_attrs: dict[str, Any]
    dataset_attrs: tuple[dict[str, Any], ...]


def _layouts(tokens: Any, hidden: Any, outputs: Any
             ) -> tuple[tuple[OutputLayout, ...], list[str]]:
    """The outputs a writer is asked for (``tokens``/``hidden``: one output), and the
    problems with them."""
    if outputs is None:
        return (OutputLayout(FEATURES_DATASET, tokens, hidden),), [
            f"{name}={val!r} must be an int >= 1"
            for name, val in (("tokens", tokens), ("hidden", hidden)) if not _is_count(val)]
    problems = []
    if tokens is not None or hidden is not None:
        problems.append("pass tokens= and hidden=, or outputs=, not both")
    if isinstance(outputs, (str, bytes, Mapping)) or not isinstance(outputs, Sequence) \
            or not outputs:
        return (), problems + ["outputs must be a non-empty list of OutputLayout"]
    for o in outputs:
        if not isinstance(o, OutputLayout):
            problems.append(f"outputs item {o!r} is not an OutputLayout")
            continue
        problems += [f"output {o.name!r}: {name}={val!r} must be an int >= 1"
                     for name, val in (("tokens", o.tokens), ("hidden", o.hidden))
                     if not _is_count(val)]
        problems += _attrs_problems(o.attrs, f"output {o.name!r} attrs",
                                    RESERVED_ATTRS + (OUTPUTS_ATTR,))
    if not problems:
        clash = check_names([o.name for o in outputs])
        problems += [clash] if clash else []
    return tuple(outputs), problems


def _plan(tokens: Any, hidden: Any, outputs: Any, store_dtype: Any, attrs: Any
          ) -> tuple[_Plan | None, list[str]]:
    """The writer's `_Plan` from its arguments, or None and the problems with them."""
    layouts, problems = _layouts(tokens, hidden, outputs)
    if store_dtype not in STORE_DTYPES:
        problems.append(f"store_dtype={store_dtype!r} must be one of {sorted(STORE_DTYPES)}")
    problems += _attrs_problems(attrs, "attrs", RESERVED_ATTRS + (OUTPUTS_ATTR,))
    if len(layouts) > 1 and isinstance(attrs, Mapping):
        own = [k for k in OUTPUT_ATTRS if k in attrs]
        if own:
            problems.append(f"attrs may not set {own} with several outputs: attrs are the "
                            "run's, each output's own go in its OutputLayout.attrs")
    if problems:
        return None, problems
    plan = _several_plan if len(layouts) > 1 else _one_plan
    return plan(layouts, store_dtype, attrs)


def _several_plan(layouts: tuple[OutputLayout, ...], store_dtype: str, attrs: Mapping
                  ) -> tuple[_Plan | None, list[str]]:
    """Root attributes: the run's, ``store_dtype`` and the output names; each dataset's:
    its output's, with ``tokens``, ``hidden_size`` and ``output`` (its name)."""
    root = {k: encode_attr(v) for k, v in attrs.items()}
    root["store_dtype"] = store_dtype
    root[OUTPUTS_ATTR] = json.dumps([o.name for o in layouts])
    problems: list[str] = []
    per = []
    for o in layouts:
        problems += _disagree(o.attrs, f"output {o.name!r} attrs",
                              (("tokens", o.tokens), ("hidden_size", o.hidden),
                               ("output", o.name), ("store_dtype", store_dtype)))
        own = {k: encode_attr(v) for k, v in o.attrs.items()}
        own.update(tokens=o.tokens, hidden_size=o.hidden, output=o.name)
        per.append(own)
    return (None if problems else _Plan(layouts, root, tuple(per))), problems


def _one_plan(layouts: tuple[OutputLayout, ...], store_dtype: str, attrs: Mapping
              ) -> tuple[_Plan | None, list[str]]:
    """Today's file: the run's then the output's attributes, with ``tokens``,
    ``hidden_size`` and ``store_dtype``, all at the root."""
    one = layouts[0]
    merged = dict(attrs)
    problems = [f"attrs[{k!r}]={merged[k]!r} disagrees with output {one.name!r} attrs ({v!r})"
                for k, v in one.attrs.items() if k in merged and merged[k] != v]
    merged.update(one.attrs)
    problems += _disagree(merged, "attrs", (("tokens", one.tokens), ("hidden_size", one.hidden),
                                            ("store_dtype", store_dtype)))
    root = {k: encode_attr(v) for k, v in merged.items()}
    root.update(tokens=one.tokens, hidden_size=one.hidden, store_dtype=store_dtype)
    return (None if problems else _Plan(layouts, root, ({},))), problems


class _Rows:
    """One output's dataset in a shard being written, and where its rows lie."""

    def __init__(self, layout: OutputLayout, ds: Any, row_bytes: int, label: str) -> None:
        self.layout = layout
        self.ds = ds
        self.space = RowSpace(ds, row_bytes)
        self.label = label  # "" for one output, " of output NAME" for several


class ShardWriter:
    """Writes one shard atomically. Keyword-only, use as a context manager::

        with ShardWriter(out, 3, tokens=576, hidden=1024, store_dtype="float16",
                         attrs=attrs, expected_rows=1000) as w:
            w.append(keys, feats)        # (b, tokens, hidden)
            w.add_failures(records)
            info = w.commit()

    or, for several outputs (layers, towers) of the same images, each its own dataset
    ``features/NAME`` with its own attributes (``attrs`` are then the run's)::

        with ShardWriter(out, 3, outputs=[OutputLayout(name_a, 576, 1024, attrs_a),
                                          OutputLayout(name_b, 729, 1152, attrs_b)],
                         store_dtype="float16", attrs=run_attrs) as w:
            w.append(keys, [feats_a, feats_b])   # one array per output, in order

    One `OutputLayout` writes exactly the file of ``tokens=/hidden=`` (dataset
    ``features``; ``attrs`` then its ``attrs``, in that order, are the root attributes).
    Leaving the block without ``commit()`` (or with an exception) discards the shard.
    Rows go straight to disk (memory is bounded by one batch); only keys stay in memory.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_id: int,
        *,
        tokens: int | None = None,
        hidden: int | None = None,
        outputs: Sequence[OutputLayout] | None = None,
        store_dtype: str,
        attrs: dict,
        expected_rows: int | None = None,
    ) -> None:
        problems = []
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or shard_id < 0:
            problems.append(f"shard_id={shard_id!r} must be an int >= 0")
        plan, found = _plan(tokens, hidden, outputs, store_dtype, attrs)
        problems += found
        if expected_rows is not None and (
            isinstance(expected_rows, bool) or not isinstance(expected_rows, int)
            or expected_rows < 0
        ):
            problems.append(f"expected_rows={expected_rows!r} must be None or an int >= 0")
        if problems or plan is None:
            raise ConfigError("ShardWriter: " + "; ".join(problems))
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output {out} exists and is not a folder: choose another path")

        self._plan = plan
        self.outputs: tuple[OutputLayout, ...] = plan.outputs
        self.out_dir = out
        self.shard_id = shard_id
        one = plan.outputs[0] if len(plan.outputs) == 1 else None
        self.tokens = one.tokens if one else None  # of the one output (None for several)
        self.hidden = one.hidden if one else None
        self.store_dtype = store_dtype
        self.final_path = out / shard_name(shard_id)
        self.partial_path = out / (shard_name(shard_id) + PARTIAL_SUFFIX)
        self._limit = FLOAT16_MAX if store_dtype == "float16" else FLOAT32_MAX
        self._rows = 0
        self._keys: list[str] = []
        self._seen: set[str] = set()
        self._failures: list[dict] = []
        self._raw: GuardedFile | None = None
        self._file = None
        self._outs: list[_Rows] = []
        self._hasher: BlockHasher | None = None  # digests blocks of rows as they are written
        self._state = "open"
        self.expected_rows = expected_rows  # a hint; chunks are allocated as rows come
        self._create()

    # -- lifecycle

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._state in ("open", "sealed"):
            if exc_type is None:
                log.warning("%s: left without commit(); discarding it", self.partial_path)
            self.abort()
        return False

    def _create(self) -> None:
        import h5py

        itemsize = 2 if self.store_dtype == "float16" else 4
        n = len(self.outputs)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._raw = GuardedFile(self.partial_path)
            self._file = h5py.File(self._raw, "w", libver=LIBVER, userblock_size=USERBLOCK)
            for o in self.outputs:
                ds = create_rows_dataset(self._file, dataset_path(o.name, n), o.tokens,
                                         o.hidden, STORE_DTYPES[self.store_dtype])
                self._outs.append(_Rows(o, ds, o.tokens * o.hidden * itemsize,
                                        f" of output {o.name!r}" if n > 1 else ""))
            self._hasher = BlockHasher()
        except OSError as err:
            self._fail(err)
        self._check_io()

    def _fail(self, err: BaseException) -> None:
        """Discard the partial file and raise ExtractionError naming the cause."""
        cause = (self._raw.error if self._raw is not None else None) or err
        self.abort()
        raise ExtractionError(os_error_message(cause, self.partial_path)) from err

    def _check_io(self) -> None:
        """Raise (after cleaning up) if a write under HDF5 failed since the last check."""
        if self._raw is not None and self._raw.error is not None:
            self._fail(self._raw.error)

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreError(f"{self.partial_path}: shard writer already {self._state}")

    # -- data

    @property
    def num_rows(self) -> int:
        """Rows appended so far."""
        return self._rows

    def append(self, keys: list[str], features: Any, *, checked: bool = False) -> None:
        """Append rows: ``keys[i]`` names ``features[i]`` (shape (tokens, hidden)); with
        several outputs ``features`` is a sequence of such arrays, one per output in order,
        each with one row per key.

        Values are converted to the store dtype; a non-finite value, or one outside the
        float16 range when storing float16, raises ExtractionError naming the key (and
        output). ``checked=True`` skips that scan when the caller already checked these very
        values (features already in the store dtype, e.g. checked on the GPU before the cast).
        Nothing is written unless every output's rows are sound.
        """
        import numpy as np

        self._check_open()
        arrays = self._arrays(features)
        keys = list(keys)
        for rows, arr in zip(self._outs, arrays, strict=True):
            self._check_batch(rows, arr, len(keys))
        for k in keys:
            if not isinstance(k, str):
                raise ConfigError(f"{self.partial_path}: key {k!r} is not a str")
            if k in self._seen:
                raise ConfigError(f"{self.partial_path}: key {k!r} appended twice")
        if not keys:
            return
        target = np.dtype(STORE_DTYPES[self.store_dtype])
        data = [np.ascontiguousarray(arr) if checked and arr.dtype == target
                else self._convert_checked(arr, keys, rows.label)
                for rows, arr in zip(self._outs, arrays, strict=True)]
        try:
            for rows, d in zip(self._outs, data, strict=True):
                self._write_rows(rows, d)
        except OSError as err:
            self._fail(err)
        self._check_io()
        self._rows += len(keys)
        self._keys.extend(keys)
        self._seen.update(keys)

    def _arrays(self, features: Any) -> list[Any]:
        """``features`` as one numpy array per output (ConfigError when not that)."""
        if len(self._outs) == 1:
            return [_as_array(features)]
        names = ", ".join(o.name for o in self.outputs)
        if isinstance(features, (str, bytes, Mapping)) or not isinstance(features, Sequence):
            raise ConfigError(
                f"{self.partial_path}: features must be a sequence of {len(self._outs)} arrays, "
                f"one per output ({names}), not {type(features).__name__}")
        if len(features) != len(self._outs):
            raise ConfigError(
                f"{self.partial_path}: {len(features)} feature arrays for "
                f"{len(self._outs)} outputs ({names})")
        return [_as_array(f) for f in features]

    def _check_batch(self, rows: _Rows, arr: Any, nkeys: int) -> None:
        """ConfigError unless ``arr`` is (nkeys, tokens, hidden) floats of ``rows``' output."""
        o = rows.layout
        if arr.ndim != 3 or arr.shape[1:] != (o.tokens, o.hidden):
            raise ConfigError(
                f"{self.partial_path}: features{rows.label} have shape {tuple(arr.shape)}, "
                f"expected (batch, {o.tokens}, {o.hidden})"
            )
        if nkeys != arr.shape[0]:
            raise ConfigError(
                f"{self.partial_path}: {nkeys} keys for {arr.shape[0]} feature rows{rows.label}"
            )
        if arr.dtype.kind != "f":
            raise ConfigError(
                f"{self.partial_path}: features{rows.label} have dtype {arr.dtype}, expected "
                "floats"
            )

    def _write_rows(self, rows: _Rows, data) -> None:
        """Put ``data`` (b rows, store dtype, C order) after the rows written so far."""
        start = self._rows
        runs = rows.space.grow(len(data))
        if not rows.space.direct:  # old HDF5: through h5py (and so through GuardedFile)
            rows.ds[start:start + len(data)] = data
            return
        fd = self._raw.fileno()
        for i, off, n in runs:
            view = memoryview(data[i:i + n]).cast("B")
            pwrite_all(fd, view, off)
            self._hasher.feed(off, view)

    def _convert_checked(self, arr, keys: list[str], label: str = ""):
        """``arr`` in the store dtype, after checking every value fits (fast path: one
        min/max pass; on failure find the first bad row to name its key)."""
        import numpy as np
        import torch

        target = np.dtype(STORE_DTYPES[self.store_dtype])
        t = torch.from_numpy(np.ascontiguousarray(arr))
        lo, hi = (float(v) for v in t.aminmax())
        if lo >= -self._limit and hi <= self._limit:  # False for NaN
            if arr.dtype == target:
                return np.ascontiguousarray(arr)
            torch_dtype = torch.float16 if self.store_dtype == "float16" else torch.float32
            return t.to(torch_dtype).numpy().astype(target, copy=False)
        flat = t.reshape(t.shape[0], -1).double()
        finite = torch.isfinite(flat).all(dim=1)
        absmax = flat.abs().nan_to_num(0.0, posinf=0.0).amax(dim=1)
        where = label.replace(" of ", " (") + ")" if label else ""
        for i, key in enumerate(keys):
            if not bool(finite[i]):
                raise ExtractionError(
                    f"non-finite feature values (NaN/Inf) for key {key!r}{where} in "
                    f"{self.partial_path}: the tower overflowed its compute dtype; rerun "
                    "with --dtype float32 --store-dtype float32"
                )
            if float(absmax[i]) > self._limit:
                raise ExtractionError(
                    f"feature value {float(absmax[i]):.6g} for key {key!r}{where} exceeds the "
                    f"{self.store_dtype} range (max {self._limit:.6g}) in "
                    f"{self.partial_path}: rerun with --store-dtype float32"
                )
        raise ExtractionError(  # pragma: no cover - min/max and the row scan disagree
            f"feature values out of range in {self.partial_path}: rerun with "
            "--store-dtype float32"
        )

    def add_failures(self, records: list[dict]) -> None:
        """Record inputs of this chunk that could not be used (dicts with at least
        ``key``, ``path``, ``error``); they are committed with the shard."""
        self._check_open()
        for rec in records:
            if not isinstance(rec, dict) or not all(k in rec for k in ("key", "path", "error")):
                raise ConfigError(
                    f"{self.partial_path}: failure record {rec!r} needs 'key', 'path', 'error'"
                )
            self._failures.append(dict(rec))

    def seal(self) -> None:
        """First half of `commit`: write keys, failures and attributes and close the HDF5
        file. The shard is still a ``.partial``; `commit` finishes it. Splitting the two lets
        a caller keep appending to the next shard while this one is checksummed and synced.
        """
        import h5py
        import numpy as np

        self._check_open()
        keys_raw = [key_bytes(k) for k in self._keys]
        fail_raw = [json_line(r).encode("utf-8") for r in self._failures]
        str_dt = h5py.string_dtype("utf-8")
        try:
            f = self._file
            for rows in self._outs:
                rows.space.check()
            keys_arr = np.empty(len(keys_raw), dtype=object)
            keys_arr[:] = keys_raw
            f.create_dataset("keys", data=keys_arr, dtype=str_dt, track_times=False)
            fail_arr = np.empty(len(fail_raw), dtype=object)
            fail_arr[:] = fail_raw
            f.create_dataset("failures", data=fail_arr, dtype=str_dt, track_times=False)
            for rows, own in zip(self._outs, self._plan.dataset_attrs, strict=True):
                for k, v in own.items():
                    rows.ds.attrs[k] = v
            attrs = dict(self._plan.root_attrs)
            attrs.update(
                shard_id=self.shard_id,
                num_rows=self._rows,
                num_failures=len(self._failures),
                format_version=format_version(len(self._outs)),
                keys_sha256=seq_sha256(keys_raw),
                failures_sha256=seq_sha256(fail_raw),
            )
            for k, v in attrs.items():
                f.attrs[k] = v
            f.flush()
            self._check_io()
            f.close()
            self._file = None
            self._outs = []
            self._check_io()
        except OSError as err:
            self._fail(err)
        self._state = "sealed"

    def commit(self) -> ShardInfo:
        """Write keys, failures and attributes, checksum, fsync, and rename into place."""
        if self._state == "open":
            self.seal()
        if self._state != "sealed":
            raise StoreError(f"{self.partial_path}: shard writer already {self._state}")
        try:
            digest, size = self._checksum_and_sync()
            self._raw.seek(0)
            self._raw.write(userblock_bytes(digest, size))
            self._check_io()
            self._raw.fsync()
            self._raw.close()
            self._raw = None
            os.replace(self.partial_path, self.final_path)
        except OSError as err:
            self._fail(err)
        self._state = "committed"
        try:
            fsync_dir(self.out_dir)
        except OSError as err:  # the shard itself is complete and synced
            raise ExtractionError(os_error_message(err, self.out_dir, "syncing")) from err
        return ShardInfo(
            shard_id=self.shard_id,
            file=self.final_path.name,
            num_rows=self._rows,
            num_failures=len(self._failures),
            bytes=size,
            failures=list(self._failures),
            checksum=digest,
        )

    def _checksum_and_sync(self) -> tuple[str, int]:
        """The file's checksum and size; its bytes are flushed to disk meanwhile (the user
        block written after this needs one more, short, fsync)."""
        import threading

        fd = self._raw.fileno()
        failed: list[OSError] = []

        def sync() -> None:
            try:
                os.fsync(fd)
            except OSError as err:
                failed.append(err)

        syncing = threading.Thread(target=sync, name="clipfeat-fsync", daemon=True)
        syncing.start()
        try:
            known = self._hasher.digests if self._hasher is not None else {}
            result = hash_fd(fd, USERBLOCK, known=known)
        finally:
            syncing.join()
        if failed:
            raise failed[0]
        return result

    def abort(self) -> None:
        """Close and remove the partial file. Never raises."""
        if self._state == "committed":
            return
        self._state = "aborted"
        f, self._file, self._outs = self._file, None, []
        raw, self._raw = self._raw, None
        if raw is not None:
            raw.discard = True  # nothing more reaches the disk; HDF5 closes cleanly
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - abort must not raise
                pass
        if raw is not None:
            try:
                raw.close()
            except OSError:
                pass
        unlink_quietly(self.partial_path)


# --------------------------------------------------------------------------- scanning


def read_shard_failures(f) -> list[dict]:
    """The failure records stored in an open shard (h5py File)."""
    if "failures" not in f:
        return []
    out = []
    for raw in f["failures"][...]:
        rec = json.loads(key_str(raw))
        if not isinstance(rec, dict):
            raise ValueError(f"failure record is not a JSON object: {rec!r}")
        out.append(rec)
    return out


def read_shard_info(path: str | os.PathLike) -> ShardInfo:
    """ShardInfo of one finished shard, failures included. StoreError if unreadable."""
    path = Path(path)
    sid = parse_shard_id(path.name)
    try:
        with open_shard(path) as f:
            n = shard_rows(f)  # every output present, with the same rows
            failures = read_shard_failures(f)
        size = os.stat(path).st_size
        recorded = shard_checksum(path)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise StoreError(
            f"{path}: cannot read this shard ({str(err).splitlines()[0] if str(err) else err!r}); "
            "delete it and rerun the same command to redo its chunk"
        ) from err
    return ShardInfo(
        shard_id=sid if sid is not None else -1,
        file=path.name,
        num_rows=n,
        num_failures=len(failures),
        bytes=size,
        failures=failures,
        checksum=recorded[0] if recorded else None,
    )


def read_shard_row(path: str | os.PathLike, row: int, dataset: str = FEATURES_DATASET
                   ) -> tuple[str, Any]:
    """(key, stored row as a numpy array) of row ``row`` of one output of a finished shard:
    its feature ``dataset`` (``features``, or ``features/NAME`` of a several-output store:
    ``clipfeat.outputs.dataset_path``). OSError/KeyError/ValueError as h5py raises them."""
    with open_shard(path) as f:
        return key_str(f["keys"][row]), f[dataset][row]


def scan_shards(out_dir: str | os.PathLike) -> dict[int, ShardInfo]:
    """Finished shards in ``out_dir`` by id, with row counts and failure records.

    A shard that cannot be opened raises StoreError naming it (delete it to redo it).
    """
    return {sid: read_shard_info(p) for sid, p in list_shard_files(out_dir).items()}
