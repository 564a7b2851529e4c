"""The key index: key -> store position and row offset, in memory-mapped numpy arrays.

Written under ``OUT/.clipfeat/index-<token>/`` at the end of a run; the header
``.clipfeat/index.json`` that points at the arrays is replaced last, so a crash leaves the
old index in place.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from clipfeat.errors import ExtractionError, StoreError
from clipfeat.outputs import FEATURES_DATASET
from clipfeat.store.attrs import format_version
from clipfeat.store.io import atomic_write_json, fsync_dir, os_error_message, read_json, remove_tree
from clipfeat.store.keys import key_bytes, key_hash, key_str
from clipfeat.store.layout import INDEX_FILE, INDEX_FORMAT, META_DIR
from clipfeat.store.shard import ShardInfo, open_shard

log = logging.getLogger(__name__)


def row_offsets(ds):
    """File offsets of each row of ``ds`` when every row is one unfiltered, allocated chunk
    in a little-endian float16/float32 dataset (how ShardWriter writes); else None. Rows
    can then be read with one ``pread`` each, without HDF5."""
    import numpy as np

    if ds.ndim != 3 or ds.dtype.str not in ("<f2", "<f4"):
        return None
    n, t, h = (int(v) for v in ds.shape)
    if ds.chunks != (1, t, h) or ds.id.get_create_plist().get_nfilters() != 0:
        return None
    nbytes = t * h * ds.dtype.itemsize
    offsets = np.full(n, -1, dtype=np.int64)
    bad: list[Any] = []

    def visit(info) -> None:
        row = int(info.chunk_offset[0])
        addr = info.byte_offset
        if (info.size != nbytes or info.filter_mask or addr is None or not 0 <= row < n
                or addr >= 2**63):
            bad.append(info)
        else:
            offsets[row] = addr

    try:
        ds.id.chunk_iter(visit)
    except AttributeError:  # HDF5 < 1.14: one call per chunk
        try:
            for i in range(ds.id.get_num_chunks()):
                visit(ds.id.get_chunk_info(i))
        except AttributeError:  # HDF5 < 1.10.5: no chunk queries at all
            return None
    if bad or (n and int(offsets.min()) < 0):
        return None
    return offsets


def read_layout(path: Path, datasets: Sequence[str] | None = None) -> tuple[list[bytes], Any]:
    """(raw keys, raw row offsets) of one finished shard: offsets of ``datasets`` (default
    its one ``features``) as an (n,) array for one dataset, (n, k) for k, -1 where a row
    must be read through h5py; None instead of the (n,) array for one such dataset."""
    import numpy as np

    paths = list(datasets or [FEATURES_DATASET])
    try:
        with open_shard(path) as f:
            keys = [r if isinstance(r, bytes) else key_bytes(r) for r in f["keys"][...]]
            found = [row_offsets(f[p]) for p in paths]
            for p in paths:
                if int(f[p].shape[0]) != len(keys):
                    raise ValueError(f"{p} has {f[p].shape[0]} rows for {len(keys)} keys")
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise StoreError(
            f"{path}: cannot read its keys ({str(err).splitlines()[0] if str(err) else err!r});"
            " run clipfeat verify"
        ) from err
    if len(paths) == 1:
        return keys, found[0]
    offsets = np.full((len(keys), len(paths)), -1, dtype=np.int64)
    for j, offs in enumerate(found):
        if offs is not None:
            offsets[:, j] = offs
    return keys, offsets


def _as_rows(offs: Any, n: int, k: int):
    """``read_layout``'s offsets as the index stores them: (n,) for one dataset, (n, k)."""
    import numpy as np

    if offs is None:
        return np.full((n,) if k == 1 else (n, k), -1, np.int64)
    return offs


def index_shards(shards: Iterable[ShardInfo]) -> list[list]:
    """What an index is made for: [[shard id, rows, checksum or None], ...] by id."""
    return [[s.shard_id, s.num_rows, s.checksum]
            for s in sorted(shards, key=lambda s: s.shard_id)]


def write_index(out_dir: str | os.PathLike, shards: Iterable[ShardInfo],
                datasets: Sequence[str] | None = None) -> None:
    """Write the key index of ``shards`` (in store order) under OUT/.clipfeat/.

    Arrays (``np.save``, no pickle) go to a fresh ``index-<token>/`` folder: sorted 64-bit
    key hashes with their store positions, the keys themselves (one UTF-8 blob + offsets)
    and each row's byte offset in its shard: an (n,) array for a store of one output,
    (n, k) for the feature ``datasets`` of k outputs (in that order). The header
    ``index.json`` that points at them is replaced last, so a crash leaves the old index
    in place.
    """
    import numpy as np

    paths = list(datasets or [FEATURES_DATASET])
    out = Path(out_dir)
    meta_dir = out / META_DIR
    ordered = sorted(shards, key=lambda s: s.shard_id)
    lengths: list[int] = []
    hashes: list[int] = []
    blobs: list[bytes] = []
    row_offsets = []
    for info in ordered:
        raw, offs = read_layout(out / info.file, paths)
        if len(raw) != info.num_rows:
            raise StoreError(
                f"{out / info.file}: {len(raw)} keys but {info.num_rows} rows expected"
            )
        blobs.extend(raw)
        lengths.extend(len(r) for r in raw)
        hashes.extend(key_hash(r) for r in raw)
        row_offsets.append(_as_rows(offs, len(raw), len(paths)))
    n = len(blobs)
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.asarray(lengths, dtype=np.int64))
    hash_arr = np.asarray(hashes, dtype=np.uint64)
    order = np.argsort(hash_arr, kind="stable")
    arrays = {
        "hashes": hash_arr[order],
        "positions": order.astype(np.int64),
        "offsets": offsets,
        "blob": np.frombuffer(b"".join(blobs), dtype=np.uint8),
        "rows": (np.concatenate(row_offsets) if row_offsets else _as_rows(None, 0, len(paths))),
    }
    idx_dir = meta_dir / f"index-{uuid.uuid4().hex[:12]}"
    checksums: dict[str, str] = {}
    try:
        idx_dir.mkdir(parents=True, exist_ok=False)
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            data = buf.getbuffer()
            checksums[name] = _digest_bytes([data])
            with open(idx_dir / f"{name}.npy", "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        fsync_dir(idx_dir)
        fsync_dir(meta_dir)
    except OSError as err:
        remove_tree(idx_dir)
        raise ExtractionError(os_error_message(err, idx_dir)) from err
    header = {
        "format": INDEX_FORMAT,
        "format_version": format_version(len(paths)),
        "dir": idx_dir.name,
        "num_keys": n,
        "hash": "blake2b-64-le",
        "shards": index_shards(ordered),
        "checksums": checksums,
    }
    if len(paths) > 1:  # an index of one output reads as before: no new field
        header["datasets"] = paths
    atomic_write_json(meta_dir / INDEX_FILE, header)
    for entry in os.scandir(meta_dir):
        if entry.name.startswith("index-") and entry.name != idx_dir.name and entry.is_dir():
            remove_tree(Path(entry.path))


class ArrayIndex:
    """Key -> store position through memory-mapped arrays (sorted 64-bit key hashes)."""

    def __init__(self, folder: Path, num_keys: int, num_datasets: int = 1) -> None:
        import numpy as np

        def load(name: str):
            return np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)

        self.hashes = load("hashes")
        self.positions = load("positions")
        self.offsets = load("offsets")
        self.blob = load("blob")
        self.rows = load("rows")
        if not (
            len(self.hashes) == len(self.positions) == len(self.rows) == num_keys
            and self.rows.shape[1:] == (() if num_datasets == 1 else (num_datasets,))
            and len(self.offsets) == num_keys + 1
            and (num_keys == 0 or int(self.offsets[-1]) == len(self.blob))
        ):
            raise ValueError("index arrays disagree with the header")
        self.n = num_keys
        self.folder = folder

    def key_at(self, pos: int) -> str:
        return key_str(bytes(self.blob[int(self.offsets[pos]):int(self.offsets[pos + 1])]))

    def find(self, key: str) -> int | None:
        import numpy as np

        raw = key_bytes(key)
        h = np.uint64(key_hash(raw))
        i = int(np.searchsorted(self.hashes, h, side="left"))
        while i < self.n and self.hashes[i] == h:
            pos = int(self.positions[i])
            if bytes(self.blob[int(self.offsets[pos]):int(self.offsets[pos + 1])]) == raw:
                return pos
            i += 1
        return None

    def keys(self) -> list[str]:
        blob = bytes(self.blob)
        off = self.offsets.tolist()
        return [key_str(blob[off[i]:off[i + 1]]) for i in range(self.n)]

    def row_offset(self, pos: int, dataset: int = 0) -> int | None:
        """Where row ``pos`` of the ``dataset``-th feature dataset lies in its shard (None:
        read it through h5py)."""
        off = int(self.rows[pos] if self.rows.ndim == 1 else self.rows[pos, dataset])
        return off if off >= 0 else None


class DictIndex:
    """Key -> store position built by reading every shard's keys (fallback)."""

    def __init__(self, key_list: list[str]) -> None:
        self._keys = key_list
        self._pos: dict[str, int] = {}
        for i, k in enumerate(key_list):
            self._pos.setdefault(k, i)
        self.n = len(key_list)

    def key_at(self, pos: int) -> str:
        return self._keys[pos]

    def find(self, key: str) -> int | None:
        return self._pos.get(key)

    def keys(self) -> list[str]:
        return list(self._keys)

    def row_offset(self, pos: int, dataset: int = 0) -> int | None:
        return None  # unknown: FeatureStore reads the shard's layout on first use


INDEX_ARRAYS = ("hashes", "positions", "offsets", "blob", "rows")
INDEX_FIX = "rerun clipfeat extract (same command) to rebuild it, or delete it"


class IndexDamaged(StoreError):
    """The key index exists and was made for these shards, but its files are damaged."""


class _Stale(Exception):
    """The key index was made for another set of shards (or is from another tool)."""


def _digest_bytes(chunks: Iterable[Any]) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for chunk in chunks:
        h.update(chunk)
    return f"xxh3_128:{h.hexdigest()}"


def _file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return _digest_bytes(iter(lambda: fh.read(8 * 1024 * 1024), b""))


def _open_index(out_dir: str | os.PathLike, shards: list[ShardInfo], *,
                check: bool = True, datasets: Sequence[str] | None = None) -> ArrayIndex | None:
    """The key index made for ``shards`` (and their feature ``datasets``, default the one
    ``features``); None if there is none. Raises `_Stale` when it was made for other shards
    or datasets and `IndexDamaged` when its files do not match the checksums its header
    records (an index written before checksums were recorded is taken as it is)."""
    paths = list(datasets or [FEATURES_DATASET])
    meta_dir = Path(out_dir) / META_DIR
    header_path = meta_dir / INDEX_FILE
    if not header_path.exists():
        return None
    try:
        header = read_json(header_path, "the key index")
    except StoreError as err:
        raise IndexDamaged(f"{err}; {INDEX_FIX}") from None
    if not isinstance(header, dict):
        raise IndexDamaged(f"{header_path}: not a key index header; {INDEX_FIX}")
    if header.get("format") != INDEX_FORMAT or header.get("shards") != index_shards(shards):
        raise _Stale(f"{header_path}: key index is stale (shard set differs from the manifest)")
    if header.get("datasets", [FEATURES_DATASET]) != paths:
        raise _Stale(f"{header_path}: key index is stale (made for other outputs than the "
                     "manifest lists)")
    name = header.get("dir")
    if not isinstance(name, str) or "/" in name or "\\" in name or not name.startswith("index-"):
        raise IndexDamaged(f"{header_path}: bad index folder {name!r}; {INDEX_FIX}")
    sums = header.get("checksums")
    if check and sums is not None:
        for arr in INDEX_ARRAYS:
            path = meta_dir / name / f"{arr}.npy"
            try:
                ok = isinstance(sums, dict) and _file_digest(path) == sums.get(arr)
            except OSError as err:
                raise IndexDamaged(f"{path}: unreadable ({err.strerror}); {INDEX_FIX}") from None
            if not ok:
                raise IndexDamaged(f"{path}: key index file damaged (checksum differs from "
                                   f"{INDEX_FILE}); {INDEX_FIX}")
    try:
        return ArrayIndex(meta_dir / name, int(header["num_keys"]), len(paths))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IndexDamaged(f"{meta_dir / name}: key index unusable ({err}); {INDEX_FIX}") from None


def load_index(out_dir: str | os.PathLike, shards: list[ShardInfo], *,
               check: bool = True, datasets: Sequence[str] | None = None) -> ArrayIndex | None:
    """The key index if present, intact (its files match the checksums in its header; skip
    that with ``check=False``, e.g. in a process that re-opens an index already checked) and
    made for exactly ``shards``; None if missing, stale or damaged (a warning says which):
    the caller then reads the shards' keys. ``datasets``: the store's feature datasets in
    output order (default the one ``features``)."""
    try:
        return _open_index(out_dir, shards, check=check, datasets=datasets)
    except _Stale as err:
        log.warning("%s", err)
    except IndexDamaged as err:
        log.warning("%s (reading the shards' keys instead)", err)
    return None


def check_index(out_dir: str | os.PathLike, shards: list[ShardInfo],
                datasets: Sequence[str] | None = None) -> list[str] | None:
    """Problems of the key index made for ``shards`` ([] when sound): its files against
    their checksums, then every key against the shards: the same keys in store order, each
    found at its own position and pointing at its own row offset. None when there is no
    index for ``shards`` (missing or stale). Reads every shard's keys."""
    import numpy as np

    paths = list(datasets or [FEATURES_DATASET])
    try:
        idx = _open_index(out_dir, shards, datasets=paths)
    except _Stale:
        return None
    except IndexDamaged as err:
        return [str(err)]
    if idx is None:
        return None
    out = Path(out_dir)
    raw: list[bytes] = []
    rows = []
    owner: list[tuple[str, int]] = []  # (shard file, row) of each store position
    for info in sorted(shards, key=lambda s: s.shard_id):
        keys, offs = read_layout(out / info.file, paths)
        raw.extend(keys)
        owner.extend((info.file, r) for r in range(len(keys)))
        rows.append(_as_rows(offs, len(keys), len(paths)))
    folder = idx.folder
    if len(raw) != idx.n:
        return [f"{folder}: key index holds {idx.n} keys but the shards {len(raw)}; {INDEX_FIX}"]
    bad = _index_mismatch(idx, raw, np.concatenate(rows) if rows
                          else _as_rows(None, 0, len(paths)))
    if bad is None:
        return []
    what, pos = bad
    where = f" (first: {key_str(raw[pos])!r}, {owner[pos][0]} row {owner[pos][1]})" if (
        pos is not None) else ""
    return [f"{folder}/{what}.npy: key index disagrees with the shards{where}; {INDEX_FIX}"]


def _index_mismatch(idx: ArrayIndex, raw: list[bytes], rows) -> tuple[str, int | None] | None:
    """(index file, first store position concerned or None) where ``idx`` disagrees with
    the shards' keys ``raw`` and row offsets ``rows``; None when it agrees."""
    import numpy as np

    lengths = np.fromiter((len(r) for r in raw), dtype=np.int64, count=len(raw))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if not np.array_equal(np.asarray(idx.offsets), offsets):
        return "offsets", int(np.argmax(np.asarray(idx.offsets)[1:] != offsets[1:]))
    if bytes(idx.blob) != b"".join(raw):
        blob = np.frombuffer(b"".join(raw), dtype=np.uint8)
        first = int(np.argmax(np.asarray(idx.blob) != blob))
        return "blob", int(np.searchsorted(offsets, first, side="right")) - 1
    wrong = np.nonzero(np.asarray(idx.rows) != rows)[0]
    if len(wrong):
        return "rows", int(wrong[0])
    hashes = np.fromiter((key_hash(r) for r in raw), dtype=np.uint64, count=len(raw))
    positions = np.asarray(idx.positions)
    if not np.array_equal(np.sort(positions), np.arange(len(raw))):
        return "positions", None
    if not np.array_equal(hashes[positions], np.asarray(idx.hashes)):
        return "positions", int(positions[np.argmax(hashes[positions] != idx.hashes)])
    sorted_hashes = np.asarray(idx.hashes)
    if len(raw) > 1 and bool(np.any(sorted_hashes[1:] < sorted_hashes[:-1])):
        return "hashes", None
    return None
