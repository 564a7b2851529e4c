"""`CLIPVisionTower`: LLaVA's vision tower (same API and features), computing only what it returns.

The class is an ``nn.Module`` built on first access (``from clipfeat.tower import
CLIPVisionTower``), so importing this module does not import torch. The torch-free helpers
`resolve_layer`, `check_feature` and `tokens_per_image` are shared with ``clipfeat info``.

Semantics honoured (LLaVA ``llava/model/multimodal_encoder/clip_encoder.py``):
``hidden_states`` has L+1 entries, ``[0]`` the embeddings (after ``pre_layrnorm`` for CLIP),
``[i]`` the output of block i, ``[-1]`` the last block *without* the final norm.
``patch`` drops the CLS token (CLIP, DINOv2) and the registers (DINOv2 with registers), and
keeps every token for SigLIP, which has none; ``cls_patch`` keeps CLS and the patches (not on
SigLIP). The families and their token layouts are `clipfeat.families`; the class keeps
LLaVA's name for every family.

Several outputs from one forward: ``load_tower(model, layers=[...])`` (or ``layers=`` to the
constructor) takes `clipfeat.outputs.LayerSel` selections; the model keeps the blocks the
deepest needs, and `forward_outputs` returns one tensor per selection. A single layer comes
out in the compute dtype; ``mean(A:B)`` is the mean of ``hidden_states[A:B]`` accumulated in
float32 (returned float32); token selection comes after the mean.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from clipfeat import families
from clipfeat.errors import ConfigError, ModelError
from clipfeat.modelref import ModelRef, resolve_model
from clipfeat.outputs import DEFAULT_LAYER, LayerSel, check_distinct, parse_layers

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)


_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def resolve_layer(layer: Any, num_layers: int) -> int:
    """Map a hidden-state index in ``-(L+1)..L`` to its non-negative index ``k`` in ``0..L``."""
    lo, hi = -(num_layers + 1), num_layers
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"layer {layer!r} is not an integer; pass one in {lo}..{hi}")
    if not lo <= layer <= hi:
        raise ConfigError(
            f"layer {layer} is out of range for a tower with {num_layers} blocks: valid layers "
            f"are {lo}..{hi} (0 = embeddings, -1 = last block, -2 = LLaVA-1.5's choice)"
        )
    return layer if layer >= 0 else num_layers + 1 + layer


def check_feature(feature: Any, family: str) -> str:
    """Validate a select_feature name for a model family; return it."""
    return families.check_feature(feature, family)


def tokens_per_image(ref: ModelRef, feature: str) -> int:
    """Tokens per image the tower returns for a feature: ``num_patches``, plus the CLS token
    for ``cls_patch`` (registers are never returned; see `clipfeat.families`)."""
    return families.feature_tokens(ref.family, ref.num_patches, feature)


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ConfigError(
            f"dtype {dtype!r} is not supported; choose float32, float16 or bfloat16"
        )
    return getattr(torch, name)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report (text weights 'unexpected') and progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_image_processor(ref: ModelRef) -> Any:
    """The checkpoint's own PIL image processor (class defaults sized to the model if absent)."""
    cls = families.processor_class(ref.family)
    if ref.preprocessor_config is None:
        size = ref.image_size
        logger.warning(
            "model %r has no preprocessor_config.json; using %s defaults at %d px",
            ref.name, cls.__name__, size,
        )
        return cls(**families.missing_processor_config(ref.family, size))
    try:
        with _quiet_transformers():
            return cls.from_pretrained(str(ref.local_dir), local_files_only=True)
    except Exception as err:  # any failure means a bad preprocessor config
        raise ModelError(
            f"cannot load {ref.local_dir / 'preprocessor_config.json'}: "
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ) from err


class _TowerImpl:
    """LLaVA-compatible vision tower (CLIP, SigLIP, DINOv2) computing only what it returns.

    ``CLIPVisionTower(vision_tower, args, delay_load=False, *, device=None, dtype=None,
    revision=None, allow_pickle=False, model_ref=None, layers=None)``: ``args`` has
    ``mm_vision_select_layer`` and optionally ``mm_vision_select_feature`` ("patch" |
    "cls_patch"). ``vision_tower`` is a hub name or a local checkpoint folder (full CLIP/SigLIP,
    vision-only, DINOv2 with or without registers). Layer and feature are checked at
    construction; with ``delay_load`` only the configs are read. ``layers`` (a sequence of
    `clipfeat.outputs.LayerSel` or their spellings, ``-2``, ``"mean(0:12)"``) asks for several
    outputs at once and takes the place of ``mm_vision_select_layer``: ``select_layer`` is then
    the first of them.

    After ``load_model()`` the encoder blocks past the deepest selected layer are dropped, so
    ``forward(images)`` returns exactly ``hidden_states[select_layer]`` of the full model
    (token-selected), at the cost of the blocks it needs. ``forward`` takes a ``(B,3,H,W)``
    tensor -> ``(B,P,D)``, or a list of ``(3,H,W)`` -> list of ``(1,P,D)``, in the input's dtype.
    `forward_outputs` returns every selection from one forward.
    """

    def __init__(
        self,
        vision_tower: str,
        args: Any,
        delay_load: bool = False,
        *,
        device: Any = None,
        dtype: Any = None,
        revision: str | None = None,
        allow_pickle: bool = False,
        model_ref: ModelRef | None = None,
        layers: Sequence[Any] | None = None,
    ) -> None:
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        if layers is None and not hasattr(args, "mm_vision_select_layer"):
            raise ConfigError(
                "args has no mm_vision_select_layer; set it to the hidden layer to select "
                "(LLaVA-1.5 uses -2)"
            )
        self.select_layer = getattr(args, "mm_vision_select_layer", None)
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        self._device = device
        self._dtype = _torch_dtype(dtype)
        self._revision = revision
        self._allow_pickle = allow_pickle
        self._logged_loaded = False
        self.vision_tower = None
        self._image_processor = None
        self._block_args: tuple[None, ...] = ()

        # A caller that already resolved the model (extract, verify) passes its ModelRef.
        self.model_ref = model_ref if model_ref is not None else resolve_model(
            vision_tower, revision=revision, need_weights=not delay_load,
            allow_pickle=allow_pickle)
        num_layers = self.model_ref.num_hidden_layers
        if layers is None:
            index = resolve_layer(self.select_layer, num_layers)
            self.selections: tuple[LayerSel, ...] = (LayerSel(self.select_layer),)
            self.layer_indices: tuple[tuple[int, ...], ...] = ((index,),)
        else:
            self.selections = parse_layers(layers)
            check_distinct(self.selections, num_layers, model=vision_tower)
            self.layer_indices = tuple(s.indices(num_layers) for s in self.selections)
            self.select_layer = self.selections[0].attr_value()
        #: hidden_states index of the first selection (of its deepest state, for a mean)
        self.select_layer_index = max(self.layer_indices[0])
        #: encoder blocks the selections need (kept when the model loads)
        self.num_blocks_needed = max(max(ix) for ix in self.layer_indices)
        check_feature(self.select_feature, self.model_ref.family)

        if not delay_load:
            self.load_model()
        else:
            _ = self.model_ref.vision_config  # parse it now: a bad config fails here

    # -- loading ---------------------------------------------------------------------------

    def load_model(self, device_map: Any = None) -> None:
        """Load the image processor and the vision model, truncated after the deepest
        selected layer."""
        if self.is_loaded:
            if not self._logged_loaded:
                logger.info("%s is already loaded, `load_model` called again, skipping.",
                            self.vision_tower_name)
                self._logged_loaded = True
            return

        ref = self.model_ref
        if ref.weights_file is None:
            ref = resolve_model(self.vision_tower_name, revision=self._revision,
                                need_weights=True, allow_pickle=self._allow_pickle)
            self.model_ref = ref
        model_cls = families.model_class(ref.type_info)
        kwargs: dict[str, Any] = {
            "local_files_only": True,
            "output_loading_info": True,
            # None lets transformers prefer safetensors when both formats are present.
            "use_safetensors": None if self._allow_pickle else True,
        }
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            with _quiet_transformers():
                model, info = model_cls.from_pretrained(str(ref.local_dir), **kwargs)
        except Exception as err:  # corrupt file, bad shapes, unreadable disk...
            text = str(err).strip().splitlines()
            raise ModelError(
                f"cannot load the weights of model {ref.name!r} from {ref.weights_file}: "
                f"{type(err).__name__}: {text[0] if text else ''}"
            ) from err
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ModelError(
                f"model {ref.name!r} lacks {len(missing)} vision weight(s) in {ref.weights_file} "
                f"(first: {missing[0]}); they would be random: pass a complete checkpoint"
            )
        model.requires_grad_(False)
        model.eval()
        # Blocks past the deepest selected layer are never needed: drop them (memory, compute).
        encoder = getattr(model, "vision_model", model).encoder  # 4.x nests CLIP/SigLIP in it
        attr = ref.family_info.blocks_attr
        blocks = getattr(encoder, attr)
        if len(blocks):
            self._block_args = _required_arguments(blocks[0])
        setattr(encoder, attr, blocks[: self.num_blocks_needed])
        if device_map is None and (self._device is not None or self._dtype is not None):
            model.to(device=self._device, dtype=self._dtype)
        self.vision_tower = model
        self.is_loaded = True
        logger.debug("loaded %s (%s), kept %d of %d blocks", ref.name, ref.model_type,
                     self.num_blocks_needed, ref.num_hidden_layers)

    @property
    def image_processor(self) -> Any:
        """The checkpoint's HF PIL image processor (LLaVA's API), loaded on first use.

        clipfeat's own pipeline preprocesses with `clipfeat.preprocess`, so extraction never
        pays for importing transformers' image-processing stack.
        """
        if self._image_processor is None and self.is_loaded:
            self._image_processor = load_image_processor(self.model_ref)
        return self._image_processor

    @image_processor.setter
    def image_processor(self, value: Any) -> None:
        self._image_processor = value

    # -- forward -----------------------------------------------------------------------------

    def feature_select(self, image_forward_outs: Any) -> torch.Tensor:
        """Pick ``hidden_states[select_layer]`` (the mean, for a ``mean(A:B)`` first
        selection) and the tokens of the selected feature."""
        states = image_forward_outs.hidden_states
        hidden = None
        for k in self.layer_indices[0]:
            hidden = _take(hidden, states[k], mean=self.selections[0].mean)
        return self._finish(hidden, self.selections[0], len(self.layer_indices[0]))

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) pixels already on the tower's device/dtype -> (B, tokens, hidden) of the
        first (or only) selection, running only the blocks it needs."""
        return self._compute(pixel_values, (0,))[0]

    def forward_outputs(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B,3,H,W) pixels already on the tower's device/dtype -> one (B, tokens, hidden)
        tensor per selection, in order, from one forward: single layers in the compute dtype,
        means in float32."""
        return self._compute(pixel_values, range(len(self.selections)))

    def _compute(self, pixel_values: torch.Tensor, which: Sequence[int]) -> list[torch.Tensor]:
        import torch

        self._require_loaded()
        wanted = [(self.selections[j], self.layer_indices[j]) for j in which]
        readers: dict[int, list[int]] = {}  # hidden-state index -> the outputs reading it
        for pos, (_, indices) in enumerate(wanted):
            for k in indices:
                readers.setdefault(k, []).append(pos)
        outs: list[Any] = [None] * len(wanted)
        inner = self._inner
        with torch.no_grad():
            hidden = inner.embeddings(pixel_values)
            if self.model_ref.family_info.pre_layrnorm:
                hidden = inner.pre_layrnorm(hidden)
            blocks = getattr(inner.encoder, self.model_ref.family_info.blocks_attr)
            for k in range(max(readers) + 1):
                if k:
                    out = blocks[k - 1](hidden, *self._block_args)
                    hidden = out[0] if isinstance(out, tuple) else out  # 4.x: a tuple
                for pos in readers.get(k, ()):
                    outs[pos] = _take(outs[pos], hidden, mean=wanted[pos][0].mean)
            return [self._finish(out, sel, len(indices))
                    for out, (sel, indices) in zip(outs, wanted, strict=True)]

    def _finish(self, hidden: torch.Tensor, sel: LayerSel, count: int) -> torch.Tensor:
        """A mean's division (its ``count`` states summed in float32), then the tokens."""
        if sel.mean:
            hidden = hidden.div_(count)
        return families.select_tokens(hidden, self.select_feature, self.model_ref)

    def forward(self, images: Any) -> Any:
        """A (B,3,H,W) tensor -> (B,P,D); a list of (3,H,W) -> list of (1,P,D); input dtype kept."""
        self._require_loaded()
        if isinstance(images, (list, tuple)):
            return [self._forward_batch(image.unsqueeze(0)) for image in images]
        return self._forward_batch(images)

    def _forward_batch(self, images: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(images.to(device=self.device, dtype=self.dtype))
        return features.to(images.dtype)

    def _require_loaded(self) -> None:
        if not self.is_loaded:
            raise RuntimeError(
                f"vision tower {self.vision_tower_name!r} is not loaded; call load_model() first"
            )

    # -- properties (LLaVA names) ------------------------------------------------------------

    @property
    def dummy_feature(self) -> torch.Tensor:
        import torch

        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        if self.is_loaded:
            return self.vision_tower.dtype
        import torch

        return self._dtype if self._dtype is not None else torch.float32

    @property
    def device(self) -> torch.device:
        if self.is_loaded:
            return self.vision_tower.device
        import torch

        return torch.device(self._device) if self._device is not None else torch.device("cpu")

    @property
    def config(self) -> Any:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.model_ref.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.model_ref.image_size // self.model_ref.patch_size

    @property
    def num_patches(self) -> int:
        return self.model_ref.num_patches

    @property
    def num_tokens(self) -> int:
        """Tokens per image actually returned for the selected feature."""
        return tokens_per_image(self.model_ref, self.select_feature)

    @property
    def num_layers(self) -> int:
        return self.model_ref.num_hidden_layers

    @property
    def num_layers_kept(self) -> int:
        """Encoder blocks the loaded model holds: :attr:`num_blocks_needed`, since the blocks
        past the deepest selected layer are dropped when it loads (counted on the model)."""
        self._require_loaded()
        return len(getattr(self._inner.encoder, self.model_ref.family_info.blocks_attr))

    @property
    def family(self) -> str:
        return self.model_ref.family

    @property
    def has_cls_token(self) -> bool:
        return self.model_ref.has_cls_token

    @property
    def num_registers(self) -> int:
        """Register tokens in the model's hidden states (never returned)."""
        return self.model_ref.num_registers

    @property
    def cfg_only(self) -> Any:
        """The vision config read without weights (LLaVA's name)."""
        return self.model_ref.vision_config

    @property
    def _inner(self) -> Any:
        # transformers 5 puts embeddings/encoder on the model; 4.x nests them in .vision_model
        return getattr(self.vision_tower, "vision_model", self.vision_tower)


def _take(acc: Any, hidden: torch.Tensor, *, mean: bool) -> torch.Tensor:
    """One hidden state into an output: the state itself, or added to a float32 sum."""
    import torch

    if not mean:
        return hidden
    if acc is None:  # a copy: the sum is updated in place, the state feeds the next block
        return hidden.to(torch.float32, copy=True)
    return acc.add_(hidden.to(torch.float32))


def _required_arguments(block: Any) -> tuple[None, ...]:
    """None for each argument after the hidden states that a block's forward requires
    (transformers 4.x CLIP blocks take attention and causal masks, 5.x CLIP one mask,
    DINOv2 none): the blocks are run one by one, without masks, as the encoders do."""
    params = list(inspect.signature(block.forward).parameters.values())[1:]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return (None,) * sum(1 for p in params if p.kind in positional and p.default is p.empty)


def _build_tower_class() -> type:
    from torch import nn

    return type(
        "CLIPVisionTower",
        (_TowerImpl, nn.Module),
        {"__module__": __name__, "__doc__": _TowerImpl.__doc__, "__qualname__": "CLIPVisionTower"},
    )


def load_tower(
    model: str,
    *,
    layers: Sequence[LayerSel] | None = None,
    layer: int = DEFAULT_LAYER,
    feature: str = "patch",
    revision: str | None = None,
    allow_pickle: bool = False,
    device: Any = None,
    dtype: Any = None,
    model_ref: ModelRef | None = None,
) -> Any:
    """A loaded `CLIPVisionTower` of ``model`` on ``device`` in ``dtype``: the one loader that
    extract and verify share (``model_ref``: the already resolved model, so it is not
    resolved again).

    ``layers`` (selections, see `clipfeat.outputs`) asks for several outputs, read with
    ``tower.forward_outputs``; the model keeps the blocks the deepest needs. Without it the
    tower is truncated after ``layer``, as LLaVA's is."""
    from types import SimpleNamespace

    args = SimpleNamespace(mm_vision_select_layer=layer, mm_vision_select_feature=feature)
    tower = _tower_class()(model, args, delay_load=True, revision=revision,
                           allow_pickle=allow_pickle, device=device, dtype=dtype,
                           model_ref=model_ref, layers=layers)
    tower.load_model()
    return tower


def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> Any:
    """LLaVA's builder: a `CLIPVisionTower` for ``mm_vision_tower`` (or ``vision_tower``)."""
    name = getattr(vision_tower_cfg, "mm_vision_tower",
                   getattr(vision_tower_cfg, "vision_tower", None))
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"unknown vision tower {name!r}: set mm_vision_tower to a CLIP/SigLIP/DINOv2 hub "
            "name or checkpoint folder"
        )
    return _tower_class()(name, args=vision_tower_cfg, **kwargs)


_LAZY: dict[str, type] = {}


def _tower_class() -> type:
    if "CLIPVisionTower" not in _LAZY:
        _LAZY["CLIPVisionTower"] = _build_tower_class()
        globals()["CLIPVisionTower"] = _LAZY["CLIPVisionTower"]
    return _LAZY["CLIPVisionTower"]


def __getattr__(name: str) -> Any:
    # Built on first access so that importing this module does not import torch.
    if name == "CLIPVisionTower":
        return _tower_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
