"""How clipfeat writes sizes and counts for people: one formatter each for every message
and report."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Binary units with two decimals: 1181116006 -> '1.10 GiB'; under 1 KiB, whole bytes."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def plural(n: int, word: str, words: str | None = None) -> str:
    """A count with its noun: (1, 'shard') -> '1 shard', (3, 'shard') -> '3 shards';
    thousands separated (1,000 rows)."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"
