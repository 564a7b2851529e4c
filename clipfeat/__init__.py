"""clipfeat: precompute LLaVA-exact CLIP/SigLIP vision-tower features into HDF5 shards.

Heavy modules (torch, transformers, h5py) are imported lazily so that ``import clipfeat``
stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "extract", "FeatureStore", "ExtractConfig"]

if TYPE_CHECKING:  # pragma: no cover
    from clipfeat.config import ExtractConfig
    from clipfeat.pipeline import extract
    from clipfeat.store import FeatureStore


def __getattr__(name: str) -> Any:
    if name == "extract":
        from clipfeat.pipeline import extract

        return extract
    if name == "FeatureStore":
        from clipfeat.store import FeatureStore

        return FeatureStore
    if name == "ExtractConfig":
        from clipfeat.config import ExtractConfig

        return ExtractConfig
    raise AttributeError(f"module 'clipfeat' has no attribute {name!r}")
