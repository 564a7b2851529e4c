"""Input sources: image folders, file lists and LLaVA training files -> ordered `Item`s.

Every function here only lists and stats paths; no input is ever opened, so a FIFO or a
device named like an image cannot block or be read. Inputs that are known to be unusable
before decoding come back as items with `error` set, so the pipeline records them as
failures instead of dropping them silently.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import heapq
import logging
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

from clipfeat import jsonsafe
from clipfeat.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

OUTSIDE_ROOT = "outside ROOT"
OUTSIDE_IMAGE_FOLDER = "outside --image-folder"
#: With --no-follow-outside: a link (or a path through one) that leads out of the input folders.
LINK_OUTSIDE = "symlink points outside the input folder (--no-follow-outside): not followed"


class Item(NamedTuple):
    """One input: `key` is valid UTF-8 (the store key), `path` is what to open.

    `error` is set when the input is known to be unusable before decoding
    (e.g. "file not found", "dangling symlink", "not a regular file (fifo)").
    """

    key: str
    path: str
    error: str | None = None


# -- helpers ---------------------------------------------------------------------------


def _fs_key(name: str) -> str:
    """A file-system name as valid UTF-8: undecodable bytes become `\\xNN` escapes."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _text_key(text: str) -> str:
    """A string as valid UTF-8: lone surrogates become `\\udNNN` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _mode_error(mode: int) -> str | None:
    """None for a regular file, else the reason it must not be opened."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "not a regular file (directory)"
    if stat.S_ISFIFO(mode):
        return "not a regular file (fifo)"
    if stat.S_ISSOCK(mode):
        return "not a regular file (socket)"
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        return "not a regular file (device)"
    return "not a regular file"


def _stat_error(exc: OSError, path: str) -> str:
    """The reason string for a failed (link-following) stat of `path`."""
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return "dangling symlink" if os.path.islink(path) else "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot stat: {exc.strerror or exc}"


def _check_path(path: str) -> str | None:
    """Why `path` cannot be used as an input, or None; stats only, never opens."""
    try:
        st = os.stat(path)
    except ValueError:  # embedded NUL byte
        return "invalid path (NUL byte)"
    except OSError as exc:
        return _stat_error(exc, path)
    err = _mode_error(st.st_mode)
    if err is None and not os.access(path, os.R_OK):
        return "permission denied"
    return err


def _normalise_ext(ext: str) -> str:
    e = ext.strip().lstrip(".").lower()
    if not e or any(c in e for c in "/\\\0") or any(c.isspace() for c in e):
        raise ConfigError(
            f"invalid extension {ext!r}: use names like 'jpg' or '.png' (comma-separated)"
        )
    return e


def parse_exts(s: str | None) -> tuple[str, ...]:
    """Extensions from a comma-separated `--ext` value ('JPG,.png'); None -> DEFAULT_EXTS."""
    if s is None:
        return DEFAULT_EXTS
    parts = [p for p in s.split(",") if p.strip()]
    if not parts:
        raise ConfigError(
            f"--ext {s!r} names no extension: give a comma-separated list such as 'jpg,png'"
        )
    out: list[str] = []
    for p in parts:
        e = _normalise_ext(p)
        if e not in out:
            out.append(e)
    return tuple(out)


def _dir_ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def count_by_error(items: Iterable[Item]) -> dict[str, int]:
    """How many items failed, by reason (the part of `error` before any ':')."""
    counts = Counter(it.error.split(":", 1)[0] for it in items if it.error is not None)
    return dict(sorted(counts.items()))


# -- folders ---------------------------------------------------------------------------


def walk_folders(
    roots: Sequence[str | Path],
    exts: Sequence[str] = DEFAULT_EXTS,
    *,
    exclude: Sequence[str | Path] = (),
    follow_outside: bool = True,
) -> list[Item]:
    """Every image under each ROOT, keyed by its '/'-separated path relative to that ROOT.

    Hidden entries are skipped, symlinks followed (each directory visited once, real
    paths preferred over symlinked ones), directories in `exclude` never entered. With
    ``follow_outside=False`` a symlink whose target is outside every ROOT is not followed:
    it is an item with a `LINK_OUTSIDE` error (a link to a folder: one item for the link).
    Items are sorted by key per ROOT, ROOTs in the order given; a key already produced by
    an earlier ROOT comes back with a "duplicate key" error.
    """
    if not roots:
        raise ConfigError("no input folder given: pass at least one ROOT directory")
    suffixes = tuple("." + _normalise_ext(e) for e in exts)
    if not suffixes:
        raise ConfigError("no image extensions given: pass --ext such as 'jpg,png'")
    for root in roots:
        if not os.path.isdir(root):
            what = "does not exist" if not os.path.lexists(root) else "is not a directory"
            raise ConfigError(
                f"input folder {str(root)!r} {what}: pass an existing directory of images"
            )
    excluded = {ident for ident in map(_dir_ident, map(os.fspath, exclude)) if ident}

    inside = None if follow_outside else [os.path.realpath(os.fspath(r)) for r in roots]
    out: list[Item] = []
    seen: dict[str, str] = {}
    for root in roots:
        root_s = os.fspath(root)
        for item in _RootWalk(root_s, suffixes, excluded, inside).run():
            first = seen.get(item.key)
            if first is not None:
                item = item._replace(error=f"duplicate key: also found under {first}")
            else:
                seen[item.key] = root_s
            out.append(item)
    return out


def _within(path: str, bases: Sequence[str]) -> bool:
    """True if the real path ``path`` is one of ``bases`` or below one of them."""
    return any(path == b or path.startswith(b.rstrip(os.sep) + os.sep) for b in bases)


def _outside_links(items: list[Item], bases: Sequence[str]) -> list[Item]:
    """``items`` with a `LINK_OUTSIDE` error for each path that symlinks lead out of
    ``bases`` (real paths are resolved without opening any file)."""
    real = [os.path.realpath(b) for b in bases]
    return [it if it.error or _within(os.path.realpath(it.path), real)
            else it._replace(error=LINK_OUTSIDE) for it in items]


class _RootWalk:
    """One ROOT's walk: its image items sorted by key, each directory listed once."""

    def __init__(self, root: str, suffixes: tuple[str, ...],
                 excluded: set[tuple[int, int]], inside: Sequence[str] | None = None) -> None:
        self.root = root
        self.inside = inside  # real paths links may lead into (None: follow every link)
        self.suffixes = suffixes
        self.excluded = excluded
        root_abs = os.path.abspath(root)
        st = os.stat(root_abs)
        self.visited = {(st.st_dev, st.st_ino)}
        self.items: list[Item] = []
        # Real directories are walked first (stack); symlinked ones wait in a heap ordered by
        # key, so a directory reachable both ways is listed under its real path, and the
        # choice does not depend on scandir order.
        self.stack: list[tuple[str, str]] = [(root_abs, "")]
        self.deferred: list[tuple[str, str, tuple[int, int]]] = []

    def run(self) -> list[Item]:
        """Walk every directory reachable from the ROOT; return the items sorted by key."""
        while self.stack or self.deferred:
            nxt = self._next_dir()
            if nxt is not None:
                self._list_dir(*nxt)
        self.items.sort(key=lambda i: i.key)
        return self.items

    def _next_dir(self) -> tuple[str, str] | None:
        """The next (path, rel) to list, or None for a symlinked directory already walked."""
        if self.stack:
            return self.stack.pop()
        rel, path, ident = heapq.heappop(self.deferred)
        if ident in self.visited:
            logger.debug("skipping %s: directory already walked", path)
            return None
        self.visited.add(ident)
        return path, rel

    def _list_dir(self, path: str, rel: str) -> None:
        """Visit each non-hidden entry of one directory (ConfigError if it is the ROOT's)."""
        try:
            it = os.scandir(path)
        except OSError as exc:
            if not rel:
                raise ConfigError(
                    f"cannot list input folder {self.root!r}: {exc.strerror}; "
                    "check its permissions"
                ) from exc
            logger.warning("cannot list %s: %s", path, exc.strerror)
            self.items.append(Item(_fs_key(rel), path, f"cannot list directory: {exc.strerror}"))
            return
        with it:
            for entry in it:
                name = entry.name
                if name.startswith("."):
                    continue
                self._visit(entry, f"{rel}/{name}" if rel else name)

    def _visit(self, entry: os.DirEntry, child_rel: str) -> None:
        """Record an image entry as an item, queue a directory entry for listing."""
        is_image = entry.name.lower().endswith(self.suffixes)
        try:
            if entry.is_symlink():
                self._visit_symlink(entry, child_rel, is_image)
            elif entry.is_dir(follow_symlinks=False):
                lst = entry.stat(follow_symlinks=False)
                ident = (lst.st_dev, lst.st_ino)
                if ident not in self.visited and ident not in self.excluded:
                    self.visited.add(ident)
                    self.stack.append((entry.path, child_rel))
            elif is_image:
                if entry.is_file(follow_symlinks=False):
                    err = None if os.access(entry.path, os.R_OK) else "permission denied"
                else:
                    err = _mode_error(entry.stat(follow_symlinks=False).st_mode)
                self.items.append(Item(_fs_key(child_rel), entry.path, err))
        except OSError as exc:  # the entry changed or vanished during the walk
            if is_image:
                self.items.append(Item(_fs_key(child_rel), entry.path,
                                       _stat_error(exc, entry.path)))

    def _visit_symlink(self, entry: os.DirEntry, child_rel: str, is_image: bool) -> None:
        """A symlink: its target directory deferred, or an item if it is named as an image."""
        if self.inside is not None and not _within(os.path.realpath(entry.path), self.inside):
            if is_image or os.path.isdir(entry.path):
                self.items.append(Item(_fs_key(child_rel), entry.path, LINK_OUTSIDE))
            return
        try:
            target = os.stat(entry.path)
        except OSError as exc:
            if is_image:
                self.items.append(Item(_fs_key(child_rel), entry.path,
                                       _stat_error(exc, entry.path)))
            return
        if stat.S_ISDIR(target.st_mode):
            ident = (target.st_dev, target.st_ino)
            if ident not in self.visited and ident not in self.excluded:
                heapq.heappush(self.deferred, (child_rel, entry.path, ident))
        elif is_image:
            err = _mode_error(target.st_mode)
            if err is None and not os.access(entry.path, os.R_OK):
                err = "permission denied"
            self.items.append(Item(_fs_key(child_rel), entry.path, err))


# -- file lists ------------------------------------------------------------------------


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
            key, error = _fs_key(line), OUTSIDE_ROOT
        else:
            key = _fs_key(rel.replace(os.sep, "/"))
            error = None
        if key in seen:
            continue
        seen.add(key)
        items.append(Item(key, path, error if error else _check_path(path)))
    return items if follow_outside else _outside_links(items, [root_abs])


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
            key = _text_key(raw)
            error = _llava_error(raw, key)
            path = os.path.join(folder_abs, key) if error else os.path.join(folder_abs, raw)
            items.append(Item(key, path, error if error else _check_path(path)))
    return items if follow_outside else _outside_links(items, [folder_abs])
