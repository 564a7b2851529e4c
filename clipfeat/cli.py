"""Command-line interface: flags -> config, progress, messages and exit codes.

The CLI is thin: every command calls one library function. Errors raised on purpose
(`clipfeat.errors`) become one line on stderr and an exit code (2 usage, 1 runtime);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as click_exc

from clipfeat.config import DEFAULT_VERIFY_SAMPLE, ExtractConfig
from clipfeat.errors import ClipfeatError, ConfigError, Interrupted
from clipfeat.sources import DEFAULT_EXTS
from clipfeat.units import human_bytes, plural

#: Every flag's default is the library's (one owner: clipfeat.config).
_DEFAULTS = ExtractConfig()

# Help panels (typer's rich_help_panel; plain help without rich shows them as sections).
INPUT, MODEL, OUTPUT, PERFORMANCE, BEHAVIOUR = (
    "Input", "Model", "Output", "Performance", "Behaviour")


class _HelpArgument(TyperArgument):
    """An argument whose help shows its name only: no '<list[str]>' type column."""

    def display_type_rich(self, ctx):
        return None


class _HelpOption(TyperOption):
    """An option whose help shows no '<bool>' on flags, and a default given as text
    (``show_default="one per core"``) without typer's parentheses."""

    def display_type_rich(self, ctx):
        return "" if self.is_flag else super().display_type_rich(ctx)

    def _get_default_string(self, *, ctx, show_default_is_str, default_value):
        if show_default_is_str:
            return str(self.show_default)
        return super()._get_default_string(ctx=ctx, show_default_is_str=False,
                                           default_value=default_value)


def _help_params(params: list) -> list:
    """The parameters as help shows them (see `_HelpArgument`, `_HelpOption`); --help in
    the last panel, not alone in a box of its own."""
    for param in params:
        if type(param) is TyperArgument:
            param.__class__ = _HelpArgument
        elif type(param) is TyperOption:
            param.__class__ = _HelpOption
    panels = [getattr(p, "rich_help_panel", None) for p in params if p.name != "help"]
    last = next((panel for panel in reversed(panels) if panel), None)
    for param in params:
        if param.name == "help" and isinstance(param, TyperOption):
            param.rich_help_panel = last
    return params


class _Command(TyperCommand):
    """A command whose help has a plain usage line (``[ROOT]...``, ``OUT``: not typer's
    ``[ROOT...]...`` or ``{out}``), the parameters of `_help_params`, and, in plain help
    (typer without rich), the options grouped under their panels' names as rich shows them."""

    def get_params(self, ctx) -> list:
        return _help_params(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "ARG").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                default = "Arguments" if isinstance(param, TyperArgument) else "Options"
                sections.setdefault(getattr(param, "rich_help_panel", None) or default,
                                    []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


class _OneLineErrors(TyperGroup):
    """Usage errors as one line on stderr (exit 2), never a usage box or a traceback."""

    def get_params(self, ctx) -> list:
        return _help_params(super().get_params(ctx))

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
    help="""Precompute LLaVA-exact CLIP/SigLIP vision features into HDF5 shards.

\b
Examples:
  clipfeat extract /data/LLaVA-Pretrain/images --out feats/pretrain
  clipfeat extract --llava-json llava_v1_5_mix665k.json --image-folder /data --aspect pad --out feats/ft
  torchrun --nproc-per-node 8 -m clipfeat extract /data/images --out /shared/feats
  clipfeat info openai/clip-vit-large-patch14-336 --images 558128
  clipfeat info feats/pretrain
  clipfeat verify feats/pretrain --model openai/clip-vit-large-patch14-336 --sample 32

Run 'clipfeat COMMAND --help' for a command's options.""",
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


@app.command(cls=_Command)
def info(
    targets: List[str] = typer.Argument(..., metavar="TARGET...", help="A model (hub name or local folder), several for a several-tower run, or an OUT store."),
    layer: Optional[List[str]] = typer.Option(None, "--layer", metavar="N[,N...]", show_default=str(_DEFAULTS.layer), help="Hidden layer(s) to select (negative counts from the end), or mean(A:B); MODEL=LAYERS for one of several towers.", rich_help_panel=MODEL),
    feature: Optional[List[str]] = typer.Option(None, "--feature", metavar="patch|cls_patch", show_default=_DEFAULTS.feature, help="patch (drop CLS and registers) or cls_patch (keep CLS); MODEL=FEATURE for one of several towers.", rich_help_panel=MODEL),
    images: Optional[int] = typer.Option(None, "--images", min=0, metavar="N", help="Estimate the output size for N images.", rich_help_panel=OUTPUT),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object.", rich_help_panel=OUTPUT),
) -> None:
    """What a tower will produce (shapes, sizes, preprocessing), or a summary of a store.

    \b
    Examples:
      clipfeat info openai/clip-vit-large-patch14-336 --layer -2 --images 558128
      clipfeat info google/siglip-so400m-patch14-384 --json
      clipfeat info facebook/dinov2-large google/siglip-so400m-patch14-384 --layer -2 --images 1000000
      clipfeat info feats/pretrain
    """
    from clipfeat import info as info_mod

    try:
        flags = _tower_flags(targets, None, layer, feature)
        if len(targets) == 1 and info_mod.is_store(targets[0]):
            data = info_mod.describe_store(targets[0])
            text = info_mod.format_store(data)
        elif len(targets) == 1 and isinstance(flags["layer"], int):
            data = info_mod.describe_model(targets[0], layer=flags["layer"],
                                           feature=flags["feature"], images=images)
            text = info_mod.format_model(data)
        else:
            data = info_mod.describe_run(flags["model"], layers=flags["layer"],
                                         features=flags["feature"], images=images)
            text = info_mod.format_run(data)
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


def _scalar(values: Optional[List[str]], default: object) -> object:
    """A repeatable flag's values as the config takes them: the default when absent, the
    value itself when given once (so a one-tower command is the config of before)."""
    if not values:
        return default
    return values[0] if len(values) == 1 else tuple(values)


def _tower_flags(model: Optional[List[str]], revision: Optional[List[str]],
                 layer: Optional[List[str]], feature: Optional[List[str]]) -> dict:
    """--model/--revision/--layer/--feature as ExtractConfig fields (`clipfeat.outputs`)."""
    one_layer = _scalar(layer, _DEFAULTS.layer)
    if isinstance(one_layer, str) and one_layer.strip().lstrip("+-").isdigit():
        one_layer = int(one_layer)
    return {"model": _scalar(model, _DEFAULTS.model), "revision": _scalar(revision, None),
            "layer": one_layer, "feature": _scalar(feature, _DEFAULTS.feature)}


@app.command(cls=_Command)
def extract(
    # str, not Path: Path("") is ".", so an empty --out (an unset shell variable) would
    # silently write into the current folder.
    roots: List[str] = typer.Argument(None, metavar="ROOT", help="Image folders to walk (recursively), webdataset .tar shards or .parquet files (a file, a folder of parquet files, or a quoted pattern such as 'shards/{000000..000099}.tar'); with --files-from, the one folder its paths are relative to.", show_default=False, rich_help_panel=INPUT),
    files_from: Optional[Path] = typer.Option(None, "--files-from", metavar="FILE", help="Text file of image paths, one per line, relative to ROOT (without ROOT: to the current folder) or absolute inside it.", rich_help_panel=INPUT),
    llava_json: Optional[Path] = typer.Option(None, "--llava-json", metavar="FILE", help="LLaVA training JSON/JSONL; keys are its 'image' strings.", rich_help_panel=INPUT),
    image_folder: Optional[Path] = typer.Option(None, "--image-folder", metavar="DIR", help="Folder the --llava-json image paths are relative to.", rich_help_panel=INPUT),
    ext: Optional[str] = typer.Option(None, "--ext", metavar="LIST", show_default=",".join(DEFAULT_EXTS), help="Comma-separated extensions taken when walking folders (and from tars).", rich_help_panel=INPUT),
    image_column: Optional[str] = typer.Option(None, "--image-column", metavar="COL", show_default="the datasets Image column, or the one binary column", help="Parquet: the column of encoded images.", rich_help_panel=INPUT),
    key_column: Optional[str] = typer.Option(None, "--key-column", metavar="COL", show_default="FILE_STEM/ROW", help="Parquet: the column of keys (strings or integers).", rich_help_panel=INPUT),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", show_default="all", help="Only the first N inputs.", rich_help_panel=INPUT),
    exif_transpose: bool = typer.Option(False, "--exif-transpose", help="Apply EXIF orientation (LLaVA does not).", rich_help_panel=INPUT),
    max_pixels: int = typer.Option(_DEFAULTS.max_pixels, "--max-pixels", metavar="N", help="Refuse images with more pixels (decompression bombs).", rich_help_panel=INPUT),
    no_follow_outside: bool = typer.Option(False, "--no-follow-outside", help="Do not follow symlinks that lead out of ROOT / --image-folder (recorded as failures).", rich_help_panel=INPUT),
    model: Optional[List[str]] = typer.Option(None, "--model", metavar="NAME|DIR", show_default=_DEFAULTS.model, help="Hub name or local folder (CLIP, SigLIP, DINOv2); repeat for several towers.", rich_help_panel=MODEL),
    revision: Optional[List[str]] = typer.Option(None, "--revision", metavar="REV", help="Hub revision (branch, tag or commit); MODEL=REV for one tower.", rich_help_panel=MODEL),
    layer: Optional[List[str]] = typer.Option(None, "--layer", metavar="N[,N...]", show_default=str(_DEFAULTS.layer), help="Hidden layer(s) (LLaVA's mm_vision_select_layer), or mean(A:B); MODEL=LAYERS for one tower.", rich_help_panel=MODEL),
    feature: Optional[List[str]] = typer.Option(None, "--feature", metavar="patch|cls_patch", show_default=_DEFAULTS.feature, help="patch (drop CLS, registers) or cls_patch (keep CLS); MODEL=FEATURE for one tower.", rich_help_panel=MODEL),
    aspect: str = typer.Option(_DEFAULTS.aspect, "--aspect", metavar="square|pad", help="square (resize+crop) or pad (LLaVA-1.5 expand2square).", rich_help_panel=MODEL),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights; only for trusted checkpoints.", rich_help_panel=MODEL),
    out: str = typer.Option(..., "--out", "-o", metavar="DIR", help="Output folder for shards, manifest and failures.", rich_help_panel=OUTPUT),
    store_dtype: str = typer.Option(_DEFAULTS.store_dtype, "--store-dtype", metavar="float16|float32", help="Stored dtype.", rich_help_panel=OUTPUT),
    shard_size: int = typer.Option(_DEFAULTS.shard_size, "--shard-size", metavar="N", help="Images per shard (the unit of resume).", rich_help_panel=OUTPUT),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an OUT made with other settings.", rich_help_panel=OUTPUT),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary.", rich_help_panel=OUTPUT),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout.", rich_help_panel=OUTPUT),
    device: str = typer.Option(_DEFAULTS.device, "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N.", rich_help_panel=PERFORMANCE),
    dtype: str = typer.Option(_DEFAULTS.dtype, "--dtype", metavar="DTYPE", help="Compute dtype: auto (float16 on CUDA, float32 on CPU), float16, bfloat16, float32.", rich_help_panel=PERFORMANCE),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, "--batch-size", metavar="N", help="Images per forward pass.", rich_help_panel=PERFORMANCE),
    workers: Optional[int] = typer.Option(_DEFAULTS.workers, "--workers", metavar="N", show_default="one per core", help="Decode processes (0 = decode in-process).", rich_help_panel=PERFORMANCE),
    decode_timeout: float = typer.Option(_DEFAULTS.decode_timeout, "--decode-timeout", metavar="SECONDS", help="Seconds before a stuck decode is abandoned and recorded.", rich_help_panel=PERFORMANCE),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if any input failed.", rich_help_panel=BEHAVIOUR),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Redo finished shards whose failures were timeouts, crashes or out-of-memory (not bad files).", rich_help_panel=BEHAVIOUR),
    no_lock: bool = typer.Option(False, "--no-lock", help="Do not lock OUT (file systems without locks; then never run two extracts into one OUT).", rich_help_panel=BEHAVIOUR),
) -> None:
    """Extract features for every image of ROOT (folders, tar or parquet files) into HDF5 shards in --out.

    \b
    Examples:
      clipfeat extract /data/LLaVA-Pretrain/images --out feats/pretrain
      clipfeat extract --llava-json llava_v1_5_mix665k.json --image-folder /data --aspect pad --out feats/ft
      clipfeat extract --files-from list.txt /data/images --out feats/list
      clipfeat extract 'shards/{000000..000099}.tar' --out feats/wds
      clipfeat extract data/train-*.parquet --key-column id --out feats/hf
      torchrun --nproc-per-node 8 -m clipfeat extract /data/images --out /shared/feats

    Rerunning the same command resumes; finished shards are never redone.
    """
    from clipfeat.distributed import env_world

    try:
        cfg = ExtractConfig(
            roots=tuple(str(r) for r in roots or ()),
            out=str(out),
            **_tower_flags(model, revision, layer, feature),
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
            image_column=image_column,
            key_column=key_column,
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
            msg += f"; {plural(failures, 'failure')} listed in {Path(out) / 'failures.jsonl'}"
        if not summary.complete and summary.world == 1:
            msg += " (incomplete: rerun to finish)"
        typer.echo(f"clipfeat: {msg}", err=True)
    if strict and failures:
        raise typer.Exit(1)


@app.command(cls=_Command)
def verify(
    out: str = typer.Argument(..., metavar="OUT", help="An output folder written by clipfeat extract."),
    model: Optional[List[str]] = typer.Option(None, "--model", metavar="NAME|DIR", help="Also re-extract --sample rows with this model and compare (repeat for each tower of a several-tower store).", rich_help_panel=MODEL),
    sample: Optional[int] = typer.Option(None, "--sample", min=0, metavar="N", show_default=f"{DEFAULT_VERIFY_SAMPLE} with --model", help="Rows to re-extract (needs --model).", rich_help_panel=MODEL),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights for the re-extraction; only for trusted checkpoints.", rich_help_panel=MODEL),
    device: str = typer.Option("cpu", "--device", metavar="DEVICE", help="Device for the re-extraction.", rich_help_panel=PERFORMANCE),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object (with 'ok').", rich_help_panel=OUTPUT),
) -> None:
    """Check a store: every shard opens, counts/keys/attributes agree, no NaN/Inf.

    \b
    Examples:
      clipfeat verify feats/pretrain
      clipfeat verify feats/pretrain --model openai/clip-vit-large-patch14-336 --sample 32

    Exit 0 when sound, 1 when a problem was found, 2 for a usage error.
    """
    from clipfeat.verify import verify_store

    try:
        if sample is not None and not model:
            raise ConfigError(f"--sample {sample} needs --model: rows are re-extracted with "
                              "a model and compared (pass the store's model)")
        if sample is None:
            sample = DEFAULT_VERIFY_SAMPLE if model else 0
        report = verify_store(out, model=model, sample=sample, device=device,
                              allow_pickle=allow_pickle)
    except ClipfeatError as err:
        _fail(err)
    typer.echo(json.dumps(report.to_dict()) if as_json else report.format())
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
