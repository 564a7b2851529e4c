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
    """Normalises uint8 batches on the device, runs the towers, brings features back.

    ``towers`` are loaded `CLIPVisionTower`s and ``tower_specs`` the `PreprocessSpec` each
    is fed; ``spec`` is what the decoders make (the one spec, or a `SpecSet` whose flat
    buffers hold every spec's pixels). A batch's features are a list, one array per output
    (each tower's layer selections, in order). On CUDA the next batch is launched before
    the previous one's results are awaited, so host work (stacking, hand-off to the writer)
    overlaps the forward pass.
    """

    def __init__(self, towers: Sequence[Any], tower_specs: Sequence[Any], spec: Any,
                 device: str, compute_dtype: str, store_dtype: str):
        import torch

        from clipfeat.preprocess import Normalizer
        from clipfeat.specset import SpecSet, spec_shape

        self.torch = torch
        self.towers = list(towers)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.compute_dtype = getattr(torch, compute_dtype)
        self.store_dtype = getattr(torch, store_dtype)
        self.check_range = store_dtype == "float16"
        self.split = spec.split if isinstance(spec, SpecSet) else None
        specs = spec.specs if isinstance(spec, SpecSet) else (spec,)
        self.inputs = [specs.index(s) for s in tower_specs]  # tower -> its spec's pixels
        self.normalizers = [Normalizer(s) for s in specs]
        self.shapes = [spec_shape(s) for s in specs]
        self.in_rings: list[deque] = [deque() for _ in specs]
        # CPU: reused uint8 and float32 batch buffers (a fresh 87 MB tensor per batch costs
        # ~20k page faults; glibc never reuses blocks that large).
        self.cpu_in: list[Any] = [None] * len(specs)
        self.cpu_pix: list[Any] = [None] * len(specs)
        self.out_free: queue.Queue = queue.Queue()  # sets of pinned output buffers
        self.out_count = 0

    def _pinned_input(self, j: int, n: int, batch_size: int) -> Any:
        torch = self.torch
        if not self.cuda:
            # One buffer, reused: a batch is done with it before the next is stacked.
            if self.cpu_in[j] is None or self.cpu_in[j].shape[0] < n:
                self.cpu_in[j] = torch.empty((max(n, batch_size), *self.shapes[j]),
                                             dtype=torch.uint8)
            return self.cpu_in[j][:n]
        ring = self.in_rings[j]
        if len(ring) < 3:
            buf = torch.empty((batch_size, *self.shapes[j]), dtype=torch.uint8).pin_memory()
        else:
            buf = ring.popleft()
        ring.append(buf)
        return buf[:n]

    def _pinned_outputs(self, shapes: list[tuple[int, ...]], limit: int) -> list[Any]:
        torch = self.torch
        try:
            bufs = self.out_free.get_nowait()
        except queue.Empty:
            if self.out_count < limit:
                self.out_count += 1
                bufs = [torch.empty(s, dtype=self.store_dtype).pin_memory() for s in shapes]
            else:
                bufs = self.out_free.get()  # wait for the writer to hand a set back
        return bufs

    def _pixels(self, j: int, x: Any, n: int, batch_size: int) -> Any:
        """Spec ``j``'s uint8 batch ``x`` (on the device) normalised, in the compute dtype."""
        torch = self.torch
        if self.cuda:
            pix = self.normalizers[j](x)
        else:
            if self.cpu_pix[j] is None or self.cpu_pix[j].shape[0] < n:
                self.cpu_pix[j] = torch.empty((max(n, batch_size), *self.shapes[j]),
                                              dtype=torch.float32)
            pix = self.normalizers[j](x, out=self.cpu_pix[j][:n])
        return pix.to(self.compute_dtype)

    def launch(self, arrays: Sequence[Any], batch_size: int) -> tuple[Any, Any, Any, Any]:
        """Start one batch; returns a handle for `collect`."""
        import numpy as np

        torch = self.torch
        n = len(arrays)
        parts = [arrays] if self.split is None else list(zip(*map(self.split, arrays),
                                                             strict=True))
        with torch.inference_mode():
            pix = []
            for j, images in enumerate(parts):
                host_in = self._pinned_input(j, n, batch_size)
                np.stack(images, out=host_in.numpy())
                pix.append(self._pixels(j, host_in.to(self.device, non_blocking=True), n,
                                        batch_size))
            feats = [f for tower, j in zip(self.towers, self.inputs, strict=True)
                     for f in tower.forward_outputs(pix[j])]
            bad = None  # one flag on the device for every output of the batch
            for f in feats:
                b = ~torch.isfinite(f).all()
                if self.check_range:
                    b = b | (f.abs().amax() > FLOAT16_MAX)
                bad = b if bad is None else bad | b
            outs = [f.to(self.store_dtype) for f in feats]
            if not self.cuda:
                return [o.numpy() for o in outs], bool(bad), None, None
            full = self._pinned_outputs([(batch_size, *o.shape[1:]) for o in outs], limit=12)
            host_out = [buf[:n] for buf in full]
            for h, o in zip(host_out, outs, strict=True):
                h.copy_(o, non_blocking=True)
            bad_host = torch.empty((), dtype=torch.bool).pin_memory()
            bad_host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return host_out, bad_host, event, full

    def collect(self, handle: tuple[Any, Any, Any, Any]
                ) -> tuple[list[Any], bool, Callable[[], None] | None]:
        """The batch's features (one array per output), whether any value is out of range,
        and the callback that hands the output buffers back (None on CPU)."""
        host_out, bad, event, full = handle
        if event is None:
            return host_out, bool(bad), None
        event.synchronize()
        return [h.numpy() for h in host_out], bool(bad.item()), (lambda: self.out_free.put(full))


# --------------------------------------------------------------------------- the run


def raise_range(
    feats: Sequence[Any], rows: list[tuple[int, str]], store_dtype: str, compute_dtype: str
) -> None:
    """Name the first row whose values the store cannot hold (in any output), and the fix."""
    import numpy as np

    arrays = [np.asarray(f, dtype=np.float32) for f in feats]
    for i, (_, key) in enumerate(rows):
        for f in arrays:
            _check_row(f[i], key, store_dtype, compute_dtype)
    raise ExtractionError("the tower produced values outside the store dtype's range: "
                          "rerun with --store-dtype float32 (add --overwrite if --out holds finished shards)")


def _check_row(row: Any, key: str, store_dtype: str, compute_dtype: str) -> None:
    """ExtractionError naming ``key`` if the store cannot hold ``row``."""
    import numpy as np

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
