"""What a run stores: towers, the layers asked of each, and the names their outputs get.

Torch-free; the one owner of the ``--model/--layer/--feature/--revision`` grammar and of
output names, shared by the CLI, the pipeline, the store and ``clipfeat info``.

- A *layer selection* (`LayerSel`) is one hidden-state index as LLaVA counts them (``-2``,
  ``23``; ``hidden_states`` has L+1 entries) or the mean over a half-open range of them,
  written like Python's slice of ``hidden_states``: ``mean(0:12)`` averages
  ``hidden_states[0]..[11]`` (DenseConnector's form). Bounds may be negative or omitted
  (``mean(12:)``), and must lie in ``-(L+1)..L+1``.
- ``--layer`` values are comma-separated selections (``-2,-9``), and may be repeated. A value
  ``MODEL=LAYERS`` applies to that ``--model`` only; the others take the plain values (or
  the default ``-2``). ``--feature`` and ``--revision`` take ``VALUE`` or ``MODEL=VALUE`` the
  same way. One ``--model`` and one ``--layer`` is exactly the one-tower command of before.
- Output name: ``TOWER/LAYER``, where TOWER is the last component of the model's hub name
  or folder (``clip-vit-large-patch14-336``) and LAYER the selection as written
  (``-2``, ``mean(0:12)``). A one-output store keeps its rows in the dataset ``features``;
  with several outputs, output ``NAME`` is the dataset ``features/NAME``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from clipfeat.errors import ConfigError

DEFAULT_LAYER = -2
#: The dataset of a one-output store, and the group holding each output of a several-output one.
FEATURES_DATASET = "features"

_INT = r"[+-]?\d+"
_MEAN_RE = re.compile(rf"^mean\(\s*({_INT})?\s*:\s*({_INT})?\s*\)$")
_INT_RE = re.compile(rf"^{_INT}$")
_SLUG_BAD = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class LayerSel:
    """One requested layer: ``hidden_states[start]`` (``mean`` False), or the mean of
    ``hidden_states[start:stop]`` (``mean`` True; None bounds as in a Python slice)."""

    start: int | None
    stop: int | None = None
    mean: bool = False

    @classmethod
    def parse(cls, value: Any) -> LayerSel:
        """``-2`` / ``"-2"`` / ``"mean(0:12)"`` -> a selection; ConfigError naming the value."""
        if isinstance(value, LayerSel):
            return value
        if isinstance(value, bool):
            raise ConfigError(f"layer {value!r} is not an integer or mean(A:B)")
        if isinstance(value, int):
            return cls(value)
        text = str(value).strip()
        if _INT_RE.match(text):
            return cls(int(text))
        m = _MEAN_RE.match(text.replace(" ", ""))
        if m:
            a, b = (int(g) if g is not None else None for g in m.groups())
            return cls(a, b, mean=True)
        raise ConfigError(
            f"layer {value!r} is not valid: pass a hidden-state index like -2 or 23, or a mean "
            "over a range like 'mean(0:12)' (hidden_states[0] .. [11])"
        )

    def __str__(self) -> str:
        if not self.mean:
            return str(self.start)
        a = "" if self.start is None else str(self.start)
        b = "" if self.stop is None else str(self.stop)
        return f"mean({a}:{b})"

    def attr_value(self) -> int | str:
        """The value recorded as the output's ``layer`` attribute (an int for one layer)."""
        return int(self.start) if not self.mean else str(self)  # type: ignore[arg-type]

    def indices(self, num_layers: int) -> tuple[int, ...]:
        """The non-negative ``hidden_states`` indices this selection reads, for a tower with
        ``num_layers`` blocks (L+1 hidden states); ConfigError naming the valid range."""
        from clipfeat.tower import resolve_layer

        if not self.mean:
            return (resolve_layer(self.start, num_layers),)
        n = num_layers + 1
        for bound in (self.start, self.stop):
            if bound is not None and not -n <= bound <= n:
                raise ConfigError(
                    f"layer {self} is out of range for a tower with {num_layers} blocks: mean "
                    f"bounds are {-n}..{n} (a slice of the {n} hidden states)"
                )
        picked = tuple(range(n)[slice(self.start, self.stop)])
        if not picked:
            raise ConfigError(f"layer {self} selects no hidden state: use mean(A:B) with A < B")
        return picked

    def deepest(self, num_layers: int) -> int:
        """The number of encoder blocks that must run to compute this selection."""
        return max(self.indices(num_layers))


def parse_layers(value: Any) -> tuple[LayerSel, ...]:
    """``-2`` / ``"-2,-9"`` / ``["-2", "mean(0:12)"]`` -> selections in order (no repeats)."""
    if isinstance(value, (int, LayerSel)) and not isinstance(value, bool):
        return (LayerSel.parse(value),)
    if isinstance(value, str):
        parts: list[Any] = _split_commas(value)
    elif isinstance(value, Sequence):
        parts = []
        for v in value:
            parts.extend(_split_commas(v) if isinstance(v, str) else [v])
    else:
        raise ConfigError(f"layer {value!r} is not valid: pass an int, or '-2,-9'")
    sels = [LayerSel.parse(p) for p in parts]
    if not sels:
        raise ConfigError("no layer given: pass --layer N (LLaVA-1.5 uses -2)")
    seen: set[str] = set()
    for s in sels:
        if str(s) in seen:
            raise ConfigError(f"layer {s} is given twice: list each layer once")
        seen.add(str(s))
    return tuple(sels)


def _split_commas(text: str) -> list[str]:
    """Split on commas outside parentheses (``mean(0:12),-2`` -> two parts)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    if any(not p for p in parts):
        raise ConfigError(f"layer list {text!r} has an empty entry: write it like '-2,-9'")
    return parts


def check_distinct(sels: Sequence[LayerSel], num_layers: int, *, model: str) -> None:
    """Refuse two selections of one tower that read the same hidden states (``-2`` and ``23``)."""
    seen: dict[tuple[int, ...], LayerSel] = {}
    for s in sels:
        key = (s.mean,) + s.indices(num_layers)
        if key in seen:
            raise ConfigError(
                f"layers {seen[key]} and {s} of {model} are the same hidden state(s): "
                "list each once"
            )
        seen[key] = s


def tower_slug(model: str) -> str:
    """The TOWER part of output names: the last component of a hub name or folder."""
    last = [p for p in re.split(r"[/\\]", str(model).strip()) if p not in ("", ".", "..")]
    slug = _SLUG_BAD.sub("_", last[-1]) if last else ""
    return slug or "model"


def output_name(model: str, layer: LayerSel) -> str:
    """``TOWER/LAYER``: the stable name of one output (`tower_slug` and the layer as written)."""
    return f"{tower_slug(model)}/{layer}"


def dataset_path(name: str, num_outputs: int) -> str:
    """The HDF5 dataset holding output ``name`` in a store with ``num_outputs`` outputs."""
    return FEATURES_DATASET if num_outputs == 1 else f"{FEATURES_DATASET}/{name}"


@dataclass(frozen=True)
class TowerRequest:
    """One ``--model`` with what is asked of it (before the model is resolved)."""

    model: str
    layers: tuple[LayerSel, ...]
    feature: str
    revision: str | None = None

    def output_names(self) -> list[str]:
        return [output_name(self.model, s) for s in self.layers]


def _per_model(flag: str, values: Sequence[Any] | Any, models: Sequence[str]
               ) -> tuple[list[Any], dict[str, list[Any]]]:
    """Split a flag's values into plain ones and ``MODEL=VALUE`` ones (by model)."""
    if values is None:
        return [], {}
    if isinstance(values, (str, int)) or not isinstance(values, Sequence):
        values = [values]
    plain: list[Any] = []
    scoped: dict[str, list[Any]] = {}
    for v in values:
        text = v if isinstance(v, str) else None
        name, _, rest = text.rpartition("=") if text is not None else ("", "", "")
        name = name.strip()
        if name and (name in models or len(models) > 1):
            if name not in models:
                raise ConfigError(
                    f"{flag} {text!r} names model {name!r}, which is not one of the --model "
                    f"values ({', '.join(models)}): write {flag} MODEL=VALUE with MODEL as given "
                    "to --model"
                )
            scoped.setdefault(name, []).append(rest.strip())
        else:
            plain.append(v)
    return plain, scoped


def _one(flag: str, values: list[Any], model: str, default: Any) -> Any:
    if not values:
        return default
    if len(values) > 1:
        raise ConfigError(f"{flag} is given {len(values)} times for {model}: give it once")
    return values[0]


def tower_requests(models: Sequence[str] | str, *, layers: Any = DEFAULT_LAYER,
                   features: Any = "patch", revisions: Any = None) -> tuple[TowerRequest, ...]:
    """The towers of a run from the flag values (one tower: plain values, as always)."""
    from clipfeat.config import FEATURES

    models = [models] if isinstance(models, str) else list(models)
    if not models or any(not isinstance(m, str) or not m.strip() for m in models):
        raise ConfigError("--model is empty: pass a hub name or a checkpoint folder")
    dup = sorted({m for m in models if models.count(m) > 1})
    if dup:
        raise ConfigError(f"--model {dup[0]} is given twice: list each tower once "
                          "(several layers of one tower: --layer -2,-9)")
    slugs = [tower_slug(m) for m in models]
    clash = sorted({s for s in slugs if slugs.count(s) > 1})
    if clash:
        raise ConfigError(
            f"two --model values end in the same name {clash[0]!r}, which output names are made "
            "of: use checkpoint folders with different names"
        )
    plain_l, scoped_l = _per_model("--layer", layers, models)
    plain_f, scoped_f = _per_model("--feature", features, models)
    plain_r, scoped_r = _per_model("--revision", revisions, models)
    out = []
    for m in models:
        sels = parse_layers(scoped_l.get(m) or plain_l or [DEFAULT_LAYER])
        feature = _one("--feature", scoped_f.get(m) or plain_f, m, "patch")
        if feature not in FEATURES:
            raise ConfigError(f"--feature {feature!r} is not one of {', '.join(FEATURES)}")
        revision = _one("--revision", scoped_r.get(m) or plain_r, m, None)
        out.append(TowerRequest(m, sels, feature, revision or None))
    return tuple(out)
