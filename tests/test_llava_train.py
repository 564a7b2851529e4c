"""docs/reading.md's LLaVA steps, run through a minimal copy of LLaVA's training code.

``llava_train_copy`` restates (it is not LLaVA's code) the behaviour of LLaVA-1.5's
``ModelArguments``/``DataArguments``/``TrainingArguments`` under ``HfArgumentParser``,
``build_vision_tower``, ``LlavaMetaModel.__init__`` and ``initialize_vision_modules``,
``train()``'s order of setting the config, ``LazySupervisedDataset.__getitem__``'s image and
text-only branches, ``DataCollatorForSupervisedDataset``'s ``images`` stacking, and
``encode_images``/``prepare_inputs_labels_for_multimodal``; its docstring lists what each
does. The user's edits in it are the lines the docs show; a test checks they match.
"""

from __future__ import annotations

import json
from dataclasses import field, make_dataclass
from pathlib import Path

import llava_train_copy as llava
import numpy as np
import pytest
import torch
import transformers
from stores import Shard, build_store, read_rows

from clipfeat.errors import ConfigError, StoreError

TOKENS, HIDDEN = 4, 8
MODEL = "openai/clip-vit-large-patch14-336"
KEYS = ["coco/train2017/000000000009.jpg", "gqa/images/2354786.jpg", "vg/VG_100K/10.jpg"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "reading.md"


def make_store(out: Path, aspect: str) -> dict[str, np.ndarray]:
    meta = {"model": MODEL, "layer": -2, "layer_index": 23, "feature": "patch",
            "aspect": aspect, "image_size": 28, "patch_size": 14, "hidden_size": HIDDEN,
            "tokens": TOKENS, "store_dtype": "float16", "compute_dtype": "float16",
            "model_type": "clip"}
    rng = np.random.default_rng(1)
    build_store(out, [Shard(KEYS, rng.standard_normal((len(KEYS), TOKENS, HIDDEN)))],
                meta=meta, plan={})
    return read_rows(out)


SAMPLES = [
    {"id": "a", "image": KEYS[0], "conversations": [{"from": "human", "value": "<image>\nHi"}]},
    {"id": "t", "conversations": [{"from": "human", "value": "text only"}]},
    {"id": "b", "image": KEYS[2], "conversations": []},
    {"id": "u", "conversations": []},
]


def argv(out, *extra):
    """LLaVA-1.5's finetune.sh arguments that matter here."""
    return ["--model_name_or_path", "lmsys/vicuna-7b-v1.5", "--version", "v1",
            "--vision_tower", MODEL, "--mm_vision_select_layer", "-2",
            "--mm_projector_type", "linear", "--data_path", "llava.json",
            "--image_folder", "./playground/data", "--bf16", "True",
            "--output_dir", str(out), *extra]


@pytest.fixture
def pad_store(tmp_path, monkeypatch):
    rows = make_store(tmp_path / "feats", "pad")
    monkeypatch.setenv("CLIPFEAT_STORE", str(tmp_path / "feats"))
    return rows


def test_llava_arguments_parse_unchanged(tmp_path):
    parser = transformers.HfArgumentParser(
        (llava.ModelArguments, llava.DataArguments, llava.TrainingArguments))
    m, d, t = parser.parse_args_into_dataclasses(
        args=argv(tmp_path, "--image_aspect_ratio", "pad"))
    assert (m.vision_tower, m.mm_vision_select_layer, d.image_aspect_ratio) == (MODEL, -2, "pad")
    # why no dataclass field: the same field in two of them cannot be parsed at all
    model_args = make_dataclass("M", [("clipfeat_store", str, field(default=None))],
                                bases=(llava.ModelArguments,))
    data_args = make_dataclass("D", [("clipfeat_store", str, field(default=None))],
                               bases=(llava.DataArguments,))
    with pytest.raises(Exception, match="conflicting option string"):
        transformers.HfArgumentParser((model_args, data_args, llava.TrainingArguments))


@pytest.mark.parametrize("workers", [0, 2])
def test_pad_run_refuses_square_store(tmp_path, monkeypatch, workers):
    make_store(tmp_path / "feats", "square")
    monkeypatch.setenv("CLIPFEAT_STORE", str(tmp_path / "feats"))
    with pytest.raises(StoreError) as exc:
        llava.train(argv(tmp_path / "out", "--image_aspect_ratio", "pad",
                         "--dataloader_num_workers", str(workers)), SAMPLES)
    assert "'square'" in str(exc.value) and "'pad'" in str(exc.value)


def test_square_run_refuses_pad_store(tmp_path, pad_store):
    # pretraining (no --image_aspect_ratio: LLaVA's default 'square') on a fine-tuning store
    with pytest.raises(StoreError, match="'pad'"):
        llava.train(argv(tmp_path / "out"), SAMPLES[1:2])  # a text-only sample opens it too


def test_pad_run_trains_on_store_rows_and_text_only_placeholders(tmp_path, pad_store):
    from clipfeat.llava import PrecomputedVisionTower

    model, batches, embeds = llava.train(argv(tmp_path / "out", "--image_aspect_ratio", "pad"),
                                         SAMPLES)
    tower = model.get_vision_tower()
    assert isinstance(tower, PrecomputedVisionTower) and tower.dtype == torch.bfloat16
    assert model.config.mm_hidden_size == HIDDEN
    (batch,) = batches
    images = batch["images"]  # text-only placeholders have the store's shape: one stack
    assert isinstance(images, torch.Tensor) and images.shape == (4, TOKENS, HIDDEN)
    assert images.dtype == torch.float16
    np.testing.assert_array_equal(images[0].numpy(), pad_store[KEYS[0]])
    np.testing.assert_array_equal(images[2].numpy(), pad_store[KEYS[2]])
    assert not images[1].any() and not images[3].any()
    # what encode_images feeds the projector is the store's rows, in the model's dtype
    want = torch.from_numpy(np.stack([pad_store[KEYS[0]], pad_store[KEYS[2]]]))
    assert torch.equal(tower(images)[[0, 2]], want.to(torch.bfloat16))
    # image samples get TOKENS embeddings in place of the image token, text-only ones none
    width = batch["input_ids"].shape[1]  # padded; LLaVA drops the padding, the copy does not
    assert [len(e) for e in embeds[0]] == [width - 1 + TOKENS, width] * 2
    with torch.no_grad():
        projected = model.mm_projector(want[0].to(torch.bfloat16))
    assert torch.equal(embeds[0][0][1:1 + TOKENS], projected)


def test_llava_default_layer_is_refused(tmp_path, pad_store):
    # ModelArguments' default mm_vision_select_layer is -1; LLaVA-1.5 passes -2
    args = [a for a in argv(tmp_path / "out") if a not in ("--mm_vision_select_layer", "-2")]
    with pytest.raises(StoreError, match="--layer -1"):
        llava.train(args + ["--image_aspect_ratio", "pad"], SAMPLES)


def test_resume_from_saved_config_builds_store_tower(tmp_path, pad_store, monkeypatch):
    from clipfeat.llava import PrecomputedVisionTower

    first = tmp_path / "stage1"
    llava.train(argv(first, "--image_aspect_ratio", "pad"), SAMPLES)
    saved = json.loads((first / "config.json").read_text())
    assert saved["mm_vision_tower"] == MODEL and "clipfeat_store" not in saved

    calls = []
    real = llava.build_vision_tower
    monkeypatch.setattr(llava, "build_vision_tower",
                        lambda cfg, **kw: calls.append(kw) or real(cfg, **kw))
    args = argv(tmp_path / "stage2", "--image_aspect_ratio", "pad")
    args[args.index("lmsys/vicuna-7b-v1.5")] = str(first)
    model, batches, _ = llava.train(args, SAMPLES)
    assert calls == [{"delay_load": True}]  # only LlavaMetaModel.__init__ built a tower
    assert isinstance(model.get_vision_tower(), PrecomputedVisionTower)
    np.testing.assert_array_equal(batches[0]["images"][2].numpy(), pad_store[KEYS[2]])

    # the same checkpoint without CLIPFEAT_STORE: LLaVA's own tower, as for inference
    monkeypatch.delenv("CLIPFEAT_STORE")
    model = llava.LlavaModel.from_pretrained(first)
    assert isinstance(model.get_vision_tower(), llava.CLIPVisionTowerStandIn)
    assert model.get_vision_tower().delay_load


def test_continue_from_llava_checkpoint(tmp_path, monkeypatch):
    """A released LLaVA checkpoint's config (stale image_aspect_ratio 'pad', no clipfeat
    field) continued as a square run on a square store: the store tower, not refused."""
    from clipfeat.llava import PrecomputedVisionTower

    ckpt = tmp_path / "llava-v1.5-7b"
    config = transformers.PretrainedConfig(hidden_size=16)
    for k, v in dict(mm_vision_tower=MODEL, mm_vision_select_layer=-2, mm_hidden_size=HIDDEN,
                     mm_vision_select_feature="patch", image_aspect_ratio="pad",
                     mm_projector_type="linear").items():
        setattr(config, k, v)
    config.save_pretrained(ckpt)
    make_store(tmp_path / "square", "square")
    monkeypatch.setenv("CLIPFEAT_STORE", str(tmp_path / "square"))
    args = argv(tmp_path / "out")
    args[args.index("lmsys/vicuna-7b-v1.5")] = str(ckpt)
    model, batches, _ = llava.train(args, SAMPLES[:2])
    assert isinstance(model.get_vision_tower(), PrecomputedVisionTower)
    assert model.config.image_aspect_ratio == "square"


def test_without_store_llava_builds_its_own_tower(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPFEAT_STORE", raising=False)
    cfg = llava.ModelArguments(vision_tower=MODEL, mm_vision_select_layer=-2)
    assert isinstance(llava.build_vision_tower(cfg), llava.CLIPVisionTowerStandIn)


def test_s2_is_refused(pad_store):
    cfg = llava.ModelArguments(vision_tower=MODEL, mm_vision_select_layer=-2)
    cfg.s2 = True
    with pytest.raises(ConfigError, match="s2"):
        llava.build_vision_tower(cfg)


def test_load_features_errors(tmp_path, pad_store, monkeypatch):
    from clipfeat.llava import load_features

    with pytest.raises(KeyError, match="coco/missing.jpg.*'x1'"):
        load_features({"id": "x1", "image": "coco/missing.jpg"})
    with pytest.raises(ConfigError, match="one image string"):
        load_features({"image": [KEYS[0], KEYS[1]]})
    assert load_features(KEYS[1]).shape == (TOKENS, HIDDEN)  # a bare key works too
    monkeypatch.delenv("CLIPFEAT_STORE")
    with pytest.raises(ConfigError, match="CLIPFEAT_STORE"):
        load_features({"image": KEYS[0]})
    explicit = load_features({"image": KEYS[0]}, store=tmp_path / "feats")
    np.testing.assert_array_equal(explicit.numpy(), pad_store[KEYS[0]])


def test_docs_show_each_edit():
    """Every user edit the copy runs (lines marked ``# clipfeat``) is in docs/reading.md."""
    docs = {line.strip() for line in DOCS.read_text(encoding="utf-8").splitlines()}
    source = Path(llava.__file__).read_text(encoding="utf-8").splitlines()
    edits = [line.strip() for line in source if line.rstrip().endswith("# clipfeat")]
    assert len(edits) == 7
    missing = [e for e in edits if e not in docs]
    assert not missing, f"edits run by the tests but not shown in docs/reading.md: {missing}"
