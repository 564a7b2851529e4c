"""The device stage: uint8 batches normalised on the device, the tower run, features back.

On CUDA the next batch is launched before the previous one's results are awaited, so host
work (stacking, hand-off to the writer) overlaps the forward pass; features are
range-checked on the device before the cast to the store dtype.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from clipfeat.errors import ConfigError, ExtractionError
from clipfeat.store import FLOAT16_MAX


def resolve_device(requested: str, local_rank: int) -> str:
    import torch

    if requested == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {requested}: no CUDA device is available here; use --device cpu"
            )
        if requested == "cuda":
            return f"cuda:{local_rank}"
        idx = int(requested.split(":", 1)[1])
        if idx >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    if requested == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    return requested


class Device:
    """Normalises uint8 batches on the device, runs the tower, brings features back.

    On CUDA the next batch is launched before the previous one's results are awaited, so
    host work (stacking, hand-off to the writer) overlaps the forward pass.
    """

    def __init__(self, tower: Any, spec: Any, device: str, compute_dtype: str, store_dtype: str):
        import torch

        from clipfeat.preprocess import Normalizer

        self.torch = torch
        self.tower = tower
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.compute_dtype = getattr(torch, compute_dtype)
        self.store_dtype = getattr(torch, store_dtype)
        self.check_range = store_dtype == "float16"
        self.normalize = Normalizer(spec)
        self.shape = (3, spec.out_height, spec.out_width)
        self.in_ring: deque = deque()
        # CPU: reused uint8 and float32 batch buffers (a fresh 87 MB tensor per batch costs
        # ~20k page faults; glibc never reuses blocks that large).
        self.cpu_in: Any = None
        self.cpu_pix: Any = None
        self.out_free: queue.Queue = queue.Queue()
        self.out_count = 0

    def _pinned_input(self, n: int, batch_size: int) -> Any:
        torch = self.torch
        if not self.cuda:
            # One buffer, reused: a batch is done with it before the next is stacked.
            if self.cpu_in is None or self.cpu_in.shape[0] < n:
                self.cpu_in = torch.empty((max(n, batch_size), *self.shape), dtype=torch.uint8)
            return self.cpu_in[:n]
        if len(self.in_ring) < 3:
            buf = torch.empty((batch_size, *self.shape), dtype=torch.uint8).pin_memory()
        else:
            buf = self.in_ring.popleft()
        self.in_ring.append(buf)
        return buf[:n]

    def _pinned_output(self, shape: tuple[int, ...], limit: int) -> Any:
        torch = self.torch
        try:
            buf = self.out_free.get_nowait()
        except queue.Empty:
            if self.out_count < limit:
                self.out_count += 1
                buf = torch.empty(shape, dtype=self.store_dtype).pin_memory()
            else:
                buf = self.out_free.get()  # wait for the writer to hand one back
        return buf

    def launch(self, arrays: Sequence[Any], batch_size: int) -> tuple[Any, Any, Any, Any]:
        """Start one batch; returns a handle for `collect`."""
        import numpy as np

        torch = self.torch
        n = len(arrays)
        host_in = self._pinned_input(n, batch_size)
        np.stack(arrays, out=host_in.numpy())
        with torch.inference_mode():
            x = host_in.to(self.device, non_blocking=True)
            if self.cuda:
                pix = self.normalize(x)
            else:
                if self.cpu_pix is None or self.cpu_pix.shape[0] < n:
                    self.cpu_pix = torch.empty((max(n, batch_size), *self.shape),
                                               dtype=torch.float32)
                pix = self.normalize(x, out=self.cpu_pix[:n])
            pix = pix.to(self.compute_dtype)
            feats = self.tower.forward_features(pix)
            bad = ~torch.isfinite(feats).all()
            if self.check_range:
                bad = bad | (feats.abs().amax() > FLOAT16_MAX)
            out = feats.to(self.store_dtype)
            if not self.cuda:
                return out.numpy(), bool(bad), None, None
            full = self._pinned_output((batch_size, *out.shape[1:]), limit=12)
            host_out = full[:n]
            host_out.copy_(out, non_blocking=True)
            bad_host = torch.empty((), dtype=torch.bool).pin_memory()
            bad_host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return host_out, bad_host, event, full

    def collect(self, handle: tuple[Any, Any, Any, Any]) -> tuple[Any, bool, Callable[[], None] | None]:
        host_out, bad, event, full = handle
        if event is None:
            return host_out, bool(bad), None
        event.synchronize()
        return host_out.numpy(), bool(bad.item()), (lambda: self.out_free.put(full))


# --------------------------------------------------------------------------- the run


def raise_range(
    feats: Any, rows: list[tuple[int, str]], store_dtype: str, compute_dtype: str
) -> None:
    """Name the first row whose values the store cannot hold, and the fix."""
    import numpy as np

    f = np.asarray(feats, dtype=np.float32)
    for i, (_, key) in enumerate(rows):
        row = f[i]
        if (np.isinf(row).any() and not np.isnan(row).any() and store_dtype == "float16"
                and compute_dtype in ("float32", "bfloat16")):
            # finite in the compute dtype (checked on the device), inf once cast to float16
            raise ExtractionError(
                f"features of {key!r} exceed float16's range ±{FLOAT16_MAX:g}: "
                "rerun with --store-dtype float32 (add --overwrite if --out holds finished shards)"
            )
        if not np.isfinite(row).all():
            raise ExtractionError(
                f"the tower produced NaN/Inf for {key!r} (compute dtype overflow?): "
                "rerun with --dtype float32 (and --store-dtype float32)"
            )
        if store_dtype == "float16" and np.abs(row).max() > FLOAT16_MAX:
            raise ExtractionError(
                f"features of {key!r} reach {np.abs(row).max():.4g}, beyond float16's range "
                f"±{FLOAT16_MAX:g}: rerun with --store-dtype float32 (add --overwrite if --out holds "
                "finished shards)"
            )
    raise ExtractionError("the tower produced values outside the store dtype's range: "
                          "rerun with --store-dtype float32 (add --overwrite if --out holds finished shards)")


# --------------------------------------------------------------------------- verify helper
