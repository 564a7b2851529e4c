"""The Hugging Face hub, quietly: no raw huggingface_hub lines on the user's terminal.

`quiet` wraps every hub call clipfeat makes (`clipfeat.modelref`): huggingface_hub's own
log lines (its logger has a handler of its own: "Retrying in 1s [Retry 1/5]", "'...' thrown
while requesting HEAD ...") go to clipfeat's log at DEBUG instead, its tqdm bars are off and
its Python warnings are dropped. What went wrong reaches the user as one ModelError line.

``python -m clipfeat.hub MODEL [--revision REV]`` fetches into the HF cache exactly the files
clipfeat accepts: the configs and safetensors weights or, for a repo whose ``main`` has only
``pytorch_model.bin`` (``openai/clip-vit-large-patch14-336``), the safetensors conversion by
SFconvertbot (see `clipfeat.modelref`); clipfeat then finds them offline.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


class _ToDebug(logging.Handler):
    """Re-logs huggingface_hub's records on clipfeat's logger at DEBUG."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger.debug("huggingface_hub: %s", record.getMessage())
        except Exception:  # noqa: BLE001 - a log line is never worth a failure
            pass


@contextmanager
def quiet() -> Iterator[None]:
    """huggingface_hub's log lines to clipfeat's log at DEBUG, no progress bars, no warnings."""
    hf_logger = logging.getLogger("huggingface_hub")
    saved = hf_logger.handlers[:], hf_logger.propagate, hf_logger.level
    hf_logger.handlers = [_ToDebug()]
    hf_logger.propagate = False
    hf_logger.setLevel(logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _no_progress_bars():
                yield
    finally:
        hf_logger.handlers, hf_logger.propagate = saved[0], saved[1]
        hf_logger.setLevel(saved[2])


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    try:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils.tqdm import are_progress_bars_disabled, enable_progress_bars
    except ImportError:  # pragma: no cover - older huggingface_hub
        yield
        return
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """``python -m clipfeat.hub MODEL [--revision REV]``: fetch what clipfeat needs."""
    import argparse

    from clipfeat.errors import ClipfeatError
    from clipfeat.modelref import resolve_model

    parser = argparse.ArgumentParser(
        prog="python -m clipfeat.hub",
        description="Download a hub model's configs and safetensors weights (or SFconvertbot's "
                    "safetensors conversion of a pickle-only repo) into the HF cache.")
    parser.add_argument("model")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    print(f"fetching {args.model} (configs and safetensors weights) ...", file=sys.stderr)
    try:
        ref = resolve_model(args.model, revision=args.revision, need_weights=True)
    except ClipfeatError as err:
        print(f"clipfeat: error: {err}", file=sys.stderr)
        return err.exit_code
    source = f" (weights from {ref.weights_revision})" if ref.weights_revision else ""
    print(f"{args.model}: {ref.local_dir}{source}; clipfeat finds it offline now")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
