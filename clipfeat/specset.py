"""Several preprocessings of one decoded image: one per distinct tower input.

A run with several towers decodes each image once (`load_image`) and makes one uint8 array
per distinct `PreprocessSpec` (two towers with the same processor share one). The arrays lie
one after the other in a flat uint8 buffer, so the decode pool moves them as one slot of
shared memory; `split` gives them back as ``(3, H, W)`` views. A `SpecSet` of one spec is
never used: a one-tower run decodes with the plain spec, exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from clipfeat.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from clipfeat.preprocess import PreprocessSpec


def spec_shape(spec: PreprocessSpec) -> tuple[int, int, int]:
    """The uint8 pixels `to_uint8` makes for ``spec``: (3, out_height, out_width)."""
    return (3, spec.out_height, spec.out_width)


@dataclass(frozen=True)
class SpecSet:
    """Distinct specs in first-seen order; picklable (it travels to the decode workers)."""

    specs: tuple[PreprocessSpec, ...]

    @classmethod
    def of(cls, specs: Sequence[PreprocessSpec]) -> SpecSet:
        distinct: list[Any] = []
        for s in specs:
            if s not in distinct:
                distinct.append(s)
        if not distinct:
            raise ConfigError("SpecSet needs at least one preprocessing spec")
        return cls(tuple(distinct))

    def index(self, spec: PreprocessSpec) -> int:
        """Which array of `split` holds the pixels for ``spec``."""
        return self.specs.index(spec)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, pos = [], 0
        for s in self.specs:
            out.append(pos)
            h, w = s.out_height, s.out_width
            pos += 3 * h * w
        return tuple(out)

    @property
    def nbytes(self) -> int:
        return sum(3 * s.out_height * s.out_width for s in self.specs)

    @property
    def out_shape(self) -> tuple[int]:
        """The shape of the flat buffer the decoder fills (and the pool's slots hold)."""
        return (self.nbytes,)

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """The (3, H, W) views of a flat buffer, one per spec, in order."""
        return [flat[o:o + 3 * s.out_height * s.out_width].reshape(spec_shape(s))
                for o, s in zip(self.offsets, self.specs, strict=True)]

    def pixels(self, img: Any, aspect: str, max_pixels: int | None) -> np.ndarray:
        """Every spec's pixels of one decoded image (`to_uint8` each): the flat uint8 buffer."""
        import numpy as np

        from clipfeat.preprocess import to_uint8

        out = np.empty(self.nbytes, dtype=np.uint8)
        for view, spec in zip(self.split(out), self.specs, strict=True):
            view[...] = to_uint8(img, spec, aspect, max_pixels=max_pixels)
        return out


def pixel_shape(spec: PreprocessSpec | SpecSet) -> tuple[int, ...]:
    """What the decoder returns for ``spec``: (3, H, W), or a SpecSet's flat buffer."""
    return spec.out_shape if isinstance(spec, SpecSet) else spec_shape(spec)


def pixel_bytes(spec: PreprocessSpec | SpecSet) -> int:
    """Bytes of one decoded image for ``spec`` (every preprocessing of a SpecSet)."""
    import math

    return math.prod(pixel_shape(spec))
