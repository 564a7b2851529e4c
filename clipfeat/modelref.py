"""Resolve a model name or folder to local files and read its configs, without loading weights.

A name that is an existing folder is used as is; anything else is a Hugging Face hub repo id,
fetched (or found in the cache) with ``huggingface_hub.snapshot_download``. Only the files
clipfeat needs are fetched: the two JSON configs and, when asked, the weights.

Weights are always taken as safetensors when they exist. Some official repos (notably
``openai/clip-vit-large-patch14-336``) publish only ``pytorch_model.bin`` on ``main``; for those,
as transformers' ``from_pretrained(use_safetensors=True)`` does, the open pull request
"Adding `safetensors` variant of this model" by the Hugging Face bot ``SFconvertbot`` is used
(never a PR by anyone else), and only if it converts exactly the pickle weights and carries
exactly the configs of the requested revision (same git blobs). That PR is a commit on top of
``main`` that only adds the safetensors files, so its snapshot folder holds config.json,
preprocessor_config.json and the weights together: it becomes ``ModelRef.local_dir`` and
``ModelRef.weights_revision`` says where the weights came from. Nothing is ever converted and
no PR is ever opened.

The geometry a run needs (hidden size, layers, image and patch size, registers) is read from
``config.json`` directly, so ``clipfeat info`` never imports torch or transformers; the
transformers config object is built on first use of ``ModelRef.vision_config``. What differs
between families (which model types, their defaults, token layout) is `clipfeat.families`.
``ModelRef.image_size`` is the size the tower is fed: config.json's ``image_size`` for CLIP
and SigLIP, the processor's crop for DINOv2 (``config_image_size`` keeps config.json's).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from clipfeat import families, jsonsafe
from clipfeat.errors import ModelError

logger = logging.getLogger(__name__)

#: model_type in config.json -> family (the accepted ones; see `clipfeat.families`)
SUPPORTED_MODEL_TYPES = {name: mt.family for name, mt in families.MODEL_TYPES.items()}

#: The largest value of each vision size that any real tower comes near (ViT-g/14 has 40
#: blocks of width 1,408; So400m 27 of width 1,152; DINOv2-g 40 of 1,536 with 4 registers):
#: larger ones are mistakes, refused before anything is built or read.
_VISION_LIMITS = {
    "num_hidden_layers": 1_000,
    "hidden_size": 65_536,
    "intermediate_size": 262_144,
    "image_size": 16_384,
    "patch_size": 1_024,
    "num_channels": 16,
    "num_register_tokens": 1_024,
}

#: The ModelRef properties read (and so validated) when a model is resolved.
_GEOMETRY = ("hidden_size", "num_hidden_layers", "config_image_size", "image_size",
             "patch_size", "intermediate_size", "num_channels", "num_registers")

#: Largest safetensors header read (the format's own limit is 100 MB).
_MAX_HEADER = 100_000_000

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

#: Hub repos known to publish only pickle weights on ``main`` (for hints; each is looked up
#: like any other repo).
PICKLE_ONLY_MAIN = frozenset({"openai/clip-vit-large-patch14-336"})

#: The Hugging Face bot whose safetensors conversion PRs are trusted, and its PR title.
SFCONVERT_BOT = "SFconvertbot"
SFCONVERT_TITLE = "Adding `safetensors` variant of this model"

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
    weights_revision: str | None = None
    """Where the weights came from when not from ``revision``: ``"refs/pr/N@<commit>"`` for
    the SFconvertbot safetensors conversion of a pickle-only hub repo; None otherwise."""

    @property
    def type_info(self) -> families.ModelType:
        """What `clipfeat.families` knows about this ``model_type``."""
        return families.MODEL_TYPES[self.model_type]

    @property
    def family_info(self) -> families.Family:
        return families.FAMILIES[self.family]

    @property
    def hidden_size(self) -> int:
        return self._vision_int("hidden_size")

    @property
    def num_hidden_layers(self) -> int:
        return self._vision_int("num_hidden_layers")

    @property
    def config_image_size(self) -> int:
        """config.json's ``image_size``: what the position embeddings were made for."""
        return self._vision_int("image_size")

    @cached_property
    def image_size(self) -> int:
        """The size (px, square) the tower is fed: config.json's ``image_size``, except for
        DINOv2, whose processor crops (224) smaller than its config's pretraining size
        (518) and whose model interpolates the position embeddings to what it is fed."""
        if not self.family_info.sized_by_processor:
            return self.config_image_size
        return _processor_image_size(self)

    @property
    def patch_size(self) -> int:
        return self._vision_int("patch_size")

    @property
    def intermediate_size(self) -> int:
        """The MLP width of a block (DINOv2: from ``mlp_ratio``; SwiGLU: two thirds of that,
        rounded up to a multiple of 8, as transformers builds it)."""
        if self.family != "dinov2":
            return self._vision_int("intermediate_size")
        width = int(self.hidden_size * self.mlp_ratio)
        if self.vision_dict.get("use_swiglu_ffn"):
            width = (int(width * 2 / 3) + 7) // 8 * 8
        return self._check_limit("intermediate_size", width)

    @property
    def mlp_ratio(self) -> float:
        """DINOv2's MLP width over hidden size (config ``mlp_ratio``)."""
        value = self.vision_dict.get("mlp_ratio", self.type_info.config_defaults.get("mlp_ratio"))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ModelError(f"{self.local_dir / 'config.json'}: mlp_ratio is {value!r}, "
                             "expected a positive number")
        return value

    @property
    def num_channels(self) -> int:
        return self._vision_int("num_channels")

    @property
    def num_registers(self) -> int:
        """Register tokens after the CLS token (DINOv2 with registers; 0 otherwise)."""
        if not self.type_info.registers:
            return 0
        return self._vision_int("num_register_tokens")

    @property
    def vision_parameters(self) -> int:
        """Parameters of the vision tower config.json describes (what transformers builds:
        ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Dinov2Model`` ...), computed without
        building it."""
        h, i = self.hidden_size, self.intermediate_size
        patch = self.num_channels * self.patch_size ** 2 * h  # the patch conv's weight
        if self.family == "dinov2":
            return self._dinov2_parameters(patch)
        positions = (self.config_image_size // self.patch_size) ** 2
        block = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # attn, mlp, 2 norms
        total = self.num_hidden_layers * block + 2 * h  # post_layernorm
        if self.family == "clip":  # class token, bias-free conv, positions incl. CLS, pre-norm
            return total + h + patch + (positions + 1) * h + 2 * h
        total += patch + h + positions * h
        if self.vision_dict.get("vision_use_head", True):  # attention-pooling head
            total += h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
        return total

    def _dinov2_parameters(self, patch: int) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.vision_dict
        positions = (self.config_image_size // self.patch_size) ** 2 + 1  # CLS included
        tokens = h * (1 + self.num_registers)  # CLS, registers
        if self.type_info.registers or d.get("use_mask_token", True):
            tokens += h
        embeddings = tokens + positions * h + patch + h  # the conv has a bias
        attention = 3 * h * h + (3 * h if d.get("qkv_bias", True) else 0) + h * h + h
        if d.get("use_swiglu_ffn"):  # gate and up (h -> i), down (i -> h), with biases
            mlp = 2 * (h * i + i) + (i * h + h)
        else:
            mlp = (h * i + i) + (i * h + h)
        block = 2 * 2 * h + attention + mlp + 2 * h  # 2 norms, 2 layer scales
        return embeddings + self.num_hidden_layers * block + 2 * h  # final layernorm

    def _sizes(self) -> str:
        """The config values the parameter count follows, for messages."""
        keys = ["num_hidden_layers", "hidden_size", "intermediate_size", "image_size",
                "patch_size", "num_channels"]
        if self.family == "dinov2":
            keys[2] = "mlp_ratio"
            keys += ["num_register_tokens"] if self.type_info.registers else []
        return ", ".join(f"{k} {self._config_value(k):,}" for k in keys)

    def _config_value(self, key: str) -> Any:
        if key == "mlp_ratio":
            return self.mlp_ratio
        return self._vision_int(key)

    @property
    def has_cls_token(self) -> bool:
        """CLIP and DINOv2 prepend a class token; SigLIP has none."""
        return bool(self.family_info.cls_tokens)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def is_full_checkpoint(self) -> bool:
        """True for a text+vision checkpoint (model_type clip/siglip)."""
        return self.type_info.full

    @cached_property
    def vision_config(self) -> Any:
        """The transformers config of the tower (``CLIPVisionConfig``, ``Dinov2Config`` ...;
        imports transformers)."""
        config_cls = families.config_class(self.type_info)
        try:
            return config_cls.from_pretrained(str(self.local_dir), local_files_only=True)
        except Exception as err:  # any parse failure is a bad checkpoint
            raise ModelError(
                f"cannot read {self.local_dir / 'config.json'}: {_first_line(err)}"
            ) from err

    def _vision_int(self, key: str) -> int:
        value = self.vision_dict.get(key, self.type_info.config_defaults[key])
        least = 0 if key == "num_register_tokens" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            kind = "a non-negative" if least == 0 else "a positive"
            raise ModelError(
                f"{self.local_dir / 'config.json'}: vision {key} is {value!r}, "
                f"expected {kind} integer"
            )
        return self._check_limit(key, value)

    def _check_limit(self, key: str, value: int) -> int:
        limit = _VISION_LIMITS.get(key)
        if limit is not None and value > limit:
            raise ModelError(
                f"{self.local_dir / 'config.json'}: vision {key} is {value:,}, more than any "
                f"vision tower has (at most {limit:,}); the config is damaged"
            )
        return value


def _processor_image_size(ref: ModelRef) -> int:
    """The square size the checkpoint's own processor makes (DINOv2: its crop)."""
    from clipfeat.errors import ConfigError
    from clipfeat.preprocess import PreprocessSpec

    path = ref.local_dir / "preprocessor_config.json"
    try:
        spec = PreprocessSpec.from_processor_config(
            ref.preprocessor_config, family=ref.family, image_size=families.DINOV2_CROP)
    except ConfigError as err:
        raise ModelError(f"{path}: {err}") from err
    if spec.out_height != spec.out_width:
        key = "crop_size" if spec.do_center_crop else "size"
        raise ModelError(f"{path}: {key} gives {spec.out_height}x{spec.out_width} px images; "
                         "clipfeat feeds towers square images: make it square")
    return ref._check_limit("image_size", spec.out_height)


def resolve_model(
    name: str,
    *,
    revision: str | None = None,
    need_weights: bool = False,
    allow_pickle: bool = False,
) -> ModelRef:
    """Resolve a hub name or local folder to a `ModelRef`; raise ModelError if unusable.

    With ``need_weights`` the weights must be present (and are downloaded for a hub name);
    pickle weights (``pytorch_model.bin``) are accepted only with ``allow_pickle``, and even
    then a hub repo's SFconvertbot safetensors conversion is preferred (see the module doc).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name {name!r} is empty; pass a hub name or a local folder")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {name!r} is a file, not a folder; pass the checkpoint folder")
        local_dir = path.resolve()
        resolved_revision = weights_revision = None
        if revision is not None:
            logger.warning("revision %r ignored: model %r is a local folder", revision, name)
        from_hub = False
    elif _looks_like_path(name):
        raise ModelError(
            f"no such model folder: {name!r}; pass an existing checkpoint folder or a hub name "
            "like openai/clip-vit-large-patch14-336"
        )
    else:
        from clipfeat.hub import quiet

        with quiet():  # huggingface_hub's retries and warnings: the log, not the terminal
            local_dir, resolved_revision, weights_revision = _hub_files(
                name, revision=revision, need_weights=need_weights, allow_pickle=allow_pickle)
        from_hub = True

    raw = _read_json(local_dir / "config.json", name=name, required=True)
    model_type = raw.get("model_type")
    type_info = families.model_type(model_type)
    if type_info is None:
        raise ModelError(_unsupported_message(name, model_type, raw))
    vision_dict = _vision_dict(raw, type_info)
    preprocessor = _read_json(local_dir / "preprocessor_config.json", name=name, required=False)
    weights = _find_weights(local_dir, name=name, need_weights=need_weights,
                            allow_pickle=allow_pickle, from_hub=from_hub, revision=revision)
    ref = ModelRef(
        name=name,
        local_dir=local_dir,
        revision=resolved_revision,
        model_type=model_type,
        family=type_info.family,
        preprocessor_config=preprocessor,
        weights_file=weights,
        vision_dict=vision_dict,
        weights_revision=weights_revision,
    )
    # Read the geometry now so a malformed config fails here, not half-way through a run,
    # and hold it against the weights before anything is built from it.
    for key in _GEOMETRY:
        getattr(ref, key)
    if ref.patch_size > ref.image_size:
        where = ("the processor's output size" if ref.family_info.sized_by_processor
                 else "image_size")
        raise ModelError(f"{local_dir / 'config.json'}: vision patch_size {ref.patch_size} is "
                         f"larger than {where} {ref.image_size}; the config is damaged")
    if weights is not None:
        _check_weights_fit(ref, weights)
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


def _local_parent(name: str) -> bool:
    """True if ``name`` (owner/name shaped) starts with a folder that exists here, as a
    mistyped path like ``runs/exx`` does (``runs/`` exists), and a hub name rarely does."""
    parent = Path(name).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def _folder_note(name: str) -> str:
    parent = Path(name).expanduser().parent
    return f" ({parent}/ exists here but holds no {Path(name).name!r})"


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
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"cannot read {path}: {_first_line(err)}") from err
    data = jsonsafe.loads(text, name=str(path), error=ModelError)
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def _vision_dict(raw: dict, type_info: families.ModelType) -> dict:
    if not type_info.full:
        return raw
    # As CLIPVisionConfig/SiglipVisionConfig.from_pretrained do: the nested vision_config
    # (old openai/* configs also carry a vision_config_dict, which the vision model ignores).
    vision = raw.get("vision_config") or {}
    if not isinstance(vision, dict):
        raise ModelError(f"config.json of model_type {type_info.name!r} has a malformed "
                         "vision_config")
    return vision


def _unsupported_message(name: str, model_type: Any, raw: dict) -> str:
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    reason = families.unsupported_reason(model_type)
    if reason is not None:
        return f"model {name!r} has model_type {model_type!r}, {reason}"
    if model_type is None:
        msg = f"model {name!r} has no model_type in config.json"
    else:
        msg = (f"model {name!r} has model_type {model_type!r}, not a vision tower clipfeat "
               "runs (CLIP, SigLIP, DINOv2)")
    msg += f" (supported: {supported})"
    tower = raw.get("mm_vision_tower") or raw.get("vision_tower")
    if isinstance(tower, str):
        msg += f"; for a LLaVA checkpoint pass its vision tower instead: --model {tower}"
    return msg


def pickle_weights(local_dir: Path) -> Path | None:
    """The pickle weights of a folder that has no safetensors ones (None otherwise)."""
    if _has_safetensors(local_dir):
        return None
    for p in (local_dir / PICKLE_FILE, local_dir / PICKLE_INDEX):
        if p.is_file():
            return p
    return None


#: How to use pickle weights, and what it risks.
PICKLE_RISK = ("--allow-pickle loads them, but unpickling can run arbitrary code: only for a "
               "source you trust")


def _fetch_hint(name: str) -> str:
    """The command that fetches what clipfeat accepts (see `clipfeat.hub`)."""
    if name in PICKLE_ONLY_MAIN:
        return (f"python -m clipfeat.hub {name} (its main has only {PICKLE_FILE}: this fetches "
                f"the configs and the safetensors conversion by {SFCONVERT_BOT}; or, with "
                f"{PICKLE_FILE} in the cache, {PICKLE_RISK})")
    return f"python -m clipfeat.hub {name} (its configs and safetensors weights only)"


def _find_weights(local_dir: Path, *, name: str, need_weights: bool, allow_pickle: bool,
                  from_hub: bool, revision: str | None = None) -> Path | None:
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
            f"convert them to safetensors, or {PICKLE_RISK}"
        )
    if from_hub:
        raise ModelError(_no_hub_safetensors(name, local_dir, revision))
    raise ModelError(
        f"model folder {str(local_dir)!r} has no weights ({SAFETENSORS_FILE} or "
        f"{SAFETENSORS_INDEX}); pass a complete checkpoint folder"
    )


def _no_hub_safetensors(name: str, local_dir: Path, revision: str | None) -> str:
    """Why a hub model has no weights clipfeat accepts, and the ways to some."""
    from huggingface_hub import constants

    if revision not in (None, "main"):
        return (f"model {name!r} has no safetensors weights at revision {revision!r}; pass a "
                f"revision that has them, or for its {PICKLE_FILE} {PICKLE_RISK}")
    if constants.HF_HUB_OFFLINE or _HUB_UNREACHED.get(name):
        return (f"model {name!r}: the cache holds its configs ({local_dir}) but no safetensors "
                "weights, and the hub cannot be reached (HF_HUB_OFFLINE=1 or no network); on a "
                f"connected machine run {_fetch_hint(name)}; for a cached {PICKLE_FILE}, "
                f"{PICKLE_RISK}")
    return (f"model {name!r} has no safetensors weights on the hub (only {PICKLE_FILE}, and "
            f"no open safetensors conversion PR by {SFCONVERT_BOT} matches it); "
            f"{PICKLE_RISK}")


#: Hub names whose conversion-PR lookup failed in this process (unreachable hub).
_HUB_UNREACHED: dict[str, bool] = {}


def _weight_files(weights: Path, *, name: str) -> list[Path]:
    """The files holding the weights: ``weights`` itself, or the shards its index lists."""
    if not weights.name.endswith(".index.json"):
        return [weights]
    data = _read_json(weights, name=name, required=True) or {}
    return [weights.parent / str(f) for f in sorted(set(data["weight_map"].values()))]


def _safetensors_vision_count(path: Path, *, vision_only: bool,
                              prefix: str = "vision_model.") -> int:
    """Elements of the vision tower's tensors in a safetensors file, from its header only:
    those under ``prefix`` (``vision_model.``; DINOv2: ``dinov2.`` in a classifier's
    checkpoint), or in a vision-only checkpoint saved without it (as transformers 5 saves
    CLIP/SigLIP towers, and every DINOv2 backbone is saved) every tensor."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= _MAX_HEADER:
                raise ModelError(f"{path}: not a safetensors file (header size {size:,})")
            header = jsonsafe.loads(fh.read(size).decode("utf-8", "replace"), name=str(path),
                                    error=ModelError, what="safetensors header")
    except OSError as err:
        raise ModelError(f"cannot read {path}: {_first_line(err)}") from err
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    prefixed = any(key.startswith(prefix) for key in header)
    total = 0
    for key, info in header.items():
        # position_ids: a buffer that older checkpoints carry, not a parameter.
        if (prefixed or not vision_only) and not key.startswith(prefix) \
                or key.endswith("position_ids"):
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ModelError(f"{path}: tensor {key!r} has no valid shape; the file is damaged")
        count = 1
        for d in shape:
            count *= d
        total += count
    return total


def _check_weights_fit(ref: ModelRef, weights: Path) -> None:
    """ModelError unless the weights hold the tower config.json describes: as many vision
    parameters (safetensors, from the headers) or, for pickle, bytes for them at 16 bits."""
    expected = ref.vision_parameters
    files = _weight_files(weights, name=ref.name)
    config = ref.local_dir / "config.json"
    if all(f.name.endswith(".safetensors") for f in files):
        found = sum(_safetensors_vision_count(f, vision_only=not ref.is_full_checkpoint,
                                              prefix=ref.type_info.weights_prefix)
                    for f in files)
        if found != expected:
            held = (f"only {found:,} (the rest would be random)" if found < expected
                    else f"{found:,}")
            raise ModelError(
                f"{config} describes a vision tower of {expected:,} parameters "
                f"({ref._sizes()}) but {weights.name} holds {held}: the config does not "
                "belong to these weights"
            )
        return
    size = sum(f.stat().st_size for f in files if f.is_file())
    if size < 2 * expected:
        raise ModelError(
            f"{config} describes a vision tower of {expected:,} parameters ({ref._sizes()}) "
            f"but {weights.name} has only {size:,} bytes (at least {2 * expected:,} at 16 "
            "bits): the config does not belong to these weights"
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


def _hub_files(name: str, *, revision: str | None, need_weights: bool,
               allow_pickle: bool) -> tuple[Path, str | None, str | None]:
    """(folder with the configs and weights, commit of ``revision``, weights_revision or None)."""
    patterns = list(_CONFIG_PATTERNS) + (_SAFETENSORS_PATTERNS if need_weights else [])
    local_dir = _snapshot(name, revision=revision, patterns=patterns)
    commit = local_dir.name if local_dir.parent.name == "snapshots" else None
    if not need_weights or _has_safetensors(local_dir):
        return local_dir, commit, None
    if revision in (None, "main"):  # the bot's PRs are made on top of main
        found = _conversion_pr(name, local_dir, main_revision=commit or "main")
        if found is not None:
            return found[0], commit, found[1]
    if allow_pickle:  # only now: never download pickle weights the PR makes unnecessary
        local_dir = _snapshot(name, revision=commit or revision,
                              patterns=patterns + _PICKLE_PATTERNS)
    return local_dir, commit, None


def _has_safetensors(folder: Path) -> bool:
    return (folder / SAFETENSORS_FILE).is_file() or (folder / SAFETENSORS_INDEX).is_file()


def _is_pickle_weights(filename: str) -> bool:
    return any(fnmatch.fnmatchcase(filename, p) for p in _PICKLE_PATTERNS)


def _conversion_pr(name: str, main_dir: Path, *, main_revision: str) -> tuple[Path, str] | None:
    """The SFconvertbot safetensors PR of a pickle-only repo: (its snapshot, "refs/pr/N@sha").

    Online it is looked up on the hub and downloaded (safetensors and configs only); offline,
    or when the hub cannot be reached, a PR snapshot downloaded before is taken from the cache.
    """
    from huggingface_hub import constants

    _HUB_UNREACHED.pop(name, None)
    if not constants.HF_HUB_OFFLINE:
        try:
            return _download_conversion_pr(name, main_revision)
        except Exception as err:  # hub unreachable, rate-limited, ...: try the cache
            _HUB_UNREACHED[name] = True
            logger.warning("cannot look up the safetensors conversion PR of model %r on the "
                           "hub (%s); looking in the local cache", name, _first_line(err))
    return _cached_conversion_pr(name, main_dir)


def _blob_ids(info: Any) -> dict[str, str | None]:
    return {s.rfilename: s.blob_id for s in (getattr(info, "siblings", None) or [])}


def _download_conversion_pr(name: str, main_revision: str) -> tuple[Path, str] | None:
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    main_files = _blob_ids(api.model_info(name, revision=main_revision, files_metadata=True))
    if not any(_is_pickle_weights(f) for f in main_files):
        return None  # nothing the bot could have converted
    # The hub filters too, but every condition is checked here: only the bot is trusted.
    prs = api.get_repo_discussions(name, author=SFCONVERT_BOT, discussion_type="pull_request",
                                   discussion_status="open")
    for pr in prs:
        if not (pr.is_pull_request and pr.status == "open" and pr.author == SFCONVERT_BOT
                and pr.title == SFCONVERT_TITLE):
            continue
        ref = f"refs/pr/{pr.num}"
        info = api.model_info(name, revision=ref, files_metadata=True)
        pr_files = _blob_ids(info)
        # Same pickle weights and same configs as main, i.e. a conversion of this revision.
        keys = {f for f in (*main_files, *pr_files)
                if _is_pickle_weights(f) or f in _CONFIG_PATTERNS}
        differ = sorted(f for f in keys if main_files.get(f) != pr_files.get(f))
        if differ or not (SAFETENSORS_FILE in pr_files or SAFETENSORS_INDEX in pr_files):
            logger.info("model %r: ignoring %s (%s)", name, ref,
                        f"{differ[0]} differs from main" if differ else "no safetensors weights")
            continue
        # By ref name (not commit) so that the cache records refs/pr/N for offline use.
        folder = Path(snapshot_download(name, revision=ref,
                                        allow_patterns=_CONFIG_PATTERNS + _SAFETENSORS_PATTERNS))
        if info.sha and folder.name != info.sha:
            logger.warning("model %r: %s moved while it was downloaded; ignoring it", name, ref)
            continue
        logger.info("model %r has only pickle weights on main; using the safetensors "
                    "conversion in %s by %s", name, ref, SFCONVERT_BOT)
        return folder, f"{ref}@{folder.name}"
    return None


def _same_file(a: Path, b: Path) -> bool:
    if not a.is_file() or not b.is_file():
        return a.is_file() == b.is_file()
    return a.read_bytes() == b.read_bytes()


def _cached_conversion_pr(name: str, main_dir: Path) -> tuple[Path, str] | None:
    """A ``refs/pr/N`` snapshot in the HF cache with safetensors and main's very configs.

    huggingface_hub records a downloaded revision ``refs/pr/N`` in ``<repo>/refs/refs/pr/N``.
    Its author cannot be checked offline; the cache is the user's own and safetensors cannot
    run code, and with several candidates the user must choose (``--revision refs/pr/N``).
    """
    if main_dir.parent.name != "snapshots":
        return None
    repo = main_dir.parent.parent
    found = []
    for ref_file in (repo / "refs" / "refs" / "pr").glob("*"):
        if not ref_file.name.isdigit() or not ref_file.is_file():
            continue
        try:
            commit = ref_file.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        folder = repo / "snapshots" / commit
        if (commit and folder != main_dir and _has_safetensors(folder)
                and all(_same_file(main_dir / f, folder / f) for f in _CONFIG_PATTERNS)):
            found.append((int(ref_file.name), folder))
    if not found:
        return None
    found.sort()
    if len(found) > 1:
        refs = ", ".join(f"refs/pr/{num}" for num, _ in found)
        raise ModelError(
            f"model {name!r} has only pickle weights on main and the cache holds several "
            f"safetensors pull requests ({refs}); pass --revision with the one to use, or go "
            f"online so that {SFCONVERT_BOT}'s is picked"
        )
    num, folder = found[0]
    logger.info("model %r: using the cached safetensors weights of refs/pr/%d (%s)", name,
                num, folder)
    return folder, f"refs/pr/{num}@{folder.name}"


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the hub cannot be reached: OfflineModeIsEnabled (a
    ConnectionError), connection errors and timeouts of its HTTP library."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            lib = __import__(module)
        except ImportError:
            continue
        for attr in ("TransportError", "ConnectionError", "Timeout"):
            exc = getattr(lib, attr, None) or getattr(getattr(lib, "exceptions", None), attr, None)
            if isinstance(exc, type) and issubclass(exc, BaseException):
                errors.append(exc)
    return tuple(errors)


def _snapshot(name: str, *, revision: str | None, patterns: list[str]) -> Path:
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
            f"(hf auth login), {hint}"
        ) from err
    except RevisionNotFoundError as err:
        raise ModelError(f"model {name!r} has no revision {revision!r} on the hub") from err
    except RepositoryNotFoundError as err:
        if _local_parent(name):
            raise ModelError(f"no such folder or hub model: {name}{_folder_note(name)}") from err
        raise ModelError(
            f"model {name!r} was not found on the Hugging Face hub (or it is private: "
            f"hf auth login); {hint}"
        ) from err
    except (LocalEntryNotFoundError, *_unreachable_errors()) as err:
        if _local_parent(name):  # runs/exx: a mistyped folder, not a hub name
            raise ModelError(
                f"no such folder or cached model: {name}{_folder_note(name)}; pass an existing "
                "checkpoint folder with --model"
            ) from err
        raise ModelError(
            f"no such folder or cached model: {name}{at} (not in the local Hugging Face cache, "
            "and the hub cannot be reached: HF_HUB_OFFLINE=1 or no network); on a connected "
            f"machine run {_fetch_hint(name)}, {hint}"
        ) from err
    except Exception as err:  # network/disk errors of any kind
        raise ModelError(f"cannot fetch model {name!r}{at} from the hub: {_first_line(err)}; "
                         f"{hint}") from err
    return Path(path)
