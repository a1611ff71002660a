"""Linear followed by a BatchNorm-like norm, when the norm's channel axis (dim 1) is the
Linear's output feature axis (the last one).

* (N, C) input: dim 1 is the feature axis: fold.
* (N, L, C) input: a BatchNorm1d normalises dim 1 (L), not the Linear's features: skip.
* A one-channel norm is a scalar affine and commutes with anything: fold at any rank.
* Without example inputs the rank is unknown: skip unless the shapes prove it.
"""

from __future__ import annotations

from normswap.reasons import Reason, reason
from normswap.views.base import GraphView, Layer, NormSite

from ._producer import ProducerRule
from .checks import RANK_UNKNOWN  # noqa: F401  (tests compare with it)

NAME = "linear_bn"


def _extra(site: NormSite, view: GraphView, lin: Layer, channels: int) -> Reason | None:
    if channels == 1:
        return None  # scalar affine
    ranks = view.ranks(site)
    if ranks is None:
        if channels != lin.out_channels:
            return reason("dim1_not_features", channels=channels, layer=lin.name, out=lin.out_channels)
        return RANK_UNKNOWN
    if ranks != {2}:
        return reason("rank_nlc", rank=max(ranks), layer=lin.name)
    if channels != lin.out_channels:
        return reason("channel_mismatch", detail=f"{channels} vs {lin.out_channels}")
    return None


rule = ProducerRule(NAME, ("linear",), "Linear", _extra)
