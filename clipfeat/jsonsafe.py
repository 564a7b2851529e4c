"""The one parser of user-supplied JSON (LLaVA data files, a model's configs).

``json.loads`` turns some hostile files into exceptions that are not ``JSONDecodeError``:
nesting deeper than Python's recursion limit (``"[" * 200000``) raises RecursionError, an
integer longer than ``sys.get_int_max_str_digits()`` raises ValueError. `loads` turns every
way a text is not usable JSON into the caller's error class with one line naming the file.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from clipfeat.errors import ConfigError


def loads(text: str, *, name: str, error: type[ConfigError] = ConfigError,
          line: int | None = None, what: str = "JSON") -> Any:
    """``json.loads(text)``; raise ``error("<name>: ...")`` if ``text`` is not usable JSON.

    ``line`` is the line of ``name`` that ``text`` is (JSON Lines): positions are given on it.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        lineno = exc.lineno if line is None else line
        raise error(f"{name}: invalid {what} at line {lineno} column {exc.colno}: "
                    f"{exc.msg}") from None
    except RecursionError:
        at = "" if line is None else f" at line {line}"
        raise error(f"{name}: {what}{at} is nested too deeply to parse (more than about "
                    f"{sys.getrecursionlimit()} levels of [ or {{)") from None
    except ValueError as exc:  # an integer longer than Python converts
        at = "" if line is None else f" at line {line}"
        digits = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
        detail = (f"holds an integer with more than {digits} digits"
                  if "integer string conversion" in str(exc) else str(exc).splitlines()[0])
        raise error(f"{name}: {what}{at} {detail}; it is not a usable file") from None
