"""Several outputs in one pass, end to end: each output equals its tower's own transformers
computation (processor + hidden_states), the one-output store is unchanged, resume and
torchrun give the same bytes, and a change of outputs on an existing OUT is refused."""

from __future__ import annotations

import json
import sys
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


@pytest.mark.parametrize("feature, aspect", [("patch", "square"), ("cls_patch", "pad")])
def test_dinov2_with_and_without_registers_beside_siglip(tmp_path, images, dinov2_dir,
                                                         dinov2_reg_dir, siglip_dir, feature,
                                                         aspect):
    """Three towers, three preprocessings (each its own resize, crop, mean/std and pad
    colour), each output equal to that family's own processor + hidden_states."""
    dino, reg, sig = str(dinov2_dir), str(dinov2_reg_dir), str(siglip_dir)
    out = tmp_path / "out"
    clipfeat.extract(roots=[str(images["a.jpg"].parent)], out=str(out), model=[dino, reg, sig],
                     layer=["-1,mean(1:3)", f"{sig}=-2"], feature=[feature, f"{sig}=patch"],
                     aspect=aspect, **KW)
    keys = sorted(images)
    paths = [images[k] for k in keys]
    expect = {
        f"{tower_slug(dino)}/-1": reference(dinov2_dir, -1, feature, paths, aspect),
        f"{tower_slug(dino)}/mean(1:3)": reference(dinov2_dir, (1, 3), feature, paths, aspect),
        f"{tower_slug(reg)}/-1": reference(dinov2_reg_dir, -1, feature, paths, aspect),
        f"{tower_slug(reg)}/mean(1:3)": reference(dinov2_reg_dir, (1, 3), feature, paths,
                                                  aspect),
        f"{tower_slug(sig)}/-2": reference(siglip_dir, -2, "patch", paths, aspect),
    }
    patches = expect[f"{tower_slug(dino)}/-1"].shape[1] - (feature == "cls_patch")
    assert expect[f"{tower_slug(reg)}/-1"].shape[1] == patches + (feature == "cls_patch")
    store = clipfeat.FeatureStore(out)
    assert store.outputs == list(expect)
    for name, want in expect.items():
        got = np.stack([store.select(name)[k].numpy() for k in keys])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    meta = store.output_meta(f"{tower_slug(reg)}/-1")
    assert (meta["family"], meta["num_registers"], meta["feature"]) == ("dinov2", 4, feature)


def test_verify_re_extracts_every_output(tmp_path, images, clip_full_dir, siglip_dir):
    from clipfeat.verify import verify_store

    clip, sig = str(clip_full_dir), str(siglip_dir)
    out = tmp_path / "out"
    clipfeat.extract(roots=[str(images["a.jpg"].parent)], out=str(out), model=[clip, sig],
                     layer=["-1,mean(0:2)"], **KW)
    report = verify_store(out, model=[clip, sig], sample=3)
    assert report.ok, report.problems
    assert report.sampled == 4 * 3 and report.max_sample_error < 1e-5
    half = verify_store(out, model=clip, sample=3)
    assert half.ok and half.sampled == 2 * 3
    assert any(f"no --model names its tower {sig}" in n for n in half.notes), half.notes
    res = runner.invoke(app, ["verify", str(out), "--model", clip, "--model", sig,
                              "--sample", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sampled"] == 8


# --------------------------------------------------------------------------- resume, torchrun

MULTI = 2  # images per shard: many commit points for a kill to land between


def multi_args(root: Path, out: Path, clip: Path, sig: Path, *extra: str) -> list[str]:
    """Two towers, two layers each (one a mean), one process or a rank of torchrun."""
    return ["extract", str(root), "--out", str(out), "--model", str(clip), "--model", str(sig),
            "--layer", "-2,mean(0:2)", "--feature", f"{clip}=cls_patch", "--device", "cpu",
            "--dtype", "float32", "--store-dtype", "float32", "--shard-size", str(MULTI),
            "--batch-size", "3", "--workers", "1", *extra]


def every_dataset(out: Path) -> dict[str, dict[str, object]]:
    """shard file -> {dataset path or attribute: value} of everything a shard holds (bytes
    of every output, keys, failures, root and per-output attributes but provenance)."""
    found: dict[str, dict[str, object]] = {}
    for shard in sorted(out.glob("shard-*.h5")):
        items: dict[str, object] = {}
        with h5py.File(shard, "r") as f:
            def visit(name, obj, items=items):
                if isinstance(obj, h5py.Dataset):
                    items[name] = obj[()].tobytes() if obj.dtype.kind == "f" else list(obj[()])
                    items[name + "@attrs"] = dict(obj.attrs)
            f.visititems(visit)
            items["@attrs"] = {k: v for k, v in f.attrs.items() if k not in ("versions",)}
        found[shard.name] = items
    return found


@pytest.fixture(scope="module")
def multi_tree(tmp_path_factory) -> tuple[Path, list[str]]:
    from test_resume import make_tree

    root = tmp_path_factory.mktemp("multi-tree")
    return root, make_tree(root, 29, broken=(20,))


@pytest.fixture(scope="module")
def multi_ref(multi_tree, clip_full_dir, siglip_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi-ref") / "out"
    res = runner.invoke(app, multi_args(multi_tree[0], out, clip_full_dir, siglip_dir,
                                        "--workers", "0"))
    assert res.exit_code == 0, res.output
    return out


def _killed_part_way(cmd: list[str], out: Path, tmp_path: Path, name: str,
                     ranks: int = 1) -> dict[str, object]:
    """Run ``cmd``, SIGKILL every process of it once 3 shards are in place (of each rank);
    the finished shards must be sound. Returns what they hold."""
    from test_resume import Proc, assert_no_orphans, wait_until

    from clipfeat.store import check_shard_bytes, parse_shard_id

    def ready() -> bool:
        ids = {parse_shard_id(p.name) for p in out.glob("shard-*.h5")}
        return len(ids) >= 3 and len({i % ranks for i in ids}) == ranks

    p = Proc(cmd, tmp_path / "logs", name)
    try:
        assert wait_until(ready, p), f"the run ended too soon:\n{p.stderr[-3000:]}"
        p.kill_all()
        assert_no_orphans(p.marker, out=out)
    finally:
        p.cleanup()
    for shard in out.glob("shard-*.h5"):
        assert check_shard_bytes(shard) is None, shard
    kept = every_dataset(out)
    assert 0 < len(kept) < 15  # 29 inputs in 15 shards of 2
    return kept


@pytest.mark.slow
def test_two_towers_two_layers_killed_then_finished_by_two_ranks(tmp_path, multi_tree, multi_ref,
                                                                 clip_full_dir, siglip_dir):
    """1 -> 2: a one-process run killed part way, finished under torchrun with two ranks."""
    from test_distributed import torchrun
    from test_resume import Proc, assert_no_orphans

    root = multi_tree[0]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "clipfeat",
           *multi_args(root, out, clip_full_dir, siglip_dir)]
    kept = _killed_part_way(cmd, out, tmp_path, "single")
    second = Proc(torchrun(2, "-m", "clipfeat", *multi_args(root, out, clip_full_dir,
                                                            siglip_dir)),
                  tmp_path / "logs", "torchrun")
    try:
        assert second.wait() == 0, second.stderr[-3000:]
        assert_no_orphans(second.marker)
    finally:
        second.cleanup()
    got, want = every_dataset(out), every_dataset(multi_ref)
    assert {k: got[k] for k in kept} == kept, "finished shards were rewritten"
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    assert clipfeat.FeatureStore(out).complete


@pytest.mark.slow
def test_two_towers_two_layers_two_ranks_killed_then_finished_by_one(
        tmp_path, multi_tree, multi_ref, clip_full_dir, siglip_dir):
    """2 -> 1: a torchrun job killed part way (both ranks' shards in place), finished by one
    process: the same bytes as one uninterrupted run."""
    from test_distributed import torchrun

    root = multi_tree[0]
    out = tmp_path / "out"
    kept = _killed_part_way(torchrun(2, "-m", "clipfeat",
                                     *multi_args(root, out, clip_full_dir, siglip_dir)),
                            out, tmp_path, "torchrun", ranks=2)
    res = runner.invoke(app, multi_args(root, out, clip_full_dir, siglip_dir))
    assert res.exit_code == 0, res.output
    got, want = every_dataset(out), every_dataset(multi_ref)
    assert {k: got[k] for k in kept} == kept
    assert got == want


def test_a_lost_plan_is_rebuilt_from_every_outputs_attributes(tmp_path, images, clip_full_dir,
                                                            siglip_dir, caplog):
    """plan.jsonl gone: the rerun rebuilds it from the shards, whose identity is each
    output's own attributes; nothing is redone, and a change of output is still refused."""
    clip, sig = str(clip_full_dir), str(siglip_dir)
    root = str(images["a.jpg"].parent)
    out = tmp_path / "out"
    kw = dict(roots=[root], out=str(out), model=[clip, sig], layer=["-1,mean(0:2)"],
              shard_size=3, **KW)
    clipfeat.extract(**kw)
    before = every_dataset(out)
    (out / ".clipfeat" / "plan.jsonl").unlink()
    s = clipfeat.extract(**kw)
    assert s.skipped == len(images) and s.extracted == 0
    assert "rebuilt from the 3 intact finished shards" in caplog.text
    assert every_dataset(out) == before
    (out / ".clipfeat" / "plan.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"outputs\..*/-1\.feature: 'patch' in OUT -> "
                                          r"'cls_patch' now"):
        clipfeat.extract(**dict(kw, feature=[f"{clip}=cls_patch"]))


def test_cls_patch_on_a_siglip_beside_a_clip_names_the_tower(tmp_path, images, clip_full_dir,
                                                            siglip_dir):
    out = tmp_path / "out"
    res = runner.invoke(app, ["extract", str(images["a.jpg"].parent), "--out", str(out),
                              "--model", str(clip_full_dir), "--model", str(siglip_dir),
                              "--feature", "cls_patch"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"--model {siglip_dir}: feature 'cls_patch' needs a CLS token" in res.output
    assert "--feature MODEL=cls_patch" in res.output and not out.exists()
