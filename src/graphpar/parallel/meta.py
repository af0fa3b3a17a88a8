"""Meta tensors that keep their values: a batch's integer index tensors on the meta device.

Shape-only prediction (`graphpar.parallel.predict`) runs a model on the meta device, where
tensors have shapes but no data. A few steps need the values of index tensors, not only their
shapes: the edge partition (triplet counts per edge, `partition.share_edges`) and GemNet's
padded triplet layout (the most triplets of one edge). `to_meta` gives the meta copy of a
tensor and, for an integer tensor, keeps its real values beside it (an attribute of the meta
tensor); `values_of` reads them back. Only the tensors made here know their values: a meta
tensor computed from them does not.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["knows_values", "to_meta", "values_of"]

_VALUES = "_graphpar_values"


def to_meta(x: Tensor) -> Tensor:
    """`x` on the meta device; an integer or boolean `x` keeps its values (`values_of`)."""
    meta = x.detach().to("meta") if not x.is_meta else x
    if not x.is_meta and not x.is_floating_point() and not x.is_complex():
        setattr(meta, _VALUES, x.detach())
    return meta


def knows_values(x: Tensor) -> bool:
    """Whether `x` is a meta tensor made by `to_meta` that keeps its values."""
    return x.is_meta and getattr(x, _VALUES, None) is not None


def values_of(x: Tensor) -> Tensor:
    """The real values of a meta tensor made by `to_meta` (`x` itself if it is not meta)."""
    if not x.is_meta:
        return x
    values = getattr(x, _VALUES, None)
    if values is None:
        raise ValueError(
            f"a meta tensor of shape {tuple(x.shape)} has no known values: index tensors must "
            "come from graphpar.parallel.meta.to_meta (the batch of graphpar.parallel.predict)"
        )
    return values
