"""``clipfeat info``: what a tower will produce, from its configs only (no weights, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipfeat import families
from clipfeat.errors import ConfigError
from clipfeat.modelref import PICKLE_RISK, pickle_weights, resolve_model
from clipfeat.preprocess import size_mismatch
from clipfeat.tower import check_feature, resolve_layer, tokens_per_image
from clipfeat.units import human_bytes

STORE_BYTES_PER_VALUE = 2  # features are stored as float16 by default

_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box",
                   5: "hamming"}


def describe_model(
    model: str,
    *,
    layer: int = -2,
    feature: str = "patch",
    images: int | None = None,
) -> dict:
    """Shapes, sizes and preprocessing a tower produces, read from its configs (no weights)."""
    ref = resolve_model(model, need_weights=False)
    num_layers = ref.num_hidden_layers
    layer_index = resolve_layer(layer, num_layers)
    check_feature(feature, ref.family)
    tokens = tokens_per_image(ref, feature)
    hidden = ref.hidden_size
    bytes_per_image = tokens * hidden * STORE_BYTES_PER_VALUE
    preprocessing = _preprocessing(ref.preprocessor_config, ref.family, ref.image_size)
    data: dict[str, Any] = {
        "model": model,
        "local_dir": str(ref.local_dir),
        "revision": ref.revision,
        "model_type": ref.model_type,
        "family": ref.family,
        "weights": ref.weights_file.name if ref.weights_file else None,
        # Present but refused without --allow-pickle (not "absent": clipfeat info says how).
        "pickle_weights": None if ref.weights_file else _pickle_name(ref.local_dir),
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "image_size": ref.image_size,
        "patch_size": ref.patch_size,
        "num_patches": ref.num_patches,
        "has_cls_token": ref.has_cls_token,
        "num_registers": ref.num_registers,
        "layer": layer,
        "layer_index": layer_index,
        "layer_range": [-(num_layers + 1), num_layers],
        "feature": feature,
        "tokens_per_image": tokens,
        "feature_shape": [tokens, hidden],
        "store_dtype": "float16",
        "bytes_per_image": bytes_per_image,
        "preprocessing": preprocessing,
    }
    warnings = []
    out_size = _output_size(preprocessing)
    if out_size is not None:  # the very message `clipfeat extract` stops with
        key = "crop_size" if preprocessing["crop"] else "size"
        mismatch = size_mismatch(out_size, ref.image_size, key=key,
                                 path=ref.local_dir / "preprocessor_config.json")
        if mismatch is not None:
            warnings.append(mismatch + " (clipfeat extract refuses it)")
    if data["pickle_weights"]:
        warnings.append(f"only pickle weights ({data['pickle_weights']}), refused by default: "
                        f"{PICKLE_RISK}; or convert them to safetensors")
    if preprocessing["source"] != "preprocessor_config.json":
        warnings.append("no preprocessor_config.json: the image processor's defaults are used")
    data["warnings"] = warnings
    if images is not None:
        if isinstance(images, bool) or not isinstance(images, int) or images < 0:
            raise ConfigError(f"images {images!r} must be a non-negative integer")
        total = images * bytes_per_image
        data["images"] = images
        data["total_bytes"] = total
        data["total_human"] = human_bytes(total)
    return data


def format_model(d: dict) -> str:
    """A readable, aligned table of `describe_model`'s facts."""
    return _table(_model_rows(d))


def _model_rows(d: dict) -> list[tuple[str, str]]:
    """`format_model`'s rows; without ``layer`` (a tower of `describe_run`, whose outputs
    have their own lines) no layer or per-image row."""
    lo, hi = d["layer_range"]
    pp = d["preprocessing"]
    cls = "yes" if d["has_cls_token"] else "no"
    registers = d.get("num_registers", 0)
    side = d["image_size"] // d["patch_size"]
    dropped = " and registers" if registers else ""
    if d["feature"] == "patch" and d["has_cls_token"]:
        tokens_note = f"CLS{dropped} dropped"
    elif d["has_cls_token"]:
        tokens_note = "CLS + patches" + (", registers dropped" if registers else "")
    else:
        tokens_note = "all patches, no CLS token"
    image = (f"{d['image_size']} px, patch {d['patch_size']} -> {side}x{side} = "
             f"{d['num_patches']} patches, CLS token: {cls}"
             + (f", {registers} registers" if registers else ""))
    tokens, hidden = d["feature_shape"]
    rows: list[tuple[str, str]] = [
        ("model", d["model"]),
        ("folder", d["local_dir"] + (f" (revision {d['revision']})" if d["revision"] else "")),
        ("model type", f"{d['model_type']} ({_kind(d)})"),
        ("weights", _weights_row(d)),
        ("hidden size", str(d["hidden_size"])),
        ("blocks", f"{d['num_hidden_layers']} (valid --layer {lo}..{hi})"),
        ("image", image),
    ]
    if "layer" in d:
        rows.append(("layer", f"{d['layer']} = hidden_states[{d['layer_index']}]"))
    rows += [
        ("feature", f"{d['feature']} ({d['tokens_per_image']} tokens, {tokens_note})"),
        ("feature shape", f"{tokens} x {hidden} ({d['store_dtype']})"),
    ]
    if "layer" in d:
        rows.append(("per image", f"{human_bytes(d['bytes_per_image'])} "
                                  f"({d['bytes_per_image']} B)"))
    if "images" in d:
        rows.append((f"{d['images']} images", f"{d['total_human']} ({d['total_bytes']} B)"))
    rows += [
        ("resize", _fmt_size(pp["resize"]) + (f", {pp['resample']}" if pp["resize"] else "")),
        ("center crop", _fmt_size(pp["crop"])),
        ("rescale", "none" if pp["rescale_factor"] is None else f"x {pp['rescale_factor']:.8g}"),
        ("mean", _fmt_floats(pp["mean"])),
        ("std", _fmt_floats(pp["std"])),
        ("preprocessing", pp["source"]),
    ]
    rows += [("warning", w) for w in d.get("warnings", [])]
    return rows


def _pickle_name(folder: Path) -> str | None:
    found = pickle_weights(folder)
    return found.name if found else None


def _weights_row(d: dict) -> str:
    if d["weights"]:
        return d["weights"]
    if d.get("pickle_weights"):
        return f"{d['pickle_weights']} only: pickle, refused without --allow-pickle (see warning)"
    return "not present (configs only)"


def _kind(d: dict) -> str:
    name = families.family(d["family"]).title
    info = families.model_type(d["model_type"])
    if info is not None and info.full:
        return f"{name} text+vision checkpoint, vision half used"
    if info is not None and info.registers:
        return f"{name} vision tower with registers"
    return f"{name} vision tower"


def is_store(target: str) -> bool:
    """True if ``target`` is a clipfeat output folder (see `clipfeat.store.is_store`)."""
    from clipfeat.store import is_store as _is_store

    return _is_store(Path(target).expanduser())


def describe_store(target: str) -> dict:
    """Summary of a clipfeat output store (`clipfeat.store.describe_store`)."""
    from clipfeat.store import describe_store as _describe_store

    return _describe_store(Path(target).expanduser())


def format_store(d: dict) -> str:
    """Text of `describe_store`'s summary (`clipfeat.store.format_store`)."""
    from clipfeat.store import format_store as _format_store

    return _format_store(d)


def _preprocessing(cfg: dict | None, family: str, image_size: int) -> dict:
    """Normalise a preprocessor_config.json (or the processor's defaults) to the facts we show."""
    source = "preprocessor_config.json"
    if cfg is None:
        source = "defaults (no preprocessor_config.json)"
        cfg = families.missing_processor_config(family, image_size)
    defaults = families.processor_defaults(family)

    def get(key: str) -> Any:
        value = cfg.get(key)
        return defaults[key] if value is None else value

    resize = None
    if get("do_resize"):
        # an int size: the family's kind (CLIP, DINOv2: shortest edge; SigLIP: square)
        resize = _size_dict(get("size"), shortest_edge="shortest_edge" in defaults["size"])
    crop = None
    if get("do_center_crop"):
        crop = _size_dict(get("crop_size"), shortest_edge=False)
    resample = get("resample")
    rescale = get("rescale_factor") if get("do_rescale") else None
    normalize = get("do_normalize")
    return {
        "resize": resize,
        "crop": crop,
        "resample": _RESAMPLE_NAMES.get(resample, str(resample)),
        "rescale_factor": rescale,
        "mean": list(get("image_mean")) if normalize else None,
        "std": list(get("image_std")) if normalize else None,
        "source": source,
    }


def _size_dict(size: Any, *, shortest_edge: bool) -> dict | None:
    if size is None:
        return None
    if isinstance(size, int):  # old configs: "size": 224 / "crop_size": 224
        return {"shortest_edge": size} if shortest_edge else {"height": size, "width": size}
    if isinstance(size, dict):
        return dict(size)
    return {"value": size}


def _output_size(pp: dict) -> tuple[int, int] | None:
    """(height, width) the processor produces, when the configs say so plainly."""
    for part in (pp["crop"], pp["resize"]):
        if part and "height" in part and "width" in part:
            return int(part["height"]), int(part["width"])
    return None


def _fmt_size(size: dict | None) -> str:
    if not size:
        return "none"
    if "height" in size and "width" in size:
        return f"{size['height']}x{size['width']}"
    return ", ".join(f"{k}={v}" for k, v in size.items())


def _fmt_floats(values: list | None) -> str:
    return "none" if values is None else "(" + ", ".join(f"{v:.8g}" for v in values) + ")"


def _fmt_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return "-"
    return str(value)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# --------------------------------------------------------------------------- several outputs


def describe_run(
    models: str | list[str],
    *,
    layers: Any = -2,
    features: Any = "patch",
    images: int | None = None,
) -> dict:
    """Every output a run of these towers would store (``--model/--layer/--feature`` as
    `clipfeat extract` takes them): shapes, bytes per image and the total for ``images``,
    each tower's facts as `describe_model` gives them (configs only, no weights)."""
    from clipfeat.outputs import check_distinct, dataset_path, output_name, tower_requests

    requests = tower_requests(models, layers=layers, features=features)
    towers, outputs = [], []
    for req in requests:
        tower = describe_model(req.model, layer=-1, feature=req.feature)  # configs read once
        for key in ("layer", "layer_index", "bytes_per_image"):  # per output, below
            tower.pop(key)
        num_layers = tower["num_hidden_layers"]
        check_distinct(req.layers, num_layers, model=req.model)
        deepest = max(sel.deepest(num_layers) for sel in req.layers)
        tower["blocks_run"] = deepest
        towers.append(tower)
        for sel in req.layers:
            tokens, hidden = tower["feature_shape"]
            outputs.append({
                "name": output_name(req.model, sel), "model": req.model, "layer": str(sel),
                "hidden_states": list(sel.indices(num_layers)), "feature": req.feature,
                "tokens": tokens, "hidden_size": hidden,
                "bytes_per_image": tokens * hidden * STORE_BYTES_PER_VALUE,
            })
    for o in outputs:
        o["dataset"] = dataset_path(o["name"], len(outputs))
    per_image = sum(o["bytes_per_image"] for o in outputs)
    data: dict[str, Any] = {"towers": towers, "outputs": outputs, "store_dtype": "float16",
                            "bytes_per_image": per_image}
    if images is not None:
        if isinstance(images, bool) or not isinstance(images, int) or images < 0:
            raise ConfigError(f"images {images!r} must be a non-negative integer")
        data.update(images=images, total_bytes=images * per_image,
                    total_human=human_bytes(images * per_image))
    return data


def format_run(d: dict) -> str:
    """`describe_run` as text: each tower's table, then one line per output and the totals."""
    parts = []
    for t in d["towers"]:
        rows = _model_rows(t)
        rows.append(("blocks run", f"{t['blocks_run']} of {t['num_hidden_layers']} "
                                   "(the deepest layer asked)"))
        parts.append(_table(rows))
    rows = [(f"output {o['name']}",
             f"hidden_states{_fmt_states(o['hidden_states'])}, {o['feature']}, "
             f"{o['tokens']} x {o['hidden_size']} ({d['store_dtype']}), "
             f"{human_bytes(o['bytes_per_image'])} per image, dataset {o['dataset']}")
            for o in d["outputs"]]
    rows.append(("per image", f"{human_bytes(d['bytes_per_image'])} ({d['bytes_per_image']} B) "
                              f"in {len(d['outputs'])} outputs"))
    if "images" in d:
        rows.append((f"{d['images']} images", f"{d['total_human']} ({d['total_bytes']} B)"))
    parts.append(_table(rows))
    return "\n\n".join(parts)


def _fmt_states(indices: list[int]) -> str:
    if len(indices) == 1:
        return f"[{indices[0]}]"
    return f"[{indices[0]}:{indices[-1] + 1}] mean"
