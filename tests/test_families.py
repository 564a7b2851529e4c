"""Tower families (clipfeat.families): every output of one forward against transformers' own
hidden_states, preprocessing against each checkpoint's own PIL processor, token layouts, the
model types accepted and refused.

Expected values come from transformers (the full, untruncated vision model and the processor
AutoImageProcessor picks), through `llava_reference`."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import imagegen
import pytest
import torch
from llava_reference import LlavaReference, auto_processor, processor_class
from PIL import Image

from clipfeat import families
from clipfeat.errors import ConfigError, ModelError
from clipfeat.info import describe_model, format_model
from clipfeat.modelref import resolve_model
from clipfeat.outputs import LayerSel
from clipfeat.preprocess import Normalizer, PreprocessSpec, to_uint8
from clipfeat.tower import CLIPVisionTower, load_tower, tokens_per_image

L = 3  # TINY_VISION num_hidden_layers (clipfeat.testing)

# fixture -> (family, registers)
TOWERS = {
    "clip_full_dir": ("clip", 0),
    "clip_vision_dir": ("clip", 0),
    "siglip_dir": ("siglip", 0),
    "siglip2_dir": ("siglip", 0),
    "dinov2_dir": ("dinov2", 0),
    "dinov2_reg_dir": ("dinov2", 4),
}
CASES = [(f, feat) for f, (fam, _) in TOWERS.items()
         for feat in (("patch", "cls_patch") if fam != "siglip" else ("patch",))]

# selections with what each reads, as a slice of the L+1 hidden states (independent of
# LayerSel.indices): (spelling, slice, mean)
DEEP = [("-2", slice(2, 3), False), ("0", slice(0, 1), False), ("mean(0:2)", slice(0, 2), True),
        ("3", slice(3, 4), False), ("mean(1:)", slice(1, None), True)]
SHALLOW = [("1", slice(1, 2), False), ("mean(0:2)", slice(0, 2), True)]

SIZES = [(37, 23), (23, 41), (30, 30), (61, 17)]


def _images() -> list[Image.Image]:
    return [Image.fromarray(imagegen.photo_array(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def reference(request):
    """Per checkpoint: its LlavaReference, the processor's pixels of the test images (both
    aspects, one batch) and the full model's hidden_states of that batch."""
    cache: dict[str, tuple] = {}

    def get(fixture: str):
        if fixture not in cache:
            llava = LlavaReference(request.getfixturevalue(fixture))
            pixels = torch.stack([llava.pixels(img, aspect) for aspect in ("square", "pad")
                                  for img in _images()])
            cache[fixture] = (llava, pixels, llava.hidden_states(pixels))
        return cache[fixture]

    return get


def _expected(llava, hidden, feature, how, mean):
    states = hidden[how]
    if mean:
        return llava.select(torch.stack(states).float().mean(0), feature)
    return llava.select(states[0], feature)


@pytest.mark.parametrize("fixture, feature", CASES)
@pytest.mark.parametrize("plan", [DEEP, SHALLOW], ids=["deep", "shallow"])
def test_forward_outputs_equal_transformers_hidden_states(request, reference, fixture, feature,
                                                          plan):
    path = request.getfixturevalue(fixture)
    llava, pixels, hidden = reference(fixture)
    assert len(hidden) == L + 1
    tower = load_tower(str(path), layers=[LayerSel.parse(s) for s, _, _ in plan],
                       feature=feature)
    deepest = max(range(L + 1)[how][-1] for _, how, _ in plan)
    assert tower.num_layers_kept == deepest  # the blocks past the deepest one are dropped
    outs = tower.forward_outputs(pixels)
    assert len(outs) == len(plan)
    for out, (spelling, how, mean) in zip(outs, plan, strict=True):
        expected = _expected(llava, hidden, feature, how, mean)
        assert out.shape == expected.shape == (len(pixels), tower.num_tokens, tower.hidden_size)
        assert out.dtype == torch.float32
        if mean:
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, msg=spelling)
        else:
            assert torch.equal(out, expected), spelling
    # forward_features: the first selection, as before
    first = _expected(llava, hidden, feature, plan[0][1], plan[0][2])
    assert torch.equal(tower.forward_features(pixels), first)


@pytest.mark.parametrize("fixture", ["clip_vision_dir", "siglip2_dir", "dinov2_reg_dir"])
def test_low_precision_tower_single_layers_in_its_dtype_means_in_float32(request, reference,
                                                                         fixture):
    path = request.getfixturevalue(fixture)
    llava, pixels, _ = reference(fixture)
    tower = load_tower(str(path), layers=["-2", "mean(0:3)"], dtype="bfloat16")
    low = pixels.to(torch.bfloat16)
    single, mean = tower.forward_outputs(low)
    ref16 = LlavaReference(path, dtype=torch.bfloat16)
    hidden = ref16.hidden_states(low)
    assert single.dtype == torch.bfloat16 and mean.dtype == torch.float32
    assert torch.equal(single, llava.select(hidden[-2]))
    expected = llava.select(torch.stack([h.float() for h in hidden[0:3]]).mean(0))
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fixture, feature", CASES)
def test_preprocessing_equals_the_checkpoint_processor(request, reference, fixture, feature):
    """Our uint8 + normalisation equal the processor AutoImageProcessor (PIL) picks, for odd
    sizes and both aspects; and the tokens per image are what the model returns."""
    path = request.getfixturevalue(fixture)
    llava, pixels, hidden = reference(fixture)
    ref = resolve_model(str(path))
    proc = auto_processor(path)
    assert type(proc) is processor_class(ref.family) is families.processor_class(ref.family)
    spec = PreprocessSpec.from_processor_config(ref.preprocessor_config, family=ref.family,
                                                image_size=ref.image_size)
    assert spec == PreprocessSpec.from_processor(proc)
    assert spec.pad_color == llava.pad_color
    assert (spec.out_height, spec.out_width) == (ref.image_size, ref.image_size)
    norm = Normalizer(spec)
    ours = torch.stack([norm(torch.from_numpy(to_uint8(img, spec, aspect))[None])[0]
                        for aspect in ("square", "pad") for img in _images()])
    assert torch.equal(ours, pixels)
    assert tokens_per_image(ref, feature) == llava.select(hidden[-1], feature).shape[1]


@pytest.mark.parametrize("fixture, patches, registers", [
    ("dinov2_dir", 9, 0), ("dinov2_reg_dir", 9, 4), ("siglip2_dir", 16, 0),
    ("clip_full_dir", 25, 0)])
def test_geometry_and_token_counts(request, fixture, patches, registers):
    path = request.getfixturevalue(fixture)
    ref = resolve_model(str(path))
    raw = json.loads((path / "config.json").read_text())
    expected = type(ref.vision_config).from_pretrained(path)
    assert ref.vision_config.to_dict() == expected.to_dict()
    assert ref.config_image_size == expected.image_size
    assert ref.num_patches == patches and ref.num_registers == registers
    assert ref.has_cls_token is (ref.family != "siglip")
    assert tokens_per_image(ref, "patch") == patches
    if ref.has_cls_token:
        assert tokens_per_image(ref, "cls_patch") == patches + 1
    if ref.family == "dinov2":
        # fed the processor's crop (21 px), not config.json's 28 (its position embeddings)
        assert raw["image_size"] == 28 and ref.image_size == 21
        assert ref.model_type == ("dinov2_with_registers" if registers else "dinov2")


def test_siglip2_fixed_resolution_checkpoint_loads_as_siglip(siglip2_dir, reference):
    ref = resolve_model(str(siglip2_dir), need_weights=True)
    assert (ref.model_type, ref.family, ref.is_full_checkpoint) == ("siglip", "siglip", True)
    assert ref.preprocessor_config["resample"] == 2  # bilinear, as the SigLIP2 conversion sets
    llava, pixels, hidden = reference("siglip2_dir")
    tower = CLIPVisionTower(str(siglip2_dir), SimpleNamespace(mm_vision_select_layer=-2))
    assert torch.equal(tower(pixels), hidden[-2])
    with pytest.raises(ConfigError, match="cls_patch"):
        load_tower(str(siglip2_dir), layers=["-2"], feature="cls_patch")


@pytest.mark.parametrize("config_cls", ["Siglip2Config", "Siglip2VisionConfig"])
def test_siglip2_naflex_is_refused_with_the_reason(tmp_path, config_cls):
    import transformers

    cls = getattr(transformers, config_cls, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls} (4.49+)")
    cls().save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        resolve_model(str(tmp_path))
    text = str(err.value)
    assert "NaFlex" in text and "not support" in text
    assert "model_type 'siglip'" in text  # the supported fixed-resolution ones
    with pytest.raises(ModelError, match="NaFlex"):
        CLIPVisionTower(str(tmp_path), SimpleNamespace(mm_vision_select_layer=-2))


def test_token_layout():
    """``patch`` drops CLS and registers; ``cls_patch`` keeps CLS, drops registers."""
    hidden = torch.arange(7.0).view(1, 7, 1)  # CLS, 2 registers, 4 patches (DINOv2-reg)
    tokens = {
        ("dinov2", 2, "patch"): [3, 4, 5, 6], ("dinov2", 2, "cls_patch"): [0, 3, 4, 5, 6],
        ("dinov2", 0, "patch"): [1, 2, 3, 4, 5, 6], ("dinov2", 0, "cls_patch"): list(range(7)),
        ("clip", 0, "patch"): [1, 2, 3, 4, 5, 6], ("clip", 0, "cls_patch"): list(range(7)),
        ("siglip", 0, "patch"): list(range(7)),
    }
    for (family, registers, feature), expected in tokens.items():
        ref = SimpleNamespace(family=family, num_registers=registers)
        got = families.select_tokens(hidden, feature, ref)
        assert got.flatten().tolist() == expected, (family, registers, feature)
    with pytest.raises(ConfigError, match="cls_patch"):
        families.select_tokens(hidden, "cls_patch", SimpleNamespace(family="siglip"))


def test_layers_reading_the_same_states_or_out_of_range_are_refused(dinov2_dir):
    with pytest.raises(ConfigError, match="same hidden state"):
        load_tower(str(dinov2_dir), layers=["-2", "2"])
    with pytest.raises(ConfigError, match="out of range"):
        load_tower(str(dinov2_dir), layers=["mean(0:9)"])


@pytest.mark.parametrize("model_type, extra", [
    ("Dinov2", {}), ("Dinov2", {"use_swiglu_ffn": True}), ("Dinov2", {"use_mask_token": False}),
    ("Dinov2", {"qkv_bias": False, "mlp_ratio": 3}),
    ("Dinov2WithRegisters", {}), ("Dinov2WithRegisters", {"num_register_tokens": 1,
                                                          "use_swiglu_ffn": True}),
])
def test_dinov2_parameter_count_matches_transformers(tmp_path, model_type, extra):
    """The config formula (held against the weights) counts what transformers builds."""
    import transformers

    sizes = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, image_size=42,
                 patch_size=7)
    config = getattr(transformers, f"{model_type}Config")(**dict(sizes, **extra))
    model = getattr(transformers, f"{model_type}Model")(config)
    if extra.get("use_mask_token") is False and model.embeddings.mask_token is not None:
        pytest.skip(f"transformers {transformers.__version__} always builds the mask token")
    config.save_pretrained(tmp_path)
    ref = resolve_model(str(tmp_path))
    assert ref.vision_parameters == sum(p.numel() for p in model.parameters())


def test_dinov2_config_that_does_not_fit_the_weights(tmp_path, dinov2_reg_dir):
    folder = tmp_path / "model"
    shutil.copytree(dinov2_reg_dir, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["num_register_tokens"] = 5
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="num_register_tokens 5.* does not belong"):
        resolve_model(str(folder), need_weights=True)


def test_dinov2_classifier_checkpoint_loads_its_backbone(tmp_path, reference):
    """A Dinov2ForImageClassification checkpoint keeps the backbone under ``dinov2.``."""
    import transformers

    from clipfeat.testing import save_tiny_dinov2

    src = save_tiny_dinov2(tmp_path / "backbone")
    config = transformers.Dinov2Config.from_pretrained(src)
    config.num_labels = 3
    classifier = transformers.Dinov2ForImageClassification(config)
    classifier.dinov2.load_state_dict(transformers.Dinov2Model.from_pretrained(src).state_dict())
    folder = tmp_path / "classifier"
    classifier.save_pretrained(folder)
    shutil.copy(src / "preprocessor_config.json", folder)
    llava = LlavaReference(src)
    x = torch.randn(2, 3, *llava.input_size, generator=torch.Generator().manual_seed(3))
    tower = load_tower(str(folder), layers=["-1"])
    assert torch.equal(tower.forward_outputs(x)[0], llava.select(llava.hidden_states(x)[-1]))


def test_dinov2_without_preprocessor_config_uses_its_recipe(tmp_path, dinov2_dir, caplog):
    folder = tmp_path / "noproc"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(dinov2_dir / name, folder / name)
    ref = resolve_model(str(folder))
    assert ref.image_size == families.DINOV2_CROP == 224
    with caplog.at_level("WARNING", logger="clipfeat.tower"):
        tower = CLIPVisionTower(str(folder), SimpleNamespace(mm_vision_select_layer=-2))
        proc = tower.image_processor
    assert "no preprocessor_config.json" in caplog.text
    assert type(proc) is processor_class("dinov2")
    spec = PreprocessSpec.from_processor_config(None, family="dinov2", image_size=224)
    assert spec == PreprocessSpec.from_processor(proc)
    assert (spec.shortest_edge, spec.crop_height, spec.mean) == (256, 224, (0.485, 0.456, 0.406))
    assert spec.pad_color == (123, 116, 103)


def test_dinov2_missing_keys_take_bitimageprocessor_defaults():
    """As transformers: keys absent from preprocessor_config.json take the class defaults
    (BitImageProcessor's are CLIP's: shortest edge 224, OpenAI mean/std)."""
    cls = processor_class("dinov2")
    assert PreprocessSpec.from_processor_config({}, family="dinov2", image_size=224) == \
        PreprocessSpec.from_processor(cls())
    partial = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}
    assert PreprocessSpec.from_processor_config(partial, family="dinov2", image_size=32) == \
        PreprocessSpec.from_processor(cls(**partial))


def test_info_describes_dinov2_with_registers(dinov2_reg_dir):
    d = describe_model(str(dinov2_reg_dir), feature="cls_patch", images=10)
    assert (d["family"], d["model_type"]) == ("dinov2", "dinov2_with_registers")
    assert (d["image_size"], d["num_patches"], d["num_registers"]) == (21, 9, 4)
    assert d["tokens_per_image"] == 10 and d["feature_shape"] == [10, 32]
    assert d["preprocessing"]["crop"] == {"height": 21, "width": 21}
    assert d["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert not d["warnings"]
    text = format_model(d)
    assert "4 registers" in text and "registers dropped" in text
    assert "DINOv2 vision tower with registers" in text
    patch = format_model(describe_model(str(dinov2_reg_dir)))
    assert "9 tokens, CLS and registers dropped" in patch


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model family 'vit'"):
        PreprocessSpec.from_processor_config(None, family="vit", image_size=224)


def test_every_model_type_names_its_transformers_classes():
    import transformers

    for info in families.MODEL_TYPES.values():
        assert families.model_class(info) is getattr(transformers, info.model_class)
        vision_type = info.name + "_vision_model" if info.full else info.name
        assert families.config_class(info).model_type == vision_type
