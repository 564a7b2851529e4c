"""The output store: shard writer, manifest, failures, key index, reader.

Layout of OUT (every name is owned by `clipfeat.store.layout`; see docs/architecture.md):

    shard-000000.h5         finished shards only; chunk i of the plan -> shard i
    manifest.json           config, outputs + finished shards with counts (rewritten atomically)
    failures.jsonl          every input that could not be used, by shard then chunk order
    .clipfeat/plan.jsonl    frozen work list (clipfeat.plan)
    .clipfeat/index.json    key index header, points at .clipfeat/index-<token>/*.npy

A shard is written as ``shard-NNNNNN.h5.partial`` and renamed into place after flush and
fsync; the rename is the completion mark. The first 512 bytes of a shard are an HDF5 user
block (HDF5 and h5py skip it) holding a checksum of the rest of the file, written at
commit: any flipped byte anywhere in a shard is caught by ``clipfeat verify``.

A store of one output keeps its rows in the dataset ``features`` of each shard; a store of
several (layers, towers of one run) keeps output NAME in ``features/NAME``, each with its
own attributes (`outputs`: `OutputLayout`).

Reading never executes code: JSON, HDF5 and ``np.load(allow_pickle=False)`` only.

Modules: `layout` (names in OUT), `io` (atomic writes, fsync, OS error messages), `keys`,
`attrs`, `checksum`, `outputs` (where each output lies in a shard and in manifest.json),
`shard` (`ShardWriter`, `ShardInfo`), `manifest` (`finalize`),
`index` (key index), `reader` (`FeatureStore`), `describe` (``clipfeat info OUT``).
"""

from __future__ import annotations

from clipfeat.store.attrs import (
    FLOAT16_MAX,
    FLOAT32_MAX,
    FORMAT_VERSION,
    MULTI_FORMAT_VERSION,
    OUTPUT_ATTRS,
    OUTPUTS_ATTR,
    PER_SHARD_ATTRS,
    RESERVED_ATTRS,
    STORE_DTYPES,
    decode_attr,
    encode_attr,
    format_version,
)
from clipfeat.store.checksum import CHECKSUM_KIND, USERBLOCK, check_shard_bytes, shard_checksum
from clipfeat.store.describe import describe_store, failure_reason, format_store, planned_chunks
from clipfeat.store.finished import (
    FinishedCheck,
    ShardContent,
    check_finished,
    discard_damaged,
    read_finished,
)
from clipfeat.store.h5file import open_shard
from clipfeat.store.index import check_index, load_index, write_index
from clipfeat.store.io import (
    atomic_write_json,
    atomic_write_lines,
    os_error_message,
    write_lines_atomically,
)
from clipfeat.store.keys import json_line, key_bytes, key_hash, key_str, seq_sha256
from clipfeat.store.layout import (
    FAILURES,
    INDEX_FILE,
    LOCK_FILE,
    MANIFEST,
    META_DIR,
    PARTIAL_SUFFIX,
    PLAN_FILE,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    is_store,
    list_shard_files,
    parse_shard_id,
    remove_partials,
    shard_name,
)
from clipfeat.store.lock import OutLock
from clipfeat.store.manifest import finalize, read_manifest
from clipfeat.store.outputs import (
    OutputLayout,
    config_output,
    dataset_paths,
    entry_attrs,
    output_attrs,
    output_datasets,
    shard_rows,
)
from clipfeat.store.reader import FeatureStore
from clipfeat.store.shard import (
    ShardInfo,
    ShardWriter,
    read_shard_failures,
    read_shard_info,
    read_shard_row,
    scan_shards,
)

__all__ = [
    "CHECKSUM_KIND", "FAILURES", "FLOAT16_MAX", "FLOAT32_MAX", "FORMAT_VERSION", "FeatureStore",
    "FinishedCheck", "INDEX_FILE", "LOCK_FILE", "MANIFEST", "META_DIR", "MULTI_FORMAT_VERSION",
    "OUTPUTS_ATTR", "OUTPUT_ATTRS", "OutLock", "OutputLayout",
    "PARTIAL_SUFFIX", "PER_SHARD_ATTRS", "PLAN_FILE", "RESERVED_ATTRS", "SHARD_PREFIX",
    "SHARD_SUFFIX", "STORE_DTYPES", "ShardContent", "ShardInfo", "ShardWriter", "USERBLOCK",
    "atomic_write_json", "atomic_write_lines", "check_finished", "check_index",
    "check_shard_bytes", "config_output", "dataset_paths", "decode_attr", "describe_store",
    "discard_damaged", "encode_attr", "entry_attrs", "failure_reason", "finalize", "format_store",
    "format_version", "is_store", "json_line", "key_bytes",
    "key_hash", "key_str", "list_shard_files", "load_index", "open_shard", "os_error_message",
    "output_attrs", "output_datasets", "parse_shard_id", "planned_chunks", "read_finished",
    "read_manifest", "read_shard_failures", "read_shard_info", "read_shard_row",
    "remove_partials", "scan_shards", "seq_sha256", "shard_checksum", "shard_name",
    "shard_rows", "write_index", "write_lines_atomically",
]
