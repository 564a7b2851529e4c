"""Several outputs in one pass, end to end: each output equals its tower's own transformers
computation (processor + hidden_states), the one-output store is unchanged, resume and
torchrun give the same bytes, and a change of outputs on an existing OUT is refused."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from llava_reference import LlavaReference
from test_extract import make_images
from typer.testing import CliRunner

import clipfeat
from clipfeat.cli import app
from clipfeat.errors import ConfigError
from clipfeat.outputs import tower_slug

runner = CliRunner()
KW = dict(device="cpu", dtype="float32", store_dtype="float32", workers=0, batch_size=3)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return make_images(tmp_path_factory.mktemp("imgs") / "root")


def stored(out: Path, dataset: str) -> dict[str, np.ndarray]:
    """key -> row of one dataset in every shard of ``out``, read with h5py."""
    rows = {}
    for shard in sorted(out.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            for k, v in zip(f["keys"].asstr()[()], f[dataset][()], strict=True):
                rows[k] = v
    return rows


def reference(ckpt: Path, layer, feature: str, paths: list[Path], aspect: str) -> np.ndarray:
    """transformers' own features of ``layer`` (an int, or (a, b) for the mean of
    hidden_states[a:b], averaged in float32) for the images, one at a time."""
    import torch

    ref = LlavaReference(ckpt, feature=feature)
    out = []
    for p in paths:
        hs = ref.hidden_states(ref.pixels(p, aspect)[None])
        if isinstance(layer, tuple):
            h = torch.stack([x.float() for x in hs[layer[0]:layer[1]]]).mean(0)
        else:
            h = hs[layer]
        out.append(ref.select(h).float().numpy()[0])
    return np.stack(out)


@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_two_towers_and_a_mean_each_equal_transformers(tmp_path, images, clip_full_dir,
                                                       siglip_dir, aspect):
    clip, sig = str(clip_full_dir), str(siglip_dir)
    out = tmp_path / "out"
    s = clipfeat.extract(roots=[str(images["a.jpg"].parent)], out=str(out), model=[clip, sig],
                         layer=["-2,mean(0:2)", f"{sig}=-1,0"], feature=[f"{clip}=cls_patch"],
                         aspect=aspect, **KW)
    assert s.complete and s.failed == 0
    keys = sorted(images)
    paths = [images[k] for k in keys]
    cs, ss = tower_slug(clip), tower_slug(sig)
    expect = {
        f"{cs}/-2": reference(clip_full_dir, -2, "cls_patch", paths, aspect),
        f"{cs}/mean(0:2)": reference(clip_full_dir, (0, 2), "cls_patch", paths, aspect),
        f"{ss}/-1": reference(siglip_dir, -1, "patch", paths, aspect),
        f"{ss}/0": reference(siglip_dir, 0, "patch", paths, aspect),
    }
    with h5py.File(out / "shard-000000.h5", "r") as f:
        assert json.loads(f.attrs["outputs"]) == list(expect)
        assert "features" in f and not isinstance(f["features"], h5py.Dataset)
        attrs = {name: dict(f[f"features/{name}"].attrs) for name in expect}
    assert attrs[f"{cs}/mean(0:2)"]["layer"] == "mean(0:2)"
    assert attrs[f"{ss}/-1"]["feature"] == "patch" and attrs[f"{cs}/-2"]["tokens"] == 26
    for name, want in expect.items():
        got = stored(out, f"features/{name}")
        assert sorted(got) == keys
        np.testing.assert_allclose(np.stack([got[k] for k in keys]), want, rtol=1e-5,
                                   atol=1e-5, err_msg=name)
    man = json.loads((out / "manifest.json").read_text())
    assert [o["name"] for o in man["outputs"]] == list(expect)
    assert [o["dataset"] for o in man["outputs"]] == [f"features/{n}" for n in expect]

    store = clipfeat.FeatureStore(out)
    assert store.outputs == list(expect)
    row = store[keys[0]]
    assert set(row) == set(expect)
    np.testing.assert_allclose(row[f"{ss}/-1"].numpy(), expect[f"{ss}/-1"][0], rtol=1e-5,
                               atol=1e-5)
    one = clipfeat.FeatureStore(out, output=f"{cs}/-2")
    assert tuple(one[keys[1]].shape) == (26, 32)


def test_one_tower_one_layer_store_is_unchanged(tmp_path, images, clip_full_dir):
    """One output through the list form writes exactly the one-tower store."""
    a, b = tmp_path / "a", tmp_path / "b"
    root = str(images["a.jpg"].parent)
    clipfeat.extract(roots=[root], out=str(a), model=str(clip_full_dir), layer=-2, **KW)
    clipfeat.extract(roots=[root], out=str(b), model=[str(clip_full_dir)], layer=["-2"], **KW)
    for shard in sorted(a.glob("shard-*.h5")):
        with h5py.File(shard, "r") as fa, h5py.File(b / shard.name, "r") as fb:
            assert sorted(fa) == sorted(fb) == ["failures", "features", "keys"]
            np.testing.assert_array_equal(fa["features"][()], fb["features"][()])
            assert dict(fa.attrs) == dict(fb.attrs)
            assert "outputs" not in fa.attrs and fa.attrs["layer"] == -2


def test_adding_an_output_to_an_existing_out_is_refused(tmp_path, images, clip_full_dir):
    out = tmp_path / "out"
    root = str(images["a.jpg"].parent)
    clipfeat.extract(roots=[root], out=str(out), model=str(clip_full_dir), layer=-2, **KW)
    name = tower_slug(str(clip_full_dir))
    with pytest.raises(ConfigError, match=rf"outputs: \['{name}/-2'\] in OUT -> "
                                          rf"\['{name}/-2', '{name}/-1'\] now"):
        clipfeat.extract(roots=[root], out=str(out), model=str(clip_full_dir), layer="-2,-1",
                         **KW)


def test_cli_several_layers_and_same_layer_twice(tmp_path, images, clip_full_dir):
    root = str(images["a.jpg"].parent)
    out = tmp_path / "out"
    res = runner.invoke(app, ["extract", root, "--out", str(out), "--model", str(clip_full_dir),
                              "--layer", "-2", "--layer", "-1", "--device", "cpu", "--workers",
                              "0", "--quiet"])
    assert res.exit_code == 0, res.output
    with h5py.File(out / "shard-000000.h5", "r") as f:
        assert json.loads(f.attrs["outputs"]) == [f"{tower_slug(str(clip_full_dir))}/-2",
                                                  f"{tower_slug(str(clip_full_dir))}/-1"]
    bad = runner.invoke(app, ["extract", root, "--out", str(tmp_path / "o2"), "--model",
                              str(clip_full_dir), "--layer", "-2,2"])
    assert bad.exit_code == 2 and "same hidden state" in bad.output
    assert not (tmp_path / "o2").exists()
