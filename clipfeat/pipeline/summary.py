"""What `extract` reports: progress as it goes, and a Summary at the end."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol


class Progress(Protocol):
    """What `extract` reports to; the CLI implements it with a tqdm bar. An implementation
    may also have ``note(text)`` (a line for the user, e.g. what is loading now) and
    ``set_done(n)`` (the images done in all, counted by rank 0 over every rank)."""

    def start(self, total: int, done: int) -> None: ...

    def advance(self, images: int, failures: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class Summary:
    """What a run did. `complete` is True only when every planned chunk has its shard."""

    out: str
    planned: int = 0
    extracted: int = 0
    failed: int = 0
    skipped: int = 0
    shards_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    complete: bool = False
    total_failures: int = 0
    rank: int = 0
    world: int = 1
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["images_per_second"] = round(self.images_per_second, 2)
        return d
