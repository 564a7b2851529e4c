"""One OUT, one writer: an exclusive lock on ``OUT/.clipfeat/lock`` for the whole run.

The lock is an ``flock`` on the lock file, held through an open descriptor: the kernel
drops it when the process exits, however it exits (SIGKILL included), so a lock is never
stale. The file itself only says who holds it (pid, host, job, start time) for the refusal
message; it is left in place after the run. Under torchrun the ranks of one job share the
lock: rank 0 holds it, the other ranks check that the holder is their own job. Readers
(`FeatureStore`, ``clipfeat info``, ``clipfeat verify``) take no lock.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from clipfeat.errors import ConfigError
from clipfeat.store.layout import LOCK_FILE, META_DIR

# Errors that mean "this file system cannot lock", not "somebody holds the lock".
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(out: str | os.PathLike) -> Path:
    return Path(out) / META_DIR / LOCK_FILE


def job_id() -> str:
    """What identifies this run's job: torchrun's run id (or its rendezvous address), else
    this process."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run and run != "none":
        return f"torchrun:{run}"
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun:{addr}:{port}"
    return f"pid:{socket.gethostname()}:{os.getpid()}"


def read_holder(out: str | os.PathLike) -> dict | None:
    """What the lock file says about its (last) holder, or None."""
    try:
        with open(lock_path(out), encoding="utf-8") as fh:
            holder = json.loads(fh.read() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another clipfeat run"
    return (f"clipfeat pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            + (f" (job {holder['job']})" if str(holder.get("job", "")).startswith("torchrun")
               else "")
            + (f", started {holder['started']}" if holder.get("started") else ""))


class OutLock:
    """The exclusive lock of an OUT folder; `acquire`, then `release` (or use ``with``)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.path = lock_path(out)
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> OutLock:
        """Take the lock or raise ConfigError naming its holder. Creates OUT/.clipfeat if
        needed (the caller checked OUT is writable)."""
        import fcntl

        if self.held:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise ConfigError(
                f"--out {self.out} is not writable ({err.strerror or err}): choose a writable "
                "--out"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"--out {self.out} is in use by {describe_holder(read_holder(self.out))}: "
                    "wait for that run to end, or write to another --out"
                ) from None
            if err.errno in _NO_LOCKS:
                raise ConfigError(
                    f"--out {self.out} is on a file system without working locks "
                    f"({errno.errorcode.get(err.errno, err.errno)}): make sure no other "
                    "clipfeat writes there and rerun with --no-lock"
                ) from None
            raise
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "job": job_id(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data = json.dumps(holder).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # the kernel drops the flock with the last descriptor

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_same_job(out: str | os.PathLike) -> None:
    """For ranks > 0 under torchrun: ConfigError unless OUT's lock is held by this job."""
    holder = read_holder(out)
    if not holder or holder.get("job") != job_id():
        raise ConfigError(
            f"--out {out} is locked by {describe_holder(holder)}, not by this torchrun job: "
            "wait for that run to end, or write to another --out"
        )
