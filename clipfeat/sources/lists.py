"""Listed inputs: a file of paths (`--files-from`) and LLaVA training files (`--llava-json`).

Only lists and stats paths, as the folder walk does; the order is the file's.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Iterator, Sequence

from clipfeat import jsonsafe
from clipfeat.errors import ConfigError
from clipfeat.sources.common import (
    OUTSIDE_IMAGE_FOLDER,
    OUTSIDE_ROOT,
    Item,
    check_path,
    fs_key,
    text_key,
)
from clipfeat.sources.folders import outside_links


def _read_bytes(file: str | Path, what: str) -> bytes:
    p = os.fspath(file)
    if not os.path.exists(p):
        raise ConfigError(f"{what} {p!r} does not exist: pass an existing file")
    if os.path.isdir(p):
        raise ConfigError(f"{what} {p!r} is a directory: pass a file")
    try:
        with open(p, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {p!r}: {exc.strerror}") from exc


def _is_outside(rel: str) -> bool:
    return rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel)


def _relative_to(path: str, root: str) -> str | None:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # different drives (Windows)
        return None
    return None if _is_outside(rel) else rel


def read_files_from(file: str | Path, roots: Sequence[str | Path] | None = None, *,
                    follow_outside: bool = True) -> list[Item]:
    """Items from a text file of paths, one per line, keyed relative to ROOT.

    ROOT is the one root given, or the current directory. Blank lines and lines starting
    with '#' are skipped; a key listed twice is taken once. Order: the file's order.
    """
    roots = list(roots or [])
    if len(roots) > 1:
        raise ConfigError(
            f"--files-from takes at most one ROOT, got {len(roots)}: "
            "list paths relative to a single ROOT"
        )
    root = os.fspath(roots[0]) if roots else os.curdir
    if not os.path.isdir(root):
        raise ConfigError(f"ROOT {root!r} is not an existing directory: pass the folder the "
                          "listed paths are relative to")
    data = _read_bytes(file, "file list")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    root_abs = os.path.abspath(root)
    real_root: str | None = None

    items: list[Item] = []
    seen: set[str] = set()
    for raw_line in data.split(b"\n"):
        if raw_line.endswith(b"\r"):
            raw_line = raw_line[:-1]
        line = raw_line.decode("utf-8", "surrogateescape")
        if not line.strip() or line.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(root_abs, line))
        rel = _relative_to(path, root_abs)
        if rel is None and os.path.isabs(line):
            # The same place reached through a symlinked ROOT or parent still counts.
            if real_root is None:
                real_root = os.path.realpath(root_abs)
            parent = os.path.realpath(os.path.dirname(path))
            rel = _relative_to(os.path.join(parent, os.path.basename(path)), real_root)
        if rel is None:
            key, error = fs_key(line), OUTSIDE_ROOT
        else:
            key = fs_key(rel.replace(os.sep, "/"))
            error = None
        if key in seen:
            continue
        seen.add(key)
        items.append(Item(key, path, error if error else check_path(path)))
    return items if follow_outside else outside_links(items, [root_abs])


# -- LLaVA training files --------------------------------------------------------------


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: parsing a large JSON file allocates millions of objects and
    the collector's repeated passes over them cost about a quarter of the load time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _is_one_object(text: str, name: str) -> bool:
    """Whether a file whose first line is not a JSON value holds one JSON object."""
    try:
        return isinstance(jsonsafe.loads(text, name=name), dict)
    except ConfigError:
        return False


def read_llava_samples(file: str | Path) -> list[tuple[str, object]]:
    """[(where, sample)] from a LLaVA JSON list or JSON Lines file (UTF-8, with or without
    a BOM); `where` names the sample. The one reader of LLaVA data files."""
    name = os.fspath(file)
    data = _read_bytes(file, "LLaVA data file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not valid UTF-8 at byte {exc.start}: save it as UTF-8") from exc
    head = text.lstrip()[:1]
    if head == "[":
        samples = jsonsafe.loads(text, name=name)
        return [(f"sample {i}", s) for i, s in enumerate(samples)]
    if head == "{":
        out: list[tuple[str, object]] = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                sample = jsonsafe.loads(line, name=name, line=lineno, what="JSON Lines")
            except ConfigError:
                if not out and _is_one_object(text, name):
                    raise ConfigError(
                        f"{name}: holds a single JSON object; expected a JSON list of "
                        "samples or JSON Lines (one sample per line)"
                    ) from None
                raise
            out.append((f"sample {len(out)} (line {lineno})", sample))
        return out
    if not head:
        raise ConfigError(f"{name}: file is empty; expected a LLaVA JSON list or JSON Lines")
    raise ConfigError(
        f"{name}: not LLaVA data: expected a JSON list of samples '[...]' or JSON Lines"
    )


def _llava_error(raw: str, key: str) -> str | None:
    if not raw:
        return "empty image path"
    if "\0" in raw:
        return "invalid path (NUL byte)"
    if key != raw:
        return "invalid path (not valid Unicode)"
    if os.path.isabs(raw) or _is_outside(os.path.normpath(raw)):
        return OUTSIDE_IMAGE_FOLDER
    return None


def read_llava_json(file: str | Path, image_folder: str | Path, *,
                    follow_outside: bool = True) -> list[Item]:
    """Items for every image a LLaVA training file names, keyed by the `image` string as written.

    Accepts a JSON list of samples or JSON Lines. Text-only samples are ignored; each image
    is listed once, in order of first appearance; paths are under `image_folder`.
    """
    folder = os.fspath(image_folder)
    if not os.path.isdir(folder):
        raise ConfigError(
            f"--image-folder {folder!r} is not an existing directory: pass the folder the "
            "'image' paths are relative to"
        )
    folder_abs = os.path.abspath(folder)
    name = os.fspath(file)

    items: list[Item] = []
    seen: set[str] = set()
    with _gc_paused():
        samples = read_llava_samples(file)
    for where, sample in samples:
        if not isinstance(sample, dict):
            raise ConfigError(
                f"{name}: {where} is a JSON {type(sample).__name__}, not an object: "
                "each sample must be an object with an optional 'image'"
            )
        image = sample.get("image")
        if image is None:
            continue
        if isinstance(image, str):
            images = [image]
        elif isinstance(image, list) and all(isinstance(x, str) for x in image):
            images = image
        else:
            raise ConfigError(
                f"{name}: {where} has 'image' of type {type(image).__name__}: "
                "it must be a string or a list of strings"
            )
        for raw in images:
            if raw in seen:
                continue
            seen.add(raw)
            key = text_key(raw)
            error = _llava_error(raw, key)
            path = os.path.join(folder_abs, key) if error else os.path.join(folder_abs, raw)
            items.append(Item(key, path, error if error else check_path(path)))
    return items if follow_outside else outside_links(items, [folder_abs])
