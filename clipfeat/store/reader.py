"""`FeatureStore`: features read back by image key, one ``pread`` per row."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfeat.errors import ConfigError, StoreError
from clipfeat.store.attrs import STORE_DTYPES
from clipfeat.store.checksum import USERBLOCK, parse_userblock
from clipfeat.store.index import DictIndex, load_index, read_layout
from clipfeat.store.keys import key_str
from clipfeat.store.layout import FAILURES
from clipfeat.store.manifest import read_manifest
from clipfeat.store.outputs import config_output, entry_attrs
from clipfeat.store.shard import ShardInfo, open_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Output:
    """One output of a store: its name, feature dataset in every shard, row shape, and
    metadata (the run's config with the output's own attributes)."""

    name: str
    dataset: str
    shape: tuple[int, int]
    meta: dict


class FeatureStore:
    """Read features back by image key: ``store[key] -> torch.Tensor (tokens, hidden)``.

    Lookup goes through the key index written at the end of a run (memory-mapped, shared
    between DataLoader workers); without a usable index every shard's keys are read once.
    Each row is one uncompressed HDF5 chunk whose file offset the index records, so a read
    is a single ``pread`` on a plain read-only file descriptor: no HDF5 handle stays open
    (no file locking, nothing to break across fork, no clash with other ``h5py.File``
    handles on the same shard). Shards are checked against manifest.json (size and
    checksum) when first opened. Shards HDF5 was asked to lay out differently (filters,
    other chunking) are read through h5py (``locking=False``) instead.

    A store made with several outputs (layers, towers: ``store.outputs`` lists their names)
    is read one of two ways. ``FeatureStore(out, output=NAME)`` (or ``store.select(NAME)``)
    reads that output alone, exactly like a one-output store: ``store[key]`` a tensor,
    ``shape``/``meta`` its own. Without ``output=``, ``store[key]`` and ``get_many`` give a
    dict name -> tensor of every output, one ``pread`` per row per output (a fused-backbone
    loader wants them all at once); ``shape`` then raises StoreError (rows of different
    outputs have different shapes, and a dict would only fail later, far from the cause:
    see ``shapes``), while ``dtype`` (one store dtype for all) and ``meta`` (the run's
    settings) still answer. ``output_meta(name)`` describes any output.

    Picklable, so it can be (or be held by) the dataset of a ``torch.utils.data.DataLoader``
    with workers (fork or spawn); files are re-opened in each process. An int index
    ``store[i]`` reads the i-th row in store order (``store.keys()[i]``).
    """

    def __init__(self, out_dir: str | os.PathLike, output: str | None = None, *,
                 max_open_files: int = 128) -> None:
        import numpy as np

        self.path = Path(out_dir)
        if not self.path.is_dir():
            raise StoreError(f"{self.path}: not a folder; pass the OUT folder of clipfeat extract")
        if isinstance(max_open_files, bool) or not isinstance(max_open_files, int) or (
                max_open_files < 1):
            raise ConfigError(f"max_open_files={max_open_files!r} must be an int >= 1")
        self.manifest = read_manifest(self.path)
        self.config: dict = dict(self.manifest.get("config") or {})
        self.complete: bool = bool(self.manifest.get("complete"))
        self.shards: list[ShardInfo] = sorted(
            (ShardInfo.from_manifest(e) for e in self.manifest["shards"]),
            key=lambda s: s.shard_id,
        )
        missing = [s.file for s in self.shards if not (self.path / s.file).is_file()]
        if missing:
            raise StoreError(
                f"{self.path}: shard {missing[0]} listed in manifest.json is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; rerun the extract command to redo it"
            )
        entries = self.manifest.get("outputs") or [config_output(self.config)]
        self.outputs: list[str] = [e["name"] for e in entries]
        if output is not None and output not in self.outputs:
            raise ConfigError(_unknown_output(output, self.outputs, self.path))
        if not self.complete:
            log.warning("%s: store is incomplete (the run is still going or was stopped); "
                        "reading the %d finished shards", self.path, len(self.shards))
        self._starts = np.zeros(len(self.shards) + 1, dtype=np.int64)
        self._starts[1:] = np.cumsum(np.asarray([s.num_rows for s in self.shards],
                                                dtype=np.int64))
        self._n = int(self._starts[-1])
        self.max_open_files = max_open_files
        self._datasets = [e["dataset"] for e in entries]
        self._index = None
        self._index_kind = None
        self._layouts: dict[int, Any] = {}  # shard number -> row offsets, or None (h5py)
        self._failures: dict[str, str] | None = None  # failures.jsonl, read on the first miss
        self._init_process_state()
        self._ensure_index()
        self._dtype = self._detect_dtype()
        self._outs = [_Output(e["name"], e["dataset"], self._detect_shape(e, j),
                              self._output_meta(e)) for j, e in enumerate(entries)]
        self._select(output)

    def _output_meta(self, entry: dict) -> dict:
        if len(self._datasets) == 1:  # one output: its attributes are the config's
            return dict(self.config)
        return {**self.config, **entry_attrs(entry), "output": entry["name"]}

    def _select(self, output: str | None) -> None:
        """Read ``output`` alone (None: the one output, or every output as a dict)."""
        if output is None and len(self._outs) == 1:
            output = self._outs[0].name
        self.output: str | None = output
        self._sel = [self.outputs.index(output)] if output is not None else \
            list(range(len(self._outs)))
        self.meta: dict = dict(self._outs[self._sel[0]].meta) if output is not None \
            else dict(self.config)

    def select(self, output: str) -> FeatureStore:
        """This store reading ``output`` alone (as ``FeatureStore(out, output=output)``,
        without reading the manifest and index again). ConfigError for an unknown name."""
        if output not in self.outputs:
            raise ConfigError(_unknown_output(output, self.outputs, self.path))
        clone = FeatureStore.__new__(FeatureStore)
        clone.__dict__.update({k: v for k, v in self.__dict__.items()
                               if k not in _PROCESS_STATE})
        clone._layouts = dict(self._layouts)
        clone._init_process_state()
        clone._select(output)
        return clone

    # -- process-local state

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._handles: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in _PROCESS_STATE:
            state.pop(name, None)
        state["_failures"] = None  # re-read on a miss, not copied to every worker
        if self._index_kind == "array":
            state["_index"] = None  # memory maps are re-opened, not copied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def _check_process(self) -> None:
        """After fork, never use the parent's descriptors or HDF5 handles."""
        if self._pid != os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)  # the child's copy; the parent's stays open
                except OSError:
                    pass
            self._fds = OrderedDict()
            self._handles = OrderedDict()  # dropped, not closed: HDF5 state is the parent's
            self._pid = os.getpid()

    def _ensure_index(self):
        if self._index is not None:
            return self._index
        # A process that re-opens an index already checked (a DataLoader worker) trusts it.
        idx = load_index(self.path, self.shards, check=self._index_kind != "array",
                         datasets=self._datasets)
        if idx is not None:
            self._index, self._index_kind = idx, "array"
            return idx
        if self._index_kind == "array":  # the index vanished after it was first used
            log.warning("%s: key index no longer readable", self.path)
        if self.complete:
            log.warning("%s: no usable key index; reading the keys of all %d shards",
                        self.path, len(self.shards))
        key_list: list[str] = []
        for i, s in enumerate(self.shards):
            raw, offsets = read_layout(self.path / s.file, self._datasets)
            if len(raw) != s.num_rows:
                raise StoreError(
                    f"{self.path / s.file}: {len(raw)} keys but the manifest says "
                    f"{s.num_rows} rows; run clipfeat verify"
                )
            key_list.extend(key_str(r) for r in raw)
            self._layouts[i] = offsets
        self._index, self._index_kind = DictIndex(key_list), "scan"
        return self._index

    def _first_shard_dataset(self, dataset: str) -> tuple[int, int, str]:
        """(tokens, hidden, dtype name) of ``dataset`` in the first shard."""
        with open_shard(self.path / self.shards[0].file) as f:
            ds = f[dataset]
            return int(ds.shape[1]), int(ds.shape[2]), ds.dtype.name

    def _detect_dtype(self):
        import numpy as np

        name = self.config.get("store_dtype")
        if name not in STORE_DTYPES and self.shards:
            name = self._first_shard_dataset(self._datasets[0])[2]
        return np.dtype(STORE_DTYPES.get(name, name or "<f2"))

    def _detect_shape(self, entry: dict, j: int) -> tuple[int, int]:
        src = self.config if len(self._datasets) == 1 else entry
        t, h = src.get("tokens"), src.get("hidden_size")
        if (t is None or h is None) and self.shards:
            t, h, _ = self._first_shard_dataset(self._datasets[j])
        if t is None or h is None:
            raise StoreError(f"{self.path}: empty store without tokens/hidden_size in config")
        return int(t), int(h)

    # -- file access

    def _fd(self, idx: int) -> int:
        """A read-only descriptor of shard number ``idx``, checked against the manifest."""
        fd = self._fds.get(idx)
        if fd is not None:
            self._fds.move_to_end(idx)
            return fd
        info = self.shards[idx]
        path = self.path / info.file
        try:
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            head = os.pread(fd, USERBLOCK, 0)
        except OSError as err:
            raise StoreError(f"{path}: cannot open ({err.strerror}); run clipfeat verify") from err
        recorded = parse_userblock(head)
        if (info.bytes and size != info.bytes) or (
                info.checksum and (recorded is None or recorded[0] != info.checksum)):
            os.close(fd)
            raise StoreError(f"{path}: differs from the shard manifest.json lists (size or "
                             "checksum): it was changed after the run; run clipfeat verify")
        self._fds[idx] = fd
        while len(self._fds) > self.max_open_files:
            _, old = self._fds.popitem(last=False)
            try:
                os.close(old)
            except OSError:
                pass
        return fd

    def _dataset(self, idx: int, j: int):
        """The h5py dataset of output ``j`` in shard number ``idx`` (non-standard layouts)."""
        entry = self._handles.get(idx)
        path = self.path / self.shards[idx].file
        if entry is None:
            try:
                entry = (open_shard(path), {})
            except (OSError, ValueError, RuntimeError) as err:
                raise StoreError(f"{path}: cannot open ({err}); run clipfeat verify") from err
            self._handles[idx] = entry
            while len(self._handles) > self.max_open_files:
                _, (old, _) = self._handles.popitem(last=False)
                try:
                    old.close()
                except Exception:  # noqa: BLE001
                    pass
        else:
            self._handles.move_to_end(idx)
        f, datasets = entry
        if j not in datasets:
            try:
                datasets[j] = f[self._datasets[j]]
            except (OSError, KeyError, ValueError, RuntimeError) as err:
                raise StoreError(f"{path}: cannot open {self._datasets[j]} ({err}); run "
                                 "clipfeat verify") from err
        return datasets[j]

    def _row_offset(self, pos: int, idx: int, j: int) -> int | None:
        if not hasattr(os, "preadv"):  # e.g. Windows: read through h5py
            return None
        if self._index_kind == "array":
            return self._index.row_offset(pos, j)
        if idx not in self._layouts:
            self._layouts[idx] = read_layout(self.path / self.shards[idx].file,
                                             self._datasets)[1]
        offsets = self._layouts[idx]
        if offsets is None:
            return None
        row = pos - int(self._starts[idx])
        off = int(offsets[row] if offsets.ndim == 1 else offsets[row, j])
        return off if off >= 0 else None

    def _read_into(self, pos: int, dest, j: int) -> None:
        """Copy row ``pos`` (store order) of output ``j`` into the (tokens, hidden) array
        ``dest``."""
        idx = self._shard_of(pos)
        view = memoryview(dest).cast("B")
        # One lock around lookup and read: another thread may evict (close) a descriptor.
        with self._lock:
            self._check_process()
            self._ensure_index()
            offset = self._row_offset(pos, idx, j)
            if offset is None:
                dest[...] = self._dataset(idx, j)[pos - int(self._starts[idx])]
                return
            try:
                got = os.preadv(self._fd(idx), [view], offset)
            except OSError as err:
                raise StoreError(f"{self.path / self.shards[idx].file}: read failed "
                                 f"({err.strerror}); run clipfeat verify") from err
        if got != len(view):
            raise StoreError(f"{self.path / self.shards[idx].file}: short read at row "
                             f"{pos - int(self._starts[idx])} (truncated?); run clipfeat verify")

    # -- mapping API

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._ensure_index().find(key) is not None

    def keys(self) -> list[str]:
        """All keys in store order (shard id, then row)."""
        return self._ensure_index().keys()

    def key_at(self, i: int) -> str:
        """The key of row ``i`` in store order."""
        return self._ensure_index().key_at(self._position(i))

    def _position(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"row {i} out of range for a store of {self._n} rows")
        return i

    def locate(self, key: str) -> tuple[int, int]:
        """(shard id, row within that shard) of ``key``; KeyError if absent."""
        pos = self._find(key)
        idx = self._shard_of(pos)
        return self.shards[idx].shard_id, pos - int(self._starts[idx])

    def _find(self, key: str) -> int:
        if not isinstance(key, str):
            raise TypeError(f"store keys are str, not {type(key).__name__}")
        pos = self._ensure_index().find(key)
        if pos is None:
            reason = self.failure(key)
            if reason is not None:
                raise KeyError(f"{key!r} is not in the store {self.path}: its extraction "
                               f"failed ({reason}); see {self.path / FAILURES}")
            raise KeyError(
                f"{key!r} is not in the store {self.path} ({self._n} keys); keys are the "
                "exact image strings of the source (LLaVA 'image' field / path relative "
                "to the input folder)"
            )
        return pos

    def failure(self, key: str) -> str | None:
        """Why ``key`` was not extracted, as ``failures.jsonl`` records it; None if it has
        no failure record. The file is read once, on the first call."""
        if self._failures is None:
            failures: dict[str, str] = {}
            try:
                with open(self.path / FAILURES, encoding="utf-8",
                          errors="surrogateescape") as fh:
                    for line in fh:
                        try:
                            rec = json.loads(line)
                            failures[str(rec["key"])] = str(rec.get("error") or "unknown")
                        except (ValueError, KeyError, TypeError):
                            continue  # blank or damaged line: clipfeat verify reports it
            except OSError:
                pass
            self._failures = failures
        return self._failures.get(key)

    def _shard_of(self, pos: int) -> int:
        import numpy as np

        return int(np.searchsorted(self._starts, pos, side="right")) - 1

    def __getitem__(self, key: str | int):
        """Features of ``key`` (str) or of row ``key`` (int) as a (tokens, hidden) tensor;
        a dict output name -> tensor for a store of several outputs opened without
        ``output=``."""
        import numpy as np
        import torch

        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            pos = self._position(key)
        else:
            pos = self._find(key)
        rows = {}
        for j in self._sel:
            out = np.empty(self._outs[j].shape, dtype=self._dtype)
            self._read_into(pos, out, j)
            rows[self._outs[j].name] = torch.from_numpy(out)
        return rows if self.output is None else rows[self.output]

    def get(self, key: str, default: Any = None):
        """``store[key]``, or ``default`` when the key is absent."""
        try:
            return self[key]
        except KeyError:
            return default

    def get_many(self, keys: Iterable[str]):
        """Features of several keys as one (k, tokens, hidden) tensor, in the given order
        (a dict output name -> such a tensor, as for ``store[key]``)."""
        import numpy as np
        import torch

        positions = [self._find(k) for k in keys]
        order = sorted(range(len(positions)), key=positions.__getitem__)
        rows = {}
        for j in self._sel:
            out = np.empty((len(positions), *self._outs[j].shape), dtype=self._dtype)
            for dest in order:
                self._read_into(positions[dest], out[dest], j)
            rows[self._outs[j].name] = torch.from_numpy(out)
        return rows if self.output is None else rows[self.output]

    # -- description

    @property
    def shape(self) -> tuple[int, int]:
        """(tokens, hidden) of every row of the selected output. StoreError for a store of
        several outputs opened without ``output=`` (see ``shapes``)."""
        if self.output is None:
            raise StoreError(
                f"{self.path}: the store holds {len(self.outputs)} outputs of different shapes "
                f"({', '.join(self.outputs)}): open it with FeatureStore(out, output=NAME), or "
                "read store.shapes")
        return self._outs[self._sel[0]].shape

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Output name -> (tokens, hidden) of its rows, for every output."""
        return {o.name: o.shape for o in self._outs}

    @property
    def dtype(self):
        """numpy dtype of the stored features (one store dtype for every output)."""
        return self._dtype

    def output_meta(self, name: str) -> dict:
        """How output ``name`` was made: the run's settings with that output's own (model,
        layer, feature, tokens, hidden_size, preprocessing, ...). ConfigError naming the
        outputs when ``name`` is not one."""
        if name not in self.outputs:
            raise ConfigError(_unknown_output(name, self.outputs, self.path))
        return dict(self._outs[self.outputs.index(name)].meta)

    @property
    def open_files(self) -> int:
        """Shard files this process holds open (at most ``max_open_files``)."""
        return len(self._fds)

    @property
    def index_kind(self) -> str:
        """'array' when lookups use the index file, 'scan' when keys were read from shards."""
        self._ensure_index()
        return str(self._index_kind)

    def close(self) -> None:
        """Close open files (they are re-opened on the next read)."""
        with self._lock:
            fds, self._fds = self._fds, OrderedDict()
            handles, self._handles = self._handles, OrderedDict()
            mine = self._pid == os.getpid()
        if mine:
            for fd in fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            for f, _ in handles.values():
                try:
                    f.close()
                except Exception:  # noqa: BLE001
                    pass

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_pid", None) == os.getpid():
                for fd in getattr(self, "_fds", {}).values():
                    os.close(fd)
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __repr__(self) -> str:
        picked = "" if len(self.outputs) == 1 else (
            f", output={self.output!r}" if self.output is not None
            else f", outputs={len(self.outputs)}")
        return (f"FeatureStore({str(self.path)!r}{picked}, keys={self._n}, "
                f"shards={len(self.shards)}, complete={self.complete})")


#: Attributes that belong to one process (descriptors, HDF5 handles): never pickled or copied.
_PROCESS_STATE = ("_fds", "_handles", "_lock", "_pid")


def _unknown_output(name: Any, outputs: list[str], path: Path) -> str:
    return (f"output {name!r} is not in the store {path}: its outputs are "
            + ", ".join(repr(n) for n in outputs))
