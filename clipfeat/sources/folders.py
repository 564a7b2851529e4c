"""Folders of loose images: a recursive walk, keyed by the path relative to each ROOT.

Only lists and stats paths; no input is ever opened, so a FIFO or a device named like an
image cannot block or be read. Inputs known to be unusable before decoding come back as
items with `error` set, so the pipeline records them instead of dropping them silently.
"""

from __future__ import annotations

import heapq
import logging
import os
import stat
from pathlib import Path
from typing import Sequence

from clipfeat.errors import ConfigError
from clipfeat.sources.common import (
    DEFAULT_EXTS,
    LINK_OUTSIDE,
    Item,
    dir_ident,
    fs_key,
    image_suffixes,
    mode_error,
    stat_error,
)

logger = logging.getLogger(__name__)


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
    suffixes = image_suffixes(exts)
    for root in roots:
        if not os.path.isdir(root):
            what = "does not exist" if not os.path.lexists(root) else "is not a directory"
            raise ConfigError(
                f"input folder {str(root)!r} {what}: pass an existing directory of images"
            )
    excluded = {ident for ident in map(dir_ident, map(os.fspath, exclude)) if ident}

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


def within(path: str, bases: Sequence[str]) -> bool:
    """True if the real path ``path`` is one of ``bases`` or below one of them."""
    return any(path == b or path.startswith(b.rstrip(os.sep) + os.sep) for b in bases)


def outside_links(items: list[Item], bases: Sequence[str]) -> list[Item]:
    """``items`` with a `LINK_OUTSIDE` error for each path that symlinks lead out of
    ``bases`` (real paths are resolved without opening any file)."""
    real = [os.path.realpath(b) for b in bases]
    return [it if it.error or within(os.path.realpath(it.path), real)
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
            self.items.append(Item(fs_key(rel), path, f"cannot list directory: {exc.strerror}"))
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
                    err = mode_error(entry.stat(follow_symlinks=False).st_mode)
                self.items.append(Item(fs_key(child_rel), entry.path, err))
        except OSError as exc:  # the entry changed or vanished during the walk
            if is_image:
                self.items.append(Item(fs_key(child_rel), entry.path,
                                       stat_error(exc, entry.path)))

    def _visit_symlink(self, entry: os.DirEntry, child_rel: str, is_image: bool) -> None:
        """A symlink: its target directory deferred, or an item if it is named as an image."""
        if self.inside is not None and not within(os.path.realpath(entry.path), self.inside):
            if is_image or os.path.isdir(entry.path):
                self.items.append(Item(fs_key(child_rel), entry.path, LINK_OUTSIDE))
            return
        try:
            target = os.stat(entry.path)
        except OSError as exc:
            if is_image:
                self.items.append(Item(fs_key(child_rel), entry.path,
                                       stat_error(exc, entry.path)))
            return
        if stat.S_ISDIR(target.st_mode):
            ident = (target.st_dev, target.st_ino)
            if ident not in self.visited and ident not in self.excluded:
                heapq.heappush(self.deferred, (child_rel, entry.path, ident))
        elif is_image:
            err = mode_error(target.st_mode)
            if err is None and not os.access(entry.path, os.R_OK):
                err = "permission denied"
            self.items.append(Item(fs_key(child_rel), entry.path, err))
