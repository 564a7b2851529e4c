"""How clipfeat writes sizes for people: one formatter for every message and report."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Binary units with two decimals: 1181116006 -> '1.10 GiB'; under 1 KiB, whole bytes."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
