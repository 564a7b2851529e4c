"""What the decode pool hands back: one result per input, and counters for the summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


class DecodeResult(NamedTuple):
    """One input's outcome: ``array`` (uint8 (3, H, W)) or a one-line ``error``."""

    index: int
    key: str
    path: str
    array: np.ndarray | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class DecodeStats:
    """Counters for the run summary."""

    decoded: int = 0
    failed: int = 0
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0
    retries: int = 0
    recovered: int = 0  # items that failed once and succeeded when retried in a fresh process

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


#: Failure reasons that say nothing about the file itself (the decoder ran out of time or
#: memory, or its process died): worth another try (``clipfeat extract --retry-failed``).
TRANSIENT_PREFIXES = ("decode timed out", "decoder crashed", "out of memory")


def is_transient(error: str) -> bool:
    """True for a failure another attempt may not repeat (see TRANSIENT_PREFIXES)."""
    return str(error).startswith(TRANSIENT_PREFIXES)
