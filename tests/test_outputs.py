"""The --model/--layer/--feature grammar of several outputs, and `clipfeat info` planning them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clipfeat import ExtractConfig
from clipfeat.cli import app
from clipfeat.errors import ConfigError
from clipfeat.info import describe_run
from clipfeat.outputs import (
    LayerSel,
    dataset_path,
    output_name,
    parse_layers,
    tower_requests,
    tower_slug,
)

runner = CliRunner()


@pytest.mark.parametrize("text, indices", [
    ("-2", (23,)), ("23", (23,)), ("0", (0,)), ("-25", (0,)),
    ("mean(0:12)", tuple(range(12))), ("mean(12:24)", tuple(range(12, 24))),
    ("mean(12:)", tuple(range(12, 25))), ("mean(:3)", (0, 1, 2)), ("mean(-4:-1)", (21, 22, 23)),
    (" mean( 0 : 2 ) ", (0, 1)),
])
def test_layer_selection_reads_these_hidden_states(text, indices):
    assert LayerSel.parse(text).indices(24) == indices  # 24 blocks: 25 hidden states


@pytest.mark.parametrize("text, needle", [
    ("25", "valid layers are -25..24"), ("-26", "valid layers are -25..24"),
    ("mean(0:26)", "mean bounds are -25..25"), ("mean(5:5)", "selects no hidden state"),
    ("mean(6:5)", "selects no hidden state"), ("two", "is not valid"), ("mean(0,3)", "not valid"),
    ("1.5", "not valid"),
])
def test_bad_layer_selection_names_the_value(text, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        LayerSel.parse(text).indices(24)


def test_layer_list_keeps_order_and_the_written_form():
    sels = parse_layers(["-2,-9", "mean(0:12),mean(12:24)"])
    assert [str(s) for s in sels] == ["-2", "-9", "mean(0:12)", "mean(12:24)"]
    assert [s.attr_value() for s in sels] == [-2, -9, "mean(0:12)", "mean(12:24)"]
    with pytest.raises(ConfigError, match="given twice"):
        parse_layers("-2,-2")
    with pytest.raises(ConfigError, match="empty entry"):
        parse_layers("-2,,-9")


def test_names_and_datasets():
    assert tower_slug("openai/clip-vit-large-patch14-336") == "clip-vit-large-patch14-336"
    assert tower_slug("/ckpt/my tower/") == "my_tower"
    name = output_name("facebook/dinov2-large", LayerSel.parse("mean(0:12)"))
    assert name == "dinov2-large/mean(0:12)"
    assert dataset_path(name, 1) == "features"
    assert dataset_path(name, 3) == "features/dinov2-large/mean(0:12)"


def test_one_tower_is_the_command_of_before():
    (t,) = ExtractConfig(roots=["x"], out="o").towers()
    assert (t.model, [str(s) for s in t.layers], t.feature, t.revision) == (
        "openai/clip-vit-large-patch14-336", ["-2"], "patch", None)


def test_per_model_values_override_the_plain_ones():
    towers = tower_requests(["org/clip", "org/dino"], layers=["-2", "org/dino=-1,mean(0:12)"],
                            features=["org/clip=cls_patch"], revisions=["org/dino=abc123"])
    got = [(t.model, [str(s) for s in t.layers], t.feature, t.revision) for t in towers]
    assert got == [("org/clip", ["-2"], "cls_patch", None),
                   ("org/dino", ["-1", "mean(0:12)"], "patch", "abc123")]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(models=["a/x", "a/x"]), "given twice"),
    (dict(models=["a/x", "b/x"]), "same name 'x'"),
    (dict(models=["a/x", "a/y"], layers=["a/z=-1"]), "not one of the --model values"),
    (dict(models=["a/x", "a/y"], features=["a/x=patch", "a/x=cls_patch"]),
     "--feature is given 2 times for a/x"),
    (dict(models=["a/x"], features=["cls"]), "--feature 'cls' is not one of"),
    (dict(models=[""]), "--model is empty"),
])
def test_bad_tower_flags_name_the_value(kwargs, needle):
    models = kwargs.pop("models")
    with pytest.raises(ConfigError, match=needle):
        tower_requests(models, **kwargs)


def test_describe_run_plans_every_output(config_only_vitl336, siglip_dir):
    vitl, sig = str(config_only_vitl336), str(siglip_dir)
    d = describe_run([vitl, sig], layers=["-2,mean(0:12)", f"{sig}=-1"],
                     features=[f"{vitl}=cls_patch"], images=1000)
    names = [o["name"] for o in d["outputs"]]
    vslug, sslug = tower_slug(vitl), tower_slug(sig)
    assert names == [f"{vslug}/-2", f"{vslug}/mean(0:12)", f"{sslug}/-1"]
    assert [o["hidden_states"] for o in d["outputs"]] == [[23], list(range(12)), [3]]
    assert [(o["tokens"], o["hidden_size"]) for o in d["outputs"]] == [
        (577, 1024), (577, 1024), (16, 32)]
    per_image = 2 * (577 * 1024 * 2 + 16 * 32)  # float16
    assert d["bytes_per_image"] == per_image and d["total_bytes"] == 1000 * per_image
    assert [t["blocks_run"] for t in d["towers"]] == [23, 3]
    assert d["outputs"][0]["dataset"] == f"features/{vslug}/-2"


def test_describe_run_refuses_the_same_layer_twice(config_only_vitl336):
    with pytest.raises(ConfigError, match="same hidden state"):
        describe_run(str(config_only_vitl336), layers="-2,23")


def test_cli_info_several_towers(config_only_vitl336, siglip_dir):
    vitl, sig = str(config_only_vitl336), str(siglip_dir)
    res = runner.invoke(app, ["info", vitl, sig, "--layer", "-2", "--layer", f"{sig}=-1,-2",
                              "--images", "10", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert [o["layer"] for o in d["outputs"]] == ["-2", "-1", "-2"]
    text = runner.invoke(app, ["info", vitl, "--layer", "-2,-9"])
    assert text.exit_code == 0, text.output
    assert f"output {tower_slug(vitl)}/-9" in text.stdout and "in 2 outputs" in text.stdout


def test_cli_info_one_layer_is_unchanged(config_only_vitl336):
    res = runner.invoke(app, ["info", str(config_only_vitl336), "--layer", "-2", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert (d["layer"], d["layer_index"], d["tokens_per_image"]) == (-2, 23, 576)


@pytest.mark.parametrize("args, needle", [
    (["--layer", "-2,23"], "same hidden state"),
    (["--layer", "mean(3:3)"], "selects no hidden state"),
])
def test_cli_info_bad_layers_exit_2(config_only_vitl336, args, needle):
    res = runner.invoke(app, ["info", str(config_only_vitl336), *args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and needle in res.output
