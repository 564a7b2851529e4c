"""One OUT, one writer: the lock on OUT/.clipfeat/lock refuses a second run at once (exit 2,
naming the holder, nothing written), dies with its holder, and lets readers be."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipfeat.cli import app
from clipfeat.store import FeatureStore, OutLock

runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lock-imgs")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _args(root: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["extract", str(root), "--out", str(out), "--model", str(model), "--device", "cpu",
            "--workers", "0", "--shard-size", "2", "--quiet", *extra]


def _listing(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_locked_out_is_refused_at_once(tmp_path, images, clip_full_dir):
    out = tmp_path / "out"
    assert runner.invoke(app, _args(images, out, clip_full_dir)).exit_code == 0
    before = _listing(out)
    with OutLock(out):  # another run is writing OUT (a second descriptor: flock conflicts)
        res = runner.invoke(app, _args(images, out, clip_full_dir, "--shard-size", "3"))
        assert res.exit_code == 2, res.output
        line = res.stderr.strip()
        assert "\n" not in line and "is in use by clipfeat pid" in line
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in line
        # readers need no lock and keep working meanwhile
        assert len(FeatureStore(out)) == 6
        assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
        assert runner.invoke(app, ["info", str(out)]).exit_code == 0
    holder = json.loads((out / ".clipfeat" / "lock").read_text())
    assert holder["pid"] == os.getpid()
    del before[".clipfeat/lock"]
    after = _listing(out)
    del after[".clipfeat/lock"]
    assert after == before, "the refused run wrote something"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    code = (f"import os, signal; from clipfeat.store import OutLock; "
            f"OutLock({str(out)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert (out / ".clipfeat" / "lock").is_file()
    with OutLock(out) as lock:  # the kernel dropped the dead process's lock
        assert lock.held


def test_a_rank_of_another_job_is_refused(tmp_path, images, clip_full_dir, monkeypatch):
    out = tmp_path / "out"
    assert runner.invoke(app, _args(images, out, clip_full_dir)).exit_code == 0
    (out / ".clipfeat" / "lock").write_text(json.dumps(
        {"pid": 1, "host": "node7", "job": "torchrun:other-job", "started": "x"}))
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2"),
                        ("TORCHELASTIC_RUN_ID", "this-job")):
        monkeypatch.setenv(name, value)
    import clipfeat.distributed as distributed

    monkeypatch.setattr(distributed, "setup", lambda device: distributed.Dist(1, 2, 1))
    res = runner.invoke(app, _args(images, out, clip_full_dir))
    assert res.exit_code == 2, res.output
    assert "pid 1 on host node7 (job torchrun:other-job)" in res.stderr
    assert "not by this torchrun job" in res.stderr


def test_a_file_system_without_locks_is_named_and_no_lock_goes_on(tmp_path, images,
                                                                  clip_full_dir, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_locks)
        res = runner.invoke(app, _args(images, out, clip_full_dir))
        assert res.exit_code == 2, res.output
        assert "without working locks (ENOLCK)" in res.stderr and "--no-lock" in res.stderr
        assert not list(out.glob("shard-*.h5"))
        res = runner.invoke(app, _args(images, out, clip_full_dir, "--no-lock"))
    assert res.exit_code == 0, res.output
    assert len(FeatureStore(out)) == 6


def test_overwrite_keeps_the_lock_it_holds(tmp_path, images, clip_full_dir):
    out = tmp_path / "out"
    assert runner.invoke(app, _args(images, out, clip_full_dir)).exit_code == 0
    res = runner.invoke(app, _args(images, out, clip_full_dir, "--layer", "-1", "--overwrite"))
    assert res.exit_code == 0, res.output
    assert (out / ".clipfeat" / "lock").is_file()
    assert FeatureStore(out).meta["layer"] == -1
