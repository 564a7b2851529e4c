"""Damage is found, never read back as data: a damaged manifest, key index, shard or plan is
reported (one line naming the file and the fix) or repaired, never trusted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from stores import Shard, build_store
from typer.testing import CliRunner

from clipfeat.cli import app
from clipfeat.errors import StoreError
from clipfeat.store import FeatureStore
from clipfeat.verify import verify_store

runner = CliRunner()
TOKENS, HIDDEN = 3, 8
META = {"model": "tiny/clip", "layer": -2, "feature": "patch", "aspect": "square",
        "tokens": TOKENS, "hidden_size": HIDDEN, "store_dtype": "float32"}


def small_store(out: Path, rows=(3, 2)) -> dict[str, np.ndarray]:
    """A finished store of len(rows) shards; returns {key: row}."""
    rng = np.random.default_rng(0)
    shards, want = [], {}
    for sid, n in enumerate(rows):
        keys = [f"s{sid}/{i}.png" for i in range(n)]
        x = rng.standard_normal((n, TOKENS, HIDDEN)).astype(np.float32)
        shards.append(Shard(keys, x))
        want.update(zip(keys, x, strict=True))
    build_store(out, shards, meta=META, plan={"num_chunks": len(rows)}, store_dtype="float32")
    return want


# --------------------------------------------------------------------------- manifest

def _edit(man: dict, how: str) -> object:
    s0 = man["shards"][0]
    if how == "not a dict":
        return [man]
    if how == "num_rows ten":
        s0["num_rows"] = "ten"
    elif how == "no file":
        del s0["file"]
    elif how == "no shard_id":
        del s0["shard_id"]
    elif how == "no num_rows":
        del s0["num_rows"]
    elif how == "entry not a dict":
        man["shards"][0] = "shard-000000.h5"
    elif how == "shards not a list":
        man["shards"] = {"0": s0}
    elif how == "config a list":
        man["config"] = ["model"]
    elif how == "bytes negative":
        s0["bytes"] = -3
    elif how == "shard_id bool":
        s0["shard_id"] = False
    elif how == "listed twice":
        man["shards"].append(dict(s0))
    elif how == "num_images str":
        man["num_images"] = "5"
    elif how == "file not a shard":
        s0["file"] = "../etc/passwd"
    return man


DAMAGES = ["not a dict", "num_rows ten", "no file", "no shard_id", "no num_rows",
           "entry not a dict", "shards not a list", "config a list", "bytes negative",
           "shard_id bool", "listed twice", "num_images str", "file not a shard", "not json"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_manifest_is_one_line_everywhere(tmp_path, how):
    small_store(tmp_path)
    path = tmp_path / "manifest.json"
    if how == "not json":
        path.write_bytes(b'{"format": "clipfeat", "shards": [\xff')
    else:
        path.write_text(json.dumps(_edit(json.loads(path.read_text()), how)))

    with pytest.raises(StoreError) as err:
        FeatureStore(tmp_path)
    msg = str(err.value)
    assert "manifest.json" in msg and "rerun the extract command" in msg and "\n" not in msg

    res = runner.invoke(app, ["info", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.json" in lines[0] and "rerun" in lines[0]

    res = runner.invoke(app, ["verify", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)
    assert "FAILED" in res.stdout and "manifest.json" in res.stdout
    report = verify_store(tmp_path)
    assert any(p.startswith("manifest.json:") and "rerun the extract command" in p
               for p in report.problems), report.problems
    assert report.checked_shards == 2  # the shards are still checked
