"""LLaVA drop-in: PrecomputedVisionTower and LlavaFeatureDataset over a real store."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from stores import MULTI_OUTPUTS, Shard, build_store, multi_output_store, read_rows

from clipfeat.errors import ConfigError, StoreError
from clipfeat.store import FeatureStore

TOKENS, HIDDEN = 4, 8  # 28 px / 14 px patches -> 2 x 2 grid


def make_store(out: Path, *, store_dtype="float16", feature="patch", tokens=TOKENS) -> list[str]:
    meta = {"model": "openai/clip-vit-large-patch14-336", "layer": -2, "layer_index": 23,
            "feature": feature, "aspect": "pad", "image_size": 28, "patch_size": 14,
            "hidden_size": HIDDEN, "tokens": tokens, "store_dtype": store_dtype,
            "compute_dtype": "float16", "model_type": "clip"}
    keys = ["coco/train2017/000000000009.jpg", "gqa/images/2354786.jpg", "ocr_vqa/images/1.jpg",
            "textvqa/train_images/0a1b.jpg", "vg/VG_100K/10.jpg"]
    rng = np.random.default_rng(0)
    build_store(out, [Shard(ks, rng.standard_normal((len(ks), tokens, HIDDEN)).astype(np.float32))
                      for ks in (keys[:3], keys[3:])],
                meta=meta, plan={}, store_dtype=store_dtype)
    return keys


@pytest.fixture
def store_dir(tmp_path):
    make_store(tmp_path)
    return tmp_path


def test_tower_properties(store_dir):
    from clipfeat.llava import PrecomputedVisionTower

    tower = PrecomputedVisionTower(str(store_dir))
    assert isinstance(tower, torch.nn.Module)
    assert tower.is_loaded and tower.image_processor is None
    tower.load_model()  # no-op
    assert tower.hidden_size == HIDDEN
    assert tower.num_patches_per_side == 2 and tower.num_patches == 4
    assert tower.config.hidden_size == HIDDEN and tower.config.image_size == 28
    assert tower.config.patch_size == 14
    assert tower.dtype == torch.float16 and tower.device == torch.device("cpu")
    dummy = tower.dummy_feature
    assert dummy.shape == (1, HIDDEN) and dummy.dtype == torch.float16
    assert not float(dummy.abs().sum())
    assert tower.state_dict() == {}  # nothing to save or load
    assert tower.select_layer == -2 and tower.select_feature == "patch"


def test_tower_forward_batch_and_list(store_dir):
    from clipfeat.llava import PrecomputedVisionTower

    rows = read_rows(store_dir)
    keys = list(rows)
    tower = PrecomputedVisionTower(FeatureStore(store_dir))
    batch = torch.from_numpy(np.stack([rows[k] for k in keys[:3]]))
    out = tower(batch)
    assert out.shape == (3, TOKENS, HIDDEN) and out.dtype == torch.float16
    np.testing.assert_array_equal(out.numpy(), batch.numpy())
    single = tower(torch.from_numpy(rows[keys[0]]))  # (P, D) -> (1, P, D)
    assert single.shape == (1, TOKENS, HIDDEN)
    listed = tower([torch.from_numpy(rows[keys[0]]), torch.from_numpy(rows[keys[1]])[None]])
    assert isinstance(listed, list) and [t.shape for t in listed] == [(1, TOKENS, HIDDEN)] * 2
    np.testing.assert_array_equal(listed[1][0].numpy(), rows[keys[1]])
    with pytest.raises(ValueError, match="hidden size 5"):
        tower(torch.zeros(1, TOKENS, 5))


def test_tower_follows_to_dtype(store_dir):
    from clipfeat.llava import PrecomputedVisionTower

    rows = read_rows(store_dir)
    key = next(iter(rows))
    tower = PrecomputedVisionTower(store_dir).to(torch.float32)
    assert tower.dtype == torch.float32
    assert tower.dummy_feature.dtype == torch.float32
    out = tower(torch.from_numpy(rows[key])[None])
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out[0].numpy(), rows[key].astype(np.float32))
    tower = tower.to(device="cpu", dtype=torch.bfloat16)
    assert tower(torch.zeros(2, TOKENS, HIDDEN)).dtype == torch.bfloat16
    looked = tower.lookup(list(rows)[:2])
    assert looked.shape == (2, TOKENS, HIDDEN) and looked.dtype == torch.bfloat16
    assert tower.lookup(key).shape == (TOKENS, HIDDEN)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tower_follows_to_device(store_dir):
    from clipfeat.llava import PrecomputedVisionTower

    tower = PrecomputedVisionTower(store_dir).to("cuda")
    assert tower.device.type == "cuda"
    assert tower(torch.zeros(1, TOKENS, HIDDEN)).device.type == "cuda"
    assert tower.dummy_feature.device.type == "cuda"


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        (dict(expect_layer=-1), ["-2", "-1", "--layer -1"]),
        (dict(expect_feature="cls_patch"), ["'patch'", "'cls_patch'"]),
        (dict(expect_aspect="square"), ["'pad'", "'square'"]),
        (dict(expect_model="openai/clip-vit-base-patch32"),
         ["openai/clip-vit-large-patch14-336", "openai/clip-vit-base-patch32"]),
    ],
)
def test_tower_refuses_other_settings(store_dir, kwargs, needles):
    from clipfeat.llava import PrecomputedVisionTower

    with pytest.raises(StoreError) as exc:
        PrecomputedVisionTower(store_dir, **kwargs)
    for needle in needles:
        assert needle in str(exc.value)


def test_tower_accepts_matching_settings(store_dir):
    from clipfeat.llava import PrecomputedVisionTower, check_compatible

    PrecomputedVisionTower(store_dir, expect_layer=-2, expect_feature="patch",
                           expect_aspect="pad", expect_model="openai/clip-vit-large-patch14-336")
    meta = FeatureStore(store_dir).meta
    check_compatible(meta, layer=23)  # the resolved hidden_states index also matches
    check_compatible(meta, model="/models/openai/clip-vit-large-patch14-336/")  # local copy
    with pytest.raises(StoreError, match="layer"):
        check_compatible(meta, layer=22, feature="patch")
    with pytest.raises(StoreError):
        check_compatible(dict(meta, aspect="square"), aspect="pad")
    check_compatible(dict(meta, aspect="square"), aspect="square")


def test_tower_is_picklable(store_dir):
    from clipfeat.llava import PrecomputedVisionTower

    tower = PrecomputedVisionTower(store_dir)
    clone = pickle.loads(pickle.dumps(tower))
    assert type(clone) is type(tower) and clone.hidden_size == HIDDEN


def test_cls_patch_store_grid(tmp_path):
    from clipfeat.llava import PrecomputedVisionTower

    make_store(tmp_path, feature="cls_patch", tokens=TOKENS + 1)
    tower = PrecomputedVisionTower(tmp_path, expect_feature="cls_patch")
    assert tower.num_patches == 4  # like CLIPVisionTower: patches, not tokens
    assert tower(torch.zeros(2, TOKENS + 1, HIDDEN)).shape == (2, TOKENS + 1, HIDDEN)


# ----------------------------------------------------------------------------- dataset


def llava_samples(keys: list[str]) -> list[dict]:
    return [
        {"id": "a", "image": keys[0], "conversations": [{"from": "human", "value": "<image>\nHi"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "text only"}]},
        {"id": "c", "image": [keys[1], keys[4]], "conversations": []},
        {"id": "d", "image": keys[0], "conversations": []},  # the same image again
    ]


@pytest.mark.parametrize("form", ["json", "jsonl", "list"])
def test_dataset_yields_features(tmp_path, form):
    from clipfeat.llava import LlavaFeatureDataset

    out = tmp_path / "out"
    keys = make_store(out)
    rows = read_rows(out)
    samples = llava_samples(keys)
    if form == "json":
        data = tmp_path / "llava.json"
        data.write_text(json.dumps(samples))
    elif form == "jsonl":
        data = tmp_path / "llava.jsonl"
        data.write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    else:
        data = samples
    ds = LlavaFeatureDataset(str(data) if form != "list" else data, out)
    assert len(ds) == 4
    first = ds[0]
    assert first["id"] == "a" and first["conversations"] == samples[0]["conversations"]
    assert first["image_features"].shape == (TOKENS, HIDDEN)
    np.testing.assert_array_equal(first["image_features"].numpy(), rows[keys[0]])
    assert ds[1]["image_features"] is None
    multi = ds[2]["image_features"]
    assert isinstance(multi, list) and len(multi) == 2
    np.testing.assert_array_equal(multi[1].numpy(), rows[keys[4]])
    np.testing.assert_array_equal(ds[3]["image_features"].numpy(), rows[keys[0]])
    assert ds.keys_needed() == [keys[0], keys[1], keys[4]]
    assert ds.missing_keys() == []


def test_dataset_missing_key_is_named(store_dir):
    from clipfeat.llava import LlavaFeatureDataset

    ds = LlavaFeatureDataset([{"id": "x1", "image": "coco/missing.jpg"}], store_dir)
    with pytest.raises(KeyError) as exc:
        ds[0]
    assert "coco/missing.jpg" in str(exc.value) and "x1" in str(exc.value)
    assert ds.missing_keys() == ["coco/missing.jpg"]


def test_dataset_in_dataloader_workers(tmp_path):
    from clipfeat.llava import LlavaFeatureDataset, PrecomputedVisionTower

    out = tmp_path / "out"
    keys = make_store(out)
    rows = read_rows(out)
    samples = [{"id": str(i), "image": k} for i, k in enumerate(keys)] * 2
    ds = LlavaFeatureDataset(samples, out)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=3, num_workers=2, multiprocessing_context="fork",
        collate_fn=lambda b: torch.stack([s["image_features"] for s in b]),
    )
    got = torch.cat(list(loader))
    want = np.stack([rows[s["image"]] for s in samples])
    np.testing.assert_array_equal(got.numpy(), want)
    # what LLaVA's encode_images does with the batch: tower output feeds the projector
    tower = PrecomputedVisionTower(out).to(torch.float32)
    projector = torch.nn.Linear(HIDDEN, 3)
    assert projector(tower(got)).shape == (len(samples), TOKENS, 3)


# ----------------------------------------------------------------------------- several outputs

CLIP_OUT, SIGLIP_OUT = (o.name for o in MULTI_OUTPUTS)


@pytest.fixture
def multi_dir(tmp_path):
    return tmp_path, multi_output_store(tmp_path, rows=(3, 2))


def test_tower_over_one_output_of_several(multi_dir):
    from clipfeat.llava import PrecomputedVisionTower

    out, want = multi_dir
    tower = PrecomputedVisionTower(out, SIGLIP_OUT, expect_layer="mean(0:2)",
                                   expect_feature="patch", expect_aspect="pad",
                                   expect_model="/ckpt/tiny-siglip")
    assert tower.output == SIGLIP_OUT and tower.hidden_size == 6 and tower.tokens == 9
    assert tower.config.image_size == 30 and tower.num_patches == 9  # 30 px / 10 px patches
    assert tower.select_layer == "mean(0:2)" and tower.vision_tower_name == "/ckpt/tiny-siglip"
    key = next(iter(want[SIGLIP_OUT]))
    np.testing.assert_array_equal(tower.lookup(key).numpy(), want[SIGLIP_OUT][key])
    clip = PrecomputedVisionTower(FeatureStore(out), output=CLIP_OUT, expect_layer=-2)
    assert clip.hidden_size == 8 and clip.num_patches == 4 and "output='tiny-clip/-2'" in repr(
        clip)
    PrecomputedVisionTower(out, CLIP_OUT, expect_layer=2)  # its resolved hidden_states index
    assert pickle.loads(pickle.dumps(clip)).hidden_size == 8


@pytest.mark.parametrize("output, kwargs, needles", [
    (CLIP_OUT, dict(expect_layer=-1), ["output tiny-clip/-2", "layer -2", "--layer -1"]),
    (SIGLIP_OUT, dict(expect_layer=-2), ["layer mean(0:2)", "[0, 1]", "--layer -2"]),
    (SIGLIP_OUT, dict(expect_layer="mean(0:3)"), ["mean(0:2)", "mean(0:3)"]),
    (CLIP_OUT, dict(expect_feature="cls_patch"), ["'patch'", "'cls_patch'"]),
    (CLIP_OUT, dict(expect_model="/ckpt/tiny-siglip"), ["'/ckpt/tiny-clip'"]),
    (SIGLIP_OUT, dict(expect_aspect="square"), ["'pad'", "'square'"]),
])
def test_tower_checks_the_chosen_outputs_metadata(multi_dir, output, kwargs, needles):
    from clipfeat.llava import PrecomputedVisionTower

    with pytest.raises(StoreError) as exc:
        PrecomputedVisionTower(multi_dir[0], output, **kwargs)
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)


def test_several_outputs_need_a_choice(multi_dir, monkeypatch):
    from clipfeat.llava import OUTPUT_ENV, STORE_ENV, PrecomputedVisionTower, load_features

    out, want = multi_dir
    for make in (lambda: PrecomputedVisionTower(out),
                 lambda: load_features({"image": "m0/0.jpg"}, store=out)):
        with pytest.raises(StoreError, match="CLIPFEAT_OUTPUT") as exc:
            make()
        assert f"'{CLIP_OUT}', '{SIGLIP_OUT}'" in str(exc.value)
    with pytest.raises(ConfigError, match="tiny-clip/-3"):
        PrecomputedVisionTower(out, "tiny-clip/-3")
    monkeypatch.setenv(STORE_ENV, str(out))
    monkeypatch.setenv(OUTPUT_ENV, SIGLIP_OUT)
    got = load_features({"image": "m1/1.jpg"}, SimpleNamespace(image_aspect_ratio="pad"))
    np.testing.assert_array_equal(got.numpy(), want[SIGLIP_OUT]["m1/1.jpg"])
    assert load_features({"id": "text only"}).shape == (9, 6)
    clip = load_features("m0/2.jpg", output=CLIP_OUT)  # the argument wins over the env
    np.testing.assert_array_equal(clip.numpy(), want[CLIP_OUT]["m0/2.jpg"])


def test_precomputed_vision_tower_takes_the_output(multi_dir, monkeypatch):
    from clipfeat.llava import OUTPUT_ENV, STORE_ENV, precomputed_vision_tower

    out, _ = multi_dir
    cfg = SimpleNamespace(mm_vision_tower="/ckpt/tiny-clip", mm_vision_select_layer=-2,
                          mm_vision_select_feature="patch")
    monkeypatch.setenv(STORE_ENV, str(out))
    with pytest.raises(StoreError, match=OUTPUT_ENV):
        precomputed_vision_tower(cfg)
    monkeypatch.setenv(OUTPUT_ENV, CLIP_OUT)
    assert precomputed_vision_tower(cfg, delay_load=True).hidden_size == 8
    with pytest.raises(StoreError, match="mm_vision_tower"):
        precomputed_vision_tower(cfg, output=SIGLIP_OUT)


def test_dataset_over_several_outputs(multi_dir):
    from clipfeat.llava import LlavaFeatureDataset

    out, want = multi_dir
    samples = [{"id": "a", "image": "m0/1.jpg"}, {"id": "b", "image": ["m1/0.jpg", "m0/0.jpg"]}]
    both = LlavaFeatureDataset(samples, out)[0]["image_features"]
    assert sorted(both) == sorted(want)
    np.testing.assert_array_equal(both[SIGLIP_OUT].numpy(), want[SIGLIP_OUT]["m0/1.jpg"])
    one = LlavaFeatureDataset(samples, out, output=CLIP_OUT)[1]["image_features"]
    np.testing.assert_array_equal(one[0].numpy(), want[CLIP_OUT]["m1/0.jpg"])
