"""Bad arguments and environments: exit 2, ONE line naming the value and the fix, no
traceback, and nothing written to OUT (OUT not even created)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imagegen
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipfeat.cli import app

REPO = Path(__file__).resolve().parents[1]


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def assert_one_line_error(code: int, stdout: str, stderr: str, needle: str) -> str:
    """Exit 2, nothing on stdout, exactly one non-empty line on stderr, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stdout, stderr)
    assert stdout.strip() == "", stdout
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("clipfeat: error: "), lines[0]
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory, clip_full_dir) -> dict[str, Path]:
    """An image folder, input files and broken checkpoints, made once for the module."""
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("cli-errors")
    root = d / "root"
    imagegen.make_image(root / "a.png", "RGB", (20, 20))
    imagegen.make_image(root / "b.jpg", "RGB", (24, 18))

    def ckpt_copy(name: str, weights: bool) -> Path:
        target = d / name
        target.mkdir()
        for f in ("config.json", "preprocessor_config.json"):
            shutil.copy(clip_full_dir / f, target / f)
        if weights:
            shutil.copy(clip_full_dir / "model.safetensors", target / "model.safetensors")
        return target

    no_weights = ckpt_copy("no-weights", weights=False)
    corrupt = ckpt_copy("corrupt", weights=False)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    truncated = ckpt_copy("truncated", weights=False)
    data = (clip_full_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickle_only = ckpt_copy("pickle-only", weights=False)
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(clip_full_dir / "model.safetensors"), pickle_only / "pytorch_model.bin")
    bert = d / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, vocab_size=50)).save_pretrained(bert)
    llava = d / "train.json"
    llava.write_text(json.dumps([{"image": "a.png"}]))
    files = d / "files.txt"
    files.write_text("a.png\n")
    a_file = d / "a-file"
    a_file.write_text("keep me\n")
    return {"dir": d, "root": root, "model": clip_full_dir, "no_weights": no_weights,
            "corrupt": corrupt, "truncated": truncated, "pickle_only": pickle_only,
            "bert": bert, "llava": llava, "files": files, "a_file": a_file}


# (case id, argv after "extract" with {placeholders}, a string the one line must contain)
CASES = [
    ("missing-root", ["{dir}/no-such-root"], "no-such-root"),
    ("out-is-a-file", ["{root}", "--out", "{a_file}"], "a-file"),
    ("out-below-a-file", ["{root}", "--out", "{a_file}/sub"], "not writable"),
    ("out-empty", ["{root}", "--out", ""], "--out"),  # not "." (the current folder)
    ("root-empty", ["", "--out", "{dir}/out"], "ROOT"),
    ("unknown-model", ["{root}", "--model", "no-such-org/no-such-model"],
     "no-such-org/no-such-model"),
    ("model-path-missing", ["{root}", "--model", "{dir}/nowhere/model"], "nowhere"),
    ("model-is-a-file", ["{root}", "--model", "{a_file}"], "a-file"),
    ("model-without-weights", ["{root}", "--model", "{no_weights}"], "no weights"),
    ("corrupt-weights", ["{root}", "--model", "{corrupt}"], "model.safetensors"),
    ("truncated-weights", ["{root}", "--model", "{truncated}"], "model.safetensors"),
    ("not-a-vision-model", ["{root}", "--model", "{bert}"], "'bert'"),
    ("pickle-weights", ["{root}", "--model", "{pickle_only}"], "--allow-pickle"),
    ("layer-too-high", ["{root}", "--layer", "99"], "99"),
    ("layer-too-low", ["{root}", "--layer", "-99"], "-99"),
    ("unknown-feature", ["{root}", "--feature", "cls"], "'cls'"),
    ("batch-size-0", ["{root}", "--batch-size", "0"], "--batch-size 0"),
    ("batch-size-text", ["{root}", "--batch-size", "many"], "--batch-size"),
    ("shard-size-0", ["{root}", "--shard-size", "0"], "--shard-size 0"),
    ("workers-negative", ["{root}", "--workers", "-1"], "--workers -1"),
    ("limit-0", ["{root}", "--limit", "0"], "--limit 0"),
    ("max-pixels-0", ["{root}", "--max-pixels", "0"], "--max-pixels 0"),
    ("decode-timeout-0", ["{root}", "--decode-timeout", "0"], "--decode-timeout"),
    ("unknown-aspect", ["{root}", "--aspect", "wide"], "'wide'"),
    ("unknown-dtype", ["{root}", "--dtype", "int8"], "'int8'"),
    ("unknown-store-dtype", ["{root}", "--store-dtype", "int8"], "'int8'"),
    ("unknown-device", ["{root}", "--device", "tpu"], "'tpu'"),
    ("absent-cuda-device", ["{root}", "--device", "cuda:99"], "cuda:99"),
    ("empty-ext", ["{root}", "--ext", ","], "--ext"),
    ("unknown-option", ["{root}", "--frobnicate"], "--frobnicate"),
    ("no-input", [], "ROOT"),
    ("llava-json-with-root", ["{root}", "--llava-json", "{llava}", "--image-folder", "{root}"],
     "drop the ROOT"),
    ("llava-json-without-folder", ["--llava-json", "{llava}"], "--image-folder"),
    ("image-folder-without-llava", ["{root}", "--image-folder", "{root}"], "--llava-json"),
    ("llava-json-and-files-from", ["--llava-json", "{llava}", "--image-folder", "{root}",
                                   "--files-from", "{files}"], "--files-from"),
    ("llava-json-missing", ["--llava-json", "{dir}/none.json", "--image-folder", "{root}"],
     "none.json"),
    ("llava-json-not-json", ["--llava-json", "{files}", "--image-folder", "{root}"],
     "files.txt"),
    ("image-folder-missing", ["--llava-json", "{llava}", "--image-folder", "{dir}/no-folder"],
     "no-folder"),
    ("files-from-two-roots", ["{root}", "{root}", "--files-from", "{files}"], "--files-from"),
    ("files-from-missing", ["{root}", "--files-from", "{dir}/none.txt"], "none.txt"),
]


def _argv(template: list[str], env: dict[str, Path], out: Path) -> list[str]:
    args = [a.format(**env) for a in template]
    if "--out" not in args:
        args += ["--out", str(out)]
    if "--model" not in args:
        args += ["--model", str(env["model"])]
    if "--device" not in args:
        args += ["--device", "cpu"]
    return ["extract", *args]


@pytest.mark.parametrize("template,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_arguments_exit_2_with_one_line(env, tmp_path, monkeypatch, template, needle):
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = env["a_file"].read_bytes()
    res = _runner().invoke(app, _argv(template, env, out))
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, needle)
    assert not out.exists() and not (env["dir"] / "out").exists()
    assert not any(cwd.iterdir()), "something was written into the current folder"
    assert env["a_file"].read_bytes() == before


def test_unwritable_out_is_refused_before_writing(env, tmp_path, monkeypatch):
    """Tests run as root, who may write anywhere: simulate a read-only parent folder."""
    parent = tmp_path / "read-only"
    parent.mkdir()
    real = os.access

    def access(path, mode, *a, **kw):
        if mode & os.W_OK and Path(os.fsdecode(path)) == parent:
            return False
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    out = parent / "out"
    res = _runner().invoke(app, _argv(["{root}", "--out", str(out)], env, out))
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, "not writable")
    assert not out.exists()


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs sysfs at /sys")
def test_out_on_a_pseudo_file_system(env):
    """The kernel refuses the mkdir (os.access says yes): still one line, exit 2."""
    out = Path("/sys/clipfeat-test-out")
    if out.exists():
        pytest.skip("unexpected /sys entry")
    res = _runner().invoke(app, _argv(["{root}", "--out", str(out)], env, out))
    assert_one_line_error(res.exit_code, res.stdout, res.stderr, str(out))
    assert not out.exists()


def test_allow_pickle_loads_pickle_weights(env, tmp_path):
    out = tmp_path / "out"
    res = _runner().invoke(app, _argv(["{root}", "--model", "{pickle_only}", "--allow-pickle",
                                       "--workers", "0", "--quiet", "--json"], env, out))
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["extracted"] == 2 and summary["failed"] == 0 and summary["complete"]


def _python_m_clipfeat(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "clipfeat", *args], capture_output=True,
                          text=True, env=env, cwd=str(REPO), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("template,needle", [
    (["{dir}/no-such-root"], "no-such-root"),
    (["{root}", "--model", "{corrupt}"], "model.safetensors"),
], ids=["missing-root", "corrupt-weights"])
def test_real_process_shows_no_traceback(env, tmp_path, template, needle):
    out = tmp_path / "out"
    proc = _python_m_clipfeat(_argv(template, env, out))
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, needle)
    assert not out.exists()


def test_version_and_bare_command():
    """`clipfeat --version` prints the version; a bare `clipfeat` shows help and exits 2."""
    import clipfeat
    from clipfeat.cli import app as _app

    res = CliRunner().invoke(_app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == clipfeat.__version__
    res = CliRunner().invoke(_app, [])
    assert res.exit_code == 2 and "extract" in res.output


@pytest.mark.parametrize("case", ["empty", "only-txt", "ext-txt", "llava-text-only",
                                  "files-from-empty"])
def test_nothing_to_extract_is_a_usage_error_before_the_model_loads(tmp_path, clip_full_dir,
                                                                    monkeypatch, case):
    import clipfeat.tower

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(clipfeat.tower, "load_tower", no_load)
    root = tmp_path / "root"
    root.mkdir()
    out = tmp_path / "out"
    inputs = [str(root)]
    if case == "only-txt":
        (root / "notes.txt").write_text("no image")
    elif case == "ext-txt":
        Image.new("RGB", (8, 8)).save(root / "a.png")
        inputs += ["--ext", "txt"]
    elif case == "llava-text-only":
        data = tmp_path / "train.json"
        data.write_text(json.dumps([{"id": "1", "conversations": []}]))
        inputs = ["--llava-json", str(data), "--image-folder", str(root)]
    elif case == "files-from-empty":
        (tmp_path / "list.txt").write_text("")
        inputs += ["--files-from", str(tmp_path / "list.txt")]
    res = CliRunner().invoke(app, ["extract", *inputs, "--out", str(out), "--model",
                                   str(clip_full_dir), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip()
    assert "\n" not in line, line
    assert "nothing to extract" in line or "holds no file" in line, line
    if case in ("empty", "only-txt", "ext-txt"):
        assert str(root) in line and ("txt" if case == "ext-txt" else "jpg") in line
    assert not out.exists()


def test_first_output_on_a_terminal_comes_before_torch_loads(tmp_path, clip_full_dir,
                                                             monkeypatch):
    """On a terminal, the first line says what is planned and what loads, within a second
    of the start (before torch and the weights); a rerun with nothing to do never loads
    the model (it says so without the model's weights being readable)."""
    import pty
    import select
    import time

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (20 + i, 20)).save(root / f"{i}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "clipfeat", "extract", str(root), "--out", str(out),
           "--model", str(clip_full_dir), "--device", "cpu", "--workers", "0"]
    master, slave = pty.openpty()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    seen, first_at = b"", None
    while proc.poll() is None or select.select([master], [], [], 0.1)[0]:
        if select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if first_at is None and b"images to extract" in seen:
                first_at = time.monotonic() - t0
    proc.wait(timeout=60)
    os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "3 of 3 images to extract (1 shards)" in text and "loading torch" in text, text
    # the imports alone take seconds here; the note comes before them
    assert first_at is not None and first_at < 3.0, (first_at, text)
    assert text.index("images to extract") < text.index("3 extracted")
    # nothing to do: the model is not loaded
    import clipfeat.tower

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(clipfeat.tower, "load_tower", no_load)
    res = CliRunner().invoke(app, ["extract", str(root), "--out", str(out), "--model",
                                   str(clip_full_dir), "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0 and "nothing to do" in res.stderr, res.output
