"""Store keys as bytes, their hashes, and order-sensitive digests of key lists."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


def json_line(obj: Any) -> str:
    """One-line JSON, UTF-8 where possible; lone surrogates (undecodable file names) are
    escaped as ``\\udcXX`` so the line always encodes and loads back to the same string."""
    text = json.dumps(obj, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, default=str)
    return text


def key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def key_str(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")


def key_hash(raw: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def seq_sha256(items: Iterable[bytes]) -> str:
    """sha256 of a sequence of byte strings, each length-prefixed (order matters)."""
    h = hashlib.sha256()
    for item in items:
        h.update(len(item).to_bytes(8, "little"))
        h.update(item)
    return h.hexdigest()
