"""Input sources -> ordered `Item`s: folders of images, file lists, LLaVA training files.

Modules: `common` (the `Item` type, keys, `--ext`), `folders` (the recursive walk), `lists`
(`--files-from`, `--llava-json`). Every public name is importable from here.
"""

from clipfeat.sources.common import (
    DEFAULT_EXTS,
    LINK_OUTSIDE,
    OUTSIDE_IMAGE_FOLDER,
    OUTSIDE_ROOT,
    Item,
    count_by_error,
    parse_exts,
)
from clipfeat.sources.folders import walk_folders
from clipfeat.sources.lists import read_files_from, read_llava_json, read_llava_samples

__all__ = [
    "DEFAULT_EXTS",
    "LINK_OUTSIDE",
    "OUTSIDE_IMAGE_FOLDER",
    "OUTSIDE_ROOT",
    "Item",
    "count_by_error",
    "parse_exts",
    "read_files_from",
    "read_llava_json",
    "read_llava_samples",
    "walk_folders",
]
