"""Linear followed by a BatchNorm-like norm, when the norm's channel axis (dim 1) is the
Linear's output feature axis (the last one).

* (N, C) input: dim 1 is the feature axis: fold.
* (N, L, C) input: a BatchNorm1d normalises dim 1 (L), not the Linear's features: skip.
* A one-channel norm is a scalar affine and commutes with anything: fold at any rank.
* Without example inputs the rank is unknown: skip unless the shapes prove it.
"""

from __future__ import annotations

from ..core import LINEAR_TYPES, RANK_UNKNOWN, Ctx, Site
from ._producer import ProducerRule

NAME = "linear_bn"


def _extra(site: Site, ctx: Ctx, lin, channels: int) -> str | None:
    if channels == 1:
        return None  # scalar affine
    ranks = ctx.ranks_of(site.module)
    if ranks is None:
        if channels != lin.out_features:
            return (f"the norm normalises dim 1 ({channels} channels), not the output features "
                    f"of '{ctx.name_of(lin)}' ({lin.out_features})")
        return RANK_UNKNOWN
    if ranks != {2}:
        return (f"the norm sees rank-{max(ranks)} input (N, L, C): it normalises dim 1, not the "
                f"output features (last dim) of '{ctx.name_of(lin)}'")
    if channels != lin.out_features:
        return f"channel mismatch: {channels} vs {lin.out_features}"
    return None


rule = ProducerRule(NAME, LINEAR_TYPES, "Linear", _extra)
