"""Crash safety and resume: killed runs, Ctrl-C/SIGTERM, disk full, reruns.

Expected features come from an uninterrupted single-process run of the same inputs (rows are
bit-identical whatever the batching, float32 on the CPU) and, for new inputs, from
transformers' own hidden states. Real `python -m clipfeat extract` processes are killed with
SIGKILL at random points (the seed is in every failure message) and signalled with
SIGINT/SIGTERM; disk-full and unwritable-output errors are injected in-process by making the
OS calls on one file fail.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import h5py
import imagegen
import numpy as np
import pytest
from llava_reference import LlavaReference
from PIL import Image
from stores import read_failures, read_shards, shard_files
from typer.testing import CliRunner

import clipfeat
from clipfeat.cli import app
from clipfeat.store import check_shard_bytes, read_shard_info, shard_name

runner = CliRunner()

SHARD_SIZE = 4
N_INPUTS = 95  # the shared tree: enough chunks for five interrupted runs
N_CHUNKS = -(-N_INPUTS // SHARD_SIZE)
BATCH_SIZE = 3
PROC_TIMEOUT = 180  # seconds; a safety net for hung subprocesses, never a measurement


# --------------------------------------------------------------------------- helpers


def make_tree(root: Path, n: int, *, broken: tuple[int, ...] = ()) -> list[str]:
    """`n` tiny images in two sub-folders; indices in `broken` are empty files. Sorted keys."""
    keys = []
    for i in range(n):
        rel = f"{'ab'[i % 2]}/img{i:03d}.png"
        if i in broken:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"")
        else:
            imagegen.make_image(root / rel, "RGB", (14 + i % 5, 11 + i % 3), seed=i)
        keys.append(rel)
    return sorted(keys)


def cli_args(root: Path, out: Path, model: Path, *extra: str,
             shard_size: int = SHARD_SIZE) -> list[str]:
    return ["extract", str(root), "--out", str(out), "--model", str(model), "--device", "cpu",
            "--dtype", "float32", "--store-dtype", "float32", "--shard-size", str(shard_size),
            "--batch-size", str(BATCH_SIZE), *extra]


def extract_in_process(root: Path, out: Path, model: Path, **kw: Any) -> Any:
    """The uninterrupted single-process reference run (same settings as `cli_args`)."""
    kw.setdefault("shard_size", SHARD_SIZE)
    kw.setdefault("workers", 0)
    return clipfeat.extract(roots=[str(root)], out=str(out), model=str(model), device="cpu",
                            dtype="float32", store_dtype="float32", batch_size=BATCH_SIZE, **kw)


def child_env(marker: str) -> dict[str, str]:
    """Environment of a clipfeat subprocess; `marker` tags it and every process it starts."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo",
               CLIPFEAT_TEST_RUN=marker)
    return env


class Proc:
    """A subprocess in its own session with stdout/stderr in files (no pipe to fill up)."""

    def __init__(self, cmd: list[str], log_dir: Path, name: str, marker: str | None = None):
        self.marker = marker or uuid.uuid4().hex
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.out_path, "wb") as o, open(self.err_path, "wb") as e:
            self.p = subprocess.Popen(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                      env=child_env(self.marker), start_new_session=True)
        self.pid = self.p.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def poll(self) -> int | None:
        return self.p.poll()

    def wait(self, timeout: float = PROC_TIMEOUT) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"process did not end within {timeout} s; stderr:\n"
                                 f"{self.stderr[-3000:]}") from None

    def kill_all(self) -> None:
        """A crash of the machine: freeze every process of the run, then SIGKILL them all.

        Not killpg: torchrun starts each rank in a session of its own.
        """
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            sent: set[int] = set()
            for _ in range(100):  # until no new process appears (a worker being started)
                mine = {self.pid} if self.p.poll() is None else set()  # never a reaped pid
                pids = (mine | set(tagged_processes(self.marker))) - sent
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                sent |= pids
        self.p.wait(timeout=30)

    def cleanup(self) -> None:
        """Kill whatever is left of this run (a failed test must not leave processes)."""
        self.kill_all()


def clipfeat_module_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipfeat", *args]


def tagged_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries CLIPFEAT_TEST_RUN=marker."""
    needle = f"CLIPFEAT_TEST_RUN={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env and state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def process_lines(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        lines.append(f"{pid}: {cmd[:200]}")
    return "\n".join(lines)


def assert_no_orphans(marker: str, grace: float = 20.0, out: Path | None = None) -> None:
    """Every process of a run (decode workers, forkserver, tracker) is gone within `grace`;
    with ``out``, also its lock on OUT (the kernel drops it at the very end of a process's
    exit, after /proc stops showing the process's environment)."""
    from clipfeat.errors import ConfigError
    from clipfeat.store import OutLock

    deadline = time.monotonic() + grace
    left = tagged_processes(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = tagged_processes(marker)
    assert not left, f"processes outlived their run:\n{process_lines(left)}"
    while out is not None and (out / ".clipfeat" / "lock").exists():
        try:
            OutLock(out).acquire().release()
            break
        except ConfigError:
            assert time.monotonic() < deadline, f"the lock on {out} outlived its run"
            time.sleep(0.05)


def wait_until(cond: Callable[[], bool], proc: Proc, timeout: float = PROC_TIMEOUT) -> bool:
    """Poll `cond` until true (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(0.01)
    proc.cleanup()
    raise AssertionError(f"timed out waiting; stderr:\n{proc.stderr[-3000:]}")


def file_state(path: Path) -> tuple[str, int, int, int]:
    """(sha256 of the bytes, inode, mtime_ns, size): any rewrite changes one of them."""
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns, st.st_size


def shard_states(out: Path) -> dict[str, tuple[str, int, int, int]]:
    return {name: file_state(out / name) for name in shard_files(out)}


def assert_shards_sound(out: Path, context: str = "") -> None:
    """Every `*.h5` in OUT is a complete shard: checksum block matches, HDF5 opens, counts agree."""
    for name in shard_files(out):
        path = out / name
        problem = check_shard_bytes(path)
        assert problem is None, f"{context}: {name} is not a complete shard: {problem}"
        info = read_shard_info(path)
        with h5py.File(path, "r") as f:
            assert f["keys"].shape[0] == f["features"].shape[0] == info.num_rows, (context, name)


def assert_same_store(out: Path, ref: Path, context: str = "") -> None:
    """Same shard files, same keys in the same rows, bit-identical features, same failures."""
    got, want = read_shards(out), read_shards(ref)
    assert sorted(got) == sorted(want), context
    for name in want:
        gk, gf, gfail = got[name]
        wk, wf, wfail = want[name]
        assert gk == wk, f"{context}: {name} keys differ"
        # float32 CPU compute is batch-invariant here, so rows are equal to the bit
        np.testing.assert_array_equal(gf, wf, err_msg=f"{context}: {name}")
        assert gfail == wfail, f"{context}: {name} failure records differ"
    assert read_failures(out) == read_failures(ref), context
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True, context
    assert manifest["num_images"] == sum(len(v[0]) for v in want.values()), context


def all_keys(out: Path) -> list[str]:
    """Every key OUT accounts for (stored rows and failure records), with repeats."""
    shards = read_shards(out).values()
    return [k for keys, _, _ in shards for k in keys] + [
        f["key"] for _, _, fails in shards for f in fails]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, list[str]]:
    """94 images and one empty file: 95 inputs, 24 chunks of 4 (the last one of 3)."""
    root = tmp_path_factory.mktemp("resume-tree")
    return root, make_tree(root, N_INPUTS, broken=(17,))


@pytest.fixture(scope="module")
def reference(tree, clip_full_dir, tmp_path_factory) -> Path:
    """An uninterrupted single-process run over `tree`."""
    out = tmp_path_factory.mktemp("resume-ref") / "out"
    s = extract_in_process(tree[0], out, clip_full_dir)
    assert s.complete and s.extracted == N_INPUTS - 1 and s.failed == 1
    return out


# --------------------------------------------------------------------------- resume (in-process)


def test_rerun_keeps_finished_shards_and_redoes_the_rest(tmp_path, tree, reference,
                                                         clip_full_dir):
    root, keys = tree
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    # Leave OUT as a crash would: shards 3 and 10 missing, a half-written shard 10, a stale
    # temp file of an interrupted manifest update.
    (out / shard_name(3)).unlink()
    (out / shard_name(10)).unlink()
    (out / (shard_name(10) + ".partial")).write_bytes(b"\x89HDF half written")
    (out / ".manifest.json.tmp-999-deadbeef").write_text("{")
    kept = shard_states(out)

    res = runner.invoke(app, cli_args(root, out, clip_full_dir, "--workers", "0", "--json"))
    assert res.exit_code == 0, res.output
    assert f"resuming: {N_INPUTS - 8} of {N_INPUTS} images already done" in res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["skipped"], summary["extracted"], summary["shards_written"]) == (
        N_INPUTS - 8, 8, 2)
    now = shard_states(out)
    for name, state in kept.items():
        assert now[name] == state, f"{name} was rewritten"
    assert not list(out.glob("*.partial")) and not list(out.glob(".*.tmp-*"))
    assert_same_store(out, reference)


def test_added_files_become_new_chunks_and_gone_files_fail(tmp_path, clip_full_dir):
    root = tmp_path / "root"
    keys = make_tree(root, 10)  # chunks 0..2 of 4, 4, 2 images
    out = tmp_path / "out"
    extract_in_process(root, out, clip_full_dir)
    plan_before = (out / ".clipfeat" / "plan.jsonl").read_text()
    # Shard 2 never finished; meanwhile one of its files and one of shard 0's were deleted,
    # and three files were added (one sorts before every planned key).
    (out / shard_name(2)).unlink()
    gone_unfinished, gone_finished = keys[8], keys[1]
    (root / gone_unfinished).unlink()
    (root / gone_finished).unlink()
    added = ["a/000-new.png", "b/img004b-new.png", "zz-new.png"]
    for i, rel in enumerate(added):
        imagegen.make_image(root / rel, "RGB", (17, 13), seed=100 + i)
    kept = shard_states(out)

    summary = extract_in_process(root, out, clip_full_dir)
    assert summary.complete
    assert (summary.skipped, summary.extracted, summary.failed) == (8, 4, 1)
    plan_after = (out / ".clipfeat" / "plan.jsonl").read_text()
    assert plan_after.startswith(plan_before), "planned items were rewritten or re-ordered"
    appended = [json.loads(x) for x in plan_after[len(plan_before):].splitlines()]
    assert [(d["k"], d["c"]) for d in appended] == [(k, 3) for k in sorted(added)]
    assert {n: st for n, st in shard_states(out).items() if n in kept} == kept
    shards = read_shards(out)
    assert shards[shard_name(0)][0] == keys[:4]  # a finished chunk is never revisited
    k2, _, f2 = shards[shard_name(2)]
    assert k2 == [keys[9]]
    assert [(f["key"], f["error"]) for f in f2] == [(gone_unfinished, "file not found")]
    assert shards[shard_name(3)][0] == sorted(added)
    assert [f["key"] for f in read_failures(out)] == [gone_unfinished]
    # LLaVA's features of the new images, computed with transformers alone (PIL processor)
    llava = LlavaReference(clip_full_dir, layer=-2, feature="patch", hide_transparency=False)
    for rel in added:
        i = shards[shard_name(3)][0].index(rel)
        np.testing.assert_allclose(shards[shard_name(3)][1][i], llava.features([root / rel])[0],
                                   rtol=1e-5, atol=1e-5, err_msg=rel)


# --------------------------------------------------------------------------- disk full, unwritable


def _fd_name(fd: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return ""


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _inject(monkeypatch, where: str, name_part: str, code: int) -> None:
    """Make one OS call fail with `code` on files whose name contains `name_part`."""
    if where == "pwrite":
        real, calls = os.pwrite, [0]

        def pwrite(fd, data, offset):
            if name_part in _fd_name(fd):
                calls[0] += 1
                if calls[0] > 3:  # the disk fills up part-way through the file
                    raise _oserror(code)
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
    elif where == "fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if name_part in _fd_name(fd if isinstance(fd, int) else fd.fileno()):
                raise _oserror(code)
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    elif where == "open":
        real_open = os.open

        def open_(path, flags, mode=0o777, *a, **kw):
            if name_part in os.path.basename(os.fspath(path)) and flags & os.O_CREAT:
                raise _oserror(code)
            return real_open(path, flags, mode, *a, **kw)

        monkeypatch.setattr(os, "open", open_)
    elif where == "replace":
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if name_part in os.path.basename(os.fspath(src)):
                raise _oserror(code)
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", replace)
    else:  # pragma: no cover
        raise ValueError(where)


THIRD = shard_name(2) + ".partial"


@pytest.mark.parametrize("where,name_part,code,cause", [
    ("pwrite", THIRD, errno.ENOSPC, "disk full (ENOSPC)"),
    ("fsync", THIRD, errno.ENOSPC, "disk full (ENOSPC)"),
    ("open", THIRD, errno.EACCES, "permission denied (EACCES)"),
    ("replace", THIRD, errno.EROFS, "read-only file system (EROFS)"),
    ("fsync", "manifest.json.tmp", errno.ENOSPC, "disk full (ENOSPC)"),
])
def test_write_errors_stop_cleanly_and_a_rerun_completes(monkeypatch, tmp_path, tree, reference,
                                                         clip_full_dir, where, name_part, code,
                                                         cause):
    root, _ = tree
    out = tmp_path / "out"
    args = cli_args(root, out, clip_full_dir, "--workers", "0", "--quiet")
    with monkeypatch.context() as m:
        _inject(m, where, name_part, code)
        res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipfeat: error: "), res.stderr
    assert cause in lines[0] and "rerun" in lines[0], lines[0]
    assert "Traceback" not in res.output

    names = shard_files(out)
    if name_part == THIRD:  # shards commit in chunk order: 0 and 1 made it, nothing after
        assert names == [shard_name(0), shard_name(1)]
    else:  # the manifest is written as the run starts (then after every shard): it failed
        assert names == []  # before the first shard
        assert not (out / "manifest.json").exists()
    assert_shards_sound(out, "after the error")
    assert not list(out.glob("*.partial")), "a partial shard was left behind"
    assert not list(out.glob(".*.tmp-*")), "a temp file was left behind"
    want = read_shards(reference)
    for name, (keys, feats, fails) in read_shards(out).items():
        assert keys == want[name][0] and fails == want[name][2]
        np.testing.assert_array_equal(feats, want[name][1])
    kept = shard_states(out)

    res = runner.invoke(app, args)  # space freed / folder writable again
    assert res.exit_code == 0, res.output
    assert {n: st for n, st in shard_states(out).items() if n in kept} == kept
    assert_same_store(out, reference, "after the rerun")


# --------------------------------------------------------------------------- signals in-process


def _signal_in_load(monkeypatch) -> None:
    """SIGINT arrives while the weights load (inside the loader's `except Exception`)."""
    import transformers

    real = transformers.CLIPVisionModel.from_pretrained.__func__

    def from_pretrained(cls, *a, **kw):
        signal.raise_signal(signal.SIGINT)
        return real(cls, *a, **kw)

    monkeypatch.setattr(transformers.CLIPVisionModel, "from_pretrained",
                        classmethod(from_pretrained))


def _signal_swallowed(monkeypatch) -> None:
    """SIGINT lands where its exception is lost (as in a __del__ or weakref callback, where
    Python only prints it), part-way through the run."""
    from clipfeat.tower import CLIPVisionTower

    real, calls = CLIPVisionTower.forward_outputs, [0]  # what extract runs per batch

    def forward_outputs(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 4:
            try:
                signal.raise_signal(signal.SIGINT)
            except BaseException:  # noqa: BLE001 - what a finalizer does with it
                pass
        return real(self, *a, **kw)

    monkeypatch.setattr(CLIPVisionTower, "forward_outputs", forward_outputs)


@pytest.mark.parametrize("inject", [_signal_in_load, _signal_swallowed])
def test_ctrl_c_is_never_lost_or_mistaken(monkeypatch, tmp_path, tree, reference, clip_full_dir,
                                          inject):
    root, _ = tree
    out = tmp_path / "out"
    args = cli_args(root, out, clip_full_dir, "--workers", "0", "--quiet")
    with monkeypatch.context() as m:
        inject(m)
        res = runner.invoke(app, args)
    assert res.exit_code == 130, res.output
    assert "interrupted by SIGINT" in res.stderr and "Resume" in res.stderr, res.stderr
    assert len(shard_files(out)) < N_CHUNKS, "the run went on after Ctrl-C"
    assert_shards_sound(out, "after Ctrl-C")
    assert not list(out.glob("*.partial"))
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert_same_store(out, reference, "after the rerun")


# --------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_signals_and_sigkill_then_rerun_equals_uninterrupted_run(tmp_path, tree, reference,
                                                                  clip_full_dir):
    """One OUT through five runs: Ctrl-C, SIGKILL, SIGTERM, SIGKILL at a random moment (all
    `python -m clipfeat` processes), and a last run that finishes. Every stop keeps only
    complete shards and never touches a finished one; the result equals the uninterrupted
    run row for row, bit for bit."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    ctx = f"seed {seed}"
    root, keys = tree
    out = tmp_path / "out"
    cli = cli_args(root, out, clip_full_dir, "--workers", "1")
    cmd = clipfeat_module_cmd(*cli)
    logs = tmp_path / "logs"
    history: dict[str, tuple[str, int, int, int]] = {}
    counts: list[str] = []

    def check_stop(step: str) -> None:
        assert_shards_sound(out, f"{ctx}, {step}")
        states = shard_states(out)
        for name, state in history.items():  # a finished shard is never touched again
            assert states[name] == state, f"{ctx}, {step}: {name} was rewritten"
        history.update(states)
        counts.append(f"{step}: {len(states)} shards")
        found = all_keys(out)
        assert len(found) == len(set(found)), f"{ctx}, {step}: a key is stored twice"

    checked: set[str] = set()

    def started_new(n: int) -> Callable[[], bool]:
        """Condition: n more shards exist. While polling, every shard that appears is checked
        at once: a `*.h5` is complete from the moment it has its name."""
        before = len(history)

        def cond() -> bool:
            names = shard_files(out)
            for name in set(names) - checked:
                problem = check_shard_bytes(out / name)
                assert problem is None, f"{ctx}: {name} appeared incomplete: {problem}"
                checked.add(name)
            return len(names) >= before + n

        return cond

    procs: list[Proc] = []
    try:
        # 1. Ctrl-C: the whole foreground process group gets SIGINT.
        p = Proc(cmd, logs, "1-sigint")
        procs.append(p)
        assert wait_until(started_new(1), p), f"{ctx}: finished before Ctrl-C\n{p.stderr}"
        os.killpg(p.pid, signal.SIGINT)
        assert p.wait(timeout=60) == 130, p.stderr
        assert "interrupted by SIGINT" in p.stderr and "Resume by running the same command" \
            in p.stderr, p.stderr
        assert not list(out.glob("*.partial")), "a graceful stop must remove its partial shard"
        assert_no_orphans(p.marker, out=out)
        check_stop("after SIGINT")

        # 2. SIGKILL of the main process alone, right after k more shards exist.
        p = Proc(cmd, logs, "2-sigkill")
        procs.append(p)
        assert wait_until(started_new(rng.randint(1, 2)), p), f"{ctx}: finished too soon"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        check_stop("after SIGKILL once shards appeared")
        assert_no_orphans(p.marker, out=out)  # the decode workers and forkserver die with it

        # 3. SIGTERM (a scheduler ending the job).
        p = Proc(cmd, logs, "3-sigterm")
        procs.append(p)
        assert wait_until(started_new(1), p), f"{ctx}: finished before SIGTERM"
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(timeout=60) == 143, p.stderr
        assert "interrupted by SIGTERM" in p.stderr and "Resume" in p.stderr, p.stderr
        assert_no_orphans(p.marker, out=out)
        check_stop("after SIGTERM")

        # 4. SIGKILL of the whole group at a random moment of steady work (a shard takes
        # a few tens of milliseconds here, so the delay lands anywhere within one).
        p = Proc(cmd, logs, "4-sigkill-random")
        procs.append(p)
        assert wait_until(started_new(rng.randint(1, 3)), p), f"{ctx}: finished too soon"
        time.sleep(rng.uniform(0.0, 0.05))
        p.kill_all()
        assert_no_orphans(p.marker, out=out)
        check_stop("after a SIGKILL at a random moment")

        # 5. The same command, run here (it saves a process start), finishes the job.
        done_rows = sum(len(k) + len(f) for k, _, f in read_shards(out).values())
        assert 0 < done_rows < len(keys), f"{ctx}: {counts}"
        res = runner.invoke(app, cli)
        assert res.exit_code == 0, res.output
        assert f"resuming: {done_rows} of {len(keys)} images already done" in res.stderr
        check_stop("after the final run")
        assert not list(out.glob("*.partial"))
        assert_same_store(out, reference, ctx)
    finally:
        for p in procs:
            p.cleanup()


# --------------------------------------------------------------------------- --retry-failed


def test_retry_failed_redoes_only_chunks_with_timeouts(tmp_path, clip_full_dir, caplog):
    """An image that timed out once (a stopped or overloaded worker) is not a bad file: a
    rerun says so, and --retry-failed redoes its chunk; other shards stay byte for byte."""
    import logging

    import clipfeat
    from clipfeat.store import FeatureStore

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(4)
    names = ["a.png", "b.png", "c__hangonce__.png", "d.png", "e.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / name)
    common = dict(roots=[str(root)], out=str(tmp_path / "out"), model=str(clip_full_dir),
                  device="cpu", workers=1, shard_size=2, decode_timeout=3,
                  extra={"decode_fn": "imagegen:misbehaving_decode"})
    first = clipfeat.extract(**common)
    assert first.failed == 1 and first.complete
    fails = [json.loads(x) for x in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [f["key"] for f in fails] == ["c__hangonce__.png"]
    assert fails[0]["error"].startswith("decode timed out")
    kept = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("shard-*.h5")}

    with caplog.at_level(logging.WARNING):
        again = clipfeat.extract(**common)
    assert again.extracted == 0 and "--retry-failed" in caplog.text

    retried = clipfeat.extract(**common, retry_failed=True)
    assert retried.extracted == 2 and retried.failed == 0 and retried.complete
    assert (tmp_path / "out" / "failures.jsonl").read_text() == ""
    store = FeatureStore(tmp_path / "out")
    assert sorted(store.keys()) == sorted(names)
    for name, data in kept.items():
        if name != "shard-000001.h5":  # the chunk of c and d was redone
            assert (tmp_path / "out" / name).read_bytes() == data, name


def test_a_run_stopped_early_leaves_a_readable_store(monkeypatch, tmp_path, tree, clip_full_dir):
    """manifest.json is written as the run starts and after every shard, and again when a
    signal stops it: FeatureStore and verify open what is finished, and say it is incomplete."""
    import logging

    from clipfeat.store import FeatureStore

    root, _ = tree
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _signal_swallowed(m)  # SIGINT at the 4th batch
        res = runner.invoke(app, cli_args(root, out, clip_full_dir, "--workers", "0",
                                          "--quiet", "--batch-size", "4"))
    assert res.exit_code == 130, res.output
    done = shard_files(out)
    assert 0 < len(done) < N_CHUNKS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["shards"]) == len(done)
    logging.getLogger("clipfeat").setLevel(logging.WARNING)
    store = FeatureStore(out)
    assert not store.complete and len(store) == manifest["num_images"] > 0
    assert store[store.keys()[0]].shape == store.shape
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    assert "incomplete" in res.output.lower()


# --------------------------------------------------------------------------- provenance


def test_a_model_changed_in_place_is_refused_and_provenance_is_recorded(tmp_path,
                                                                        clip_full_dir):
    """A local checkpoint whose weights changed is another model: the rerun is refused like
    any change of settings. The versions, device and dtypes are in every shard and the
    manifest; an OUT planned before weights were hashed resumes and then records them."""
    import torch
    from safetensors.torch import load_file, save_file

    import clipfeat

    model = tmp_path / "model"
    shutil.copytree(clip_full_dir, model)
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(6)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / name)
    out = tmp_path / "out"
    args = cli_args(root, out, model, "--workers", "0", "--quiet")
    assert runner.invoke(app, args).exit_code == 0

    with h5py.File(next(out.glob("shard-*.h5")), "r") as f:
        versions = json.loads(f.attrs["versions"])
        assert versions["torch"] == torch.__version__
        assert versions["clipfeat"] == clipfeat.__version__ and versions["pillow"]
        assert f.attrs["device"] == "cpu" and f.attrs["compute_dtype"] == "float32"
        assert f.attrs["model_weights"].startswith("xxh3_128:")
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["versions"] == versions and config["device"] == "cpu"

    # an OUT planned by an earlier clipfeat (no weights digest): resumed, then recorded
    plan_file = out / ".clipfeat" / "plan.jsonl"
    lines = plan_file.read_text().splitlines()
    header = json.loads(lines[0])
    digest = header["identity"].pop("model_weights")
    plan_file.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(plan_file.read_text().splitlines()[0])["identity"]["model_weights"] == digest

    weights = model / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "vision_model" in k and k.endswith("weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "c.png")
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "model_weights: " in res.stderr and "other settings" in res.stderr
