"""SIGINT/SIGTERM during a run: raised in the main thread, checked again at safe points."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class Signalled(KeyboardInterrupt):
    """What the signal handler raises; `extract` turns it into `Interrupted`.

    Not an Exception (like KeyboardInterrupt): the signal can land anywhere, and an
    ``except Exception`` on the way (loading weights, a library's fallback) would otherwise
    swallow it or report it as another error.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# Signals caught by the guard. Python only prints an exception raised in a __del__ or weakref
# callback, so the handler's may be lost: `check_signal` raises it again at safe points.
_pending: list[int] = []


def check_signal() -> None:
    """Raise `Signalled` if a signal arrived since the guard was installed."""
    if _pending:
        raise Signalled(_pending[0])


def signal_guard() -> Callable[[], None]:
    """Turn SIGINT/SIGTERM into `Signalled` in the main thread; returns the undo, which
    puts the previous handlers back (so `extract` leaves no handler behind)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        _pending.append(signum)
        raise Signalled(signum)

    _pending.clear()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def undo() -> None:
        for s, h in old.items():
            signal.signal(s, h)
        _pending.clear()

    return undo
