"""`extract(config) -> Summary`: sources -> plan -> decode workers -> tower -> shard writer.

Three stages run at once so the device never waits: decode worker processes (fed by a
feeder thread) turn files into uint8 arrays in plan order; the calling thread normalises
batches on the device and runs the tower; a writer thread appends rows to the open shard of
each chunk and commits a shard (flush, fsync, rename) as soon as its chunk is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from clipfeat import __version__
from clipfeat.config import ExtractConfig
from clipfeat.errors import ClipfeatError, ConfigError, ExtractionError, Interrupted

logger = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
_STOP = object()


class Progress(Protocol):
    """What `extract` reports to; the CLI implements it with a tqdm bar."""

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


# --------------------------------------------------------------------------- preparation


@dataclass
class _Run:
    cfg: ExtractConfig
    out: Path
    device: str
    compute_dtype: str
    tower: Any
    spec: Any
    meta: dict[str, Any]
    identity: dict[str, Any]
    items: list[Any]
    sources: dict[str, Any]
    existing_plan: Any = None


def _resolve_device(requested: str, local_rank: int) -> str:
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


def _resolve_dtype(requested: str, device: str) -> str:
    if requested == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    return requested


def _abs(p: str | None) -> str | None:
    return os.path.abspath(p) if p else None


def _gather_items(
    cfg: ExtractConfig, out: Path, *, scan: bool = True
) -> tuple[list[Any], dict[str, Any]]:
    """The inputs, in plan order (only rank 0 scans; the others read the frozen plan)."""
    from clipfeat import sources

    exts = tuple(cfg.exts) if cfg.exts else sources.DEFAULT_EXTS
    if not scan:
        items = []
    elif cfg.llava_json:
        items = sources.read_llava_json(cfg.llava_json, cfg.image_folder)
    elif cfg.files_from:
        items = sources.read_files_from(cfg.files_from, list(cfg.roots) or None)
    else:
        items = sources.walk_folders(list(cfg.roots), exts, exclude=[out])
    if cfg.limit is not None:
        items = items[: cfg.limit]
    src = {
        "roots": [_abs(r) for r in cfg.roots],
        "files_from": _abs(cfg.files_from),
        "llava_json": _abs(cfg.llava_json),
        "image_folder": _abs(cfg.image_folder),
        "exts": list(exts) if not (cfg.llava_json or cfg.files_from) else None,
    }
    return items, src


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: choose another --out")
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable; choose a writable --out")


def _identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            diffs.append(f"{k}: {old.get(k)!r} in OUT, {new.get(k)!r} now")
    return diffs


def _prepare(cfg: ExtractConfig) -> _Run:
    """Every check of a user mistake that needs no torch, before anything is written.

    The device, the compute dtype and the comparison with an existing OUT wait for
    `_settle` (importing torch takes seconds, and decoding can start meanwhile).
    """
    from clipfeat import distributed
    from clipfeat.modelref import resolve_model
    from clipfeat.plan import load_plan
    from clipfeat.preprocess import PreprocessSpec
    from clipfeat.tower import check_feature, resolve_layer, tokens_per_image

    cfg.validate()
    out = Path(cfg.out).expanduser()
    for r in cfg.roots:
        if not Path(r).is_dir():
            raise ConfigError(f"ROOT {r} is not an existing folder: check the path")
    _check_out(out)

    ref = resolve_model(
        cfg.model, revision=cfg.revision, need_weights=True, allow_pickle=cfg.allow_pickle
    )
    layer_index = resolve_layer(cfg.layer, ref.num_hidden_layers)
    check_feature(cfg.feature, ref.family)
    if ref.preprocessor_config is None:
        logger.warning("model %r has no preprocessor_config.json: using the %s defaults at %d px",
                       cfg.model, ref.family, ref.image_size)
    spec = PreprocessSpec.from_processor_config(
        ref.preprocessor_config, family=ref.family, image_size=ref.image_size
    )
    meta = {
        "clipfeat_version": __version__,
        "model": cfg.model,
        "model_revision": ref.revision or "",
        "model_weights_revision": getattr(ref, "weights_revision", None) or "",
        "model_type": ref.model_type,
        "family": ref.family,
        "layer": cfg.layer,
        "layer_index": layer_index,
        "num_layers": ref.num_hidden_layers,
        "feature": cfg.feature,
        "aspect": cfg.aspect,
        "image_size": int(ref.image_size),
        "patch_size": int(ref.patch_size),
        "hidden_size": int(ref.hidden_size),
        "tokens": int(tokens_per_image(ref, cfg.feature)),
        "has_cls_token": bool(ref.has_cls_token),
        "compute_dtype": None,  # set by _settle
        "store_dtype": cfg.store_dtype,
        "exif_transpose": cfg.exif_transpose,
        "preprocessing": spec.to_dict(),
    }
    items, src = _gather_items(cfg, out, scan=distributed.env_world()[0] == 0)
    identity = {
        "model": cfg.model,
        "model_revision": ref.revision or "",
        "layer": cfg.layer,
        "feature": cfg.feature,
        "aspect": cfg.aspect,
        "compute_dtype": None,  # set by _settle
        "store_dtype": cfg.store_dtype,
        "exif_transpose": cfg.exif_transpose,
        "preprocessing": spec.to_dict(),
        "sources": src,
    }
    plan = None
    if not cfg.overwrite:
        plan = load_plan(out) if out.is_dir() else None
        if plan is not None:
            if int(plan.header["shard_size"]) != cfg.shard_size:
                raise ConfigError(
                    f"--shard-size {cfg.shard_size} differs from the {plan.header['shard_size']} "
                    f"--out {out} was planned with: rerun with --shard-size "
                    f"{plan.header['shard_size']}, or --overwrite to start over"
                )
        elif out.is_dir() and any(out.glob("shard-*.h5")):
            raise ConfigError(
                f"--out {out} holds shards but no plan: use another --out, or --overwrite"
            )
    # The weights are loaded (and so validated) by _extract before OUT is touched.
    return _Run(cfg, out, "", "", None, spec, meta, identity, items, src, existing_plan=plan)


def _settle(run: _Run) -> None:
    """The checks that need torch: resolve the device and the compute dtype, then compare
    the full configuration with what an existing OUT was made with. Writes nothing."""
    from clipfeat import distributed

    cfg = run.cfg
    _, _, local_rank = distributed.env_world()
    run.device = _resolve_device(cfg.device, local_rank)
    run.compute_dtype = _resolve_dtype(cfg.dtype, run.device)
    run.meta["compute_dtype"] = run.compute_dtype
    run.identity["compute_dtype"] = run.compute_dtype
    plan = run.existing_plan
    if plan is not None:
        diffs = _identity_diff(plan.header.get("identity", {}), run.identity)
        if diffs:
            raise ConfigError(
                f"--out {run.out} holds features made with other settings ({'; '.join(diffs)}): "
                "use another --out, or --overwrite to replace them"
            )


def _wipe(out: Path) -> None:
    """--overwrite: remove what clipfeat wrote (and nothing else)."""
    import shutil

    for p in list(out.glob("shard-*.h5")) + list(out.glob("shard-*.h5.partial")):
        p.unlink()
    for name in ("manifest.json", "failures.jsonl"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / ".clipfeat", ignore_errors=True)


# --------------------------------------------------------------------------- stages


class _Writer(threading.Thread):
    """Owns every open ShardWriter: appends rows, seals a shard when its chunk ends.

    Sealed shards go to a committer thread that checksums, fsyncs and renames them, so the
    next chunk's rows are written while the previous shard is being synced.
    """

    def __init__(self, out: Path, meta: dict[str, Any], on_commit: Callable[[Any], None]):
        super().__init__(name="clipfeat-writer", daemon=True)
        self.out = out
        self.meta = meta
        self.on_commit = on_commit
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.sealed: queue.Queue = queue.Queue(maxsize=2)
        self.committer = threading.Thread(target=self._commit_loop, name="clipfeat-committer",
                                          daemon=True)
        self.error: BaseException | None = None
        self.open: dict[int, Any] = {}
        self.pending: dict[int, Any] = {}  # sealed, not yet committed
        self.commit_failed = False
        self.expected: dict[int, int] = {}
        self.bytes_written = 0
        self.seconds = {"append": 0.0, "seal": 0.0, "commit": 0.0, "main_waits_writer": 0.0}
        self.lock = threading.Lock()

    def start(self) -> None:
        super().start()
        self.committer.start()

    def put(self, msg: tuple) -> None:
        t = time.perf_counter()
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(msg, timeout=0.2)
                self.seconds["main_waits_writer"] += time.perf_counter() - t
                return
            except queue.Full:
                if not self.is_alive():
                    raise ExtractionError("the shard writer stopped unexpectedly") from None

    def _shard(self, chunk: int) -> Any:
        w = self.open.get(chunk)
        if w is None:
            from clipfeat.store import ShardWriter

            w = ShardWriter(
                self.out,
                chunk,
                tokens=self.meta["tokens"],
                hidden=self.meta["hidden_size"],
                store_dtype=self.meta["store_dtype"],
                attrs=self.meta,
                expected_rows=self.expected.get(chunk),
            )
            self.open[chunk] = w
        return w

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.sealed.put(None)  # let the committer finish what it holds, then stop

    def _run(self) -> None:
        while True:
            msg = self.q.get()
            if msg[0] == "stop":
                return
            if self.error is not None:
                if msg[0] == "rows" and msg[4] is not None:
                    msg[4]()
                continue
            try:
                kind = msg[0]
                if kind == "rows":
                    _, chunk, keys, feats, release = msg
                    t = time.perf_counter()
                    try:
                        # the device loop checked these values before casting them
                        self._shard(chunk).append(keys, feats, checked=True)
                    finally:
                        if release is not None:
                            release()
                    self.seconds["append"] += time.perf_counter() - t
                elif kind == "fail":
                    self._shard(msg[1]).add_failures([msg[2]])
                elif kind == "begin":
                    self.expected[msg[1]] = msg[2]
                elif kind == "end":
                    t = time.perf_counter()
                    w = self._shard(msg[1])
                    w.seal()
                    self.seconds["seal"] += time.perf_counter() - t
                    with self.lock:
                        del self.open[msg[1]]
                        self.pending[msg[1]] = w
                    while self.error is None:
                        try:
                            self.sealed.put(w, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    else:  # the committer failed meanwhile: nobody will commit this one
                        w.abort()
                        with self.lock:
                            self.pending.pop(msg[1], None)
            except BaseException as err:  # surfaced to the main thread by put()/finish()
                self.error = err
                self.abort_all()

    def _commit_loop(self) -> None:
        while True:
            w = self.sealed.get()
            if w is None:
                return
            # A sealed shard is complete: commit it even if a later chunk failed; but once a
            # commit itself failed (disk full, read-only...), commit nothing after it.
            if self.commit_failed:
                w.abort()
                with self.lock:
                    self.pending.pop(w.shard_id, None)
                continue
            try:
                t = time.perf_counter()
                info = w.commit()
                self.seconds["commit"] += time.perf_counter() - t
                with self.lock:
                    self.pending.pop(info.shard_id, None)
                self.bytes_written += info.bytes
                self.on_commit(info)
            except BaseException as err:
                self.commit_failed = True
                if self.error is None:
                    self.error = err
                w.abort()
                with self.lock:
                    self.pending.pop(w.shard_id, None)

    def abort_all(self) -> None:
        """Drop the shards still being written (sealed ones are left to the committer)."""
        with self.lock:
            writers = list(self.open.values())
            self.open.clear()
        for w in writers:
            w.abort()

    def join_all(self, timeout: float | None = None) -> None:
        self.join(timeout)
        self.committer.join(timeout)

    def finish(self) -> None:
        self.put(("stop",))
        self.join_all()
        if self.error is not None:
            raise self.error


class _Feeder(threading.Thread):
    """Drives the decode pool and queues its results, in plan order, for the device loop."""

    def __init__(self, pool: Any, tasks: Iterator[tuple[int, str, str]], depth: int):
        super().__init__(name="clipfeat-feeder", daemon=True)
        self.pool = pool
        self.tasks = tasks
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.waited = 0.0  # seconds the device loop waited for decoded images
        self.drained = False  # every image is decoded (the rest is in the queue)

    def run(self) -> None:
        try:
            # Borrowed: the arrays stay in the pool's shared memory until the batch they go
            # into is stacked (see _run_chunks), which releases them.
            for res in self.pool.imap(self.tasks, borrow=True):
                self._put(res)
                if self.stop.is_set():
                    return
            self.drained = True
            self._put(_STOP)
        except BaseException as err:
            self._put(err)

    def _put(self, obj: Any) -> None:
        while not self.stop.is_set():
            try:
                self.q.put(obj, timeout=0.2)
                return
            except queue.Full:
                continue

    def backlog(self) -> float:
        """How full the queue of decoded images is (0 to 1)."""
        return self.q.qsize() / self.q.maxsize

    def get(self) -> Any:
        t = time.perf_counter()
        obj = self.q.get()
        self.waited += time.perf_counter() - t
        if isinstance(obj, BaseException):
            raise obj
        return obj


class _Device:
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


class _Signalled(KeyboardInterrupt):
    """What the signal handler raises; `extract` turns it into `Interrupted`.

    Not an Exception (like KeyboardInterrupt): the signal can land anywhere, and an
    ``except Exception`` on the way (loading weights, a library's fallback) would otherwise
    swallow it or report it as another error.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# Signals caught by the guard. Python only prints an exception raised in a __del__ or weakref
# callback, so the handler's may be lost: `_check_signal` raises it again at safe points.
_pending_signals: list[int] = []


def _check_signal() -> None:
    if _pending_signals:
        raise _Signalled(_pending_signals[0])


def _signal_guard() -> Callable[[], None]:
    """Turn SIGINT/SIGTERM into `_Signalled` in the main thread; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        _pending_signals.append(signum)
        raise _Signalled(signum)

    _pending_signals.clear()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def undo() -> None:
        for s, h in old.items():
            signal.signal(s, h)
        _pending_signals.clear()

    return undo


def extract(
    config: ExtractConfig | None = None, *, progress: Progress | None = None, **kwargs: Any
) -> Summary:
    """Extract features for every input of `config` into its OUT folder; return a Summary.

    Call with an `ExtractConfig`, or with its fields as keywords:
    ``clipfeat.extract(roots=["images/"], out="feats/", layer=-2, feature="patch")``.
    Raises ConfigError (bad arguments, nothing written), ExtractionError (the run failed;
    finished shards are intact) or Interrupted (a signal stopped it; rerun to resume).
    """
    if config is None:
        config = ExtractConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    undo = _signal_guard()
    try:
        return _extract(config, progress)
    except _Signalled as stop:
        name = signal.Signals(stop.signum).name
        raise Interrupted(stop.signum, f"interrupted by {name}") from None
    finally:
        undo()


def _extract(cfg: ExtractConfig, progress: Progress | None) -> Summary:
    from clipfeat import distributed
    from clipfeat.plan import extend, load_plan, save
    from clipfeat.store import finalize, remove_partials, scan_shards

    t0 = time.perf_counter()
    run = _prepare(cfg)
    out = run.out
    decode: _Decode | None = None
    dist = None
    try:
        plan = None
        rank, world, _ = distributed.env_world()
        if rank == 0:
            plan = extend(run.existing_plan, run.items, shard_size=cfg.shard_size,
                          sources=run.sources, identity=run.identity)
        if world == 1:
            # Start decoding now: the workers get going while torch and the model load.
            finished = {} if cfg.overwrite or not out.is_dir() else scan_shards(out)
            decode = _Decode(run, plan, [c for c in plan.chunks if c.id not in finished])
        _settle(run)  # imports torch; may still refuse the run (nothing is written yet)
        if plan is not None and run.existing_plan is None:
            plan.header["identity"] = run.identity  # now with the compute dtype
        t_prepared = time.perf_counter()
        dist = distributed.setup(run.device)
        # Load (and so validate) the weights before anything is written to OUT.
        t_load = time.perf_counter()
        _load_tower(run)
        t_loaded = time.perf_counter()
        if dist.is_main:
            _write_plan(out, plan, overwrite=cfg.overwrite, save=save)
            remove_partials(out)
        dist.barrier()
        if plan is None:
            plan = load_plan(out)
        summary = Summary(out=str(out), planned=len(plan.items), rank=dist.rank, world=dist.world)
        finished = scan_shards(out)
        done_ids = set(finished)
        todo_all = [c for c in plan.chunks if c.id not in done_ids]
        mine = [c for c in todo_all if dist.mine(c.id)]
        summary.skipped = sum(len(c) for c in plan.chunks if c.id in done_ids)
        if mine and decode is None:
            decode = _Decode(run, plan, mine)
        if todo_all:
            _run_chunks(run, plan, mine, todo_all, finished, summary, progress, dist, decode)
        _check_signal()
        dist.barrier()
        if dist.is_main:
            shards = scan_shards(out)
            summary.complete = all(c.id in shards for c in plan.chunks)
            summary.total_failures = sum(s.num_failures for s in shards.values())
            finalize(out, meta=run.meta, plan=plan.info(), shards=shards.values(),
                     complete=summary.complete)
    finally:
        if decode is not None:
            decode.close()
        if dist is not None:
            dist.close()
    summary.seconds = time.perf_counter() - t0
    summary.stats.setdefault("seconds", {}).update(
        prepare=round(t_prepared - t0, 3), model_load=round(t_loaded - t_load, 3)
    )
    return summary


def _write_plan(out: Path, plan: Any, *, overwrite: bool, save: Callable[..., None]) -> None:
    """Create OUT (wiping clipfeat's files with --overwrite) and write the plan into it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a read-only or pseudo file system
        raise ConfigError(
            f"--out {out} cannot be created ({err.strerror or err}): choose a writable --out"
        ) from None
    if overwrite:
        _wipe(out)
    try:
        save(out, plan)
    except PermissionError as err:
        raise ConfigError(
            f"--out {out} is not writable ({err.strerror or err}): choose a writable --out"
        ) from None
    except OSError as err:
        raise ExtractionError(f"cannot write the plan into {out}: {err}") from None


#: Memory for decoded images waiting for the device (shared memory the workers write into).
#: 384 MiB was no faster on the 2-core benchmark (four interleaved pairs of runs).
QUEUE_BYTES = 256 << 20


class _Decode:
    """The decode worker pool and its feeder thread over the items of some chunks."""

    def __init__(self, run: _Run, plan: Any, chunks: list[Any]) -> None:
        from clipfeat.decode import DecodePool

        cfg = run.cfg
        self.chunk_ids = [c.id for c in chunks]
        # Room for a few batches, more while the model loads, at most QUEUE_BYTES of pixels
        # (792 images at 336 px, which a 2-core CPU run decodes before torch has loaded).
        image_bytes = 3 * run.spec.out_height * run.spec.out_width
        depth = max(2 * cfg.batch_size, 4 * max(1, cfg.num_workers),
                    min(1024, QUEUE_BYTES // image_bytes))
        self.pool = DecodePool(
            run.spec,
            aspect=cfg.aspect,
            workers=cfg.num_workers,
            exif_transpose=cfg.exif_transpose,
            max_pixels=cfg.max_pixels,
            timeout=cfg.decode_timeout,
            # Tests inject a misbehaving decoder here ("module:function", see DecodePool).
            decode_fn=cfg.extra.get("decode_fn"),
            # Every decoded image waits in one of these slots until its batch is stacked:
            # the feeder's queue, the batch being gathered, and the items in the workers.
            max_pending=depth + cfg.batch_size + 2 * max(1, cfg.num_workers),
        )

        def tasks() -> Iterator[tuple[int, str, str]]:
            for c in chunks:
                for it in plan.chunk_items(c):
                    if not it.error:
                        yield (it.index, it.key, it.path)

        self.feeder = _Feeder(self.pool, tasks(), depth=depth)
        self.feeder.start()

    def close(self) -> None:
        self.feeder.stop.set()
        self.pool.close()


def _run_chunks(
    run: _Run,
    plan: Any,
    mine: list[Any],
    todo_all: list[Any],
    finished: dict[int, Any],
    summary: Summary,
    progress: Progress | None,
    dist: Any,
    decode: _Decode | None,
) -> None:
    import torch

    from clipfeat.store import finalize

    cfg = run.cfg
    committed: dict[int, Any] = dict(finished)
    lock = threading.Lock()
    last_manifest = [time.monotonic()]

    def on_commit(info: Any) -> None:
        with lock:
            committed[info.shard_id] = info
            summary.shards_written += 1
        if dist.world == 1 and time.monotonic() - last_manifest[0] > 30:
            last_manifest[0] = time.monotonic()
            try:
                finalize(run.out, meta=run.meta, plan=plan.info(), shards=list(committed.values()),
                         complete=False)
            except OSError as err:  # the next commit or the final one will report it
                logger.warning("could not update the manifest: %s", err)

    if progress is not None:
        total = len(plan.items)
        progress.start(total=total, done=summary.skipped)

    tuner = None
    if not run.device.startswith("cuda"):
        threads = cfg.torch_threads or torch.get_num_threads()
        torch.set_num_threads(max(1, threads))
        if cfg.torch_threads is None and threads > 1 and cfg.num_workers > 0:
            tuner = _ThreadTuner(threads, cfg.num_workers)
    if decode is None or decode.chunk_ids != [c.id for c in mine]:
        if decode is not None:
            decode.close()
        decode = _Decode(run, plan, mine)
    pool, feeder = decode.pool, decode.feeder
    if tuner is not None:
        tuner.step(feeder.backlog(), decoding=not feeder.drained)
    dev = _Device(run.tower, run.spec, run.device, run.compute_dtype, cfg.store_dtype)
    writer = _Writer(run.out, run.meta, on_commit)
    writer.start()
    batch: list[tuple[int, str, Any]] = []
    ended: list[int] = []
    in_flight: list[Any] = []  # (handle, batch, ended chunks)

    device_s = [0.0]
    t_loop = time.perf_counter()
    decoded_before_loop = pool.stats.decoded + pool.stats.failed  # done while torch loaded
    others = {c.id: len(c) for c in todo_all if not dist.mine(c.id)}
    next_poll = [0.0]

    def poll_others(force: bool = False) -> None:
        """Rank 0's bar counts the whole job: add the chunks other ranks have finished."""
        if progress is None or not others or not dist.is_main:
            return
        now = time.monotonic()
        if not force and now < next_poll[0]:
            return
        next_poll[0] = now + 2.0
        from clipfeat.store import parse_shard_id

        for name in os.listdir(run.out):
            sid = parse_shard_id(name)
            if sid is not None and sid in others:
                progress.advance(others.pop(sid), 0)

    def drain_one() -> None:
        poll_others()
        handle, rows, ends = in_flight.pop(0)
        t = time.perf_counter()
        feats, bad, release = dev.collect(handle)
        device_s[0] += time.perf_counter() - t
        if bad:
            if release:
                release()
            _raise_range(feats, rows, cfg.store_dtype, run.compute_dtype)
        ends = list(ends)  # ascending chunk ids, like the rows
        start = 0
        while start < len(rows):
            chunk = rows[start][0]
            while ends and ends[0] < chunk:  # all its rows are queued: commit it before
                writer.put(("end", ends.pop(0)))  # opening the next shard
            stop = start
            while stop < len(rows) and rows[stop][0] == chunk:
                stop += 1
            last = stop == len(rows)
            writer.put(("rows", chunk, [r[1] for r in rows[start:stop]], feats[start:stop],
                        release if last else None))
            start = stop
        if not rows and release:
            release()
        for c in ends:
            writer.put(("end", c))
        summary.extracted += len(rows)
        if progress is not None:
            progress.advance(len(rows), 0)

    def flush() -> None:
        nonlocal batch, ended
        _check_signal()
        if batch:
            t = time.perf_counter()
            handle = dev.launch([b[2] for b in batch], cfg.batch_size)
            device_s[0] += time.perf_counter() - t
            for b in batch:  # stacked into the device's buffer: their slots can be reused
                pool.release(b[2])
            in_flight.append((handle, [(b[0], b[1]) for b in batch], ended))
        elif ended:
            in_flight.append(((None, False, None, None), [], ended))
        batch, ended = [], []
        while len(in_flight) > (1 if dev.cuda else 0):
            drain_one()
        if tuner is not None:
            tuner.step(feeder.backlog(), decoding=not feeder.drained)

    try:
        for c in mine:
            items = plan.chunk_items(c)
            writer.put(("begin", c.id, len(items)))
            for it in items:
                if it.error:
                    err, path = it.error, it.path
                else:
                    res = feeder.get()
                    if res is _STOP or res.index != it.index:
                        raise ExtractionError(
                            f"internal error: decode results out of order at {it.key!r}"
                        )
                    err, path = res.error, res.path
                    if err is None:
                        batch.append((c.id, it.key, res.array))
                        if len(batch) >= cfg.batch_size:
                            flush()
                        continue
                writer.put(("fail", c.id, _failure(it, path, err)))
                summary.failed += 1
                if progress is not None:
                    progress.advance(1, 1)
            ended.append(c.id)
            if not batch:
                flush()
        flush()
        while in_flight:
            drain_one()
        writer.finish()
        poll_others(force=True)
    except BaseException:
        feeder.stop.set()
        _stop_writer(writer)
        raise
    finally:
        feeder.stop.set()
        stats = getattr(pool, "stats", None)
        summary.stats = stats.as_dict() if hasattr(stats, "as_dict") else {}
        summary.stats["seconds"] = {
            "loop": round(time.perf_counter() - t_loop, 3),
            "waiting_for_decode": round(feeder.waited, 3),
            "device_launch_and_collect": round(device_s[0], 3),
            **{k: round(v, 3) for k, v in writer.seconds.items()},
        }
        summary.stats["decoded_before_loop"] = decoded_before_loop
        if tuner is not None:
            summary.stats["torch_threads"] = tuner.threads
    summary.bytes_written = writer.bytes_written


class _ThreadTuner:
    """On a CPU run, share the cores between torch's intra-op threads and the decode workers.

    While the workers have images to decode, torch gets the cores they leave
    (``threads - workers``, at least one): torch's threads stall as a group when a worker
    preempts one, the niced workers get little of a core that torch wants, and one thread
    does more per CPU-second than two anyway (the tiny 336-px tower's forward: 3.6 vs 4.2
    CPU-ms per image, ``benchmarks/bench_cpu_budget.py``). All threads go to torch when the
    workers have nothing to do: the queue of decoded images is (nearly) full, which is where
    a compute-bound run lives, or every image is decoded. Back to the smaller number when
    the queue falls under half full, so that decoding catches up.
    """

    HIGH, LOW = 0.9, 0.5  # queue fill at which torch takes all threads / gives some back

    def __init__(self, threads: int, workers: int) -> None:
        self.max = self.threads = threads
        self.min = max(1, threads - workers)

    def step(self, backlog: float, decoding: bool = True) -> None:
        """``backlog``: how full the decoded-image queue is (0-1); called before each batch."""
        import torch

        if not decoding or backlog >= self.HIGH:
            want = self.max
        elif backlog < self.LOW:
            want = self.min
        else:
            return
        if want != self.threads:
            self.threads = want
            torch.set_num_threads(want)
            logger.debug("torch intra-op threads -> %d (decoded-image queue %.0f%% full%s)",
                         want, 100 * backlog, "" if decoding else ", decoding done")


def _stop_writer(writer: _Writer) -> None:
    """After a failure: let the writer finish what it holds, then drop unfinished shards."""
    # Not writer.put(): once the writer has failed, put() re-raises its error instead of
    # queueing, and the writer (still draining its queue) would never see the stop.
    deadline = time.monotonic() + 60
    while writer.is_alive() and time.monotonic() < deadline:
        try:
            writer.q.put(("stop",), timeout=0.2)
            break
        except queue.Full:
            continue
    writer.join_all(timeout=max(0.0, deadline - time.monotonic()))
    writer.abort_all()


def _load_tower(run: _Run) -> None:
    """Build and load the tower on the run's device and dtype (ModelError on bad weights)."""
    from clipfeat.tower import CLIPVisionTower

    cfg = run.cfg
    args = dataclasses.make_dataclass(
        "Args", ["mm_vision_select_layer", "mm_vision_select_feature"]
    )(cfg.layer, cfg.feature)
    tower = CLIPVisionTower(cfg.model, args, delay_load=True, revision=cfg.revision,
                            allow_pickle=cfg.allow_pickle, device=run.device,
                            dtype=run.compute_dtype)
    tower.load_model()
    run.tower = tower


def _failure(it: Any, path: str, error: str) -> dict[str, Any]:
    return {"key": it.key, "path": path, "error": error, "index": it.index, "shard": it.chunk}


def _raise_range(
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
                "rerun with --store-dtype float32"
            )
        if not np.isfinite(row).all():
            raise ExtractionError(
                f"the tower produced NaN/Inf for {key!r} (compute dtype overflow?): "
                "rerun with --dtype float32 (and --store-dtype float32)"
            )
        if store_dtype == "float16" and np.abs(row).max() > FLOAT16_MAX:
            raise ExtractionError(
                f"features of {key!r} reach {np.abs(row).max():.4g}, beyond float16's range "
                f"±{FLOAT16_MAX:g}: rerun with --store-dtype float32"
            )
    raise ExtractionError("the tower produced values outside the store dtype's range: "
                          "rerun with --store-dtype float32")


# --------------------------------------------------------------------------- verify helper


def compute_features(
    items: Sequence[tuple[str, str]],
    meta: dict[str, Any],
    *,
    model: str,
    device: str = "cpu",
) -> dict[str, Any]:
    """Re-extract `(key, path)` items with the settings in `meta`; key -> float32 array or error.

    Used by `clipfeat verify --model` to compare stored rows with a fresh computation.
    """
    import numpy as np
    import torch

    from clipfeat.preprocess import Normalizer, PreprocessSpec, load_image, to_uint8
    from clipfeat.tower import CLIPVisionTower

    args = dataclasses.make_dataclass("Args", ["mm_vision_select_layer", "mm_vision_select_feature"])(
        int(meta["layer"]), meta["feature"]
    )
    tower = CLIPVisionTower(model, args, delay_load=True)
    tower.load_model()
    dtype = getattr(torch, meta.get("compute_dtype", "float32"))
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    tower.vision_tower.to(device=device, dtype=dtype)
    spec = PreprocessSpec.from_processor_config(
        tower.model_ref.preprocessor_config, family=tower.family,
        image_size=int(tower.config.image_size),
    )
    norm = Normalizer(spec)
    out: dict[str, Any] = {}
    for key, path in items:
        try:
            img = load_image(path, exif_transpose=bool(meta.get("exif_transpose", False)))
            arr = to_uint8(img, spec, meta.get("aspect", "square"))
        except Exception as err:  # per-item failures are data here
            out[key] = f"{type(err).__name__}: {err}"
            continue
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(arr))[None].to(device)
            feats = tower.forward_features(norm(x).to(dtype))
        out[key] = feats[0].float().cpu().numpy()
    return out
