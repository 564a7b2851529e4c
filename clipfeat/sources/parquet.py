"""Parquet files whose image column holds the encoded images (Hugging Face datasets).

The image column is ``--image-column``, or by default the one column of the datasets
``Image`` type (a struct with a binary ``bytes`` field), else the one binary column. Keys
are ``--key-column``'s values (strings or integers, as text), or ``FILE_STEM/ROW``.

The parent lists rows from the files' footers (and the key column); a decode worker reads
the image of a row itself, with pyarrow. pyarrow reads a column no finer than a row group
(a dictionary page can hold all its values), so each worker keeps the image column of the
one row group it reads from (`RowReader`), replaced when it moves on, and a row group whose
images exceed `MAX_ROW_GROUP_BYTES` is refused when listing: memory stays bounded by one
row group per worker. (Datasets writes 100 images per row group.)

pyarrow is an optional dependency: ``pip install 'clipfeat[parquet]'``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any, BinaryIO, NamedTuple

from clipfeat.errors import ConfigError
from clipfeat.sources.common import Item, text_key
from clipfeat.sources.members import PARQUET, SourceFile, display_path, source_file
from clipfeat.units import human_bytes

#: The most image bytes (uncompressed, per the file's metadata) one row group may hold:
#: each decode worker holds the image column of the row group it reads.
MAX_ROW_GROUP_BYTES = 1 << 30
INSTALL_HINT = "pip install 'clipfeat[parquet]'"
#: Columns named in a message, at most.
_SHOWN = 12


def import_pyarrow() -> Any:
    """``pyarrow.parquet``, or ConfigError naming the extra that installs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading parquet files needs pyarrow, which is not installed: "
                          f"{INSTALL_HINT}") from None
    return pq


class ParquetRow(NamedTuple):
    """Row ``row`` (counted within its row group) of row group ``row_group``."""

    file: SourceFile
    row_group: int
    row: int

    def open(self) -> BinaryIO:
        """The row's image bytes as a binary file."""
        return io.BytesIO(READER.image(self))


# -- schema ------------------------------------------------------------------------------


def _is_binary(t: Any) -> bool:
    import pyarrow as pa

    checks = [pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary]
    if hasattr(pa.types, "is_binary_view"):
        checks.append(pa.types.is_binary_view)
    return any(check(t) for check in checks)


def _is_image_struct(t: Any) -> bool:
    import pyarrow as pa

    if not pa.types.is_struct(t):
        return False
    idx = t.get_field_index("bytes")
    return idx >= 0 and _is_binary(t.field(idx).type)


def _is_key_type(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    checks = [pa.types.is_string, pa.types.is_large_string, pa.types.is_integer]
    if hasattr(pa.types, "is_string_view"):
        checks.append(pa.types.is_string_view)
    return any(check(t) for check in checks)


def _columns(schema: Any) -> str:
    fields = [f"{f.name} ({f.type})" for f in schema]
    more = f", and {len(fields) - _SHOWN} more" if len(fields) > _SHOWN else ""
    return ", ".join(fields[:_SHOWN]) + more


def image_column(schema: Any, chosen: str | None, path: str) -> str:
    """The image column of a file with ``schema`` (see the module doc); ConfigError naming
    the columns when ``chosen`` is missing or of the wrong type, or the default is not one
    column."""
    names = schema.names
    if chosen is not None:
        if chosen not in names:
            raise ConfigError(f"--image-column {chosen!r} is not a column of {path}; its "
                              f"columns: {_columns(schema)}")
        t = schema.field(chosen).type
        if not (_is_binary(t) or _is_image_struct(t)):
            raise ConfigError(f"--image-column {chosen!r} of {path} is of type {t}: pass a "
                              "column of encoded images (binary, or a struct with a binary "
                              "'bytes' field like the datasets Image type)")
        return chosen
    structs = [f.name for f in schema if _is_image_struct(f.type)]
    found = structs or [f.name for f in schema if _is_binary(f.type)]
    if len(found) == 1:
        return found[0]
    if found:
        kind = "image (struct with 'bytes')" if structs else "binary"
        raise ConfigError(f"{path} has {len(found)} {kind} columns ({', '.join(found)}): "
                          "pick the images with --image-column NAME")
    raise ConfigError(f"{path} has no column of encoded images (columns: {_columns(schema)}): "
                      "pass --image-column NAME of a binary column or a struct with 'bytes'")


def _check_key_column(schema: Any, key_column: str, path: str) -> None:
    if key_column not in schema.names:
        raise ConfigError(f"--key-column {key_column!r} is not a column of {path}; its "
                          f"columns: {_columns(schema)}")
    t = schema.field(key_column).type
    if not _is_key_type(t):
        raise ConfigError(f"--key-column {key_column!r} of {path} is of type {t}: pass a "
                          "column of strings or integers")


def _group_image_bytes(meta: Any, column: str) -> int:
    """Uncompressed bytes of ``column`` (all its leaves) in row group metadata ``meta``."""
    total = 0
    for j in range(meta.num_columns):
        c = meta.column(j)
        if c.path_in_schema == column or c.path_in_schema.startswith(column + "."):
            total += c.total_uncompressed_size
    return total


# -- listing -----------------------------------------------------------------------------


def _open(pq: Any, path: str, how: str) -> tuple[BinaryIO, Any]:
    """(open file, pyarrow ParquetFile), or ConfigError naming ``path``."""
    from clipfeat.preprocess import ImageRejected, open_regular

    try:
        fh = open_regular(path)
    except (OSError, ImageRejected) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"cannot read parquet file {path}: {reason}") from None
    try:
        return fh, pq.ParquetFile(fh, buffer_size=1 << 20, pre_buffer=False)
    except Exception as err:  # noqa: BLE001 - pyarrow's errors name the damage
        fh.close()
        raise ConfigError(f"{path} cannot be read as parquet ({_one_line(err)}): it is "
                          f"damaged, truncated or not a parquet file; {how}") from None


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def list_parquet(files: Sequence[tuple[str, str]], *, image_column_name: str | None = None,
                 key_column: str | None = None) -> list[Item]:
    """One item per row of each ``(path, stem)`` file, in file and row order (see the
    module doc); a null key is a recorded failure keyed ``STEM/ROW``."""
    pq = import_pyarrow()
    items: list[Item] = []
    for path, stem in files:
        fh, pf = _open(pq, path, "re-download it or leave it out")
        with fh:
            schema = pf.schema_arrow
            column = image_column(schema, image_column_name, path)
            if key_column is not None:
                _check_key_column(schema, key_column, path)
            sf = source_file(path, PARQUET, os.fstat(fh.fileno()), column)
            items.extend(_rows(pf, sf, stem, key_column))
    return items


def _rows(pf: Any, sf: SourceFile, stem: str, key_column: str | None) -> list[Item]:
    meta = pf.metadata
    items: list[Item] = []
    row = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        size = _group_image_bytes(group, sf.column)
        if size > MAX_ROW_GROUP_BYTES:
            raise ConfigError(
                f"{sf.path}: row group {g} holds {human_bytes(size)} of images, more than the "
                f"{human_bytes(MAX_ROW_GROUP_BYTES)} a decode worker reads at once: rewrite "
                "the file with smaller row groups (pyarrow: pq.write_table(table, path, "
                "row_group_size=100))")
        keys, error = _group_keys(pf, g, group.num_rows, key_column)
        for r in range(group.num_rows):
            fallback = f"{stem}/{row}"
            key = keys[r] if keys is not None else fallback
            err = error
            if key is None:
                key, err = fallback, f"null key in --key-column {key_column!r}"
            elif key == "":
                key, err = fallback, f"empty key in --key-column {key_column!r}"
            items.append(Item(key, display_path(sf.path, str(row)), err,
                              None if err else ParquetRow(sf, g, r)))
            row += 1
    return items


def _group_keys(pf: Any, g: int, n: int, key_column: str | None
                ) -> tuple[list[str | None] | None, str | None]:
    """The keys of row group ``g`` (None without a key column) and an error for all its
    rows when the column cannot be read."""
    if key_column is None:
        return None, None
    try:
        values = pf.read_row_group(g, columns=[key_column], use_threads=False).column(0)
        keys = [None if v is None else text_key(str(v)) for v in values.to_pylist()]
    except Exception as err:  # noqa: BLE001 - a damaged row group: its rows fail
        return None, f"cannot read the key column of row group {g}: {_one_line(err)}"
    if len(keys) != n:
        return None, f"row group {g} has {len(keys)} keys for {n} rows"
    return keys, None


# -- reading (decode workers) ------------------------------------------------------------


class RowReader:
    """A process's parquet reader: the file it reads from, and the image column of the
    one row group it last read (released when it moves to another; `release` frees it)."""

    def __init__(self) -> None:
        self._file: SourceFile | None = None
        self._fh: BinaryIO | None = None
        self._pf: Any = None
        self._group: tuple[SourceFile, int] | None = None
        self._values: Any = None  # the image bytes (binary array) of that row group
        self._paths: Any = None  # the datasets Image 'path' field, where there is one
        self._error: str | None = None  # why that row group cannot be read

    def image(self, row: ParquetRow) -> bytes:
        """The encoded image of ``row`` (ImageRejected: null, or the file cannot be read)."""
        from clipfeat.preprocess import ImageRejected

        if self._group != (row.file, row.row_group):
            self._load(row)
        if self._error is not None:
            raise ImageRejected(self._error)
        value = self._values[row.row].as_py()
        if value is None:
            path = self._paths[row.row].as_py() if self._paths is not None else None
            raise ImageRejected("null image: the row holds no image bytes" + (
                f" (the datasets Image names a file instead: {path!r})" if path else ""))
        return value

    def _load(self, row: ParquetRow) -> None:
        self._values = self._paths = self._error = None  # freed before the next is read
        self._group = (row.file, row.row_group)
        try:
            pf = self._open(row.file)
            table = pf.read_row_group(row.row_group, columns=[row.file.column],
                                      use_threads=False)
            values = table.column(0)  # a ChunkedArray: indexed as it is, not copied
        except Exception as err:  # noqa: BLE001 - every failure becomes the rows' error
            from clipfeat.preprocess import ImageRejected

            if isinstance(err, (ImageRejected, FileNotFoundError)):
                self._group = None
                raise
            self._error = f"cannot read row group {row.row_group}: {_one_line(err)}"
            return
        if _is_image_struct(values.type):
            # flatten(): the children with the struct's own nulls applied
            fields = dict(zip((f.name for f in values.type), values.flatten(), strict=True))
            self._paths = fields.get("path")
            values = fields["bytes"]
        self._values = values

    def _open(self, file: SourceFile) -> Any:
        if self._file == file and file.changed(os.fstat(self._fh.fileno())):
            self.release()  # changed in place since opened: open() says how
        if self._file != file:
            self.release()
            pq = import_pyarrow()
            fh = file.open()  # ImageRejected if it changed since the plan
            try:
                self._pf = pq.ParquetFile(fh, buffer_size=1 << 20, pre_buffer=False)
            except BaseException:
                fh.close()
                raise
            self._fh, self._file = fh, file
        return self._pf

    def release(self) -> None:
        """Close the file and drop the cached row group."""
        if self._fh is not None:
            self._fh.close()
        self._file = self._fh = self._pf = None
        self._group = self._values = self._paths = self._error = None


#: This process's reader (each decode worker is a process of its own).
READER = RowReader()


def release_readers() -> None:
    """Close the tar and parquet files this process keeps open, and drop its cached row
    group."""
    from clipfeat.sources.members import TAR_FILE

    READER.release()
    TAR_FILE.release()
