"""The parent's handle on the decode worker processes: start, kill, replace, close.

One lock covers starting, replacing and closing: `close` may come from another thread
(the pipeline's, while its feeder thread is still starting the pool), and no worker may be
started after it, nor with the shared memory already released.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Any

from clipfeat.errors import ConfigError

log = logging.getLogger(__name__)

# Modules the forkserver imports once so that each new worker starts warm (~10 ms). With
# "__main__" listed, the main script is imported once there (as __mp_main__) instead of once
# per worker, which matters when it imports torch.
PRELOAD = [
    "__main__", "clipfeat.decode.worker", "numpy", "PIL.Image", "PIL.ImageOps",
    "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "PIL.GifImagePlugin", "PIL.WebPImagePlugin",
    "PIL.TiffImagePlugin", "PIL.BmpImagePlugin",
]


class UnguardedMain(ConfigError, SystemExit):
    """The main script starts workers from its top level without a ``__main__`` guard.

    A ConfigError (``except ConfigError`` catches it) that, left uncaught, ends the script
    like ``sys.exit(message)``: one line on stderr, exit status 1, no traceback.
    """

    def __init__(self, message: str) -> None:
        ConfigError.__init__(self, message)
        self.code = f"clipfeat: error: {message}"


def _reimports_main(main: Any) -> bool:
    """True if spawn/forkserver workers run the main module again (as ``__mp_main__``), as
    `multiprocessing.spawn` decides it: by module name for ``python -m pkg.mod`` (never for a
    package's ``__main__``), else by path (never for IPython)."""
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return name != "__main__" and not name.endswith(".__main__")
    path = getattr(main, "__file__", None)
    return bool(path) and os.path.splitext(os.path.basename(path))[0] != "ipython"


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return (any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides)
            and any(isinstance(x, ast.Constant) and x.value == "__main__" for x in sides))


def is_guarded(source: str, line: int) -> bool:
    """True if ``line`` of ``source`` is inside the body of an ``if __name__ == "__main__":``."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return True  # cannot tell: assume the script is fine
    return any(isinstance(node, ast.If) and _is_main_test(node.test) and node.body
               and node.body[0].lineno <= line <= (node.body[-1].end_lineno or line)
               for node in ast.walk(tree))


def unguarded_main_line() -> tuple[str, int] | None:
    """(script, line) when the main script is running its top level, at a line outside an
    ``if __name__ == "__main__":`` block, and worker processes would run that line again.

    Workers re-import the main script (multiprocessing's spawn and forkserver do), so such a
    call would start clipfeat again inside every worker's start-up: hundreds of lines of
    tracebacks, and no worker ever ready.
    """
    main = sys.modules.get("__main__")
    if main is None or not _reimports_main(main):
        return None
    top = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            top = frame
        frame = frame.f_back
    if top is None:  # the top level has finished (a thread, a callback): nothing re-runs it
        return None
    try:
        with open(top.f_code.co_filename, encoding="utf-8") as fh:
            source = fh.read()
    except (OSError, UnicodeDecodeError):
        return None
    if is_guarded(source, top.f_lineno):
        return None
    return top.f_code.co_filename, top.f_lineno


def check_main_guard(what: str = "clipfeat") -> None:
    """Raise `UnguardedMain` (before any worker starts) for an unguarded top-level call."""
    found = unguarded_main_line()
    if found is None:
        return
    script = os.path.basename(found[0])
    raise UnguardedMain(
        f"{script} line {found[1]} runs {what} with decode workers at the script's top level: "
        f"put that call under `if __name__ == \"__main__\":` (each worker re-imports "
        f"{script}), or pass workers=0 to decode in this process"
    )


def startup_hint() -> str:
    """What to do when workers die before they are ready.

    The usual cause: a script calling clipfeat at its top level without a
    ``if __name__ == "__main__":`` guard. Workers re-import the main script (as
    multiprocessing's spawn and forkserver do), which calls clipfeat again in the worker.
    """
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if script and getattr(getattr(main, "__spec__", None), "name", None) is None:
        return (f"if {os.path.basename(script)} calls clipfeat at its top level, put the call "
                "under `if __name__ == \"__main__\":` (workers re-import the main script); "
                "otherwise run with --workers 0 (workers=0 in Python) to see the error")
    return "run with --workers 0 (workers=0 in Python) to see the error"


class WorkerProc:
    """A worker process, its pipe, and the items it holds (head = being decoded)."""

    def __init__(self, proc: Any, conn: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.queue: deque[int] = deque()
        self.ready = False
        self.since: float | None = None  # when the head item started (worker ready)
        self.done = 0  # items this process has answered
        self.started = time.monotonic()
        self.alive = True


class WorkerSet:
    """``count`` worker processes running ``target(conn, main_pid, *args)``."""

    def __init__(self, count: int, target: Any, args: tuple, start_method: str | None) -> None:
        import multiprocessing as mp

        method = start_method
        if method is None:
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        if method not in ("forkserver", "spawn"):
            # fork would copy the parent's torch/CUDA threads and locks into the worker
            raise ConfigError(f"start_method must be 'forkserver' or 'spawn', got {method!r}")
        self._ctx = mp.get_context(method)
        if method == "forkserver":
            self._ctx.set_forkserver_preload(PRELOAD)
        self.count = count
        self._target = target
        self._args = args
        self.procs: list[WorkerProc] = []
        self.closed = False
        self.lock = threading.RLock()

    def start(self) -> None:
        """Start the missing workers (all of them the first time)."""
        with self.lock:
            while len(self.procs) < self.count:
                self.procs.append(self._spawn())

    def _spawn(self) -> WorkerProc:
        if self.closed:
            raise RuntimeError("DecodePool is closed")
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=self._target, args=(child_conn, os.getpid(), *self._args),
                                 name="clipfeat-decode", daemon=True)
        proc.start()
        child_conn.close()  # so that the worker's death reads as EOF here
        return WorkerProc(proc, parent_conn)

    def kill(self, w: WorkerProc) -> None:
        w.alive = False
        try:
            if w.proc.exitcode is None:
                w.proc.kill()
            w.proc.join(5.0)
            w.proc.close()
        except (ValueError, OSError):  # still running after SIGKILL+5 s: leave it to the OS
            pass
        try:
            w.conn.close()
        except OSError:
            pass

    def replace(self, w: WorkerProc) -> WorkerProc | None:
        """Kill ``w`` and start a fresh worker in its place; None once the set is closed."""
        self.kill(w)
        with self.lock:
            if self.closed or w not in self.procs:
                return None
            new = self._spawn()
            self.procs[self.procs.index(w)] = new
        return new

    def renew_busy(self) -> int:
        """Replace every worker that still holds items (an abandoned run's), and dead ones;
        return how many were started."""
        started = 0
        with self.lock:
            for i, w in enumerate(self.procs):
                if w.alive and w.queue:
                    self.kill(w)
                if not w.alive and not self.closed:
                    self.procs[i] = self._spawn()
                    started += 1
        return started

    def live(self) -> list[WorkerProc]:
        return [w for w in self.procs if w.alive]

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.procs if w.alive]

    def mark_closed(self) -> bool:
        """Refuse every later start; False if it was already closed."""
        with self.lock:
            was, self.closed = self.closed, True
        return not was

    def close(self) -> None:
        """Stop every worker: politely (idle ones), then by force."""
        with self.lock:  # a worker being started right now is in the list once this returns
            self.closed = True
            procs, self.procs = self.procs, []
        for w in procs:
            if w.alive and not w.queue:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + 2.0
        for w in procs:
            if w.alive and not w.queue:
                w.proc.join(max(0.0, deadline - time.monotonic()))
            self.kill(w)
