"""`extract(config) -> Summary`: prepare -> plan -> loop -> finalize.

1. prepare: every check of a user mistake that needs no torch (config, ROOTs, OUT, the
   model's files and config, layer and feature), the inputs gathered, the existing plan
   read. Nothing is written.
2. settle: torch imported, the device and compute dtype chosen, the settings compared with
   what an existing OUT was made with. Decoding starts before this, since importing torch
   takes seconds. Still nothing written.
3. load the tower (bad weights fail here), write the plan into OUT, and under torchrun
   meet the other ranks.
4. loop (`loop.run_chunks`) over this rank's unfinished chunks.
5. finalize: failures.jsonl, manifest.json and the key index, on rank 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from clipfeat.config import ExtractConfig
from clipfeat.errors import ConfigError, ExtractionError, Interrupted, StoreError
from clipfeat.pipeline.device import resolve_device, resolve_dtype
from clipfeat.pipeline.feed import DecodeFeed
from clipfeat.pipeline.loop import run_chunks
from clipfeat.pipeline.settings import RunSettings, TowerSetup, identity_diff, source_record
from clipfeat.pipeline.signals import Signalled, check_signal, signal_guard
from clipfeat.pipeline.summary import Progress, Summary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What step 1 found: the checked config, the resolved model and the inputs."""

    cfg: ExtractConfig
    out: Path
    towers: tuple[TowerSetup, ...]  # each --model resolved, with its preprocessing
    spec: Any  # what the decoders make: the one PreprocessSpec, or a SpecSet of several
    settings: RunSettings  # compute_dtype still None
    items: list[Any]
    existing_plan: Any  # clipfeat.plan.Plan or None


@dataclass(frozen=True)
class Run:
    """A settled run: what the loop needs."""

    cfg: ExtractConfig
    out: Path
    device: str
    settings: RunSettings
    spec: Any  # as Prepared.spec
    towers: list[Any]  # loaded CLIPVisionTowers, in --model order (none: nothing to do)
    tower_specs: tuple[Any, ...]  # the PreprocessSpec each tower is fed


def extract(
    config: ExtractConfig | None = None, *, progress: Progress | None = None, **kwargs: Any
) -> Summary:
    """Extract features for every input of `config` into its OUT folder; return a Summary.

    Call with an `ExtractConfig`, or with its fields as keywords:
    ``clipfeat.extract(roots=["images/"], out="feats/", layer=-2, feature="patch")``.
    Raises ConfigError (bad arguments, nothing written), ExtractionError (the run failed;
    finished shards are intact) or Interrupted (a signal stopped it; rerun to resume).
    Called from the main thread, SIGINT/SIGTERM stop the run cleanly meanwhile; the
    previous signal handlers and torch's thread count are back when it returns.
    """
    if config is None:
        config = ExtractConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    if config.workers != 0:  # an unguarded script: stop before its workers would run it again
        from clipfeat.decode.workers import check_main_guard

        check_main_guard("clipfeat.extract()")
    undo = signal_guard()
    try:
        return _extract(config, progress)
    except Signalled as stop:
        name = signal.Signals(stop.signum).name
        raise Interrupted(stop.signum, f"interrupted by {name}") from None
    finally:
        undo()


def _extract(cfg: ExtractConfig, progress: Progress | None) -> Summary:
    from clipfeat import distributed
    from clipfeat.plan import extend, load_plan
    from clipfeat.store import discard_damaged

    t0 = time.perf_counter()
    cfg.validate()
    out = Path(cfg.out).expanduser()
    _check_out(out)
    rank, world, _ = distributed.env_world()
    lock = _lock(cfg, out, rank)  # before anything slow: a locked OUT is refused at once
    feed: DecodeFeed | None = None
    dist = None
    try:
        prep = prepare(cfg)
        cfg = prep.cfg  # with the worker count capped
        plan, checked, todo, feed = _plan_early(prep, rank, world)
        _announce(progress, cfg, plan, todo)
        device, settings, replace = settle(prep)  # imports torch; may refuse (nothing written)
        if replace:  # OUT's plan had other settings but no finished shard: start afresh
            if feed is not None:
                feed.close()
            feed, checked = None, None
            prep = dataclasses.replace(prep, existing_plan=None)
            if plan is not None:
                plan = extend(None, prep.items, shard_size=cfg.shard_size,
                              sources=settings.sources, identity=settings.identity())
        if plan is not None:
            _record_identity(plan, settings, new=prep.existing_plan is None)
        t_prepared = time.perf_counter()
        dist = distributed.setup(device)
        # Load (and so validate) the weights before anything is written to OUT.
        t_load = time.perf_counter()
        nothing_left = todo == [] and not replace and not checked.damaged
        towers = [] if nothing_left else _load_towers(prep, device, settings)
        run = Run(cfg, out, device, settings, prep.spec, towers,
                  tuple(t.spec for t in prep.towers))
        t_loaded = time.perf_counter()
        if dist.is_main:
            if lock is not None:
                lock.acquire()  # a new OUT: created here, under the lock
            _write_plan(out, plan, overwrite=cfg.overwrite or replace)
            checked = checked or _check_finished(out, plan, cfg)
            discard_damaged(checked.damaged)
        dist.barrier()
        if not dist.is_main and not cfg.no_lock:
            from clipfeat.store.lock import check_same_job

            check_same_job(out)
        if plan is None:
            plan = load_plan(out)
        summary = Summary(out=str(out), planned=len(plan.items), rank=dist.rank, world=dist.world)
        # rank 0 already read every finished shard (the damage check): no second scan
        known = checked.trusted if dist.is_main and checked is not None else None
        feed, finished = _work(run, plan, dist, feed, summary, progress, known)
        check_signal()
        dist.barrier()
        if dist.is_main:
            shards = _finalize(run, plan, summary)
            if dist.world > 1:
                _count_every_rank(summary, shards, finished, progress)
    finally:
        if feed is not None:
            feed.close()
        if dist is not None:
            dist.close()
        if lock is not None:
            lock.release()
    summary.seconds = time.perf_counter() - t0
    summary.stats.setdefault("seconds", {}).update(
        prepare=round(t_prepared - t0, 3), model_load=round(t_loaded - t_load, 3)
    )
    return summary


def _work(run: Run, plan: Any, dist: Any, feed: DecodeFeed | None, summary: Summary,
          progress: Progress | None, known: dict[int, Any] | None = None
          ) -> tuple[DecodeFeed | None, dict[int, Any]]:
    """Step 4: this rank's unfinished chunks through the loop; returns the decode feed used
    and the shards that were finished before. The manifest lists the finished shards from
    the start, and again if the run stops."""
    finished = (_finished(run.cfg, run.out, announce=dist.is_main) if known is None
                else _retry_filter(run.cfg, known, announce=dist.is_main))
    todo_all = [c for c in plan.chunks if c.id not in finished]
    mine = [c for c in todo_all if dist.mine(c.id)]
    summary.skipped = sum(len(c) for c in plan.chunks if c.id in finished)
    if mine and feed is None:
        feed = DecodeFeed(run.cfg, run.spec, plan, mine)
    if not todo_all:
        return feed, finished
    if dist.is_main:  # readable from the start: the shards finished so far
        _finalize(run, plan, summary, finished=finished)
    try:
        feed = run_chunks(run, plan, mine, todo_all, finished, summary, progress, dist, feed)
        return feed, finished
    except BaseException:
        if dist.is_main:  # stopped or failed: list what is finished now
            _finalize_quietly(run, plan, summary)
        raise


def _plan_early(prep: Prepared, rank: int, world: int) -> tuple[Any, Any, Any, Any]:
    """Before torch: the plan (rank 0), and in a single process the finished shards it
    keeps, the chunks left to do and a decode feed over them, started now so that the
    workers decode while torch and the model load. (plan, check, todo, feed); None where
    not known here."""
    from clipfeat.plan import extend

    cfg = prep.cfg
    plan = checked = todo = feed = None
    if rank == 0:
        plan = extend(prep.existing_plan, prep.items, shard_size=cfg.shard_size,
                      sources=prep.settings.sources, identity=prep.settings.identity())
    if world == 1:
        checked = _check_finished(prep.out, plan, cfg)
        keep = _retry_filter(cfg, checked.trusted)
        todo = [c for c in plan.chunks if c.id not in keep]
        if todo:
            feed = DecodeFeed(cfg, prep.spec, plan, todo)
    return plan, checked, todo, feed


def _announce(progress: Progress | None, cfg: ExtractConfig, plan: Any,
              todo: list[Any] | None) -> None:
    """Tell the user what is planned and what loads now (before torch and the weights)."""
    note = getattr(progress, "note", None)
    if note is None or plan is None:
        return
    total = len(plan.items)
    if todo is None:  # torchrun: the ranks split what is left
        note(f"{total:,} images planned in {len(plan.chunks):,} shards; loading "
             f"{cfg.model_names}")
    elif todo:
        left = sum(len(c) for c in todo)
        note(f"{left:,} of {total:,} images to extract ({len(todo):,} shards) with "
             f"{cfg.model_names} on device {cfg.device}: loading torch and the model")


def _record_identity(plan: Any, settings: RunSettings, *, new: bool) -> None:
    """A new plan records the full identity (now with the compute dtype); an existing one
    gains the fields that an earlier clipfeat did not record (compared from then on)."""
    from clipfeat.pipeline.settings import ADDED_IDENTITY_FIELDS

    if new:
        plan.header["identity"] = settings.identity()
        return
    ident = plan.header.setdefault("identity", {})
    now = settings.identity()
    for k in ADDED_IDENTITY_FIELDS:
        if ident.get(k) is None and now.get(k):
            ident[k] = now[k]
            plan.dirty = True


def _lock(cfg: ExtractConfig, out: Path, rank: int) -> Any:
    """OUT's lock for rank 0 (None with --no-lock and for the other ranks, which check the
    holder instead). An existing OUT is locked at once, so that a second run is refused
    before it loads anything; a new one when it is created."""
    from clipfeat.store import META_DIR, OutLock

    if cfg.no_lock or rank != 0:
        if cfg.no_lock and rank == 0:
            logger.warning("--no-lock: %s is not locked; no other clipfeat may write there", out)
        return None
    lock = OutLock(out)
    if (out / META_DIR).is_dir():
        lock.acquire()
    return lock


def _finished(cfg: ExtractConfig, out: Path, *, announce: bool = False) -> dict[int, Any]:
    """The finished shards in OUT to keep, by id (see `_retry_filter`)."""
    from clipfeat.store import scan_shards

    return _retry_filter(cfg, scan_shards(out), announce=announce)


def _retry_filter(cfg: ExtractConfig, shards: dict[int, Any], *,
                  announce: bool = False) -> dict[int, Any]:
    """``shards`` less, with --retry-failed, those whose chunk has transient failures
    (timeouts, crashes): their chunks are redone and each new shard replaces the old one
    when committed. Without it, those failures are counted in a notice."""
    from clipfeat.decode import is_transient

    retry = {sid: sum(is_transient(f.get("error", "")) for f in info.failures)
             for sid, info in shards.items()}
    retry = {sid: n for sid, n in retry.items() if n}
    if retry and cfg.retry_failed:
        if announce:
            logger.warning("--retry-failed: redoing %d shard(s) for %d image(s) that timed out "
                           "or crashed", len(retry), sum(retry.values()))
        return {sid: info for sid, info in shards.items() if sid not in retry}
    if retry and announce:
        logger.warning("%d image(s) in %s failed by a timeout or crash, not for their content: "
                       "rerun with --retry-failed to try them again", sum(retry.values()),
                       cfg.out)
    return shards


# --------------------------------------------------------------------------- 1. prepare


def prepare(cfg: ExtractConfig) -> Prepared:
    """Every check of a user mistake that needs no torch, before anything is written.

    The device, the compute dtype and the comparison with an existing OUT wait for `settle`
    (importing torch takes seconds, and decoding can start meanwhile).
    """
    from clipfeat import distributed, sources
    from clipfeat.specset import SpecSet

    cfg.validate()
    out = Path(cfg.out).expanduser()
    sources.check_roots(cfg.roots)
    _check_out(out)

    requests = cfg.towers()
    towers = tuple(_resolve_tower(cfg, req, several=len(requests) > 1) for req in requests)
    specs = [t.spec for t in towers]
    spec = specs[0] if len(set(specs)) == 1 else SpecSet.of(specs)
    _check_batch_memory(cfg, towers, spec)
    scan = distributed.env_world()[0] == 0
    items, exts = _gather_items(cfg, out, scan=scan)
    images = sum(1 for it in items if not it.error) if scan else None
    cfg = dataclasses.replace(cfg, workers=cfg.capped_workers(images))
    settings = RunSettings.of(cfg, towers, source_record(cfg, exts))
    plan = None
    if not cfg.overwrite and out.is_dir():
        plan = _existing_plan(out, cfg, items, settings, main=scan)
    if scan and not items and (plan is None or not plan.items):
        raise ConfigError(_nothing_to_extract(cfg, exts))
    if plan is not None and cfg.limit is not None and len(plan.items) > cfg.limit:
        logger.warning("--limit %d: %s is already planned for %d images by an earlier run; a "
                       "limit can add images to a plan, not take them out (use --overwrite to "
                       "plan again)", cfg.limit, out, len(plan.items))
    if plan is not None:
        if plan.shard_size != cfg.shard_size:
            raise ConfigError(
                f"--shard-size {cfg.shard_size} differs from the {plan.shard_size} "
                f"--out {out} was planned with: rerun with --shard-size "
                f"{plan.shard_size}, or --overwrite to start over"
            )
    return Prepared(cfg, out, towers, spec, settings, items, plan)


def _resolve_tower(cfg: ExtractConfig, req: Any, *, several: bool) -> TowerSetup:
    """One --model resolved (once per run: its tower is built from this very ModelRef), its
    feature and layers checked against it, and its preprocessing. With ``several`` towers a
    bad feature names the tower and the per-tower form of the flag."""
    from clipfeat.modelref import resolve_model
    from clipfeat.outputs import check_distinct
    from clipfeat.preprocess import PreprocessSpec, check_spec_fits
    from clipfeat.tower import check_feature

    ref = resolve_model(req.model, revision=req.revision, need_weights=True,
                        allow_pickle=cfg.allow_pickle)
    try:
        check_feature(req.feature, ref.family)
    except ConfigError as err:
        if not several:
            raise
        raise ConfigError(f"--model {req.model}: {err}, or give {req.feature} to the other "
                          f"towers only (--feature MODEL={req.feature})") from None
    check_distinct(req.layers, ref.num_hidden_layers, model=req.model)
    if ref.preprocessor_config is None:
        logger.warning("model %r has no preprocessor_config.json: using the %s defaults at %d px",
                       req.model, ref.family, ref.image_size)
    spec = PreprocessSpec.from_processor_config(
        ref.preprocessor_config, family=ref.family, image_size=ref.image_size
    )
    check_spec_fits(spec, ref.image_size, path=ref.local_dir / "preprocessor_config.json")
    return TowerSetup(req, ref, spec)


def _existing_plan(out: Path, cfg: ExtractConfig, items: list[Any], settings: RunSettings,
                   *, main: bool) -> Any:
    """OUT's plan; rebuilt (rank 0) from the finished shards and the sources when
    plan.jsonl is missing or damaged but shards are there; None when OUT has neither."""
    from clipfeat.plan import load_plan
    from clipfeat.sources import check_unchanged
    from clipfeat.store import list_shard_files

    try:
        plan = load_plan(out)
    except StoreError as err:
        if not main:
            return None  # rank 0 rebuilds it; read after the barrier
        return _rebuild_plan(out, cfg, items, settings, f"damaged ({err})")
    if plan is not None:  # a tar or parquet file changed since: its planned items are lost
        check_unchanged(plan.source_files(), out)
    if plan is not None or not main or not list_shard_files(out):
        return plan
    return _rebuild_plan(out, cfg, items, settings, "missing")


def _rebuild_plan(out: Path, cfg: ExtractConfig, items: list[Any], settings: RunSettings,
                  state: str) -> Any:
    """The plan made again from OUT's intact finished shards and the sources (`plan.rebuild`),
    its identity from the shards' attributes; StoreError when they disagree."""
    from clipfeat.plan import plan_path, rebuild
    from clipfeat.store import read_finished

    intact = {sid: c for sid, c in read_finished(out).items() if c.problem is None}
    path = plan_path(out)
    if not intact:  # damaged shards, if any, are deleted once the run is settled
        logger.warning("%s is %s and no finished shard is intact: planning again", path, state)
        return None
    keep = (f"{len(intact)} finished shards are intact; move them aside (or use --overwrite "
            "to replace them) and rerun")
    identity = _shard_identity(intact, settings, keep)
    try:
        plan = rebuild({sid: (c.keys, c.failures) for sid, c in intact.items()}, items,
                       shard_size=cfg.shard_size, sources=settings.sources, identity=identity)
    except ValueError as err:
        raise StoreError(f"{path} is {state.split(' (')[0]} and the shards in --out {out} "
                         f"disagree with the sources ({err}): {keep}") from None
    logger.warning("%s was %s: rebuilt from the %d intact finished shards and the sources "
                   "(%d items still to do)", path, state.split(" (")[0], len(intact),
                   plan.appended)
    return plan


def _shard_identity(intact: dict[int, Any], settings: RunSettings, keep: str) -> dict[str, Any]:
    """The run identity the shards' attributes record (the sources: today's, which the
    shards' keys were checked against); StoreError if the shards disagree among themselves."""
    from clipfeat.pipeline.settings import identity_from_attrs

    found: dict[str, Any] | None = None
    for sid, content in sorted(intact.items()):
        ident = identity_from_attrs(content.attrs, content.output_attrs)
        if found is not None and ident != found:
            diffs = identity_diff(found, ident)
            raise StoreError(f"shard {sid} in {content.path.parent} was made with other "
                             f"settings than shard {min(intact)} ({'; '.join(diffs)}): {keep}")
        found = ident
    return dict(found or {}, sources=settings.sources)


def _check_batch_memory(cfg: ExtractConfig, towers: Sequence[TowerSetup], spec: Any) -> None:
    """Refuse a --batch-size whose pixels and features do not fit in memory (ConfigError)."""
    from clipfeat.config import check_batch_memory
    from clipfeat.specset import pixel_bytes
    from clipfeat.tower import tokens_per_image

    shapes = [(tokens_per_image(t.ref, t.request.feature), t.ref.hidden_size, len(t.request.layers))
              for t in towers]
    if len(shapes) == 1 and shapes[0][2] == 1:
        tokens, hidden, _ = shapes[0]
        what = f"at {spec.out_height}x{spec.out_width} px and {tokens}x{hidden} features"
    else:
        what = f"for {sum(n for *_, n in shapes)} outputs per image"
    check_batch_memory(
        cfg.batch_size, image_bytes=pixel_bytes(spec),
        feature_bytes=4 * sum(tok * hid * n for tok, hid, n in shapes), what=what,
    )


def _gather_items(cfg: ExtractConfig, out: Path, *, scan: bool = True
                  ) -> tuple[list[Any], tuple[str, ...]]:
    """The inputs in plan order (only rank 0 scans; the others read the frozen plan), and
    the extensions a folder walk takes."""
    from clipfeat import sources

    exts = tuple(cfg.exts) if cfg.exts else sources.DEFAULT_EXTS
    if not scan:
        items = []
    elif cfg.llava_json:
        items = sources.read_llava_json(cfg.llava_json, cfg.image_folder,
                                        follow_outside=cfg.follow_outside)
    elif cfg.files_from:
        items = sources.read_files_from(cfg.files_from, list(cfg.roots) or None,
                                        follow_outside=cfg.follow_outside)
    else:  # folders of images, tar and parquet files
        items = sources.read_roots(list(cfg.roots), exts, exclude=[out],
                                   follow_outside=cfg.follow_outside,
                                   image_column=cfg.image_column, key_column=cfg.key_column)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    return items, exts


def _nothing_to_extract(cfg: ExtractConfig, exts: tuple[str, ...]) -> str:
    """The usage error for inputs that name no image at all."""
    if cfg.llava_json:
        return (f"--llava-json {cfg.llava_json} has no sample with an 'image': nothing to "
                "extract (text-only data?)")
    if cfg.files_from:
        return f"--files-from {cfg.files_from} lists no path: nothing to extract"
    roots = ", ".join(cfg.roots)
    return (f"ROOT {roots} holds no file with a taken extension ({', '.join(exts)}): check "
            "the folder, or pass --ext with the extensions of your images")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: choose another --out")
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable; choose a writable --out")


# --------------------------------------------------------------------------- 2. settle


def settle(prep: Prepared) -> tuple[str, RunSettings, bool]:
    """The checks that need torch: the device and the compute dtype, then the full settings
    against what an existing OUT was made with. Writes nothing. The flag is True when OUT
    was planned with other settings but holds no finished shard: its plan is replaced (as
    when following the float16-overflow advice into the same OUT)."""
    from clipfeat import distributed
    from clipfeat.store import list_shard_files

    _, _, local_rank = distributed.env_world()
    device = resolve_device(prep.cfg.device, local_rank)
    settings = prep.settings.on_device(device, resolve_dtype(prep.cfg.dtype, device))
    plan = prep.existing_plan
    if plan is None:
        return device, settings, False
    old = plan.header.get("identity", {})
    diffs = identity_diff(old, settings.identity_against(old))
    if not diffs:
        return device, settings, False
    if not list_shard_files(prep.out):
        logger.warning("--out %s holds no finished shard: replacing its plan, made with other "
                       "settings (%s)", prep.out, "; ".join(diffs))
        return device, settings, True
    raise ConfigError(
        f"--out {prep.out} holds features made with other settings ({'; '.join(diffs)}): "
        "use another --out, or --overwrite to replace them"
    )


# --------------------------------------------------------------------------- 3. load, plan


def _load_towers(prep: Prepared, device: str, settings: RunSettings) -> list[Any]:
    """Every tower on the run's device and dtype, each from its ModelRef, keeping the
    blocks its deepest layer needs (ModelError on bad weights)."""
    from clipfeat.tower import load_tower

    return [load_tower(t.request.model, layers=t.request.layers, feature=t.request.feature,
                       revision=t.request.revision, allow_pickle=prep.cfg.allow_pickle,
                       device=device, dtype=settings.compute_dtype, model_ref=t.ref)
            for t in prep.towers]


def _check_finished(out: Path, plan: Any, cfg: ExtractConfig) -> Any:
    """The finished shards a rerun may keep, and the damaged ones (`store.check_finished`
    against the plan's keys of each chunk); nothing is changed on disk."""
    from clipfeat.store import FinishedCheck, check_finished

    if cfg.overwrite or not out.is_dir():
        return FinishedCheck({}, [])
    return check_finished(out, {c.id: [it.key for it in plan.chunk_items(c)]
                                for c in plan.chunks})


def _write_plan(out: Path, plan: Any, *, overwrite: bool) -> None:
    """Create OUT (wiping clipfeat's files with --overwrite), write the plan into it and
    remove what an interrupted run left half-written."""
    from clipfeat.plan import save
    from clipfeat.store import remove_partials

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
    remove_partials(out)


def _wipe(out: Path) -> None:
    """--overwrite: remove what clipfeat wrote (and nothing else)."""
    import shutil

    from clipfeat.store import (
        FAILURES,
        LOCK_FILE,
        MANIFEST,
        META_DIR,
        PARTIAL_SUFFIX,
        list_shard_files,
    )

    for p in list_shard_files(out).values():
        p.unlink()
    for p in out.glob("shard-*.h5" + PARTIAL_SUFFIX):
        p.unlink()
    for name in (MANIFEST, FAILURES):
        (out / name).unlink(missing_ok=True)
    for entry in (out / META_DIR).glob("*"):  # all but the lock this run holds
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------- 5. finalize


def _finalize_quietly(run: Run, plan: Any, summary: Summary) -> None:
    """`_finalize` after a stop or a failure: a second error must not hide the first."""
    try:
        _finalize(run, plan, summary)
    except Exception as err:  # noqa: BLE001 - the run's own error is what the user sees
        logger.warning("could not update the manifest of %s: %s", run.out, err)


def _count_every_rank(summary: Summary, shards: dict[int, Any], before: dict[int, Any],
                      progress: Progress | None) -> None:
    """Rank 0's summary (and bar) under torchrun: what every rank did, from the shards."""
    new = [s for sid, s in shards.items() if sid not in before]
    summary.extracted = sum(s.num_rows for s in new)
    summary.failed = sum(s.num_failures for s in new)
    summary.shards_written = len(new)
    summary.bytes_written = sum(s.bytes for s in new)
    set_done = getattr(progress, "set_done", None)
    if set_done is not None:
        set_done(sum(s.num_rows + s.num_failures for s in shards.values()))


def _finalize(run: Run, plan: Any, summary: Summary,
              finished: dict[int, Any] | None = None) -> dict[int, Any]:
    """manifest.json, failures.jsonl and (when every chunk is done) the key index, for the
    shards in OUT now (or ``finished``)."""
    from clipfeat.store import finalize, scan_shards

    shards = scan_shards(run.out) if finished is None else finished
    summary.complete = all(c.id in shards for c in plan.chunks)
    summary.total_failures = sum(s.num_failures for s in shards.values())
    finalize(run.out, meta=run.settings.shard_attrs(), plan=plan.info(), shards=shards.values(),
             complete=summary.complete, outputs=run.settings.manifest_outputs())
    return shards
