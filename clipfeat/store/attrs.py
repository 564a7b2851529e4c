"""Shard attributes: the store dtypes, reserved names, and how values are encoded."""

from __future__ import annotations

import json
import os
from typing import Any

from clipfeat.errors import ConfigError

FORMAT_VERSION = 2  # 2: rows written by pwrite into early-allocated chunks, XXH3 checksum blocks
#: Shards (and stores) of several outputs, each its own dataset ``features/NAME``. A store of
#: one output is still written exactly as in format 2 (`FORMAT_VERSION`), which every
#: earlier reader reads.
MULTI_FORMAT_VERSION = 3


STORE_DTYPES = {"float16": "<f2", "float32": "<f4"}
FLOAT16_MAX = 65504.0
FLOAT32_MAX = float.fromhex("0x1.fffffep+127")
# Attributes ShardWriter sets itself; a caller may not pass them in ``attrs``.
RESERVED_ATTRS = (
    "shard_id", "num_rows", "num_failures", "format_version", "keys_sha256", "failures_sha256",
)
# Attributes that differ from shard to shard (ignored when comparing shards' settings).
#: Attributes saying how a run ran: a store resumed elsewhere holds shards that differ here.
RUN_ATTRS = ("versions", "device")
PER_SHARD_ATTRS = frozenset(RESERVED_ATTRS) | frozenset(RUN_ATTRS)
#: Root attribute of a several-output shard: the JSON list of its output names, in order.
OUTPUTS_ATTR = "outputs"
#: Attributes that describe one output (its tower, layer and rows). In a several-output
#: shard they sit on that output's dataset, never among the root (run-level) attributes.
OUTPUT_ATTRS = (
    "model", "model_revision", "model_weights", "model_weights_revision", "model_type",
    "family", "layer", "layer_index", "layer_indices", "num_layers", "feature", "tokens",
    "hidden_size", "image_size", "patch_size", "has_cls_token", "num_registers",
    "preprocessing", "output",
)


def format_version(num_outputs: int) -> int:
    """The format version of a shard or store of ``num_outputs`` outputs."""
    return MULTI_FORMAT_VERSION if num_outputs > 1 else FORMAT_VERSION


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
