"""torchrun on the CPU (gloo): ranks split the chunks, and the output does not depend on how
many processes made it (2 ranks, 1 process, or a job killed with one and finished with the
other). The expected output is an uninterrupted single-process run of the same inputs."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
from test_resume import (
    Proc,
    assert_no_orphans,
    assert_same_store,
    assert_shards_sound,
    cli_args,
    clipfeat_module_cmd,
    extract_in_process,
    make_tree,
    read_shards,
    shard_files,
    shard_states,
    wait_until,
)
from typer.testing import CliRunner

from clipfeat import distributed
from clipfeat.cli import app
from clipfeat.store import parse_shard_id

SHARD_SIZE = 2  # many small shards: many commit points for the kills to land between
N_INPUTS = 81  # 41 chunks
BROKEN = (68, 79)  # empty files, in chunks 17 and 40: one for each rank, late in the job
TORCHRUN = Path(sys.executable).parent / "torchrun"


def clipfeat_script() -> str:
    """What `$(which clipfeat)` gives: the console script of this environment."""
    script = Path(sys.executable).parent / "clipfeat"
    return str(script) if script.exists() else shutil.which("clipfeat") or "clipfeat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *target: str, log_dir: Path | None = None) -> list[str]:
    cmd = [str(TORCHRUN), "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    if log_dir is not None:  # each rank's stdout/stderr in its own file
        cmd += ["--log-dir", str(log_dir), "--redirects", "3"]
    return cmd + list(target)


def args(root: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return cli_args(root, out, model, "--workers", "1", *extra, shard_size=SHARD_SIZE)


@pytest.fixture(scope="module")
def dtree(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("dist-tree")
    return root, make_tree(root, N_INPUTS, broken=BROKEN)


@pytest.fixture(scope="module")
def dref(dtree, clip_full_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist-ref") / "out"
    s = extract_in_process(dtree[0], out, clip_full_dir, shard_size=SHARD_SIZE)
    assert s.complete and s.failed == len(BROKEN)
    return out


def chunk_sizes(n: int) -> list[int]:
    return [min(SHARD_SIZE, n - i) for i in range(0, n, SHARD_SIZE)]


def rank_logs(log_dir: Path, stream: str) -> dict[int, str]:
    """Rank -> text of its redirected stdout/stderr under torchrun's --log-dir."""
    found = {}
    for path in log_dir.rglob(f"{stream}.log"):
        found[int(path.parent.name)] = path.read_text(errors="replace")
    return found


def shard_ids(out: Path) -> set[int]:
    return {parse_shard_id(n) for n in shard_files(out)}


def _as_rank(monkeypatch, rank: int, world: int = 2) -> None:
    """This process plays rank `rank` of `world` (torchrun's variables; no process group, so
    barriers return at once)."""
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(distributed, "setup", lambda device: distributed.Dist(rank, world, rank))


def test_each_rank_writes_only_its_chunks_and_rank_0_finalises(monkeypatch, tmp_path, dtree,
                                                               dref, clip_full_dir):
    root, keys = dtree
    out = tmp_path / "out"
    cli = args(root, out, clip_full_dir, "--workers", "0")
    n_chunks = len(chunk_sizes(len(keys)))
    runner = CliRunner()

    with monkeypatch.context() as m:  # rank 0 first: it freezes the plan
        _as_rank(m, 0)
        res = runner.invoke(app, cli)
    assert res.exit_code == 0, res.output
    assert shard_ids(out) == set(range(0, n_chunks, 2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False  # rank 1's shards are missing
    before = (out / "manifest.json").read_bytes()

    with monkeypatch.context() as m:
        _as_rank(m, 1)
        res = runner.invoke(app, cli)
    assert res.exit_code == 0, res.output
    assert res.stderr == "", "rank 1 must print nothing but errors"
    assert shard_ids(out) == set(range(n_chunks))
    assert (out / "manifest.json").read_bytes() == before, "only rank 0 writes the manifest"

    res = runner.invoke(app, cli)  # one process: nothing left but the manifest
    assert res.exit_code == 0 and "nothing to do" in res.stderr, res.output
    assert_same_store(out, dref, "rank 0, then rank 1, then one process")


def test_a_rank_that_loses_its_peer_fails_in_one_line(monkeypatch, tmp_path, dtree, dref,
                                                     clip_full_dir):
    """The last barrier fails (another rank crashed): no traceback, no complete manifest (it
    lists the shards this rank finished, as it did after each one), and those shards stay."""
    import torch.distributed as tdist

    root, keys = dtree
    out = tmp_path / "out"
    _as_rank(monkeypatch, 0)
    calls = []

    def barrier(*a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                               "[127.0.0.1]:4242. This is typically caused by a remote worker "
                               "crashing.")

    monkeypatch.setattr(tdist, "is_available", lambda: True)
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(tdist, "barrier", barrier)
    res = CliRunner().invoke(app, args(root, out, clip_full_dir, "--workers", "0", "--quiet"))
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "another rank stopped" in lines[0] and "rerun" in lines[0], lines
    assert "Connection closed by peer" in lines[0] and "Traceback" not in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
    assert {e["shard_id"] for e in manifest["shards"]} == shard_ids(out)
    assert shard_ids(out) == set(range(0, len(chunk_sizes(len(keys))), 2))
    assert_shards_sound(out, "after losing the peer")


def _kill_part_way(p: Proc, out: Path, n_shards: int, *, both_ranks: bool = False) -> None:
    def ready() -> bool:
        ids = shard_ids(out)
        return len(ids) >= n_shards and (not both_ranks or {i % 2 for i in ids} == {0, 1})

    assert wait_until(ready, p), f"the run ended too soon:\n{p.stderr[-3000:]}"
    p.kill_all()
    assert_no_orphans(p.marker, out=out)
    assert_shards_sound(out, "after the kill")


@pytest.mark.slow
def test_begun_with_two_ranks_finished_with_one(tmp_path, dtree, dref, clip_full_dir):
    root, keys = dtree
    out = tmp_path / "out"
    first = Proc(torchrun(2, "-m", "clipfeat", *args(root, out, clip_full_dir)),
                 tmp_path / "logs", "torchrun")
    try:
        _kill_part_way(first, out, 3, both_ranks=True)  # each rank wrote its own shards
        kept = shard_states(out)
        done = sum(len(k) + len(f) for k, _, f in read_shards(out).values())
        assert 0 < done < len(keys)
    finally:
        first.cleanup()
    # the same command in one process (run here: it saves a process start) finishes the job
    res = CliRunner().invoke(app, args(root, out, clip_full_dir))
    assert res.exit_code == 0, res.output
    assert f"resuming: {done} of {len(keys)} images already done" in res.stderr
    assert {n: st for n, st in shard_states(out).items() if n in kept} == kept
    assert_same_store(out, dref, "begun with 2 ranks, finished with 1")


@pytest.mark.slow
def test_begun_with_one_finished_with_two_ranks(tmp_path, dtree, dref, clip_full_dir):
    """`torchrun --nproc-per-node 2 $(which clipfeat) extract ...` finishes a killed job:
    rank r does the pending chunks i % 2 == r, only rank 0 reports, rank 0 finalises."""
    root, keys = dtree
    out = tmp_path / "out"
    first = Proc(clipfeat_module_cmd(*args(root, out, clip_full_dir)), tmp_path / "logs",
                 "single")
    second = None
    logs = tmp_path / "torchrun-logs"
    try:
        _kill_part_way(first, out, 3)
        kept = shard_states(out)
        done_shards = shard_ids(out)
        done = sum(len(k) + len(f) for k, _, f in read_shards(out).values())
        assert 0 < done < len(keys)
        second = Proc(torchrun(2, clipfeat_script(), *args(root, out, clip_full_dir, "--json"),
                               log_dir=logs), tmp_path / "logs", "torchrun")
        assert second.wait() == 0, second.stderr + "\n".join(rank_logs(logs, "stderr").values())
        assert_no_orphans(second.marker)
    finally:
        first.cleanup()
        if second is not None:
            second.cleanup()

    err = rank_logs(logs, "stderr")
    assert sorted(err) == [0, 1]
    assert err[1].strip() == "", f"rank 1 wrote to stderr:\n{err[1]}"
    assert f"resuming: {done} of {len(keys)} images already done" in err[0]
    assert f"{len(keys)}/{len(keys)}" in err[0], "rank 0's bar ends at the whole job"
    assert "extract" in err[0] and "img" in err[0], "rank 0 shows the progress bar"
    sizes = chunk_sizes(len(keys))
    broken_chunks = [keys.index(f"{'ab'[i % 2]}/img{i:03d}.png") // SHARD_SIZE for i in BROKEN]
    summaries = {r: json.loads(text.strip().splitlines()[-1])
                 for r, text in rank_logs(logs, "stdout").items()}
    assert sorted(summaries) == [0, 1]
    for rank, s in summaries.items():
        # rank 0 reports the whole job (from the shards, after the last barrier); rank 1,
        # which reports nothing to the user, its own part
        mine = [c for c in range(len(sizes))
                if (rank == 0 or c % 2 == rank) and c not in done_shards]
        assert (s["rank"], s["world"]) == (rank, 2)
        assert s["shards_written"] == len(mine), (rank, s)
        assert s["extracted"] + s["failed"] == sum(sizes[c] for c in mine), (rank, s)
        assert s["failed"] == sum(1 for c in broken_chunks if c in mine), (rank, s)
    assert {n: st for n, st in shard_states(out).items() if n in kept} == kept
    # rank 0 alone finalised: manifest, failures.jsonl merged from both ranks' shards, index
    assert_same_store(out, dref, "begun with 1 process, finished with 2 ranks")
    assert not list(out.glob("*.partial"))
