"""Command-line interface: flags -> config, progress, messages and exit codes.

The CLI is thin: every command calls one library function. Errors raised on purpose
(`clipfeat.errors`) become one line on stderr and an exit code (2 usage, 1 runtime);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as click_exc

from clipfeat.config import ExtractConfig
from clipfeat.errors import ClipfeatError, Interrupted
from clipfeat.units import human_bytes

#: Every flag's default is the library's (one owner: clipfeat.config).
_DEFAULTS = ExtractConfig()


class _OneLineErrors(TyperGroup):
    """Usage errors as one line on stderr (exit 2), never a usage box or a traceback."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # type: ignore[override]
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click_exc.NoArgsIsHelpError as err:
            typer.echo(err.ctx.get_help() if err.ctx else str(err), err=True)
            sys.exit(2)
        except click_exc.UsageError as err:
            cmd = err.ctx.command_path if err.ctx else "clipfeat"
            typer.echo(f"clipfeat: error: {err.format_message()} (see '{cmd} --help')", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            typer.echo("clipfeat: interrupted", err=True)
            sys.exit(130)
        except click_exc.ClickException as err:
            typer.echo(f"clipfeat: error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv or 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="clipfeat",
    help="Precompute LLaVA-exact CLIP/SigLIP vision features into HDF5 shards.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(err: ClipfeatError) -> None:
    typer.echo(f"clipfeat: error: {err}", err=True)
    raise typer.Exit(err.exit_code)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if not version and ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(2)
    if version:
        from clipfeat import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


@app.command()
def info(
    target: str = typer.Argument(..., help="A model (hub name or local folder), or an OUT store."),
    layer: int = typer.Option(_DEFAULTS.layer, "--layer", help="Hidden layer to select (negative counts from the end)."),
    feature: str = typer.Option(_DEFAULTS.feature, "--feature", help="patch (drop CLS) or cls_patch (keep it)."),
    images: Optional[int] = typer.Option(None, "--images", min=0, help="Estimate the output size for N images."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What a tower will produce (shapes, sizes, preprocessing), or a summary of a store."""
    from clipfeat import info as info_mod

    try:
        if info_mod.is_store(target):
            data = info_mod.describe_store(target)
            text = info_mod.format_store(data)
        else:
            data = info_mod.describe_model(target, layer=layer, feature=feature, images=images)
            text = info_mod.format_model(data)
    except ClipfeatError as err:
        _fail(err)
    typer.echo(json.dumps(data, indent=2) if as_json else text)



class _Bar:
    """tqdm progress on stderr: images done, img/s, ETA, failures so far."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.failures = 0

    def start(self, total: int, done: int) -> None:
        from tqdm import tqdm

        if done and not self.quiet:
            typer.echo(f"clipfeat: resuming: {done:,} of {total:,} images already done", err=True)
        self.bar = tqdm(
            total=total, initial=done, unit="img", file=sys.stderr, disable=self.quiet,
            dynamic_ncols=True, smoothing=0.1, desc="extract",
        )

    def note(self, text: str) -> None:
        """A line for a person watching (on a terminal only: logs and scripts get the
        summary and the errors, one line each)."""
        if not self.quiet and sys.stderr.isatty():
            typer.echo(f"clipfeat: {text}", err=True)

    def set_done(self, done: int) -> None:
        if self.bar is not None and done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def advance(self, images: int, failures: int) -> None:
        if self.bar is None:
            return
        if failures:
            self.failures += failures
            self.bar.set_postfix(failed=self.failures, refresh=False)
        self.bar.update(images)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _split_exts(value: Optional[str]) -> Optional[tuple]:
    if value is None:
        return None
    from clipfeat.sources import parse_exts

    return parse_exts(value)


@app.command()
def extract(
    # str, not Path: Path("") is ".", so an empty --out (an unset shell variable) would
    # silently write into the current folder.
    roots: List[str] = typer.Argument(None, metavar="ROOT...", help="Image folders to walk (recursively)."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder for shards, manifest and failures."),
    model: str = typer.Option(_DEFAULTS.model, "--model", help="Hub name or local checkpoint folder (CLIP or SigLIP)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    layer: int = typer.Option(_DEFAULTS.layer, "--layer", help="Hidden layer (LLaVA's mm_vision_select_layer); negative counts from the end."),
    feature: str = typer.Option(_DEFAULTS.feature, "--feature", help="patch (drop CLS) or cls_patch (keep it)."),
    aspect: str = typer.Option(_DEFAULTS.aspect, "--aspect", help="square (resize+crop) or pad (LLaVA-1.5 expand2square)."),
    device: str = typer.Option(_DEFAULTS.device, "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option(_DEFAULTS.dtype, "--dtype", help="Compute dtype: auto (float16 on CUDA, float32 on CPU), float16, bfloat16, float32."),
    store_dtype: str = typer.Option(_DEFAULTS.store_dtype, "--store-dtype", help="Stored dtype: float16 or float32."),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, "--batch-size", help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode processes (default: one per core; 0 = in-process)."),
    shard_size: int = typer.Option(_DEFAULTS.shard_size, "--shard-size", help="Images per shard (the unit of resume)."),
    files_from: Optional[Path] = typer.Option(None, "--files-from", help="Text file of image paths, one per line (relative to ROOT or absolute)."),
    llava_json: Optional[Path] = typer.Option(None, "--llava-json", help="LLaVA training JSON/JSONL; keys are its 'image' strings."),
    image_folder: Optional[Path] = typer.Option(None, "--image-folder", help="Folder the --llava-json image paths are relative to."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N inputs."),
    ext: Optional[str] = typer.Option(None, "--ext", help="Comma-separated extensions to take (default jpg,jpeg,png,webp,bmp,gif,tif,tiff)."),
    exif_transpose: bool = typer.Option(False, "--exif-transpose", help="Apply EXIF orientation (LLaVA does not)."),
    max_pixels: int = typer.Option(_DEFAULTS.max_pixels, "--max-pixels", help="Refuse images with more pixels (decompression bombs)."),
    decode_timeout: float = typer.Option(_DEFAULTS.decode_timeout, "--decode-timeout", help="Seconds before a stuck decode is abandoned and recorded."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an OUT made with other settings."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights; only for trusted checkpoints."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Redo finished shards whose failures were timeouts, crashes or out-of-memory (not bad files)."),
    no_follow_outside: bool = typer.Option(False, "--no-follow-outside", help="Do not follow symlinks that lead out of ROOT / --image-folder (recorded as failures)."),
    no_lock: bool = typer.Option(False, "--no-lock", help="Do not lock OUT (file systems without locks; then never run two extracts into one OUT)."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if any input failed."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Extract features for every image under ROOT... into HDF5 shards in --out."""
    from clipfeat.distributed import env_world

    try:
        cfg = ExtractConfig(
            roots=tuple(str(r) for r in roots or ()),
            out=str(out),
            model=model,
            revision=revision,
            layer=layer,
            feature=feature,
            aspect=aspect,
            device=device,
            dtype=dtype,
            store_dtype=store_dtype,
            batch_size=batch_size,
            workers=workers,
            shard_size=shard_size,
            files_from=str(files_from) if files_from else None,
            llava_json=str(llava_json) if llava_json else None,
            image_folder=str(image_folder) if image_folder else None,
            limit=limit,
            exts=_split_exts(ext),
            exif_transpose=exif_transpose,
            max_pixels=max_pixels,
            decode_timeout=decode_timeout,
            strict=strict,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            no_lock=no_lock,
            retry_failed=retry_failed,
            follow_outside=not no_follow_outside,
        ).validate()
    except ClipfeatError as err:
        _fail(err)

    from clipfeat.pipeline import extract as run_extract

    rank = env_world()[0]
    bar = _Bar(quiet or rank != 0)
    try:
        summary = run_extract(cfg, progress=bar)
    except Interrupted as err:
        bar.close()
        try:
            typer.echo(
                f"clipfeat: {err}; finished shards in {out} are intact. "
                "Resume by running the same command again.",
                err=True,
            )
        except OSError:  # SIGHUP: the terminal that would show it is gone
            pass
        raise typer.Exit(err.exit_code) from None
    except ClipfeatError as err:
        bar.close()
        _fail(err)
    bar.close()
    failures = max(summary.failed, summary.total_failures)
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
    elif not quiet and rank == 0:
        if summary.extracted == 0 and summary.failed == 0 and summary.skipped:
            msg = f"nothing to do: all {summary.skipped:,} planned images in {out} are already done"
        else:
            msg = (
                f"{summary.extracted:,} extracted, {summary.failed:,} failed, "
                f"{summary.skipped:,} skipped (already done) in {summary.seconds:.1f} s "
                f"({summary.images_per_second:.1f} img/s); "
                f"{human_bytes(summary.bytes_written)} written to {out}"
            )
        if failures:
            msg += f"; {failures:,} failures listed in {Path(out) / 'failures.jsonl'}"
        if not summary.complete and summary.world == 1:
            msg += " (incomplete: rerun to finish)"
        typer.echo(f"clipfeat: {msg}", err=True)
    if strict and failures:
        raise typer.Exit(1)


@app.command()
def verify(
    out: Path = typer.Argument(..., help="An output folder written by clipfeat extract."),
    model: Optional[str] = typer.Option(None, "--model", help="Re-extract --sample images with this model and compare."),
    sample: int = typer.Option(8, "--sample", min=0, help="Images to re-extract with --model."),
    device: str = typer.Option("cpu", "--device", help="Device for the re-extraction."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a store: every shard opens, counts/keys/attributes agree, no NaN/Inf."""
    from clipfeat.verify import verify_store

    try:
        report = verify_store(str(out), model=model, sample=sample if model else 0, device=device)
    except ClipfeatError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(report) if dataclasses.is_dataclass(report) else {"ok": report.ok, "problems": report.problems}))
    else:
        typer.echo(report.format())
    raise typer.Exit(0 if report.ok else 1)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    finally:
        # The command is over: its shards, plan and manifest are closed and synced. What is
        # left is the interpreter's last garbage collection, which walks every object torch
        # and transformers created (about a second on a CPU run): exempt them from it.
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    main()
