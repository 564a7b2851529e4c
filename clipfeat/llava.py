"""LLaVA drop-in: train on precomputed features instead of running the vision tower.

- ``PrecomputedVisionTower(store, output=None, expect_layer=-2, expect_feature="patch", ...)``
  has the properties LLaVA reads from ``CLIPVisionTower`` (``hidden_size``,
  ``num_patches``, ``config``, ``dtype``, ``device``, ``dummy_feature``, ...) and a
  ``forward`` that takes the features (what the dataset now yields instead of pixel values)
  and returns them on the module's device and dtype, so ``encode_images`` and the projector
  work unchanged.
- ``LlavaFeatureDataset(json_or_samples, store)`` yields each sample with its
  ``image_features`` looked up by the sample's exact ``image`` string.
- ``check_compatible(meta, layer=..., feature=..., aspect=..., model=...)`` refuses a store
  made with other settings, naming both values.

A store of several outputs (layers, towers: ``FeatureStore.outputs``) feeds one of them to
the tower: ``output=NAME`` (``"clip-vit-large-patch14-336/-2"``), whose own metadata
(model, layer, feature) is then checked; without one, such a store is refused with a
StoreError listing its outputs. A store of one output needs no name.

In LLaVA's own ``llava/train/train.py`` the store is named once, by the environment
variable ``CLIPFEAT_STORE`` (its output, for a store of several, by ``CLIPFEAT_OUTPUT``),
and two helpers make the edits one call each:

- ``precomputed_vision_tower(vision_tower_cfg, **kwargs)``, called first thing in LLaVA's
  ``build_vision_tower``: the store's tower when ``CLIPFEAT_STORE`` is set (None otherwise),
  checked against the model, layer and feature of whatever config LLaVA passes (the
  ``ModelArguments`` of a fresh run, or the checkpoint's ``config`` when
  ``LlavaMetaModel.__init__`` builds the tower of a checkpoint).
- ``load_features(sample, data_args)``, in ``LazySupervisedDataset.__getitem__``: the
  sample's features, or zeros of the store's shape for a text-only sample; refuses a store
  whose aspect is not ``data_args.image_aspect_ratio`` (the only object that holds the run's
  aspect in every code path).

``torch`` is imported only when the tower class is first used (``import clipfeat.llava``
stays light).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from clipfeat.errors import ConfigError, StoreError
from clipfeat.outputs import LayerSel

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from clipfeat.store import FeatureStore

__all__ = ["OUTPUT_ENV", "STORE_ENV", "LlavaFeatureDataset",  # noqa: F822
           "PrecomputedVisionTower", "check_compatible", "load_features",
           "precomputed_vision_tower"]

# The one place the store of a LLaVA run is named (see precomputed_vision_tower).
STORE_ENV = "CLIPFEAT_STORE"
# Which output of that store the run trains on, for a store of several outputs.
OUTPUT_ENV = "CLIPFEAT_OUTPUT"

# LLaVA's image_aspect_ratio values that mean "the image processor's own resize/crop".
_PLAIN_ASPECTS = {"square", "crop", "resize", "center_crop", "default", "none", "", "plain"}


def _canonical_aspect(value: Any) -> str:
    text = "none" if value is None else str(value).strip().lower()
    return "plain" if text in _PLAIN_ASPECTS else text


def _same_model(want: str, have: str) -> bool:
    a, b = str(want).rstrip("/\\"), str(have).rstrip("/\\")
    if a == b:
        return True
    # A local copy of a hub model ("/models/clip-vit-large-patch14-336") matches its
    # hub name ("openai/clip-vit-large-patch14-336") by the last path component.
    local = any(s.startswith(("/", ".", "~")) or os.path.isdir(s) for s in (a, b))
    return local and os.path.basename(a) == os.path.basename(b)


def _layer_indices(meta: dict) -> list[int]:
    """The ``hidden_states`` indices a store's features were read from, as recorded."""
    found = [meta.get("layer_index")]
    listed = meta.get("layer_indices")
    if isinstance(listed, str):
        try:
            listed = json.loads(listed)
        except ValueError:
            listed = None
    if isinstance(listed, list) and len(listed) == 1:
        found += listed
    return [int(v) for v in found if isinstance(v, int) and not isinstance(v, bool)]


def _same_layer(meta: dict, layer: Any) -> bool:
    """Is ``layer`` (an int, or ``"mean(A:B)"``) the layer the store's features come from:
    the layer as given at extraction, or (one layer) its resolved ``hidden_states`` index?"""
    try:
        want = LayerSel.parse(layer)
    except ConfigError:
        return False
    have = meta.get("layer")
    if have is not None:
        try:
            if str(LayerSel.parse(have)) == str(want):
                return True
        except ConfigError:
            pass
    return not want.mean and int(want.start) in _layer_indices(meta)  # type: ignore[arg-type]


def check_compatible(
    meta: dict,
    *,
    layer: int | str | None = None,
    feature: str | None = None,
    aspect: str | None = None,
    model: str | None = None,
) -> None:
    """Raise StoreError unless the store described by ``meta`` (``FeatureStore.meta``: the
    chosen output's, for a store of several) was made with the given settings; ``None``
    skips a check. ``layer`` matches either the layer as given at extraction (``-2``,
    ``"mean(0:12)"``) or its resolved ``hidden_states`` index."""
    problems = []
    where = f" (output {meta['output']})" if meta.get("output") else ""
    if layer is not None:
        if meta.get("layer") is None and not _layer_indices(meta):
            problems.append(f"expected layer {layer} but the store does not record its layer")
        elif not _same_layer(meta, layer):
            index = meta.get("layer_index", meta.get("layer_indices"))
            problems.append(
                f"store features{where} come from layer {meta.get('layer')} (hidden_states"
                f"[{index}]) but layer {layer} was expected "
                f"(mm_vision_select_layer): re-extract with --layer {layer}")
    if feature is not None and meta.get("feature") != feature:
        problems.append(
            f"store features{where} are {meta.get('feature')!r} but {feature!r} was expected "
            f"(mm_vision_select_feature): re-extract with --feature {feature}")
    if aspect is not None and _canonical_aspect(meta.get("aspect")) != _canonical_aspect(aspect):
        problems.append(
            f"store images were preprocessed with aspect {meta.get('aspect')!r} but "
            f"{aspect!r} was expected (image_aspect_ratio): re-extract with the matching "
            "--aspect")
    if model is not None and not _same_model(model, str(meta.get("model"))):
        problems.append(
            f"store features{where} come from model {meta.get('model')!r} but {model!r} was "
            "expected (mm_vision_tower)")
    if problems:
        raise StoreError("incompatible feature store: " + "; ".join(problems))


def _open_store(store: FeatureStore | str | os.PathLike, output: str | None = None, *,
                one: bool = False) -> FeatureStore:
    """``store`` (a FeatureStore or an OUT folder) reading ``output``; with ``one``, a
    StoreError naming the outputs when it holds several and none is chosen."""
    from clipfeat.store import FeatureStore

    if isinstance(store, FeatureStore):
        st = store if output is None or store.output == output else store.select(output)
    elif isinstance(store, (str, os.PathLike)):
        st = FeatureStore(store, output)
    else:
        raise ConfigError(f"expected a FeatureStore or an OUT folder, not {type(store).__name__}")
    if one and st.output is None:
        raise StoreError(
            f"{st.path}: the store holds {len(st.outputs)} outputs ("
            + ", ".join(repr(n) for n in st.outputs)
            + f"): choose the one to train on with output=NAME (or {OUTPUT_ENV}=NAME)")
    return st


class _PrecomputedTowerImpl:
    """A vision tower whose output was computed by ``clipfeat extract``: the store's one
    output, or ``output`` (its name) of a store of several, checked against the
    ``expect_*`` settings given (its layer, feature, aspect and model).

    ``forward(features)`` takes what the dataset yields (a (B, P, D) tensor, or a list
    of (P, D) / (1, P, D) tensors) and returns it on this module's device and dtype —
    a list in gives a list of (1, P, D) out, like LLaVA's ``CLIPVisionTower``.
    """

    is_loaded = True
    image_processor = None

    def __init__(
        self,
        store: FeatureStore | str | os.PathLike,
        output: str | None = None,
        *,
        expect_layer: int | str | None = None,
        expect_feature: str | None = None,
        expect_aspect: str | None = None,
        expect_model: str | None = None,
    ) -> None:
        import torch

        super().__init__()
        self.store = _open_store(store, output, one=True)
        self.output = self.store.output
        meta = self.store.meta
        check_compatible(meta, layer=expect_layer, feature=expect_feature,
                         aspect=expect_aspect, model=expect_model)
        tokens, hidden = self.store.shape
        image_size = meta.get("image_size")
        patch_size = meta.get("patch_size")
        self.vision_tower_name = meta.get("model")
        self.select_layer = meta.get("layer")
        self.select_feature = meta.get("feature")
        self.tokens = int(tokens)
        self.config = SimpleNamespace(
            hidden_size=int(hidden),
            image_size=int(image_size) if image_size is not None else None,
            patch_size=int(patch_size) if patch_size is not None else None,
            model_type=meta.get("model_type"),
            name_or_path=meta.get("model"),
        )
        store_dtype = torch.float32 if str(self.store.dtype) == "float32" else torch.float16
        # Zero-size buffer: follows .to(device, dtype) so forward knows where to go.
        self.register_buffer("_anchor", torch.zeros(0, dtype=store_dtype), persistent=False)

    # -- CLIPVisionTower API

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No-op: there are no weights to load."""

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        if self.config.image_size and self.config.patch_size:
            return self.config.image_size // self.config.patch_size
        grid = int(round(self.tokens ** 0.5))  # cls_patch stores one extra token
        return grid if grid * grid == self.tokens else int(round((self.tokens - 1) ** 0.5))

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side ** 2

    @property
    def dummy_feature(self) -> torch.Tensor:
        import torch

        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        import torch

        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected precomputed feature tensors, got {type(t).__name__}")
        if t.shape[-1] != self.hidden_size:
            raise ValueError(
                f"features have hidden size {t.shape[-1]} but the store's is "
                f"{self.hidden_size}: the dataset is not yielding this store's features")
        return t.to(device=self.device, dtype=self.dtype)

    def forward(self, features):
        if isinstance(features, (list, tuple)):
            out = []
            for t in features:
                t = self._place(t)
                if t.ndim == 2:
                    t = t.unsqueeze(0)
                if t.ndim != 3 or t.shape[0] != 1:
                    raise ValueError(f"list items must be (P, D) or (1, P, D), got "
                                     f"{tuple(t.shape)}")
                out.append(t)
            return out
        t = self._place(features)
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3:
            raise ValueError(f"expected (B, P, D) features, got {tuple(t.shape)}")
        return t

    def lookup(self, keys):
        """Features of one key ((P, D)) or of a list of keys ((k, P, D)), placed on
        this module's device and dtype."""
        if isinstance(keys, str):
            return self.store[keys].to(device=self.device, dtype=self.dtype)
        return self.store.get_many(list(keys)).to(device=self.device, dtype=self.dtype)

    def extra_repr(self) -> str:
        picked = f", output={self.output!r}" if len(self.store.outputs) > 1 else ""
        return (f"store={str(self.store.path)!r}{picked}, model={self.vision_tower_name!r}, "
                f"layer={self.select_layer}, feature={self.select_feature!r}, "
                f"tokens={self.tokens}, hidden_size={self.hidden_size}")


_TOWER_CLASS = None


def _tower_class():
    """Build the nn.Module subclass on first use, so importing this module needs no torch."""
    global _TOWER_CLASS
    if _TOWER_CLASS is not None:
        return _TOWER_CLASS
    from torch import nn

    _TOWER_CLASS = type(
        "PrecomputedVisionTower",
        (_PrecomputedTowerImpl, nn.Module),
        {"__module__": __name__, "__doc__": _PrecomputedTowerImpl.__doc__,
         "__qualname__": "PrecomputedVisionTower"},
    )
    return _TOWER_CLASS


def __getattr__(name: str) -> Any:
    if name == "PrecomputedVisionTower":
        return _tower_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------- LLaVA train.py


def store_path(store: FeatureStore | str | os.PathLike | None = None):
    """``store`` if given, else ``$CLIPFEAT_STORE``; None when neither names a store."""
    if store is not None:
        return store
    value = os.environ.get(STORE_ENV, "").strip()
    return value or None


def store_output(output: str | None = None) -> str | None:
    """``output`` if given, else ``$CLIPFEAT_OUTPUT``; None when neither names one."""
    if output is not None:
        return output
    value = os.environ.get(OUTPUT_ENV, "").strip()
    return value or None


def precomputed_vision_tower(vision_tower_cfg: Any, store: Any = None,
                             output: str | None = None, **kwargs: Any):
    """What LLaVA's ``build_vision_tower(vision_tower_cfg, **kwargs)`` should return when
    training on a store: a ``PrecomputedVisionTower`` over ``store`` (default
    ``$CLIPFEAT_STORE``) and its ``output`` (default ``$CLIPFEAT_OUTPUT``; needed only for
    a store of several), or None when no store is named, so LLaVA builds its own tower.

    LLaVA calls its builder with ``ModelArguments`` (``initialize_vision_modules`` in a
    fresh run) or with the model ``config`` (``LlavaMetaModel.__init__``, with
    ``delay_load=True``, when the checkpoint's config has ``mm_vision_tower``); the model
    (``mm_vision_tower`` or ``vision_tower``), ``mm_vision_select_layer`` and
    ``mm_vision_select_feature`` are read from it the way LLaVA's ``CLIPVisionTower`` reads
    them and checked against the store. The aspect is not: it is a ``DataArguments``
    field, absent from both, so ``load_features`` checks it. ``kwargs`` (``delay_load``)
    are accepted and ignored: there is nothing to load.
    """
    path = store_path(store)
    if path is None:
        return None
    for flag in ("s2", "unfreeze_mm_vision_tower"):
        if getattr(vision_tower_cfg, flag, False):
            raise ConfigError(
                f"{flag} is set, but precomputed features come from the frozen single-scale "
                f"tower: unset {STORE_ENV} to train with the real tower")
    return _tower_class()(
        _cached_store(path, store_output(output)),
        expect_model=getattr(vision_tower_cfg, "mm_vision_tower",
                             getattr(vision_tower_cfg, "vision_tower", None)),
        expect_layer=getattr(vision_tower_cfg, "mm_vision_select_layer", None),
        expect_feature=getattr(vision_tower_cfg, "mm_vision_select_feature", "patch"),
    )


# per process; FeatureStore reopens its files after fork
_STORES: dict[tuple[str, str | None], FeatureStore] = {}
_ASPECTS_CHECKED: set[tuple[str, str]] = set()


def _cached_store(store: FeatureStore | str | os.PathLike,
                  output: str | None = None) -> FeatureStore:
    """``store`` reading its one output or ``output``, opened once per process."""
    if not isinstance(store, (str, os.PathLike)):
        return _open_store(store, output, one=True)
    key = (os.path.abspath(os.fspath(store)), output)
    if key not in _STORES:
        _STORES[key] = _open_store(store, output, one=True)
    return _STORES[key]


def load_features(sample: Any, data_args: Any = None, *, store: Any = None,
                  output: str | None = None) -> torch.Tensor:
    """The ``data_dict['image']`` of a LLaVA sample when training on a store.

    ``sample`` is the sample dict (``self.list_data_dict[i]``) or its image key. With an
    ``image`` string: that image's (tokens, hidden) features, in the store dtype. Without
    one (a text-only sample): zeros of the same shape and dtype, the placeholder LLaVA's
    collator stacks with the others and ``encode_images`` runs through the tower (LLaVA
    uses zero pixels of the processor's crop size there).

    ``store`` defaults to ``$CLIPFEAT_STORE``, opened once per process, and ``output`` (the
    one to read, for a store of several: StoreError listing them when none is chosen) to
    ``$CLIPFEAT_OUTPUT``. The store's aspect
    is checked against ``data_args.image_aspect_ratio`` (StoreError: a square store in a
    ``pad`` run, or the reverse) on the first call of each process.
    """
    import torch

    path = store_path(store)
    if path is None:
        raise ConfigError(f"no feature store: set {STORE_ENV} to the OUT folder of "
                          "clipfeat extract (or pass store=)")
    st = _cached_store(path, store_output(output))
    aspect = getattr(data_args, "image_aspect_ratio", None)
    if aspect is not None and (str(st.path), str(aspect)) not in _ASPECTS_CHECKED:
        check_compatible(st.meta, aspect=aspect)
        _ASPECTS_CHECKED.add((str(st.path), str(aspect)))
    image = sample.get("image") if isinstance(sample, dict) else sample
    if image is None:
        dtype = torch.float32 if str(st.dtype) == "float32" else torch.float16
        return torch.zeros(tuple(st.shape), dtype=dtype)
    if not isinstance(image, str):
        raise ConfigError(f"image is {image!r}: LLaVA's train.py takes one image string per "
                          "sample (LlavaFeatureDataset handles lists)")
    try:
        return st[image]
    except KeyError:
        sid = sample.get("id") if isinstance(sample, dict) else None
        raise KeyError(
            f"image {image!r}" + (f" (sample id {sid!r})" if sid is not None else "")
            + f" is not in the feature store {st.path}: extract it, or check that "
            "the store was made from this JSON") from None


def load_llava_samples(data: str | os.PathLike | list) -> list[dict]:
    """LLaVA training samples from a JSON list, a JSONL file, or a list of dicts."""
    if isinstance(data, list):
        samples = data
    elif isinstance(data, (str, os.PathLike)):
        from clipfeat.sources import read_llava_samples

        samples = [s for _, s in read_llava_samples(data)]
    else:
        raise ConfigError(f"expected a JSON/JSONL path or a list of samples, "
                          f"not {type(data).__name__}")
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise ConfigError(f"sample {i} is a {type(s).__name__}, expected a JSON object")
    return samples


class LlavaFeatureDataset:
    """LLaVA samples with their image features, for a ``torch.utils.data.DataLoader``.

    ``ds[i]`` is a dict: the sample's own fields plus ``image_features``: a (P, D) tensor
    when ``image`` is a string, a list of them when it is a list, None for text-only
    samples. Keys are the exact ``image`` strings (as ``clipfeat extract --llava-json``
    stores them). Picklable: works with DataLoader workers (fork or spawn). A store of
    several outputs gives ``output``'s features, or without it a dict name -> (P, D) tensor
    per image (`FeatureStore`).
    """

    def __init__(self, data: str | os.PathLike | list, store: FeatureStore | str | os.PathLike,
                 *, output: str | None = None, image_field: str = "image") -> None:
        self.samples = load_llava_samples(data)
        self.store = _open_store(store, output)
        self.image_field = image_field

    def __len__(self) -> int:
        return len(self.samples)

    def _features(self, key: Any, i: int):
        if not isinstance(key, str):
            raise ConfigError(f"sample {i}: {self.image_field!r} is {key!r}, expected a string "
                              "or a list of strings")
        try:
            return self.store[key]
        except KeyError:
            sid = self.samples[i].get("id")
            raise KeyError(
                f"image {key!r} of sample {i}" + (f" (id {sid!r})" if sid is not None else "")
                + f" is not in the feature store {self.store.path}: extract it, or check "
                "that the store was made from this JSON") from None

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        out = dict(sample)
        image = sample.get(self.image_field)
        if image is None:
            out["image_features"] = None
        elif isinstance(image, (list, tuple)):
            out["image_features"] = [self._features(k, i) for k in image]
        else:
            out["image_features"] = self._features(image, i)
        return out

    def keys_needed(self) -> list[str]:
        """Every image key the samples refer to, first occurrence order, no repeats."""
        seen: dict[str, None] = {}
        for s in self.samples:
            image = s.get(self.image_field)
            for k in (image if isinstance(image, (list, tuple)) else [image]):
                if isinstance(k, str):
                    seen.setdefault(k, None)
        return list(seen)

    def missing_keys(self) -> list[str]:
        """Image keys the samples need that the store lacks (check before training)."""
        return [k for k in self.keys_needed() if k not in self.store]
