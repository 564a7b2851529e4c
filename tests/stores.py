"""Feature stores for tests: read one back with plain h5py, or build a small finished one.

Reading goes straight to the HDF5 files (``keys``, ``features`` or ``features/NAME``,
``failures`` datasets) and failures.jsonl, independently of ``clipfeat.store.FeatureStore``.
Building goes through the public writer API: ``ShardWriter(out, shard_id, tokens=, hidden=,
store_dtype=, attrs=, expected_rows=)`` (or ``outputs=[OutputLayout(...)]`` for several
outputs) with ``append`` / ``add_failures`` / ``commit``, then ``finalize``.

    rows = read_rows(out)               # {key: row}, in shard then row order
    rows = read_rows(out, dataset="features/tiny-clip/-2")   # one output of several
    fails = read_failures(out)          # failures.jsonl records, in file order
    infos = build_store(out, [Shard(keys, feats, failures), ...], meta=meta, plan={})
    infos = build_store(out, [Shard(keys, [feats_a, feats_b])], meta=run_meta,
                        outputs=[Output(name_a, attrs_a), Output(name_b, attrs_b)])
    want = multi_output_store(out)      # two outputs of other shapes: {name: {key: row}}

Import it from tests as ``import stores`` (like ``imagegen``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MULTI_META", "MULTI_OUTPUTS", "Output", "Shard", "build_store",
           "multi_output_store", "read_failures", "read_rows", "read_shards", "shard_files",
           "write_shard"]


def shard_files(out: Path) -> list[str]:
    """The finished shard files in ``out`` (``shard-*.h5``), sorted by name (= shard id)."""
    return sorted(p.name for p in Path(out).glob("shard-*.h5"))


def read_shards(out: Path, dataset: str = "features"
                ) -> dict[str, tuple[list[str], Any, list[dict]]]:
    """shard file -> (keys in row order, features array of ``dataset``, failure records),
    with h5py."""
    import h5py

    shards = {}
    for name in shard_files(out):
        with h5py.File(Path(out) / name, "r") as f:
            keys = list(f["keys"].asstr()[()])
            feats = f[dataset][()]
            fails = [json.loads(x) for x in f["failures"].asstr()[()]]
        shards[name] = (keys, feats, fails)
    return shards


def read_rows(out: Path, dataset: str = "features") -> dict[str, Any]:
    """key -> stored row of ``dataset`` in every shard in ``out`` (shard order, then row
    order), read with h5py; fails if any key is stored twice."""
    import h5py

    rows: dict[str, Any] = {}
    for name in shard_files(out):
        with h5py.File(Path(out) / name, "r") as f:
            keys = list(f["keys"].asstr()[()])
            feats = f[dataset][()]
        for k, v in zip(keys, feats, strict=True):
            assert k not in rows, f"key {k!r} stored twice"
            rows[k] = v
    return rows


def read_failures(out: Path) -> list[dict]:
    """The records of ``out/failures.jsonl``, in file order (every line must be JSON)."""
    text = (Path(out) / "failures.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


@dataclass
class Shard:
    """One shard to write: ``features`` is (rows, tokens, hidden), numpy or torch (an empty
    shard still needs the shape (0, tokens, hidden)), or for a store of several outputs one
    such array per output, in order. ``attrs`` defaults to the store's; ``expected_rows`` is
    passed to ``ShardWriter``."""

    keys: Sequence[str]
    features: Any
    failures: Sequence[dict] = field(default_factory=list)
    attrs: dict | None = None
    expected_rows: int | None = None


@dataclass
class Output:
    """One output of a several-output store: its name and its own attributes (tokens and
    hidden size come from the arrays)."""

    name: str
    attrs: dict = field(default_factory=dict)


def _layouts(outputs: Sequence[Output], features: Sequence[Any]) -> list[Any]:
    from clipfeat.store import OutputLayout

    return [OutputLayout(o.name, int(f.shape[1]), int(f.shape[2]), dict(o.attrs))
            for o, f in zip(outputs, features, strict=True)]


def write_shard(out: Path, shard_id: int, shard: Shard, *, store_dtype: str = "float16",
                attrs: dict | None = None, batch: int | None = None,
                outputs: Sequence[Output] | None = None) -> Any:
    """Write and commit one shard; returns its ``ShardInfo``. The rows go in one ``append``
    or, with ``batch``, in appends of ``batch`` rows (none for an empty shard). With
    ``outputs``, ``shard.features`` holds one array per output."""
    from clipfeat.store import ShardWriter

    shard_attrs = shard.attrs if shard.attrs is not None else (attrs or {})
    keys = list(shard.keys)
    if outputs is None:
        tokens, hidden = (int(n) for n in shard.features.shape[1:])
        shape: dict[str, Any] = {"tokens": tokens, "hidden": hidden}

        def rows(a: int, b: int) -> Any:
            return shard.features[a:b]
    else:
        shape = {"outputs": _layouts(outputs, shard.features)}

        def rows(a: int, b: int) -> Any:
            return [f[a:b] for f in shard.features]
    with ShardWriter(out, shard_id, store_dtype=store_dtype, attrs=shard_attrs,
                     expected_rows=shard.expected_rows, **shape) as w:
        if batch is None:
            w.append(keys, rows(0, len(keys)))
        else:
            for start in range(0, len(keys), batch):
                w.append(keys[start:start + batch], rows(start, start + batch))
        if shard.failures:
            w.add_failures(list(shard.failures))
        return w.commit()


def build_store(out: Path, shards: Sequence[Shard], *, meta: dict, plan: dict | None = None,
                store_dtype: str = "float16", attrs: dict | None = None,
                batch: int | None = None, complete: bool = True,
                outputs: Sequence[Output] | None = None) -> list[Any]:
    """A finished store: ``shards[i]`` written as shard ``i`` (:func:`write_shard`; shard
    attrs default to ``attrs``, else ``meta``), then ``finalize(out, meta=meta, plan=plan,
    shards=..., complete=complete)`` (with the outputs' layouts when ``outputs`` are given:
    a several-output store, ``meta`` its run-level config). Returns the ``ShardInfo``
    list."""
    from clipfeat.store import finalize

    attrs = dict(meta) if attrs is None else attrs
    infos = [write_shard(out, sid, shard, store_dtype=store_dtype, attrs=attrs, batch=batch,
                         outputs=outputs)
             for sid, shard in enumerate(shards)]
    layouts = _layouts(outputs, shards[0].features) if outputs is not None else None
    finalize(out, meta=meta, plan=plan if plan is not None else {}, shards=infos,
             complete=complete, outputs=layouts)
    return infos


#: The run-level config of `multi_output_store`.
MULTI_META = {"aspect": "pad", "compute_dtype": "float32", "exif_transpose": False,
              "store_dtype": "float16"}
#: Two outputs of other shapes, two towers: a layer of a CLIP-like one, a mean of a SigLIP-like.
MULTI_OUTPUTS = (
    Output("tiny-clip/-2", {
        "model": "/ckpt/tiny-clip", "model_revision": "", "model_type": "clip",
        "family": "clip", "layer": -2, "layer_indices": [2], "num_layers": 3,
        "feature": "patch", "image_size": 28, "patch_size": 14, "has_cls_token": True,
        "num_registers": 0, "preprocessing": {"size": 28, "mean": [0.48, 0.45, 0.4]}}),
    Output("tiny-siglip/mean(0:2)", {
        "model": "/ckpt/tiny-siglip", "model_revision": "", "model_type": "siglip",
        "family": "siglip", "layer": "mean(0:2)", "layer_indices": [0, 1], "num_layers": 3,
        "feature": "patch", "image_size": 30, "patch_size": 10, "has_cls_token": False,
        "num_registers": 0, "preprocessing": {"size": 30, "mean": [0.5, 0.5, 0.5]}}),
)
MULTI_SHAPES = ((4, 8), (9, 6))  # (tokens, hidden) of each of MULTI_OUTPUTS


def multi_output_store(out: Path, *, rows: Sequence[int] = (3, 0, 2), seed: int = 0,
                       store_dtype: str = "float16", complete: bool = True,
                       batch: int | None = 2) -> dict[str, dict[str, Any]]:
    """A finished store of the two `MULTI_OUTPUTS` (random values, shard i of ``rows[i]``
    rows, one failure record in each shard). Returns {output name: {key: stored row}}."""
    import numpy as np

    rng = np.random.default_rng(seed)
    want: dict[str, dict[str, Any]] = {o.name: {} for o in MULTI_OUTPUTS}
    shards = []
    for sid, n in enumerate(rows):
        keys = [f"m{sid}/{i}.jpg" for i in range(n)]
        feats = [(rng.standard_normal((n, t, h)) * 4).astype(np.float32)
                 for t, h in MULTI_SHAPES]
        for o, f in zip(MULTI_OUTPUTS, feats, strict=True):
            want[o.name].update(zip(keys, f.astype(store_dtype), strict=True))
        shards.append(Shard(keys, feats, failures=[
            {"key": f"bad{sid}.jpg", "path": f"/img/bad{sid}.jpg",
             "error": "cannot identify image file"}]))
    build_store(out, shards, meta=dict(MULTI_META, store_dtype=store_dtype),
                plan={"num_chunks": len(rows)}, store_dtype=store_dtype, batch=batch,
                complete=complete, outputs=MULTI_OUTPUTS)
    return want
