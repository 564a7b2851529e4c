"""Resolve a model name or folder to local files and read its configs, without loading weights.

A name that is an existing folder is used as is; anything else is a Hugging Face hub repo id,
fetched (or found in the cache) with ``huggingface_hub.snapshot_download``. Only the files
clipfeat needs are fetched: the two JSON configs and, when asked, the weights.

The geometry a run needs (hidden size, layers, image and patch size) is read from
``config.json`` directly, so ``clipfeat info`` never imports torch or transformers; the
transformers config object is built on first use of ``ModelRef.vision_config``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from clipfeat.errors import ModelError

logger = logging.getLogger(__name__)

#: model_type in config.json -> family
SUPPORTED_MODEL_TYPES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
}

# transformers' defaults for the few fields we read ourselves, used only when config.json
# omits them (CLIPVisionConfig / SiglipVisionConfig __init__ defaults).
_VISION_DEFAULTS = {
    "clip": {"hidden_size": 768, "num_hidden_layers": 12, "image_size": 224, "patch_size": 32},
    "siglip": {"hidden_size": 768, "num_hidden_layers": 12, "image_size": 224, "patch_size": 16},
}

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

_CONFIG_PATTERNS = ["config.json", "preprocessor_config.json"]
# Exact names, not "*.safetensors": some repos (laion/*) also ship open_clip weights.
_SAFETENSORS_PATTERNS = [SAFETENSORS_FILE, SAFETENSORS_INDEX, "model-*-of-*.safetensors"]
_PICKLE_PATTERNS = [PICKLE_FILE, PICKLE_INDEX, "pytorch_model-*-of-*.bin"]


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: where its files are and what its configs say."""

    name: str
    local_dir: Path
    revision: str | None
    model_type: str
    family: str
    preprocessor_config: dict | None = field(compare=False, repr=False)
    weights_file: Path | None
    vision_dict: dict = field(compare=False, repr=False)
    """The raw vision part of config.json (the nested ``vision_config`` of a full model)."""

    @property
    def hidden_size(self) -> int:
        return self._vision_int("hidden_size")

    @property
    def num_hidden_layers(self) -> int:
        return self._vision_int("num_hidden_layers")

    @property
    def image_size(self) -> int:
        return self._vision_int("image_size")

    @property
    def patch_size(self) -> int:
        return self._vision_int("patch_size")

    @property
    def has_cls_token(self) -> bool:
        """CLIP prepends a class token; SigLIP has none."""
        return self.family == "clip"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def is_full_checkpoint(self) -> bool:
        """True for a text+vision checkpoint (model_type clip/siglip)."""
        return self.model_type in ("clip", "siglip")

    @cached_property
    def vision_config(self) -> Any:
        """The transformers ``CLIPVisionConfig`` / ``SiglipVisionConfig`` (imports transformers)."""
        if self.family == "clip":
            from transformers import CLIPVisionConfig as config_cls
        else:
            from transformers import SiglipVisionConfig as config_cls
        try:
            return config_cls.from_pretrained(str(self.local_dir), local_files_only=True)
        except Exception as err:  # any parse failure is a bad checkpoint
            raise ModelError(
                f"cannot read {self.local_dir / 'config.json'}: {_first_line(err)}"
            ) from err

    def _vision_int(self, key: str) -> int:
        value = self.vision_dict.get(key, _VISION_DEFAULTS[self.family][key])
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(
                f"{self.local_dir / 'config.json'}: vision {key} is {value!r}, "
                "expected a positive integer"
            )
        return value


def resolve_model(
    name: str,
    *,
    revision: str | None = None,
    need_weights: bool = False,
    allow_pickle: bool = False,
) -> ModelRef:
    """Resolve a hub name or local folder to a `ModelRef`; raise ModelError if unusable.

    With ``need_weights`` the weights must be present (and are downloaded for a hub name);
    pickle weights (``pytorch_model.bin``) are accepted only with ``allow_pickle``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name {name!r} is empty; pass a hub name or a local folder")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {name!r} is a file, not a folder; pass the checkpoint folder")
        local_dir = path.resolve()
        resolved_revision = None
        if revision is not None:
            logger.warning("revision %r ignored: model %r is a local folder", revision, name)
        from_hub = False
    elif _looks_like_path(name):
        raise ModelError(
            f"no such model folder: {name!r}; pass an existing checkpoint folder or a hub name "
            "like openai/clip-vit-large-patch14-336"
        )
    else:
        local_dir = _snapshot(name, revision=revision, need_weights=need_weights,
                              allow_pickle=allow_pickle)
        resolved_revision = local_dir.name if local_dir.parent.name == "snapshots" else None
        from_hub = True

    raw = _read_json(local_dir / "config.json", name=name, required=True)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(_unsupported_message(name, model_type, raw))
    family = SUPPORTED_MODEL_TYPES[model_type]
    vision_dict = _vision_dict(raw, model_type)
    preprocessor = _read_json(local_dir / "preprocessor_config.json", name=name, required=False)
    weights = _find_weights(local_dir, name=name, need_weights=need_weights,
                            allow_pickle=allow_pickle, from_hub=from_hub)
    ref = ModelRef(
        name=name,
        local_dir=local_dir,
        revision=resolved_revision,
        model_type=model_type,
        family=family,
        preprocessor_config=preprocessor,
        weights_file=weights,
        vision_dict=vision_dict,
    )
    # Read the geometry now so a malformed config fails here, not half-way through a run.
    for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
        getattr(ref, key)
    logger.debug("resolved model %r -> %s (%s)", name, local_dir, model_type)
    return ref


def _looks_like_path(name: str) -> bool:
    """A hub repo id is 'name' or 'owner/name'; anything else that looks like a path is one."""
    if name.startswith(("/", ".", "~")):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    if os.altsep and os.altsep != "/" and os.altsep in name:
        return True
    return name.count("/") > 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _read_json(path: Path, *, name: str, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise ModelError(
                f"model {name!r} has no config.json in {path.parent}; "
                "pass a Hugging Face checkpoint folder (config.json + model.safetensors)"
            )
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {path}: {_first_line(err)}") from err
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def _vision_dict(raw: dict, model_type: str) -> dict:
    if model_type in ("clip_vision_model", "siglip_vision_model"):
        return raw
    # As CLIPVisionConfig/SiglipVisionConfig.from_pretrained do: the nested vision_config
    # (old openai/* configs also carry a vision_config_dict, which the vision model ignores).
    vision = raw.get("vision_config") or {}
    if not isinstance(vision, dict):
        raise ModelError(f"config.json of model_type {model_type!r} has a malformed vision_config")
    return vision


def _unsupported_message(name: str, model_type: Any, raw: dict) -> str:
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if model_type is None:
        msg = f"model {name!r} has no model_type in config.json"
    else:
        msg = f"model {name!r} has model_type {model_type!r}, not a CLIP/SigLIP vision tower"
    msg += f" (supported: {supported})"
    tower = raw.get("mm_vision_tower") or raw.get("vision_tower")
    if isinstance(tower, str):
        msg += f"; for a LLaVA checkpoint pass its vision tower instead: --model {tower}"
    return msg


def _find_weights(local_dir: Path, *, name: str, need_weights: bool, allow_pickle: bool,
                  from_hub: bool) -> Path | None:
    safetensors = local_dir / SAFETENSORS_FILE
    if safetensors.is_file():
        return safetensors
    index = local_dir / SAFETENSORS_INDEX
    if index.is_file():
        _check_shards(index, name=name)
        return index
    pickles = [p for p in (local_dir / PICKLE_FILE, local_dir / PICKLE_INDEX) if p.is_file()]
    if pickles and allow_pickle:
        if pickles[0].name == PICKLE_INDEX:
            _check_shards(pickles[0], name=name)
        return pickles[0]
    if not need_weights:
        return None
    if pickles:
        raise ModelError(
            f"model {name!r} has only pickle weights ({pickles[0].name}): pickle weights refused; "
            "convert to safetensors or pass --allow-pickle if you trust the source"
        )
    if from_hub:
        raise ModelError(
            f"model {name!r} has no safetensors weights in {local_dir} (the hub repo has none, "
            f"or the cache holds only its configs); download them (huggingface-cli download "
            f"{name}) or pass --allow-pickle if it ships only pytorch_model.bin and you trust it"
        )
    raise ModelError(
        f"model folder {str(local_dir)!r} has no weights ({SAFETENSORS_FILE} or "
        f"{SAFETENSORS_INDEX}); pass a complete checkpoint folder"
    )


def _check_shards(index: Path, *, name: str) -> None:
    data = _read_json(index, name=name, required=True)
    weight_map = data.get("weight_map") if data else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index} has no weight_map; the checkpoint is damaged")
    missing = sorted({f for f in weight_map.values() if not (index.parent / str(f)).is_file()})
    if missing:
        raise ModelError(
            f"model {name!r} is incomplete: {len(missing)} weight shard(s) listed in "
            f"{index.name} are missing (first: {missing[0]})"
        )


def _snapshot(name: str, *, revision: str | None, need_weights: bool,
              allow_pickle: bool) -> Path:
    """Fetch (or find in the HF cache) the files of a hub repo; ModelError on any failure."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as err:  # pragma: no cover - a hard dependency
        raise ModelError(f"model {name!r} is not a local folder and huggingface_hub "
                         f"is not installed ({err})") from err

    patterns = list(_CONFIG_PATTERNS)
    if need_weights:
        patterns += _SAFETENSORS_PATTERNS + (_PICKLE_PATTERNS if allow_pickle else [])
    at = f" at revision {revision!r}" if revision else ""
    hint = "or pass --model /path/to/local/checkpoint"
    try:
        path = snapshot_download(name, revision=revision, allow_patterns=patterns)
    except HFValidationError as err:
        raise ModelError(
            f"model {name!r} is neither an existing folder nor a valid hub name (owner/name); "
            f"{hint}"
        ) from err
    except GatedRepoError as err:
        raise ModelError(
            f"model {name!r} is gated on the hub: accept its license and log in "
            f"(huggingface-cli login), {hint}"
        ) from err
    except RevisionNotFoundError as err:
        raise ModelError(f"model {name!r} has no revision {revision!r} on the hub") from err
    except RepositoryNotFoundError as err:
        raise ModelError(
            f"model {name!r} was not found on the Hugging Face hub (or it is private: "
            f"huggingface-cli login); {hint}"
        ) from err
    except LocalEntryNotFoundError as err:
        raise ModelError(
            f"model {name!r}{at} is not in the local Hugging Face cache and the hub cannot be "
            "reached (HF_HUB_OFFLINE=1 or no network); download it on a connected machine "
            f"(huggingface-cli download {name}) {hint}"
        ) from err
    except Exception as err:  # network/disk errors of any kind
        raise ModelError(f"cannot fetch model {name!r}{at} from the hub: {_first_line(err)}; "
                         f"{hint}") from err
    return Path(path)
