"""clipfeat.decode: worker pool results, order, bounds, and survival of hostile inputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import imagegen
import numpy as np
import pytest
from llava_reference import LlavaReference, processor_class
from PIL import Image

from clipfeat.decode import DecodePool, DecodeResult, decode_file, describe_error
from clipfeat.errors import ConfigError
from clipfeat.preprocess import PreprocessSpec

pytestmark = pytest.mark.slow  # these start worker processes

SIZE = 30


@pytest.fixture(scope="module")
def proc():
    return processor_class("clip")(size={"shortest_edge": SIZE},
                                   crop_size={"height": SIZE, "width": SIZE},
                                   do_rescale=False, do_normalize=False)


@pytest.fixture(scope="module")
def spec(proc) -> PreprocessSpec:
    return PreprocessSpec.from_processor_config(None, family="clip", image_size=SIZE)


def reference_uint8(path: Path, proc, aspect: str = "square") -> np.ndarray:
    """LLaVA's pixels before rescale/normalise, via the HF PIL processor (no clipfeat): its
    transparent colour hidden (see llava_reference.LlavaReference), pad onto the CLIP mean
    (122, 116, 104)."""
    ref = LlavaReference(processor=proc, hide_transparency=True)
    assert ref.pad_color == (122, 116, 104)
    return ref.uint8(path, aspect)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    expected = imagegen.make_hostile_tree(root)
    items = [(i, rel, str(root / rel)) for i, rel in
             enumerate(sorted(r for r, e in expected.items() if e != "not-an-input"))]
    return root, expected, items


SPECIFIC_ERRORS = {
    "bad/bomb.png": "decompression bomb: 100000x100000 = 10000000000 pixels > --max-pixels",
    "bad/fifo.jpg": "not a regular file",
    "bad/dangling.jpg": "file not found",
    "bad/self_loop.jpg": "symlink loop",
    "bad/empty.jpg": "cannot identify image file",
    "bad/text.jpg": "cannot identify image file",
    "bad/html.png": "cannot identify image file",
    "bad/gzip.jpg": "cannot identify image file",
    "bad/truncated.jpg": "truncated image",
    "bad/truncated.png": "truncated image",
}


def check_tree_results(results: list[DecodeResult], tree, proc, aspect="square") -> None:
    _root, expected, items = tree
    assert [r.index for r in results] == [i for i, _, _ in items]  # input order
    assert [r.key for r in results] == [k for _, k, _ in items]
    for r in results:
        if expected[r.key] == "ok":
            assert r.error is None, (r.key, r.error)
            assert r.array.dtype == np.uint8 and r.array.shape == (3, SIZE, SIZE)
            np.testing.assert_array_equal(r.array, reference_uint8(Path(r.path), proc, aspect),
                                          err_msg=r.key)
        else:
            assert r.array is None and r.error, r.key
            assert "\n" not in r.error
            if r.key in SPECIFIC_ERRORS:
                assert r.error.startswith(SPECIFIC_ERRORS[r.key]), (r.key, r.error)


@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_hostile_tree_with_workers(tree, spec, proc, aspect):
    with DecodePool(spec, aspect, workers=2, timeout=20) as pool:
        results = list(pool.imap(tree[2]))
        assert pool.stats.timeouts == 0 and pool.stats.crashes == 0
        assert pool.stats.decoded + pool.stats.failed == len(tree[2])
    check_tree_results(results, tree, proc, aspect)


def test_hostile_tree_in_process(tree, spec, proc):
    pool = DecodePool(spec, workers=0)
    results = list(pool.imap(tree[2]))
    check_tree_results(results, tree, proc)
    assert pool.stats.failed == sum(1 for r in results if r.error)


def test_file_deleted_after_listing(tmp_path, spec):
    paths = [imagegen.make_image(tmp_path / f"{i}.png", "RGB", (20, 20), seed=i)
             for i in range(3)]
    items = [(i, p.name, str(p)) for i, p in enumerate(paths)]
    paths[1].unlink()
    with DecodePool(spec, workers=1) as pool:
        errors = [r.error for r in pool.imap(items)]
    assert errors == [None, "file not found", None]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file(tmp_path, spec):
    p = imagegen.make_image(tmp_path / "locked.jpg", "RGB", (20, 20))
    p.chmod(0)
    with DecodePool(spec, workers=1) as pool:
        (r,) = pool.imap([(0, "locked.jpg", str(p))])
    assert r.error == "permission denied"


def test_crash_hang_and_errors_are_recorded_and_the_run_goes_on(tmp_path, spec, proc):
    names = ["a.png", "b__segv__.png", "c.png", "d__hang__.png", "e.png", "f__exit__.png",
             "g.png", "h__raise__.png", "i.png", "j__stateful__.png", "k.png", "l.png"]
    items = []
    for i, name in enumerate(names):
        p = imagegen.make_image(tmp_path / name, "RGB", (24 + i, 40 - i), seed=i)
        items.append((100 + i, name, str(p)))
    with DecodePool(spec, workers=2, timeout=2.0,
                    decode_fn=imagegen.misbehaving_decode) as pool:
        results = list(pool.imap(items))
        stats = pool.stats
    assert [r.index for r in results] == [i for i, _, _ in items]
    by_name = {r.key: r for r in results}
    assert by_name["b__segv__.png"].error == f"decoder crashed (signal {int(signal.SIGSEGV)})"
    assert by_name["f__exit__.png"].error == "decoder crashed (exit code 3)"
    assert by_name["d__hang__.png"].error == "decode timed out after 2s"
    assert by_name["h__raise__.png"].error == "OSError: simulated broken file"
    for r in results:
        if not any(t in r.key for t in ("segv", "hang", "exit", "raise")):
            assert r.error is None, (r.key, r.error)
            np.testing.assert_array_equal(r.array, reference_uint8(Path(r.path), proc))
    assert stats.timeouts == 1
    assert stats.crashes >= 2
    assert stats.restarts >= 4  # segv, exit, hang, raise
    assert stats.failed == 4 and stats.decoded == len(names) - 4


def test_error_is_confirmed_in_a_fresh_process(tmp_path, spec):
    """A failure is retried once in a new process; the second answer is the one reported."""
    good = imagegen.make_image(tmp_path / "good.png", "RGB", (20, 20))
    flaky = imagegen.make_image(tmp_path / "x__stateful__.png", "RGB", (20, 20))
    broken = imagegen.make_image(tmp_path / "y__raise__.png", "RGB", (20, 20))
    items = [(0, "good", str(good)), (1, "flaky", str(flaky)), (2, "good2", str(good)),
             (3, "broken", str(broken)), (4, "good3", str(good))]
    with DecodePool(spec, workers=1, decode_fn="imagegen:misbehaving_decode") as pool:
        results = list(pool.imap(items))
        stats = pool.stats
    assert [r.error for r in results] == [None, None, None, "OSError: simulated broken file",
                                          None]
    assert stats.retries == 2  # flaky and broken each got exactly one more try
    assert stats.recovered == 1  # flaky succeeded in the fresh process
    assert stats.failed == 1


def test_items_queued_behind_a_crash_are_redispatched_not_failed(tmp_path, spec):
    crash = imagegen.make_image(tmp_path / "a__segv__.png", "RGB", (20, 20))
    goods = [imagegen.make_image(tmp_path / f"g{i}.png", "RGB", (20, 21 + i), seed=i)
             for i in range(5)]
    items = [(0, "crash", str(crash))] + [(i + 1, p.name, str(p)) for i, p in enumerate(goods)]
    with DecodePool(spec, workers=1, decode_fn=imagegen.misbehaving_decode) as pool:
        results = list(pool.imap(items))
        # the first item ran in a fresh worker: the crash is confirmed, no retry
        assert pool.stats.retries == 0 and pool.stats.crashes == 1
    assert results[0].error.startswith("decoder crashed")
    assert all(r.error is None for r in results[1:])
    for r, p in zip(results[1:], goods, strict=True):
        np.testing.assert_array_equal(r.array, decode_file(str(p), spec))


class _Items:
    """``n`` items ``(i, "k<i>", path)`` cycling over ``paths``; ``pulled`` counts those the
    pool has taken."""

    def __init__(self, paths: list[Path], n: int) -> None:
        self.paths, self.n, self.pulled = paths, n, 0

    def __iter__(self):
        for i in range(self.n):
            self.pulled += 1
            yield (i, f"k{i}", str(self.paths[i % len(self.paths)]))


def test_in_flight_items_are_bounded_and_order_kept(tmp_path, spec):
    paths = [imagegen.make_image(tmp_path / f"{i}.png", "RGB", (20 + i % 5, 20), seed=i)
             for i in range(6)]
    items = _Items(paths, 40)
    with DecodePool(spec, workers=2, max_pending=4) as pool:
        for taken, r in enumerate(pool.imap(items), start=1):
            assert r.index == taken - 1 and r.error is None
            # the manager may pull ahead while we work, but never by more than max_pending
            assert items.pulled <= taken + 4
            time.sleep(0.005)
    assert items.pulled == 40


def test_abandoned_run_leaves_the_pool_usable(tmp_path, spec):
    paths = [imagegen.make_image(tmp_path / f"{i}.png", "RGB", (22, 20 + i), seed=i)
             for i in range(8)]
    items = [(i, p.name, str(p)) for i, p in enumerate(paths)]
    with DecodePool(spec, workers=2, max_pending=6) as pool:
        gen = pool.imap(items * 5)
        first = [next(gen) for _ in range(3)]
        gen.close()
        again = list(pool.imap(items))
        assert len(pool.worker_pids()) == 2
    assert [r.index for r in first] == [0, 1, 2]
    assert [r.index for r in again] == list(range(8))
    for r, p in zip(again, paths, strict=True):
        np.testing.assert_array_equal(r.array, decode_file(str(p), spec))


def test_close_while_a_run_is_left_open(tmp_path, spec):
    """Closing the pool under a half-consumed iterator stops everything, spawns nothing."""
    paths = [imagegen.make_image(tmp_path / f"{i}.png", "RGB", (22, 20 + i), seed=i)
             for i in range(4)]
    items = [(i, p.name, str(p)) for i, p in enumerate(paths)] * 20
    pool = DecodePool(spec, workers=2, max_pending=4)
    gen = pool.imap(items)
    assert [next(gen).index for _ in range(2)] == [0, 1]
    pids = pool.worker_pids()
    pool.close()
    assert pool.worker_pids() == []
    assert not any(_alive(p) for p in pids)
    assert not any(t.name == "clipfeat-decode-manager" and t.is_alive()
                   for t in threading.enumerate())
    gen.close()  # closing the iterator afterwards is harmless
    with pytest.raises(RuntimeError, match="closed"):
        list(pool.imap(items[:1]))


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    tests_dir = Path(__file__).resolve().parent
    hang = imagegen.make_image(tmp_path / "x__hang__.png", "RGB", (20, 20))
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {str(tests_dir)!r})
        from clipfeat.decode import DecodePool
        from clipfeat.preprocess import PreprocessSpec

        def main():
            spec = PreprocessSpec.from_processor_config(None, family="clip", image_size=30)
            pool = DecodePool(spec, workers=2, timeout=600,
                              decode_fn="imagegen:misbehaving_decode")
            pool.start()
            items = [(i, str(i), {str(hang)!r}) for i in range(4)]
            threading.Thread(target=lambda: list(pool.imap(items)), daemon=True).start()
            time.sleep(1.5)
            print(" ".join(map(str, pool.worker_pids())), flush=True)
            time.sleep(600)

        if __name__ == "__main__":
            main()
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        pids = [int(x) for x in line.split()]
        assert len(pids) == 2
        assert all(_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "orphaned decode workers"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are dead
    except FileNotFoundError:
        return False


def test_describe_error_is_one_line():
    assert describe_error(FileNotFoundError(2, "No such file")) == "file not found"
    assert describe_error(MemoryError()) == "out of memory"
    assert describe_error(OSError("image file is truncated (3 bytes not processed)")) == \
        "truncated image: image file is truncated (3 bytes not processed)"
    assert describe_error(ValueError("a\nb   c")) == "ValueError: a b c"


@pytest.mark.parametrize("kwargs, match", [
    ({"aspect": "wide"}, "unknown aspect 'wide'"),
    ({"workers": -1}, "workers must be an integer >= 0"),
    ({"timeout": 0}, "timeout must be > 0"),
    ({"max_pending": 0}, "max_pending must be an integer >= 1"),
    ({"max_pixels": 0}, "max_pixels must be a positive integer or None"),
    ({"decode_fn": "nowhere:nothing"}, "must be an importable module-level function"),
    ({"decode_fn": lambda *a: None, "workers": 1}, "importable module-level function"),
    ({"start_method": "fork", "workers": 1}, "start_method must be 'forkserver' or 'spawn'"),
])
def test_bad_arguments_are_config_errors(spec, kwargs, match):
    with pytest.raises(ConfigError, match=match), DecodePool(spec, **kwargs):
        pass


def test_borrowed_arrays_hold_their_slots_until_released(tmp_path, spec):
    """borrow=True hands out read-only views of the shared memory the workers wrote; each
    holds one of the max_pending slots, so the pool pulls no further input until released."""
    paths = [imagegen.make_image(tmp_path / f"{i}.png", "RGB", (20 + i, 24), seed=i)
             for i in range(5)]
    items = _Items(paths, 12)
    with DecodePool(spec, workers=2, max_pending=3) as pool:
        gen = pool.imap(items, borrow=True)
        held = [next(gen) for _ in range(3)]
        time.sleep(0.5)  # room for the manager to pull more, if it wrongly could
        assert items.pulled == 3
        for r in held:
            assert r.error is None and not r.array.flags.writeable
            np.testing.assert_array_equal(r.array, decode_file(str(paths[r.index % 5]), spec))
        with pytest.raises(ValueError, match="not an array from this pool"):
            pool.release(held[0].array.copy())
        pool.release(held[0].array)
        pool.release(held[0].array)  # twice: ignored, the slot is not freed again
        nxt = next(gen)
        assert nxt.index == 3
        pool.release(held[0].array)  # its slot now holds item 3: this must not free it
        time.sleep(0.5)
        assert items.pulled == 4
        np.testing.assert_array_equal(nxt.array, decode_file(str(paths[3]), spec))
        rest = [nxt, *held[1:]]
        for r in rest:
            pool.release(r.array)
        for r in gen:  # the others, released as they come
            np.testing.assert_array_equal(r.array, decode_file(str(paths[r.index % 5]), spec))
            rest.append(r)
            pool.release(r.array)
        assert sorted(r.index for r in rest) == list(range(1, 12))
    assert items.pulled == 12


def test_copied_arrays_are_the_callers_own(tmp_path, spec):
    paths = [imagegen.make_image(tmp_path / f"{i}.png", "RGB", (21, 20 + i), seed=i)
             for i in range(6)]
    with DecodePool(spec, workers=2, max_pending=2) as pool:
        results = list(pool.imap((i, p.name, str(p)) for i, p in enumerate(paths)))
    # the two slots were reused three times each: every array must still be its own image
    for r, p in zip(results, paths, strict=True):
        assert r.array.flags.writeable and r.array.flags.owndata
        np.testing.assert_array_equal(r.array, decode_file(str(p), spec))


def test_workers_keep_decoding_while_the_parent_holds_the_gil(tmp_path, spec):
    """Pixels go into shared memory and each worker holds a queue of items, so decoding does
    not wait for the parent's manager thread (starved while, e.g., torch imports)."""
    img = imagegen.make_image(tmp_path / "a__mark__.png", "RGB", (24, 20))
    items = [(i, str(i), str(img)) for i in range(64)]
    with DecodePool(spec, workers=2, max_pending=64,
                    decode_fn=imagegen.misbehaving_decode) as pool:
        list(pool.imap(items[:2]))  # both workers started and warm
        for f in tmp_path.glob("a__mark__.png.*"):
            f.unlink()
        gen = pool.imap(items)
        assert next(gen).index == 0
        before = sys.getswitchinterval()
        sys.setswitchinterval(30.0)
        try:
            deadline = time.perf_counter() + 2.0
            while time.perf_counter() < deadline:  # pure Python: the GIL is never released
                pass
            decoded = len(list(tmp_path.glob("a__mark__.png.*")))
        finally:
            sys.setswitchinterval(before)
        assert decoded >= 16, f"only {decoded} images decoded while the parent was busy"
        assert [r.index for r in gen] == list(range(1, 64))


def test_unguarded_script_gets_a_clear_error(tmp_path):
    """A script using the pool at its top level (no ``if __name__ == "__main__":``) makes
    every worker re-run it; the one line must say how to fix the script. Guarded, it works."""
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(img)
    body = textwrap.dedent("""\
        import sys
        from clipfeat.decode import DecodePool
        from clipfeat.preprocess import PreprocessSpec

        def run():
            spec = PreprocessSpec.from_processor_config(None, family="clip", image_size=30)
            with DecodePool(spec, workers=1) as pool:
                res = list(pool.imap([(0, "a", sys.argv[1])]))
            print("decoded", res[0].error is None)
        """)
    bare = tmp_path / "bare_script.py"
    bare.write_text(body + "run()\n")
    guarded = tmp_path / "guarded_script.py"
    guarded.write_text(body + "if __name__ == '__main__':\n    run()\n")

    p = subprocess.run([sys.executable, str(bare), str(img)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [  # one line, before any worker is started
        "clipfeat: error: bare_script.py line 10 runs DecodePool with decode workers at the "
        "script's top level: put that call under `if __name__ == \"__main__\":` (each worker "
        "re-imports bare_script.py), or pass workers=0 to decode in this process"]

    p = subprocess.run([sys.executable, str(guarded), str(img)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "decoded True"


def test_close_from_another_thread_while_the_pool_starts(tmp_path, spec):
    """The pipeline closes the pool from its main thread while the feeder thread may still
    be starting it (a run refused early). No worker may start after close() has released
    the shared memory (the worker would map whatever the descriptor number now is, or kill
    the forkserver by sending a closed one), and a later pool must still work."""
    img = imagegen.make_image(tmp_path / "a.png", "RGB", (24, 20))
    items = [(i, str(i), str(img)) for i in range(50)]
    errors: list[BaseException] = []

    def consume(pool: DecodePool) -> None:
        try:
            for _ in pool.imap(items):
                pass
        except RuntimeError as err:
            if "closed" not in str(err):
                errors.append(err)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    for delay in [0.0, 0.001, 0.003, 0.01, 0.02, 0.04] * 2:
        pool = DecodePool(spec, workers=3)
        t = threading.Thread(target=consume, args=(pool,), daemon=True)
        t.start()
        time.sleep(delay)
        pool.close()
        t.join(15)
        assert not t.is_alive()
        assert pool.worker_pids() == []
    assert errors == []
    with DecodePool(spec, workers=2) as pool:
        assert all(r.ok for r in pool.imap(items[:4]))


def test_decoder_stderr_goes_to_the_failure_or_the_log_not_the_terminal(tmp_path, spec, capfd,
                                                                         caplog):
    """C libraries write to fd 2 (libtiff, libpng): that text must not print over the
    progress bar; it is appended to the item's error, or logged for an image that decoded."""
    import logging

    ok = imagegen.make_image(tmp_path / "a__stderr__.png", "RGB", (20, 20))
    bad = imagegen.make_image(tmp_path / "b__stderr____raise__.png", "RGB", (20, 20))
    plain = imagegen.make_image(tmp_path / "c.png", "RGB", (20, 20))
    items = [(0, "ok", str(ok)), (1, "bad", str(bad)), (2, "plain", str(plain))]
    with caplog.at_level(logging.DEBUG, logger="clipfeat.decode"):
        with DecodePool(spec, workers=1, decode_fn="imagegen:misbehaving_decode") as pool:
            results = list(pool.imap(items))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert results[0].error is None and results[2].error is None
    assert results[1].error == ("OSError: simulated broken file (TIFFReadDirectory: Warning, "
                                "b__stderr____raise__.png: unknown field with tag 317)")
    assert "a__stderr__.png: unknown field with tag 317" in caplog.text
    assert "c.png" not in caplog.text.replace(str(plain), "")


@pytest.mark.parametrize("call", ["clipfeat.extract(roots=[{root!r}], out={out!r}, "
                                  "model={model!r}, device='cpu', workers=2)",
                                  "def main():\n    clipfeat.extract(roots=[{root!r}], "
                                  "out={out!r}, model={model!r}, device='cpu')\nmain()"])
def test_unguarded_script_gets_one_line_and_nothing_is_written(tmp_path, clip_vision_dir,
                                                                call):
    """A script calling extract at its top level without `if __name__ == "__main__":`: the
    workers would re-import it and call extract again in their start-up (hundreds of lines
    of multiprocessing tracebacks). It gets one line naming the script and the fix."""
    root = tmp_path / "images"
    imagegen.make_image(root / "a.png", "RGB", (20, 20))
    out = tmp_path / "out"
    script = tmp_path / "unguarded.py"
    script.write_text("import clipfeat\n"
                      + call.format(root=str(root), out=str(out), model=str(clip_vision_dir))
                      + "\nprint('after')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("clipfeat: error: unguarded.py line ")
    assert 'put that call under `if __name__ == "__main__":`' in lines[0]
    assert "workers=0" in lines[0]
    assert not out.exists()


def test_guard_detection():
    from clipfeat.decode.workers import is_guarded

    src = textwrap.dedent("""\
        import clipfeat
        clipfeat.extract()
        if __name__ == "__main__":
            clipfeat.extract(
                workers=2)
        else:
            clipfeat.extract()
        if "__main__" == __name__:
            clipfeat.extract()
        """)
    assert [n for n in range(1, 10) if is_guarded(src, n)] == [4, 5, 9]


def test_unguarded_error_is_a_config_error():
    from clipfeat.decode.workers import UnguardedMain

    err = UnguardedMain("x")
    assert isinstance(err, ConfigError) and isinstance(err, SystemExit)
    assert err.code == "clipfeat: error: x" and str(err) == "x"
