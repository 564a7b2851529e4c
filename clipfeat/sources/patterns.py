"""ROOT patterns as webdataset users write them: brace expansion, then globs.

``shards/{000000..000099}.tar`` names 100 files, ``data/train-*.parquet`` the files that
match. Braces follow the `braceexpand` package that webdataset uses (and bash): lists
``{a,b}``, integer ranges ``{1..9}`` with an optional step ``{0..10..2}``, descending and
negative ranges, letter ranges ``{a..e}``, nesting, ``\\`` escaping the next character. A
range whose bound has a leading zero is zero-padded to the wider bound (``{07..10}`` ->
``07 08 09 10``; ``{0..10}`` is not padded). Then each result with ``*``, ``?`` or ``[...]`` is a glob (``**`` spans
folders; names starting with a dot only match a pattern that starts with one); its matches
are sorted. Local files only: nothing here fetches a URL.
"""

from __future__ import annotations

import glob
import itertools
import re
import string
from collections.abc import Iterator

from clipfeat.errors import ConfigError

_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_LETTERS = string.ascii_uppercase + string.ascii_lowercase
_GLOB_CHARS = re.compile(r"[*?[]")
#: Refuse a pattern that names more files than any dataset has shards (a typo like
#: ``{0..99999999}``) before building the list.
MAX_EXPANSION = 10_000_000


def is_pattern(text: str) -> bool:
    """True if ``text`` holds brace or glob syntax (so it names files by a pattern)."""
    return "{" in text or has_glob(text)


def has_glob(text: str) -> bool:
    return _GLOB_CHARS.search(text) is not None


def expand_braces(pattern: str) -> list[str]:
    """Every string ``pattern`` names by brace expansion, in order (ConfigError if its
    braces are unbalanced or it names more than `MAX_EXPANSION`)."""
    if _count(pattern) > MAX_EXPANSION:
        raise ConfigError(f"ROOT {pattern!r} names more than {MAX_EXPANSION:,} files: check "
                          "the ranges in its braces")
    return [_unescape(s) for s in _expand(pattern)]


def expand(pattern: str) -> list[str]:
    """The paths ``pattern`` names: braces expanded, then each glob replaced by its sorted
    matches (a glob matching nothing gives nothing; a plain name is kept as it is)."""
    out: list[str] = []
    for name in expand_braces(pattern):
        if has_glob(name):
            out.extend(sorted(glob.glob(name, recursive=True)))
        else:
            out.append(name)
    return out


# -- brace expansion ---------------------------------------------------------------------


def _chars(text: str) -> Iterator[tuple[int, str]]:
    """(index, character) of each character of ``text`` that a backslash does not escape."""
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        yield i, text[i]
        i += 1


def _split_top(text: str) -> list[tuple[bool, str]]:
    """``text`` as (is_group, part) pieces: literal text and the insides of top-level
    ``{...}`` groups. ConfigError for unbalanced braces."""
    pieces: list[tuple[bool, str]] = []
    depth, start = 0, 0
    for i, c in _chars(text):
        if c == "{":
            if depth == 0:
                if i > start:
                    pieces.append((False, text[start:i]))
                start = i + 1
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                break
            if depth == 0:
                pieces.append((True, text[start:i]))
                start = i + 1
    if depth != 0:
        raise ConfigError(f"ROOT pattern {text!r} has unbalanced braces: close each '{{' "
                          "with '}' (or escape it as '\\{')")
    if start < len(text):
        pieces.append((False, text[start:]))
    return pieces


def _alternatives(inner: str) -> list[str] | None:
    """The comma-separated alternatives of a group's inside, or None if it has no
    top-level comma (then it is a range, or literal text in braces)."""
    parts, depth, start = [], 0, 0
    for i, c in _chars(inner):
        if c in "{}":
            depth += 1 if c == "{" else -1
        elif c == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    if not parts:
        return None
    parts.append(inner[start:])
    return parts


def _range(inner: str) -> list[str] | None:
    """The strings of ``{N..M[..S]}`` or ``{a..e[..S]}``, or None if ``inner`` is neither."""
    m = _INT_RANGE.match(inner)
    if m:
        lo, hi, step = m.group(1), m.group(2), int(m.group(3) or 1) or 1
        padded = any(b.startswith(("0", "-0")) for b in (lo, hi) if b not in ("0", "-0"))
        width = max(len(lo), len(hi)) if padded else 0
        a, b = int(lo), int(hi)
        values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        return [f"{v:0{width}d}" for v in values]
    m = _CHAR_RANGE.match(inner)
    if m:
        step = int(m.group(3) or 1) or 1
        a, b = _LETTERS.index(m.group(1)), _LETTERS.index(m.group(2))
        return list(_LETTERS[a:b + 1:step] if a <= b else _LETTERS[a:b - 1 if b else None:-step])
    return None


def _group(inner: str) -> list[str]:
    alts = _alternatives(inner)
    if alts is not None:
        return [s for alt in alts for s in _expand(alt)]
    values = _range(inner)
    if values is not None:
        return values
    return ["{" + s + "}" for s in _expand(inner)]  # not a sequence: braces kept literally


def _expand(text: str) -> Iterator[str]:
    options = [_group(part) if is_group else [part] for is_group, part in _split_top(text)]
    for combo in itertools.product(*options):
        yield "".join(combo)


def _count(text: str) -> int:
    """How many strings ``text`` expands to, without building them."""
    n = 1
    for is_group, part in _split_top(text):
        if not is_group:
            continue
        alts = _alternatives(part)
        if alts is not None:
            k = sum(_count(a) for a in alts)
        else:
            m = _INT_RANGE.match(part)
            if m:
                k = abs(int(m.group(1)) - int(m.group(2))) // (int(m.group(3) or 1) or 1) + 1
            else:
                k = len(_LETTERS) if _CHAR_RANGE.match(part) else _count(part)
        n *= max(k, 1)
        if n > MAX_EXPANSION:
            return n
    return n


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)
