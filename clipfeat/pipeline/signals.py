"""SIGINT/SIGTERM/SIGHUP during a run: raised in the main thread, checked again at safe points.

SIGHUP (the terminal closed, an ssh session dropped) stops a run like SIGTERM: the shard
being written is dropped, finished shards stay, and rerunning the same command resumes.
"""

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


#: The signals `signal_guard` turns into `Signalled` (SIGHUP where the platform has it).
GUARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                if hasattr(signal, name))

# Signals caught by the guard. Python only prints an exception raised in a __del__ or weakref
# callback, so the handler's may be lost: `check_signal` raises it again at safe points.
_pending: list[int] = []


def check_signal() -> None:
    """Raise `Signalled` if a signal arrived since the guard was installed."""
    if _pending:
        raise Signalled(_pending[0])


def signal_guard() -> Callable[[], None]:
    """Turn SIGINT/SIGTERM/SIGHUP into `Signalled` in the main thread; returns the undo, which
    puts the previous handlers back (so `extract` leaves no handler behind)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        _pending.append(signum)
        raise Signalled(signum)

    _pending.clear()
    old = {s: signal.signal(s, handler) for s in GUARDED}

    def undo() -> None:
        for s, h in old.items():
            signal.signal(s, h)
        _pending.clear()

    return undo
