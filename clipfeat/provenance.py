"""What decides the numbers beyond the settings: the weights' content and the versions.

`weights_digest` hashes the model's weight files (so a checkpoint changed in place is not
resumed into a store made with the old one); `versions` names the packages whose code
computes the features. Neither imports torch.
"""

from __future__ import annotations

from pathlib import Path

#: Packages whose versions can change the stored numbers (preprocessing, the forward pass).
VERSIONED = ("clipfeat", "torch", "transformers", "pillow", "numpy", "h5py")
_BLOCK = 8 * 1024 * 1024


def weight_files(weights: Path) -> list[Path]:
    """The files holding a checkpoint's weights: the file itself, or the shards its
    ``*.index.json`` lists."""
    if not weights.name.endswith(".index.json"):
        return [weights]
    from clipfeat import jsonsafe
    from clipfeat.errors import ModelError

    data = jsonsafe.loads(weights.read_text(encoding="utf-8"), name=str(weights),
                          error=ModelError, what="weights index")
    shards = data.get("weight_map", {}).values() if isinstance(data, dict) else ()
    return [weights.parent / str(f) for f in sorted(set(shards))]


def weights_digest(weights: Path | None) -> str:
    """``xxh3_128:<hex>`` of the weight files' bytes (their names and contents, in order);
    "" when there are none. Reads each file once (about 2 GB/s from the page cache)."""
    if weights is None:
        return ""
    import xxhash

    total = xxhash.xxh3_128()
    for path in weight_files(Path(weights)):
        h = xxhash.xxh3_128()
        with open(path, "rb", buffering=0) as fh:
            while True:
                block = fh.read(_BLOCK)
                if not block:
                    break
                h.update(block)
        total.update(path.name.encode() + b"\0" + h.digest())
    return "xxh3_128:" + total.hexdigest()


def versions() -> dict[str, str | None]:
    """The installed version of each of `VERSIONED` (None if absent), without importing
    them."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: str) -> str:
    """``device`` with the accelerator's name (``cuda:0 (NVIDIA H200)``); torch imported."""
    if not device.startswith("cuda"):
        return device
    import torch

    try:
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    except Exception:  # noqa: BLE001 - a name is a nicety
        return device


__all__ = ["VERSIONED", "device_name", "versions", "weight_files", "weights_digest"]
