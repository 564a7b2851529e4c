"""ROOT arguments -> items: what kind of input each ROOT is, and the one list of them.

* Every ROOT an existing folder: folders of images, walked as `walk_folders` does. Only
  when they hold no image at all and do hold ``.parquet`` files (at any depth) are they
  read as folders of parquet files.
* Otherwise each ROOT is a ``.tar`` or ``.parquet`` file, a pattern of them
  (`clipfeat.sources.patterns`), or a folder of parquet files; tars and parquet files may
  be mixed. Folders of images cannot be mixed with them in one run.

Files are read in the order the ROOTs (and patterns) name them, each file once; a key met
again is a recorded failure, as for folders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from clipfeat.errors import ConfigError
from clipfeat.sources.common import DEFAULT_EXTS, Item, fs_key, image_suffixes
from clipfeat.sources.folders import walk_folders
from clipfeat.sources.members import PARQUET, TAR
from clipfeat.sources.patterns import expand, is_pattern

_SUFFIXES = {".tar": TAR, ".parquet": PARQUET}
_COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst",
                    ".tar.lz4")
#: What a ROOT may be, for messages.
ROOT_KINDS = "a folder of images, a .tar or .parquet file, or a pattern of them"


class _File:
    """One tar or parquet file to read: its path, kind, and key stem (parquet)."""

    def __init__(self, path: str, kind: str, stem: str) -> None:
        self.path, self.kind, self.stem = path, kind, stem


def file_kind(path: str) -> str | None:
    """TAR or PARQUET by the name's ending; None for any other name (ConfigError for a
    compressed tar, which cannot be read by offset)."""
    low = path.lower()
    for suffix, kind in _SUFFIXES.items():
        if low.endswith(suffix):
            return kind
    if low.endswith(_COMPRESSED_TARS):
        raise ConfigError(f"{path} is a compressed tar: clipfeat reads tar members in place "
                          "by their offset, which needs an uncompressed .tar; decompress it "
                          "first")
    return None


def check_roots(roots: Sequence[str]) -> None:
    """The checks of ROOT arguments that need no listing (every rank makes them):
    ConfigError for a ROOT that does not exist or is a file of another kind."""
    for r in roots:
        if os.path.isdir(r) or (is_pattern(r) and not os.path.lexists(r)):
            continue
        if not os.path.lexists(r):
            raise ConfigError(f"ROOT {r} does not exist: pass {ROOT_KINDS}")
        if file_kind(r) is None:
            raise ConfigError(f"ROOT {r} is a file, not {ROOT_KINDS}: check the path")


def read_roots(roots: Sequence[str | Path], exts: Sequence[str] = DEFAULT_EXTS, *,
               exclude: Sequence[str | Path] = (), follow_outside: bool = True,
               image_column: str | None = None, key_column: str | None = None) -> list[Item]:
    """The items of every ROOT, in order (see the module doc). ``exts`` selects images in
    folders and tar members; ``image_column``/``key_column`` are for parquet files (a
    ConfigError when there are none)."""
    names = [os.fspath(r) for r in roots]
    if not names or all(os.path.isdir(r) for r in names):
        items = walk_folders(names, exts, exclude=exclude, follow_outside=follow_outside)
        files = [] if items else _parquet_folders(names)
        if not files:
            _refuse_columns(names, [], image_column, key_column)
            return items
    else:
        check_roots(names)
        files = _dataset_files(names)
    _refuse_columns(names, files, image_column, key_column)
    items = _read_files(files, image_suffixes(exts), image_column, key_column)
    if not items:
        raise ConfigError(_nothing_found(names, files, exts))
    return _mark_duplicates(items)


def _refuse_columns(roots: list[str], files: list[_File], image_column: str | None,
                    key_column: str | None) -> None:
    if any(f.kind == PARQUET for f in files):
        return
    for flag, value in (("--image-column", image_column), ("--key-column", key_column)):
        if value is not None:
            raise ConfigError(f"{flag} {value!r} is for parquet files, and ROOT "
                              f"{', '.join(roots)} names none: drop {flag}")


def _dataset_files(roots: list[str]) -> list[_File]:
    """The tar and parquet files the ROOTs name, each once (by its real path)."""
    files: list[_File] = []
    seen: set[str] = set()
    for r in roots:
        for f in _root_files(r):
            real = os.path.realpath(f.path)
            if real not in seen:
                seen.add(real)
                files.append(f)
    return files


def _root_files(root: str) -> list[_File]:
    if os.path.isdir(root):
        found = _parquet_files(root)
        if not found:
            raise ConfigError(
                f"ROOT {root} is a folder that holds no .parquet file: folders of images "
                "cannot be mixed with .tar or .parquet inputs in one run; extract them into "
                "separate --out folders")
        return found
    if os.path.lexists(root):
        return [_named_file(root, root)]
    paths = expand(root)
    if not paths:
        raise ConfigError(f"ROOT pattern {root!r} matches no file: check the pattern (quote "
                          "it, so that the shell leaves it to clipfeat)")
    return [_named_file(p, root) for p in paths]


def _named_file(path: str, root: str) -> _File:
    """A file a ROOT names directly or by a pattern (ConfigError if missing or not a
    .tar/.parquet file)."""
    named = f"ROOT {root!r} names {path}" if path != root else f"ROOT {root}"
    if not os.path.lexists(path):
        raise ConfigError(f"{named}, which does not exist: check the pattern's ranges")
    if os.path.isdir(path):
        raise ConfigError(f"{named}, which is a folder: make the pattern name .tar or "
                          ".parquet files")
    kind = file_kind(path)
    if kind is None:
        raise ConfigError(f"{named}, which is neither a .tar nor a .parquet file: make it "
                          "name only those (e.g. 'shards/*.tar')")
    return _File(path, kind, fs_key(_strip_suffix(os.path.basename(path))))


def _strip_suffix(name: str) -> str:
    return name[: -len(".parquet")] if name.lower().endswith(".parquet") else name


def _parquet_folders(roots: list[str]) -> list[_File]:
    return [f for r in roots for f in _parquet_files(r)]


def _parquet_files(root: str) -> list[_File]:
    """The ``.parquet`` files under folder ``root`` (hidden entries skipped, symlinks
    followed, each folder once), sorted by path; the stem is the path relative to ``root``
    without ``.parquet``."""
    found: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    stack = [(os.path.abspath(root), "")]
    while stack:
        path, rel = stack.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as err:
            raise ConfigError(f"cannot list {path}: {err.strerror or err}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir():
                    stack.append((entry.path, child))
                elif entry.name.lower().endswith(".parquet"):
                    found.append((child, entry.path))
            except OSError:
                continue
    return [_File(path, PARQUET, fs_key(_strip_suffix(rel))) for rel, path in sorted(found)]


def _read_files(files: list[_File], suffixes: tuple[str, ...], image_column: str | None,
                key_column: str | None) -> list[Item]:
    from clipfeat.sources.parquet import list_parquet
    from clipfeat.sources.tar import list_tar

    items: list[Item] = []
    for f in files:
        if f.kind == TAR:
            items.extend(list_tar(f.path, suffixes))
        else:
            items.extend(list_parquet([(f.path, f.stem)], image_column_name=image_column,
                                      key_column=key_column))
    return items


def _mark_duplicates(items: list[Item]) -> list[Item]:
    """``items`` with a "duplicate key" error on every item whose key came before."""
    first: dict[str, str] = {}
    out: list[Item] = []
    for it in items:
        if it.key in first:
            it = it._replace(error=f"duplicate key: also found at {first[it.key]}", member=None)
        else:
            first[it.key] = it.path
        out.append(it)
    return out


def _nothing_found(roots: list[str], files: list[_File], exts: Sequence[str]) -> str:
    kinds = {f.kind for f in files}
    what = " and ".join(sorted(f"{k} files" for k in kinds))
    if TAR in kinds:
        return (f"the {what} of ROOT {', '.join(roots)} hold no member with a taken extension "
                f"({', '.join(exts)}): check them (tar tf FILE), or pass --ext with the "
                "extensions of your images")
    return f"the {what} of ROOT {', '.join(roots)} hold no row: nothing to extract"
