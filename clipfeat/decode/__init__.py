"""Decode worker processes: files -> uint8 (3, H, W) arrays; nothing can stall or crash the run.

:class:`DecodePool` runs :func:`decode_file` (or a given ``decode_fn``) in separate processes,
each talking to the parent over its own pipe. Pixels do not travel through the pipes: every
item in flight owns a slot of a shared-memory buffer, the worker writes the decoded image
into it, and only a short message goes over the pipe.

Failure handling, per item (each failure becomes a :class:`DecodeResult` with ``error`` set):

* a decode that runs longer than ``timeout``: the worker is killed and replaced;
* a worker that dies holding an item (segfault, ``os._exit``, OOM kill): replaced; the item is
  retried once in a fresh process, unless it already ran in one; items the worker had queued
  but not started are re-dispatched, not failed;
* an error from the decoder: Pillow keeps state between files, so the worker is replaced and,
  unless it was already fresh, the item is retried once in a fresh process; that second
  answer is the one reported. File-level refusals (missing, not a regular file, decompression
  bomb) are final at once.

Modules: `pool` (the parent's API), `dispatch` (its manager thread), `workers` (the
processes), `worker` (the child side), `slots` (the shared memory), `result`.
"""

from clipfeat.config import default_workers
from clipfeat.decode.pool import DecodePool
from clipfeat.decode.result import DecodeResult, DecodeStats, is_transient
from clipfeat.decode.worker import decode_file, describe_error, keep_heap

__all__ = [
    "DecodePool",
    "DecodeResult",
    "DecodeStats",
    "decode_file",
    "default_workers",
    "describe_error",
    "is_transient",
    "keep_heap",
]
