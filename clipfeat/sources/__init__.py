"""Input sources -> ordered `Item`s: folders of images, file lists, LLaVA training files,
webdataset tar shards and parquet files.

Modules: `common` (the `Item` type, keys, `--ext`), `folders` (the recursive walk), `lists`
(`--files-from`, `--llava-json`), `roots` (what each ROOT argument is), `patterns` (brace
ranges and globs), `members` (images inside other files, and opening them), `tar`,
`parquet`. Every public name is importable from here.
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
from clipfeat.sources.members import SourceFile, check_unchanged, files_of, opened
from clipfeat.sources.parquet import MAX_ROW_GROUP_BYTES, ParquetRow, release_readers
from clipfeat.sources.patterns import expand, expand_braces
from clipfeat.sources.roots import check_roots, read_roots
from clipfeat.sources.tar import TarMember, sample_key

__all__ = [
    "DEFAULT_EXTS",
    "LINK_OUTSIDE",
    "MAX_ROW_GROUP_BYTES",
    "OUTSIDE_IMAGE_FOLDER",
    "OUTSIDE_ROOT",
    "Item",
    "ParquetRow",
    "SourceFile",
    "TarMember",
    "check_roots",
    "check_unchanged",
    "count_by_error",
    "expand",
    "expand_braces",
    "files_of",
    "opened",
    "parse_exts",
    "read_files_from",
    "read_llava_json",
    "read_llava_samples",
    "read_roots",
    "release_readers",
    "sample_key",
    "walk_folders",
]
