"""CLIPVisionTower against transformers' own hidden_states, LLaVA semantics, loading errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from llava_reference import LlavaReference

from clipfeat.errors import ConfigError, ModelError
from clipfeat.tower import CLIPVisionTower, build_vision_tower

L = 3  # TINY_VISION num_hidden_layers (clipfeat.testing)
ALL_LAYERS = list(range(-(L + 1), L + 1))
CASES = (
    [("clip_full_dir", f) for f in ("patch", "cls_patch")]
    + [("clip_vision_dir", f) for f in ("patch", "cls_patch")]
    + [("siglip_dir", "patch"), ("siglip2_dir", "patch")]
    + [("dinov2_dir", f) for f in ("patch", "cls_patch")]
    + [("dinov2_reg_dir", f) for f in ("patch", "cls_patch")]
)


def _args(layer: int = -2, feature: str | None = "patch") -> SimpleNamespace:
    if feature is None:
        return SimpleNamespace(mm_vision_select_layer=layer)
    return SimpleNamespace(mm_vision_select_layer=layer, mm_vision_select_feature=feature)


def _reference(path: Path):
    """transformers' own vision model and its hidden_states for a fixed batch of the size its
    processor makes (independent)."""
    llava = LlavaReference(path)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, *llava.input_size, generator=gen)
    return llava, llava.model, x, llava.hidden_states(x)


@pytest.fixture(scope="module")
def reference(request):
    cache: dict[str, tuple] = {}

    def get(fixture: str):
        if fixture not in cache:
            cache[fixture] = _reference(request.getfixturevalue(fixture))
        return cache[fixture]

    return get


@pytest.mark.parametrize("fixture, feature", CASES)
def test_every_layer_matches_transformers_hidden_states(request, reference, fixture, feature):
    path = request.getfixturevalue(fixture)
    llava, _, x, hidden = reference(fixture)
    assert len(hidden) == L + 1
    for layer in ALL_LAYERS:
        tower = CLIPVisionTower(str(path), _args(layer, feature))
        expected = llava.select(hidden[layer], feature)
        got = tower(x)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected), (fixture, layer, feature)
        # blocks after the selected layer are dropped, not just unused
        k = layer if layer >= 0 else L + 1 + layer
        assert tower.select_layer_index == k
        assert tower.select_layer == layer
        assert tower.num_layers_kept == k
        assert tower.num_tokens == got.shape[1]


@pytest.mark.parametrize("fixture", ["clip_full_dir", "siglip_dir", "dinov2_reg_dir"])
def test_feature_select_on_full_model_outputs(request, reference, fixture):
    """LLaVA's path: feature_select(vision_tower(x, output_hidden_states=True)) on a full model."""
    path = request.getfixturevalue(fixture)
    llava, model, x, hidden = reference(fixture)
    tower = CLIPVisionTower(str(path), _args(-2, "patch"))
    with torch.no_grad():
        outs = model(x, output_hidden_states=True)
    selected = tower.feature_select(outs)
    expected = llava.select(hidden[-2], "patch")
    assert torch.equal(selected, expected)
    assert torch.equal(tower(x), expected)


def test_siglip_patch_keeps_every_token(siglip_dir, reference):
    _, _, x, _ = reference("siglip_dir")
    tower = CLIPVisionTower(str(siglip_dir), _args(-2, "patch"))
    out = tower(x)
    assert tower.num_patches == (28 // 7) ** 2 == 16
    assert tower.num_tokens == tower.num_patches
    assert out.shape == (3, 16, 32)
    assert tower.has_cls_token is False and tower.family == "siglip"


def test_siglip_cls_patch_refused(siglip_dir):
    with pytest.raises(ConfigError, match="cls_patch"):
        CLIPVisionTower(str(siglip_dir), _args(-2, "cls_patch"), delay_load=True)


def test_default_feature_is_patch(clip_vision_dir, reference):
    _, _, x, hidden = reference("clip_vision_dir")
    tower = CLIPVisionTower(str(clip_vision_dir), _args(-2, feature=None))
    assert tower.select_feature == "patch"
    assert torch.equal(tower(x), hidden[-2][:, 1:])


def test_list_input_gives_one_tensor_per_image(clip_full_dir, reference):
    _, _, x, _ = reference("clip_full_dir")
    tower = CLIPVisionTower(str(clip_full_dir), _args(-2, "patch"))
    batch = tower(x)
    items = tower([img for img in x])
    assert isinstance(items, list) and len(items) == x.shape[0]
    for i, item in enumerate(items):
        assert item.shape == (1, tower.num_patches, tower.hidden_size)
        torch.testing.assert_close(item, batch[i : i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype_follows_input(clip_vision_dir, reference, dtype):
    _, model, x, _ = reference("clip_vision_dir")
    tower = CLIPVisionTower(str(clip_vision_dir), _args(-2, "patch"))
    low = x.to(dtype)
    out = tower(low)
    assert out.dtype == dtype
    # the tower runs in float32: same as transformers on the upcast input, cast back
    with torch.no_grad():
        expected = model(low.float(), output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.equal(out, expected.to(dtype))
    assert all(item.dtype == dtype for item in tower([img for img in low]))


def test_tower_dtype_option(clip_vision_dir, reference):
    _, model, x, _ = reference("clip_vision_dir")
    tower = CLIPVisionTower(str(clip_vision_dir), _args(-1, "cls_patch"), dtype="bfloat16")
    assert tower.dtype == torch.bfloat16
    assert tower.dummy_feature.dtype == torch.bfloat16
    out = tower(x)
    assert out.dtype == torch.float32  # cast back to the input's dtype
    ref16 = type(model).from_pretrained(clip_vision_dir).to(torch.bfloat16).eval()
    with torch.no_grad():
        expected = ref16(x.bfloat16(), output_hidden_states=True).hidden_states[-1]
    assert torch.equal(out, expected.float())


def test_forward_features_keeps_dtype_and_selects(clip_full_dir, reference):
    _, _, x, hidden = reference("clip_full_dir")
    tower = CLIPVisionTower(str(clip_full_dir), _args(0, "cls_patch"))
    out = tower.forward_features(x)
    assert torch.equal(out, hidden[0])  # layer 0: embeddings after pre_layrnorm, no block run
    assert tower.num_layers_kept == 0


def test_no_grad_anywhere(clip_vision_dir, reference):
    _, _, x, _ = reference("clip_vision_dir")
    tower = CLIPVisionTower(str(clip_vision_dir), _args(-2, "patch"))
    params = list(tower.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not tower.vision_tower.training
    out = tower(x.clone().requires_grad_(True))
    assert not out.requires_grad
    assert not tower.forward_features(x.clone().requires_grad_(True)).requires_grad


def test_state_dict_holds_only_kept_blocks(clip_full_dir):
    tower = CLIPVisionTower(str(clip_full_dir), _args(1, "patch"))
    keys = list(tower.state_dict())
    assert keys and all(k.startswith("vision_tower.") for k in keys)
    assert any("encoder.layers.0." in k for k in keys)
    assert not any("encoder.layers.1." in k or "encoder.layers.2." in k for k in keys)
    assert not any("text_model" in k for k in keys)


def test_properties(clip_full_dir):
    tower = CLIPVisionTower(str(clip_full_dir), _args(-2, "cls_patch"))
    assert tower.is_loaded
    assert tower.hidden_size == 32
    assert tower.num_patches_per_side == 5
    assert tower.num_patches == 25
    assert tower.num_tokens == 26
    assert tower.num_layers == L
    assert tower.has_cls_token and tower.family == "clip"
    assert tower.device == torch.device("cpu")
    assert tower.dtype == torch.float32
    assert tower.dummy_feature.shape == (1, 32)
    assert tower.config.num_hidden_layers == L
    assert tower.model_ref.model_type == "clip"
    assert tower.vision_tower_name == str(clip_full_dir)


def test_image_processor_is_the_checkpoint_pil_processor(clip_full_dir):
    import transformers

    tower = CLIPVisionTower(str(clip_full_dir), _args())
    proc = tower.image_processor
    if hasattr(transformers, "CLIPImageProcessorPil"):
        assert type(proc).__name__ == "CLIPImageProcessorPil"
    assert proc.crop_size == {"height": 30, "width": 30}
    assert dict(proc.size) == {"shortest_edge": 30}


def test_missing_preprocessor_config_uses_defaults(tmp_path, clip_vision_dir, caplog):
    folder = tmp_path / "noproc"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_vision_dir / name, folder / name)
    with caplog.at_level("WARNING", logger="clipfeat.tower"):
        tower = CLIPVisionTower(str(folder), _args())
        processor = tower.image_processor  # loaded on first use
    assert "no preprocessor_config.json" in caplog.text
    assert processor is tower.image_processor
    assert tower.image_processor.crop_size == {"height": 30, "width": 30}
    assert dict(tower.image_processor.size) == {"shortest_edge": 30}


def test_delay_load_reads_config_only(config_only_vitl336):
    from transformers import CLIPVisionConfig

    tower = CLIPVisionTower(str(config_only_vitl336), _args(-2, "patch"), delay_load=True)
    assert not tower.is_loaded
    assert isinstance(tower.config, CLIPVisionConfig)
    assert tower.config.num_hidden_layers == 24
    assert tower.hidden_size == 1024
    assert tower.num_patches_per_side == 24
    assert tower.num_patches == 576
    assert tower.num_tokens == 576
    assert tower.select_layer_index == 23
    assert list(tower.parameters()) == []
    with pytest.raises(RuntimeError, match="load_model"):
        tower(torch.zeros(1, 3, 336, 336))
    with pytest.raises(ModelError, match="no weights"):
        tower.load_model()


def test_delay_load_then_load(clip_vision_dir, reference):
    _, _, x, hidden = reference("clip_vision_dir")
    tower = CLIPVisionTower(str(clip_vision_dir), _args(2, "cls_patch"), delay_load=True)
    assert not tower.is_loaded and tower.vision_tower is None
    tower.load_model()
    assert tower.is_loaded
    assert torch.equal(tower(x), hidden[2])


def test_load_model_twice_does_not_reload(clip_vision_dir):
    tower = CLIPVisionTower(str(clip_vision_dir), _args())
    model = tower.vision_tower
    tower.load_model()
    tower.load_model()
    assert tower.vision_tower is model


@pytest.mark.parametrize("layer", [L + 1, -(L + 2), 100])
def test_invalid_layer(clip_vision_dir, layer):
    with pytest.raises(ConfigError) as err:
        CLIPVisionTower(str(clip_vision_dir), _args(layer), delay_load=True)
    assert isinstance(err.value, ValueError)
    assert str(layer) in str(err.value)
    assert f"{-(L + 1)}..{L}" in str(err.value)


def test_invalid_feature(clip_vision_dir):
    with pytest.raises(ConfigError) as err:
        CLIPVisionTower(str(clip_vision_dir), _args(-2, "cls"), delay_load=True)
    assert "'cls'" in str(err.value) and "cls_patch" in str(err.value)


def test_missing_select_layer(clip_vision_dir):
    with pytest.raises(ConfigError, match="mm_vision_select_layer"):
        CLIPVisionTower(str(clip_vision_dir), SimpleNamespace(), delay_load=True)


def test_bad_dtype(clip_vision_dir):
    with pytest.raises(ConfigError, match="int8"):
        CLIPVisionTower(str(clip_vision_dir), _args(), delay_load=True, dtype="int8")


def test_full_clip_load_is_quiet(clip_full_dir, capfd):
    import io
    import logging

    import transformers
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    hf_root = logging.getLogger("transformers")
    hf_root.addHandler(handler)
    try:
        # control: transformers itself reports the text weights when loading the vision half
        CLIPVisionModel.from_pretrained(clip_full_dir)
        control = log.getvalue() + "".join(capfd.readouterr())
        log.seek(0)
        log.truncate()

        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        tower = CLIPVisionTower(str(clip_full_dir), _args())
        ours = log.getvalue() + "".join(capfd.readouterr())
    finally:
        hf_root.removeHandler(handler)
    assert tower.is_loaded
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert "text_model" in control  # the wall we hide (4.x logs it at info level)
    assert "text_model" not in ours
    assert "UNEXPECTED" not in ours.upper()
    assert "Loading weights" not in ours
    # transformers' settings are restored afterwards
    assert hf_logging.get_verbosity() == verbosity
    assert hf_logging.is_progress_bar_enabled() == bars


def _pickle_folder(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    shutil.copy(src / "preprocessor_config.json", dst / "preprocessor_config.json")
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def test_pickle_only_refused_unless_allowed(tmp_path, clip_vision_dir, reference):
    _, _, x, hidden = reference("clip_vision_dir")
    folder = _pickle_folder(clip_vision_dir, tmp_path / "pickle")
    with pytest.raises(ModelError, match="--allow-pickle"):
        CLIPVisionTower(str(folder), _args())
    tower = CLIPVisionTower(str(folder), _args(), allow_pickle=True)
    assert tower.model_ref.weights_file.name == "pytorch_model.bin"
    assert torch.equal(tower(x), hidden[-2][:, 1:])


def test_allow_pickle_still_prefers_safetensors(tmp_path, clip_vision_dir, reference):
    _, _, x, hidden = reference("clip_vision_dir")
    folder = _pickle_folder(clip_vision_dir, tmp_path / "both")
    shutil.copy(clip_vision_dir / "model.safetensors", folder / "model.safetensors")
    torch.save({"not": torch.zeros(1)}, folder / "pytorch_model.bin")  # would miss weights
    tower = CLIPVisionTower(str(folder), _args(), allow_pickle=True)
    assert torch.equal(tower(x), hidden[-2][:, 1:])


def test_folder_without_weights(tmp_path, clip_vision_dir):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(clip_vision_dir / "config.json", folder / "config.json")
    with pytest.raises(ModelError, match="no weights"):
        CLIPVisionTower(str(folder), _args())


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, clip_vision_dir, damage):
    folder = tmp_path / damage
    folder.mkdir()
    shutil.copy(clip_vision_dir / "config.json", folder / "config.json")
    data = (clip_vision_dir / "model.safetensors").read_bytes()
    data = b"\x00garbage" * 16 if damage == "garbage" else data[: len(data) // 2]
    (folder / "model.safetensors").write_bytes(data)
    with pytest.raises(ModelError) as err:
        CLIPVisionTower(str(folder), _args())
    assert "model.safetensors" in str(err.value)
    assert "\n" not in str(err.value)


def test_checkpoint_without_vision_weights(tmp_path, clip_full_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "textonly"
    folder.mkdir()
    shutil.copy(clip_full_dir / "config.json", folder / "config.json")
    weights = load_file(clip_full_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("vision_model.")},
              folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="random"):
        CLIPVisionTower(str(folder), _args())


def test_non_vision_model(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="bert"):
        CLIPVisionTower(str(tmp_path), _args())


def test_unknown_hub_name_offline():
    with pytest.raises(ModelError, match="--model"):
        CLIPVisionTower("clipfeat-test/no-such-tower", _args())


def test_build_vision_tower(clip_vision_dir, siglip_dir):
    cfg = SimpleNamespace(mm_vision_tower=str(clip_vision_dir), mm_vision_select_layer=-2,
                          mm_vision_select_feature="cls_patch")
    tower = build_vision_tower(cfg, delay_load=True)
    assert isinstance(tower, CLIPVisionTower) and isinstance(tower, torch.nn.Module)
    assert tower.vision_tower_name == str(clip_vision_dir)
    assert tower.num_tokens == 26 and not tower.is_loaded

    tower = build_vision_tower(SimpleNamespace(vision_tower=str(siglip_dir),
                                               mm_vision_select_layer=-1))
    assert tower.family == "siglip" and tower.is_loaded

    with pytest.raises(ConfigError, match="mm_vision_tower"):
        build_vision_tower(SimpleNamespace(mm_vision_select_layer=-2))


def test_import_does_not_load_torch():
    import subprocess
    import sys

    code = ("import sys; import clipfeat.tower, clipfeat.modelref, clipfeat.info; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]
