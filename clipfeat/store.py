"""The output store: atomic HDF5 shard writer, manifest, failures, key index, reader.

Layout of OUT (see docs/architecture.md):

    shard-000000.h5         finished shards only; chunk i of the plan -> shard i
    manifest.json           config + finished shards with counts (rewritten atomically)
    failures.jsonl          every input that could not be used, by shard then chunk order
    .clipfeat/plan.jsonl    frozen work list (plan.py)
    .clipfeat/index.json    key index header, points at .clipfeat/index-<token>/*.npy

A shard is written as ``shard-NNNNNN.h5.partial`` and renamed into place after flush and
fsync; the rename is the completion mark. Each shard carries its chunk's failure records,
so one rename commits both. The first 512 bytes of a shard are an HDF5 user block (HDF5
and h5py skip it) holding a checksum of the rest of the file, written at commit: any
flipped byte anywhere in a shard is caught by ``clipfeat verify``. The checksum is the
sha256 of the list of sha256 digests of the file's consecutive 8 MiB blocks (from byte 512
on), so blocks hash in parallel threads. sha256 of the keys and failure records are also
kept in the attributes, and HDF5 metadata uses the 1.10 format (checksummed superblock,
object headers and chunk index).

Reading never executes code: JSON, HDF5 and ``np.load(allow_pickle=False)`` only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipfeat.errors import ConfigError, ExtractionError, StoreError

log = logging.getLogger(__name__)

SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".h5"
PARTIAL_SUFFIX = ".partial"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
META_DIR = ".clipfeat"
PLAN_FILE = "plan.jsonl"
INDEX_FILE = "index.json"
INDEX_FORMAT = "clipfeat-index"

STORE_DTYPES = {"float16": "<f2", "float32": "<f4"}
FLOAT16_MAX = 65504.0
FLOAT32_MAX = float.fromhex("0x1.fffffep+127")
# Attributes ShardWriter sets itself; a caller may not pass them in ``attrs``.
RESERVED_ATTRS = (
    "shard_id", "num_rows", "num_failures", "format_version", "keys_sha256", "failures_sha256",
)
# Attributes that differ from shard to shard (ignored when comparing shards' settings).
PER_SHARD_ATTRS = frozenset(RESERVED_ATTRS)
# HDF5 >= 1.10 file format: checksummed superblock, object headers and chunk index.
_LIBVER = ("v110", "v110")

# The user block: "clipfeat-shard 1\nchecksum sha256-8MiB-tree <hex>\nbytes <file size>\n",
# zero-padded to 512 bytes.
USERBLOCK = 512
_USERBLOCK_MAGIC = b"clipfeat-shard 1\n"
CHECKSUM_KIND = "sha256-8MiB-tree"
_HASH_BLOCK = 8 * 1024 * 1024
_HASH_THREADS = 8

_SHARD_RE = re.compile(r"^shard-(\d{6,})\.h5$")
_ERRNO_RE = re.compile(r"errno\s*=\s*(\d+)")


# --------------------------------------------------------------------------- names


def shard_name(shard_id: int) -> str:
    """File name of finished shard ``shard_id``: ``shard-000003.h5``."""
    return f"{SHARD_PREFIX}{int(shard_id):06d}{SHARD_SUFFIX}"


def parse_shard_id(name: str | os.PathLike) -> int | None:
    """Shard id of a finished shard's file name (or path), else None (partials, others)."""
    m = _SHARD_RE.match(os.path.basename(os.fspath(name)))
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- helpers


def json_line(obj: Any) -> str:
    """One-line JSON, UTF-8 where possible; lone surrogates (undecodable file names) are
    escaped as ``\\udcXX`` so the line always encodes and loads back to the same string."""
    text = json.dumps(obj, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, default=str)
    return text


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _key_str(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")


def _key_hash(raw: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def _seq_sha256(items: Iterable[bytes]) -> str:
    """sha256 of a sequence of byte strings, each length-prefixed (order matters)."""
    h = hashlib.sha256()
    for item in items:
        h.update(len(item).to_bytes(8, "little"))
        h.update(item)
    return h.hexdigest()


def _userblock(digest: str, size: int) -> bytes:
    text = _USERBLOCK_MAGIC + f"checksum {CHECKSUM_KIND} {digest}\nbytes {size}\n".encode()
    return text.ljust(USERBLOCK, b"\0")


def _parse_userblock(block: bytes) -> tuple[str, int] | None:
    """(checksum, size) recorded in a shard's user block, or None if it holds none. A block
    that is not byte-for-byte what the writer produced for those values is also None."""
    if len(block) != USERBLOCK or not block.startswith(_USERBLOCK_MAGIC):
        return None
    try:
        lines = block.rstrip(b"\0").decode("ascii").splitlines()
        digest = lines[1].split(" ")[2]
        size = int(lines[2].split(" ", 1)[1])
    except (UnicodeDecodeError, IndexError, ValueError):
        return None
    if _userblock(digest, size) != block:
        return None
    return digest, size


def _hash_fd(fd: int, start: int) -> tuple[str, int]:
    """Checksum of an open file's bytes from ``start`` to its end, and the file's size:
    sha256 of the concatenated sha256 digests of its 8 MiB blocks, hashed in threads
    (hashlib releases the GIL), so a 1 GiB shard takes a fraction of a second."""
    size = os.fstat(fd).st_size

    def block_digest(offset: int) -> bytes:
        want = min(_HASH_BLOCK, size - offset)
        h = hashlib.sha256()
        while want > 0:
            data = os.pread(fd, want, offset)
            if not data:
                raise OSError(errno.EIO, f"file shrank while hashing at byte {offset}")
            h.update(data)
            offset += len(data)
            want -= len(data)
        return h.digest()

    offsets = range(start, size, _HASH_BLOCK)
    threads = min(_HASH_THREADS, os.cpu_count() or 1, len(offsets))
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            digests = list(pool.map(block_digest, offsets))
    else:
        digests = [block_digest(o) for o in offsets]
    return hashlib.sha256(b"".join(digests)).hexdigest(), size


def shard_checksum(path: str | os.PathLike) -> tuple[str, int] | None:
    """(checksum, size) recorded in the user block of a finished shard (cheap: 512 bytes),
    or None if the shard has no valid checksum block."""
    with open(path, "rb") as fh:
        return _parse_userblock(fh.read(USERBLOCK))


def check_shard_bytes(path: str | os.PathLike) -> str | None:
    """Re-hash a shard and compare with its user block: None when intact, else a reason."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, USERBLOCK, 0)
        recorded = _parse_userblock(head)
        if recorded is None:
            return "its checksum block (first 512 bytes) is missing or damaged"
        digest, size = _hash_fd(fd, USERBLOCK)
    finally:
        os.close(fd)
    if size != recorded[1]:
        return f"it has {size} bytes but was written with {recorded[1]} (truncated or extended)"
    if digest != recorded[0]:
        return "its content changed since it was written (checksum mismatch, e.g. a flipped byte)"
    return None


def encode_attr(value: Any) -> str | int | float | bool:
    """An attribute value as stored in a shard: str/int/float/bool as they are, anything
    JSON-able (dict, list, None) as JSON text."""
    if isinstance(value, bool):
        return bool(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy scalar
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    raise ConfigError(
        f"shard attribute value {value!r} has type {type(value).__name__}: "
        "use str, int, float, bool, or a JSON-able dict/list"
    )


def decode_attr(value: Any) -> Any:
    """An attribute value read back from h5py as a plain Python value (str/int/float/bool)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _errno_of(err: BaseException) -> int | None:
    code = getattr(err, "errno", None)
    if code:
        return int(code)
    m = _ERRNO_RE.search(str(err))  # HDF5 reports the OS errno inside its message
    return int(m.group(1)) if m else None


_CAUSES = {
    errno.ENOSPC: ("disk full (ENOSPC)", "free space and rerun the same command to resume"),
    errno.EDQUOT: ("disk quota exceeded (EDQUOT)",
                   "free space and rerun the same command to resume"),
    errno.EACCES: ("permission denied (EACCES)",
                   "make the output folder writable and rerun the same command to resume"),
    errno.EPERM: ("operation not permitted (EPERM)",
                  "make the output folder writable and rerun the same command to resume"),
    errno.EROFS: ("read-only file system (EROFS)",
                  "write to a writable file system and rerun the same command to resume"),
    errno.EIO: ("I/O error (EIO)", "check the disk and rerun the same command to resume"),
    errno.EFBIG: ("file too large (EFBIG)",
                  "raise the file size limit (ulimit -f) or use smaller shards, then rerun"),
}


def os_error_message(err: BaseException, path: str | os.PathLike, action: str = "writing") -> str:
    """One line naming the OS cause of ``err``, the path, and what to do."""
    code = _errno_of(err)
    if code in _CAUSES:
        cause, fix = _CAUSES[code]
    else:
        text = str(err).strip()
        detail = getattr(err, "strerror", None) or (text.splitlines()[0] if text else "")
        cause = f"OS error ({detail or type(err).__name__})"
        fix = "fix the cause and rerun the same command to resume"
    return f"{cause} while {action} {os.fspath(path)}: {fix}"


def _fsync_path(path: str | os.PathLike, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        _fsync_path(path, directory=True)
    except OSError as err:  # some file systems cannot fsync a directory
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR):
            raise


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_lines_atomically(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Write text lines to ``path`` atomically: temp file in the same folder, fsync,
    ``os.replace``, fsync the folder. OSError propagates (the temp file is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for line in lines:
                fh.write(line)
                fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """`write_lines_atomically`, raising ExtractionError (one line, cause and fix) on OS errors."""
    try:
        write_lines_atomically(path, lines)
    except OSError as err:
        raise ExtractionError(os_error_message(err, path)) from err


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document to ``path`` atomically (see atomic_write_lines)."""
    text = json.dumps(obj, indent=2, ensure_ascii=True, default=str)
    atomic_write_lines(path, [text])


def _unlink_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise StoreError(f"{path}: {what} is missing") from None
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: cannot read {what} ({err})") from err


class _GuardedFile:
    """A file for HDF5's ``fileobj`` driver that never lets an OS error reach HDF5.

    With HDF5's own driver a failed write (ENOSPC, EIO, ...) leaves dirty metadata that
    HDF5 retries on close and at interpreter exit, where it crashes the process. Here the
    first error is remembered in ``error`` and every later write is discarded, so HDF5
    carries on and closes cleanly; ShardWriter checks ``error`` after each HDF5 call,
    removes the partial file and raises ExtractionError.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.error: OSError | None = None
        self.discard = False
        self._pos = 0
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def _failed(self, err: OSError) -> None:
        if self.error is None:
            self.error = err
        self.discard = True

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = pos
        elif whence == 1:
            self._pos += pos
        else:
            self._pos = os.fstat(self._fd).st_size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = os.preadv(self._fd, [view], self._pos)
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(os.fstat(self._fd).st_size - self._pos, 0)
        data = os.pread(self._fd, size, self._pos)
        self._pos += len(data)
        return data

    def write(self, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        if not self.discard:
            try:
                while done < len(view):
                    n = os.pwrite(self._fd, view[done:], self._pos + done)
                    if n <= 0:
                        raise OSError(errno.EIO, "short write")
                    done += n
            except OSError as err:
                self._failed(err)
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if not self.discard:
            try:
                os.ftruncate(self._fd, size)
            except OSError as err:
                self._failed(err)
        return size

    def flush(self) -> None:
        pass

    def fsync(self) -> None:
        if self.error is not None:
            raise self.error
        try:
            os.fsync(self._fd)
        except OSError as err:
            self._failed(err)
            raise

    def fileno(self) -> int:
        return self._fd

    def checksum_from(self, start: int) -> tuple[str, int]:
        """Checksum of the bytes from ``start`` to the end (see _hash_fd), and the size."""
        return _hash_fd(self._fd, start)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _open_h5(path: str | os.PathLike):
    """Open a finished shard read-only: no HDF5 file locking (NFS/Lustre), no chunk cache
    (reads are whole one-image chunks)."""
    import h5py

    try:
        return h5py.File(path, "r", locking=False, rdcc_nbytes=0)
    except OSError as err:
        # The same file is already open in this process with locking on (HDF5 shares one
        # handle per file and refuses a different locking flag): open it the same way.
        if "locking flag" not in str(err):
            raise
        return h5py.File(path, "r", rdcc_nbytes=0)


# --------------------------------------------------------------------------- ShardInfo


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
    checksum: str | None = None  # of the file after its 512-byte user block (_hash_fd)

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
    def from_manifest(cls, entry: dict) -> ShardInfo:
        """A ShardInfo from a manifest.json entry (failures not loaded)."""
        return cls(
            shard_id=int(entry["shard_id"]),
            file=str(entry.get("file") or shard_name(int(entry["shard_id"]))),
            num_rows=int(entry["num_rows"]),
            num_failures=int(entry.get("num_failures", 0)),
            bytes=int(entry.get("bytes", 0)),
            checksum=entry.get("checksum"),
        )


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


class ShardWriter:
    """Writes one shard atomically. Keyword-only, use as a context manager::

        with ShardWriter(out, 3, tokens=576, hidden=1024, store_dtype="float16",
                         attrs=attrs, expected_rows=1000) as w:
            w.append(keys, feats)        # (b, tokens, hidden)
            w.add_failures(records)
            info = w.commit()

    Leaving the block without ``commit()`` (or with an exception) discards the shard.
    Rows go straight to disk (memory is bounded by one batch); only keys stay in memory.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_id: int,
        *,
        tokens: int,
        hidden: int,
        store_dtype: str,
        attrs: dict,
        expected_rows: int | None = None,
    ) -> None:
        problems = []
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or shard_id < 0:
            problems.append(f"shard_id={shard_id!r} must be an int >= 0")
        for name, val in (("tokens", tokens), ("hidden", hidden)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                problems.append(f"{name}={val!r} must be an int >= 1")
        if store_dtype not in STORE_DTYPES:
            problems.append(f"store_dtype={store_dtype!r} must be one of {sorted(STORE_DTYPES)}")
        if expected_rows is not None and (
            isinstance(expected_rows, bool) or not isinstance(expected_rows, int)
            or expected_rows < 0
        ):
            problems.append(f"expected_rows={expected_rows!r} must be None or an int >= 0")
        if not isinstance(attrs, dict):
            problems.append(f"attrs must be a dict, not {type(attrs).__name__}")
        else:
            bad = [k for k in attrs if not isinstance(k, str)]
            if bad:
                problems.append(f"attrs keys must be str, got {bad[:3]!r}")
            taken = [k for k in RESERVED_ATTRS if k in attrs]
            if taken:
                problems.append(f"attrs may not set {taken} (ShardWriter sets them)")
            for name, val in (("tokens", tokens), ("hidden_size", hidden),
                              ("store_dtype", store_dtype)):
                if name in attrs and attrs[name] != val:
                    problems.append(f"attrs[{name!r}]={attrs[name]!r} disagrees with {val!r}")
        if problems:
            raise ConfigError("ShardWriter: " + "; ".join(problems))
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output {out} exists and is not a folder: choose another path")

        self._attrs = {k: encode_attr(v) for k, v in attrs.items()}
        self._attrs.update(tokens=tokens, hidden_size=hidden, store_dtype=store_dtype)
        self.out_dir = out
        self.shard_id = shard_id
        self.tokens = tokens
        self.hidden = hidden
        self.store_dtype = store_dtype
        self.final_path = out / shard_name(shard_id)
        self.partial_path = out / (shard_name(shard_id) + PARTIAL_SUFFIX)
        self._limit = FLOAT16_MAX if store_dtype == "float16" else FLOAT32_MAX
        self._rows = 0
        self._keys: list[str] = []
        self._seen: set[str] = set()
        self._failures: list[dict] = []
        self._raw: _GuardedFile | None = None
        self._file = None
        self._features = None
        self._state = "open"
        self._create(expected_rows or 0)

    # -- lifecycle

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._state in ("open", "sealed"):
            if exc_type is None:
                log.warning("%s: left without commit(); discarding it", self.partial_path)
            self.abort()
        return False

    def _create(self, capacity: int) -> None:
        import h5py
        import numpy as np

        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._raw = _GuardedFile(self.partial_path)
            self._file = h5py.File(self._raw, "w", libver=_LIBVER, userblock_size=USERBLOCK)
            self._features = self._file.create_dataset(
                "features",
                shape=(capacity, self.tokens, self.hidden),
                maxshape=(None, self.tokens, self.hidden),
                chunks=(1, self.tokens, self.hidden),
                dtype=np.dtype(STORE_DTYPES[self.store_dtype]),
                track_times=False,
            )
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
        """Append rows: ``keys[i]`` names ``features[i]`` (shape (tokens, hidden)).

        Values are converted to the store dtype; a non-finite value, or one outside the
        float16 range when storing float16, raises ExtractionError naming the key.
        ``checked=True`` skips that scan when the caller already checked these very values
        (features already in the store dtype, e.g. checked on the GPU before the cast).
        """
        import numpy as np

        self._check_open()
        arr = _as_array(features)
        keys = list(keys)
        if arr.ndim != 3 or arr.shape[1:] != (self.tokens, self.hidden):
            raise ConfigError(
                f"{self.partial_path}: features have shape {tuple(arr.shape)}, expected "
                f"(batch, {self.tokens}, {self.hidden})"
            )
        if len(keys) != arr.shape[0]:
            raise ConfigError(
                f"{self.partial_path}: {len(keys)} keys for {arr.shape[0]} feature rows"
            )
        for k in keys:
            if not isinstance(k, str):
                raise ConfigError(f"{self.partial_path}: key {k!r} is not a str")
            if k in self._seen:
                raise ConfigError(f"{self.partial_path}: key {k!r} appended twice")
        if arr.dtype.kind != "f":
            raise ConfigError(
                f"{self.partial_path}: features have dtype {arr.dtype}, expected floats"
            )
        b = arr.shape[0]
        if b == 0:
            return
        target = STORE_DTYPES[self.store_dtype]
        if checked and arr.dtype == np.dtype(target):
            data = np.ascontiguousarray(arr)
        else:
            data = self._convert_checked(arr, keys)
        start, stop = self._rows, self._rows + b
        try:
            if stop > self._features.shape[0]:
                self._features.resize(stop, axis=0)
            self._features[start:stop] = data
        except OSError as err:
            self._fail(err)
        self._check_io()
        self._rows = stop
        self._keys.extend(keys)
        self._seen.update(keys)

    def _convert_checked(self, arr, keys: list[str]):
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
        for i, key in enumerate(keys):
            if not bool(finite[i]):
                raise ExtractionError(
                    f"non-finite feature values (NaN/Inf) for key {key!r} in "
                    f"{self.partial_path}: the tower overflowed its compute dtype; rerun "
                    "with --dtype float32 --store-dtype float32"
                )
            if float(absmax[i]) > self._limit:
                raise ExtractionError(
                    f"feature value {float(absmax[i]):.6g} for key {key!r} exceeds the "
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
        keys_raw = [_key_bytes(k) for k in self._keys]
        fail_raw = [json_line(r).encode("utf-8") for r in self._failures]
        str_dt = h5py.string_dtype("utf-8")
        try:
            f = self._file
            if self._features.shape[0] != self._rows:
                self._features.resize(self._rows, axis=0)
            keys_arr = np.empty(len(keys_raw), dtype=object)
            keys_arr[:] = keys_raw
            f.create_dataset("keys", data=keys_arr, dtype=str_dt, track_times=False)
            fail_arr = np.empty(len(fail_raw), dtype=object)
            fail_arr[:] = fail_raw
            f.create_dataset("failures", data=fail_arr, dtype=str_dt, track_times=False)
            attrs = dict(self._attrs)
            attrs.update(
                shard_id=self.shard_id,
                num_rows=self._rows,
                num_failures=len(self._failures),
                format_version=FORMAT_VERSION,
                keys_sha256=_seq_sha256(keys_raw),
                failures_sha256=_seq_sha256(fail_raw),
            )
            for k, v in attrs.items():
                f.attrs[k] = v
            f.flush()
            self._check_io()
            f.close()
            self._file = self._features = None
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
            digest, size = self._raw.checksum_from(USERBLOCK)
            self._raw.seek(0)
            self._raw.write(_userblock(digest, size))
            self._check_io()
            self._raw.fsync()
            self._raw.close()
            self._raw = None
            os.replace(self.partial_path, self.final_path)
        except OSError as err:
            self._fail(err)
        self._state = "committed"
        try:
            _fsync_dir(self.out_dir)
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

    def abort(self) -> None:
        """Close and remove the partial file. Never raises."""
        if self._state == "committed":
            return
        self._state = "aborted"
        f, self._file, self._features = self._file, None, None
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
        _unlink_quietly(self.partial_path)


# --------------------------------------------------------------------------- scanning


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
            _unlink_quietly(entry.path)
            removed += 1
        elif name.startswith(".") and ".tmp-" in name and entry.is_file():
            _unlink_quietly(entry.path)
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


def read_shard_failures(f) -> list[dict]:
    """The failure records stored in an open shard (h5py File)."""
    if "failures" not in f:
        return []
    out = []
    for raw in f["failures"][...]:
        rec = json.loads(_key_str(raw))
        if not isinstance(rec, dict):
            raise ValueError(f"failure record is not a JSON object: {rec!r}")
        out.append(rec)
    return out


def read_shard_info(path: str | os.PathLike) -> ShardInfo:
    """ShardInfo of one finished shard, failures included. StoreError if unreadable."""
    path = Path(path)
    sid = parse_shard_id(path.name)
    try:
        with _open_h5(path) as f:
            n = int(f["features"].shape[0])
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


def scan_shards(out_dir: str | os.PathLike) -> dict[int, ShardInfo]:
    """Finished shards in ``out_dir`` by id, with row counts and failure records.

    A shard that cannot be opened raises StoreError naming it (delete it to redo it).
    """
    return {sid: read_shard_info(p) for sid, p in list_shard_files(out_dir).items()}


# --------------------------------------------------------------------------- finalize


def _shard_failures(out: Path, info: ShardInfo) -> list[dict]:
    if info.num_failures and not info.failures:
        return read_shard_info(out / info.file).failures
    return info.failures


def finalize(
    out_dir: str | os.PathLike,
    *,
    meta: dict,
    plan: dict,
    shards: Iterable[ShardInfo],
    complete: bool,
) -> None:
    """Write failures.jsonl, manifest.json and (when complete) the key index, each
    atomically. Call it periodically with the shards so far and once at the end."""
    from clipfeat import __version__

    out = Path(out_dir)
    by_id: dict[int, ShardInfo] = {}
    for info in shards:
        if info.shard_id in by_id:
            raise ConfigError(f"finalize: shard {info.shard_id} listed twice")
        by_id[info.shard_id] = info
    ordered = [by_id[k] for k in sorted(by_id)]

    def failure_lines() -> Iterator[str]:
        for info in ordered:
            for rec in _shard_failures(out, info):
                yield json_line(rec)

    atomic_write_lines(out / FAILURES, failure_lines())
    if complete:
        write_index(out, ordered)
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
    atomic_write_json(out / MANIFEST, manifest)


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """The parsed manifest.json of a store. StoreError if missing or unreadable."""
    path = Path(out_dir) / MANIFEST
    man = _read_json(path, "the manifest")
    if not isinstance(man, dict) or man.get("format") != "clipfeat" or not isinstance(
        man.get("shards"), list
    ):
        raise StoreError(f"{path}: not a clipfeat manifest")
    return man


# --------------------------------------------------------------------------- key index


def _raw_row_offsets(ds):
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


def _read_layout(path: Path) -> tuple[list[bytes], Any]:
    """(raw keys, raw row offsets or None) of one finished shard."""
    try:
        with _open_h5(path) as f:
            keys = [r if isinstance(r, bytes) else _key_bytes(r) for r in f["keys"][...]]
            offsets = _raw_row_offsets(f["features"])
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise StoreError(
            f"{path}: cannot read its keys ({str(err).splitlines()[0] if str(err) else err!r});"
            " run clipfeat verify"
        ) from err
    return keys, offsets


def _shard_keys_raw(path: Path) -> list[bytes]:
    return _read_layout(path)[0]


def _index_shards(shards: Iterable[ShardInfo]) -> list[list]:
    """What an index is made for: [[shard id, rows, checksum or None], ...] by id."""
    return [[s.shard_id, s.num_rows, s.checksum]
            for s in sorted(shards, key=lambda s: s.shard_id)]


def write_index(out_dir: str | os.PathLike, shards: Iterable[ShardInfo]) -> None:
    """Write the key index of ``shards`` (in store order) under OUT/.clipfeat/.

    Arrays (``np.save``, no pickle) go to a fresh ``index-<token>/`` folder: sorted 64-bit
    key hashes with their store positions, the keys themselves (one UTF-8 blob + offsets)
    and each row's byte offset in its shard. The header ``index.json`` that points at them
    is replaced last, so a crash leaves the old index in place.
    """
    import numpy as np

    out = Path(out_dir)
    meta_dir = out / META_DIR
    ordered = sorted(shards, key=lambda s: s.shard_id)
    lengths: list[int] = []
    hashes: list[int] = []
    blobs: list[bytes] = []
    row_offsets = []
    for info in ordered:
        raw, offs = _read_layout(out / info.file)
        if len(raw) != info.num_rows:
            raise StoreError(
                f"{out / info.file}: {len(raw)} keys but {info.num_rows} rows expected"
            )
        blobs.extend(raw)
        lengths.extend(len(r) for r in raw)
        hashes.extend(_key_hash(r) for r in raw)
        row_offsets.append(offs if offs is not None else np.full(len(raw), -1, np.int64))
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
        "rows": (np.concatenate(row_offsets) if row_offsets else np.zeros(0, np.int64)),
    }
    idx_dir = meta_dir / f"index-{uuid.uuid4().hex[:12]}"
    try:
        idx_dir.mkdir(parents=True, exist_ok=False)
        for name, arr in arrays.items():
            with open(idx_dir / f"{name}.npy", "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(idx_dir)
        _fsync_dir(meta_dir)
    except OSError as err:
        _remove_tree(idx_dir)
        raise ExtractionError(os_error_message(err, idx_dir)) from err
    header = {
        "format": INDEX_FORMAT,
        "format_version": FORMAT_VERSION,
        "dir": idx_dir.name,
        "num_keys": n,
        "hash": "blake2b-64-le",
        "shards": _index_shards(ordered),
    }
    atomic_write_json(meta_dir / INDEX_FILE, header)
    for entry in os.scandir(meta_dir):
        if entry.name.startswith("index-") and entry.name != idx_dir.name and entry.is_dir():
            _remove_tree(Path(entry.path))


def _remove_tree(path: Path) -> None:
    try:
        for entry in os.scandir(path):
            _unlink_quietly(entry.path)
        os.rmdir(path)
    except OSError:
        pass


class _ArrayIndex:
    """Key -> store position through memory-mapped arrays (sorted 64-bit key hashes)."""

    def __init__(self, folder: Path, num_keys: int) -> None:
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
            and len(self.offsets) == num_keys + 1
            and (num_keys == 0 or int(self.offsets[-1]) == len(self.blob))
        ):
            raise ValueError("index arrays disagree with the header")
        self.n = num_keys

    def key_at(self, pos: int) -> str:
        return _key_str(bytes(self.blob[int(self.offsets[pos]):int(self.offsets[pos + 1])]))

    def find(self, key: str) -> int | None:
        import numpy as np

        raw = _key_bytes(key)
        h = np.uint64(_key_hash(raw))
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
        return [_key_str(blob[off[i]:off[i + 1]]) for i in range(self.n)]

    def row_offset(self, pos: int) -> int | None:
        off = int(self.rows[pos])
        return off if off >= 0 else None


class _DictIndex:
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

    def row_offset(self, pos: int) -> int | None:
        return None  # unknown: FeatureStore reads the shard's layout on first use


def load_index(out_dir: str | os.PathLike, shards: list[ShardInfo]) -> _ArrayIndex | None:
    """The key index if present and made for exactly ``shards``; None if missing or stale."""
    meta_dir = Path(out_dir) / META_DIR
    header_path = meta_dir / INDEX_FILE
    if not header_path.exists():
        return None
    try:
        header = _read_json(header_path, "the key index")
        if header.get("format") != INDEX_FORMAT or header.get("shards") != _index_shards(shards):
            log.warning("%s: key index is stale (shard set differs from the manifest)",
                        header_path)
            return None
        name = str(header["dir"])
        if "/" in name or "\\" in name or not name.startswith("index-"):
            raise ValueError(f"bad index folder {name!r}")
        return _ArrayIndex(meta_dir / name, int(header["num_keys"]))
    except (StoreError, OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: key index unusable (%s)", header_path, err)
        return None


# --------------------------------------------------------------------------- reader


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

    Picklable, so it can be (or be held by) the dataset of a ``torch.utils.data.DataLoader``
    with workers (fork or spawn); files are re-opened in each process. An int index
    ``store[i]`` reads the i-th row in store order (``store.keys()[i]``).
    """

    def __init__(self, out_dir: str | os.PathLike, *, max_open_files: int = 128) -> None:
        import numpy as np

        self.path = Path(out_dir)
        if not self.path.is_dir():
            raise StoreError(f"{self.path}: not a folder; pass the OUT folder of clipfeat extract")
        if isinstance(max_open_files, bool) or not isinstance(max_open_files, int) or (
                max_open_files < 1):
            raise ConfigError(f"max_open_files={max_open_files!r} must be an int >= 1")
        self.manifest = read_manifest(self.path)
        self.meta: dict = dict(self.manifest.get("config") or {})
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
        if not self.complete:
            log.warning("%s: store is incomplete (the run is still going or was stopped); "
                        "reading the %d finished shards", self.path, len(self.shards))
        self._starts = np.zeros(len(self.shards) + 1, dtype=np.int64)
        self._starts[1:] = np.cumsum(np.asarray([s.num_rows for s in self.shards],
                                                dtype=np.int64))
        self._n = int(self._starts[-1])
        self.max_open_files = max_open_files
        self._index = None
        self._index_kind = None
        self._layouts: dict[int, Any] = {}  # shard number -> row offsets, or None (h5py)
        self._init_process_state()
        self._ensure_index()
        self._row_shape, self._dtype = self._detect_shape()

    # -- process-local state

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._handles: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_fds", "_handles", "_lock", "_pid"):
            state.pop(name, None)
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
        idx = load_index(self.path, self.shards)
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
            raw, offsets = _read_layout(self.path / s.file)
            if len(raw) != s.num_rows:
                raise StoreError(
                    f"{self.path / s.file}: {len(raw)} keys but the manifest says "
                    f"{s.num_rows} rows; run clipfeat verify"
                )
            key_list.extend(_key_str(r) for r in raw)
            self._layouts[i] = offsets
        self._index, self._index_kind = _DictIndex(key_list), "scan"
        return self._index

    def _detect_shape(self):
        import numpy as np

        t, h = self.meta.get("tokens"), self.meta.get("hidden_size")
        name = self.meta.get("store_dtype")
        if (t is None or h is None or name not in STORE_DTYPES) and self.shards:
            with _open_h5(self.path / self.shards[0].file) as f:
                ds = f["features"]
                t, h, name = ds.shape[1], ds.shape[2], ds.dtype.name
        if t is None or h is None:
            raise StoreError(f"{self.path}: empty store without tokens/hidden_size in config")
        return (int(t), int(h)), np.dtype(STORE_DTYPES.get(name, name or "<f2"))

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
        recorded = _parse_userblock(head)
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

    def _dataset(self, idx: int):
        """The h5py ``features`` dataset of shard number ``idx`` (non-standard layouts)."""
        entry = self._handles.get(idx)
        if entry is not None:
            self._handles.move_to_end(idx)
            return entry[1]
        path = self.path / self.shards[idx].file
        try:
            f = _open_h5(path)
            ds = f["features"]
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise StoreError(f"{path}: cannot open ({err}); run clipfeat verify") from err
        self._handles[idx] = (f, ds)
        while len(self._handles) > self.max_open_files:
            _, (old, _) = self._handles.popitem(last=False)
            try:
                old.close()
            except Exception:  # noqa: BLE001
                pass
        return ds

    def _row_offset(self, pos: int, idx: int) -> int | None:
        if not hasattr(os, "preadv"):  # e.g. Windows: read through h5py
            return None
        if self._index_kind == "array":
            return self._index.row_offset(pos)
        if idx not in self._layouts:
            self._layouts[idx] = _read_layout(self.path / self.shards[idx].file)[1]
        offsets = self._layouts[idx]
        return None if offsets is None else int(offsets[pos - int(self._starts[idx])])

    def _read_into(self, pos: int, dest) -> None:
        """Copy row ``pos`` (store order) into the (tokens, hidden) array ``dest``."""
        idx = self._shard_of(pos)
        view = memoryview(dest).cast("B")
        # One lock around lookup and read: another thread may evict (close) a descriptor.
        with self._lock:
            self._check_process()
            self._ensure_index()
            offset = self._row_offset(pos, idx)
            if offset is None:
                dest[...] = self._dataset(idx)[pos - int(self._starts[idx])]
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
            raise KeyError(
                f"{key!r} is not in the store {self.path} ({self._n} keys); keys are the "
                "exact image strings of the source (LLaVA 'image' field / path relative "
                "to the input folder)"
            )
        return pos

    def _shard_of(self, pos: int) -> int:
        import numpy as np

        return int(np.searchsorted(self._starts, pos, side="right")) - 1

    def __getitem__(self, key: str | int):
        """Features of ``key`` (str) or of row ``key`` (int) as a (tokens, hidden) tensor."""
        import numpy as np
        import torch

        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            pos = self._position(key)
        else:
            pos = self._find(key)
        out = np.empty(self._row_shape, dtype=self._dtype)
        self._read_into(pos, out)
        return torch.from_numpy(out)

    def get(self, key: str, default: Any = None):
        """``store[key]``, or ``default`` when the key is absent."""
        try:
            return self[key]
        except KeyError:
            return default

    def get_many(self, keys: Iterable[str]):
        """Features of several keys as one (k, tokens, hidden) tensor, in the given order."""
        import numpy as np
        import torch

        positions = [self._find(k) for k in keys]
        out = np.empty((len(positions), *self._row_shape), dtype=self._dtype)
        for dest in sorted(range(len(positions)), key=positions.__getitem__):
            self._read_into(positions[dest], out[dest])
        return torch.from_numpy(out)

    # -- description

    @property
    def shape(self) -> tuple[int, int]:
        """(tokens, hidden) of every row."""
        return self._row_shape

    @property
    def dtype(self):
        """numpy dtype of the stored features."""
        return self._dtype

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
        return (f"FeatureStore({str(self.path)!r}, keys={self._n}, shards={len(self.shards)}, "
                f"complete={self.complete})")


# --------------------------------------------------------------------------- describe


def _plan_header(out: Path) -> dict | None:
    path = out / META_DIR / PLAN_FILE
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
        head = json.loads(first)
        return head if isinstance(head, dict) else None
    except (OSError, ValueError):
        return None


def _count_plan_items(out: Path) -> int | None:
    path = out / META_DIR / PLAN_FILE
    try:
        with open(path, "rb") as fh:
            return max(sum(1 for line in fh if line.strip()) - 1, 0)
    except OSError:
        return None


def _first_int(d: dict | None, *names: str) -> int | None:
    for name in names:
        if d and isinstance(d.get(name), int) and not isinstance(d.get(name), bool):
            return int(d[name])
    return None


def planned_chunks(out_dir: str | os.PathLike, plan: dict | None = None) -> int | None:
    """Number of chunks (= shards) the frozen plan holds, or None when unknown."""
    out = Path(out_dir)
    header = _plan_header(out)
    for d in (plan, header):
        n = _first_int(d, "num_chunks", "chunks", "num_shards")
        if n is not None:
            return n
    size = _first_int(plan, "shard_size", "chunk_size") or _first_int(
        header, "shard_size", "chunk_size")
    items = _first_int(plan, "num_items", "items", "total") or _first_int(
        header, "num_items", "items", "total")
    if size and items is None:
        items = _count_plan_items(out)
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
    has_manifest = (out / MANIFEST).is_file()
    has_plan = (out / META_DIR / PLAN_FILE).is_file()
    if not out.is_dir() or not (has_manifest or has_plan or list_shard_files(out)):
        raise StoreError(f"{out}: not a clipfeat store (no manifest.json, plan or shards)")
    if has_manifest:
        man = read_manifest(out)
        shards = [ShardInfo.from_manifest(e) for e in man["shards"]]
        meta, plan, complete = man.get("config") or {}, man.get("plan") or {}, man.get("complete")
        updated = man.get("updated")
    else:
        shards = list(scan_shards(out).values())
        meta, plan, complete, updated = {}, {}, False, None
        if shards:
            with _open_h5(out / shards[0].file) as f:
                meta = {k: decode_attr(v) for k, v in f.attrs.items()
                        if k not in PER_SHARD_ATTRS}
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
        "complete": bool(complete),
        "images": sum(s.num_rows for s in shards),
        "failures": num_failures,
        "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "shards": len(shards),
        "planned_shards": total_chunks,
        "pending_shards": len(pending) if pending is not None else None,
        "pending_shard_ids": pending[:20] if pending is not None else None,
        "bytes": disk,
        "updated": updated,
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


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def format_store(d: dict) -> str:
    """Human-readable text of ``describe_store``'s dict (missing entries show as '?')."""
    c = d.get("config") or {}

    def v(key: str) -> Any:
        value = c.get(key)
        return "?" if value is None else value

    state = "complete" if d.get("complete") else "INCOMPLETE"
    lines = [
        f"store      {d.get('path', '?')} ({state})",
        f"images     {d.get('images', '?')} in {d.get('shards', '?')} shards"
        + (f", {_human_bytes(d['bytes'])} on disk" if d.get("bytes") is not None else ""),
        f"model      {v('model')}"
        + (f" @ {c['model_revision']}" if c.get("model_revision") else ""),
        f"layer      {v('layer')}"
        + (f" (hidden_states[{c['layer_index']}])" if c.get("layer_index") is not None else "")
        + f", feature {v('feature')}, aspect {v('aspect')}",
        f"features   {v('tokens')} x {v('hidden_size')} {v('store_dtype')}"
        f" (computed in {v('compute_dtype')})",
    ]
    if d.get("pending_shards"):
        ids = ", ".join(str(i) for i in d.get("pending_shard_ids") or [])
        more = "" if d["pending_shards"] <= len(d.get("pending_shard_ids") or []) else ", ..."
        lines.append(f"pending    {d['pending_shards']} of {d.get('planned_shards', '?')} "
                     f"shards ({ids}{more}): rerun the same extract command to finish")
    lines.append(f"failures   {d.get('failures', '?')}")
    for reason, count in (d.get("failure_reasons") or {}).items():
        lines.append(f"  {count:>8}  {reason}")
    if d.get("updated"):
        lines.append(f"updated    {d['updated']}")
    return "\n".join(lines)
