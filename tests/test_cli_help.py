"""`--help` of every command: examples first, options in panels, defaults shown (the
library's), and no typer artefacts ('<bool>' on flags, '[ROOT...]...', '{target}')."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from clipfeat import ExtractConfig
from clipfeat.cli import app
from clipfeat.config import DEFAULT_VERIFY_SAMPLE
from clipfeat.sources import DEFAULT_EXTS

DEFAULTS = ExtractConfig()  # the library's defaults: what --help must show

WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}

EXAMPLES = {
    (): ["clipfeat extract /data/LLaVA-Pretrain/images --out feats/pretrain",
         "--llava-json llava_v1_5_mix665k.json --image-folder /data",
         "torchrun --nproc-per-node 8 -m clipfeat extract",
         "clipfeat info openai/clip-vit-large-patch14-336",
         "clipfeat info feats/pretrain",
         "clipfeat verify feats/pretrain --model openai/clip-vit-large-patch14-336 --sample 32"],
    ("extract",): ["clipfeat extract /data/LLaVA-Pretrain/images --out feats/pretrain",
                   "--llava-json llava_v1_5_mix665k.json --image-folder /data",
                   "torchrun --nproc-per-node 8 -m clipfeat extract"],
    ("info",): ["clipfeat info openai/clip-vit-large-patch14-336", "clipfeat info feats/pretrain"],
    ("verify",): ["clipfeat verify feats/pretrain --model openai/clip-vit-large-patch14-336 "
                  "--sample 32"],
}
PANELS = {
    (): [],
    ("extract",): ["Input", "Model", "Output", "Performance", "Behaviour"],
    ("info",): ["Model", "Output"],
    ("verify",): ["Model", "Output", "Performance"],
}
USAGE = {
    (): "Usage: clipfeat [OPTIONS] COMMAND [ARGS]...",
    ("extract",): "Usage: clipfeat extract [OPTIONS] [ROOT]...",
    ("info",): "Usage: clipfeat info [OPTIONS] TARGET",
    ("verify",): "Usage: clipfeat verify [OPTIONS] OUT",
}


def _help(cmd: tuple[str, ...]) -> str:
    res = CliRunner().invoke(app, [*cmd, "--help"], env=WIDE)
    assert res.exit_code == 0, res.output
    return res.stdout


def _no_artefacts(text: str) -> None:
    for bad in ("<bool>", "<list[str]>", "[ROOT...]...", "{target}", "{out}", "\b"):
        assert bad not in text, (bad, text)
    assert not re.search(r"\{\w+\}", text), text


@pytest.mark.parametrize("cmd", list(EXAMPLES))
def test_help_has_examples_panels_and_no_artefacts(cmd):
    text = _help(cmd)
    assert USAGE[cmd] in text
    assert "Examples:" in text
    assert text.index("Examples:") < text.index("╭")  # examples at the top, before options
    for example in EXAMPLES[cmd]:
        assert example in text, (example, text)
    for panel in PANELS[cmd]:
        assert f"─ {panel} ─" in text, (panel, text)
    if PANELS[cmd]:  # --help sits in a panel of the command, not in a box of its own
        assert "─ Options ─" not in text, text
    _no_artefacts(text)


def test_extract_help_defaults_are_the_librarys():
    text = " ".join(_help(("extract",)).split())
    assert f"[default: {DEFAULTS.model}]" in text
    assert f"[default: {DEFAULTS.layer}]" in text
    assert f"[default: {DEFAULTS.batch_size}]" in text
    assert f"[default: {DEFAULTS.shard_size}]" in text
    assert "[default: one per core]" in text and DEFAULTS.workers is None
    assert f"[default: {','.join(DEFAULT_EXTS)}]" in text
    # --files-from without ROOT: paths are relative to the current folder
    assert "without ROOT: to the current folder" in text
    assert "--out -o DIR" in text and "--workers N" in text


def test_verify_help_sample_default():
    text = " ".join(_help(("verify",)).split())
    assert f"[default: {DEFAULT_VERIFY_SAMPLE} with --model]" in text
    assert "--allow-pickle" in text


@pytest.mark.parametrize("cmd", [("extract",), ("verify",), ("info",)])
def test_plain_help_without_rich_keeps_panels_and_examples(cmd):
    """typer without rich (TYPER_USE_RICH=0 takes the same path) prints click's plain help:
    the panels are its section titles and the examples keep their lines."""
    env = dict(os.environ, TYPER_USE_RICH="0", **WIDE)
    code = "import sys; from clipfeat.cli import app; app(sys.argv[1:], prog_name='clipfeat')"
    text = subprocess.run([sys.executable, "-c", code, *cmd, "--help"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert USAGE[cmd] in text
    for panel in PANELS[cmd]:
        assert f"\n{panel}:\n" in text, (panel, text)
    for example in EXAMPLES[cmd]:
        assert example in text, (example, text)
    _no_artefacts(text)
