"""Exception types. Only the CLI turns them into messages and exit codes."""

from __future__ import annotations


class ClipfeatError(Exception):
    """Base class for every error clipfeat raises on purpose."""

    exit_code = 1


class ConfigError(ClipfeatError, ValueError):
    """A user mistake in arguments, paths or model choice (exit 2, nothing written)."""

    exit_code = 2


class ModelError(ConfigError):
    """The model cannot be resolved or loaded (unknown name, no weights, not a vision model)."""


class StoreError(ClipfeatError):
    """An output store is missing, damaged, or was made with other settings."""


class ExtractionError(ClipfeatError):
    """A run failed part-way (disk full, unwritable output, values out of range)."""


class Interrupted(ClipfeatError):
    """The run was stopped by a signal; finished shards are intact."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
