"""Linear followed by a BatchNorm-like norm, when the norm's channel axis (dim 1) is the
Linear's output feature axis (the last one).

* (N, C) input: dim 1 is the feature axis: fold.
* (N, L, C) input: a BatchNorm1d normalises dim 1 (L), not the Linear's features: skip.
* A one-channel norm is a scalar affine and commutes with anything: fold at any rank.
* Without example inputs the rank is unknown: skip unless the shapes prove it.
"""

from __future__ import annotations

from .. import arith
from ..core import BN_LIKE, LINEAR_TYPES, Ctx, Match, Site
from ._producer import apply_after, producer_match
from .conv_bn import _first_input_type

NAME = "linear_bn"
RANK_UNKNOWN = "input rank unknown: pass example inputs"


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


def applies(site: Site, ctx: Ctx) -> bool:
    return site.functional is None and site.kind in BN_LIKE and _first_input_type(site) in LINEAR_TYPES


def match(site: Site, ctx: Ctx):
    return producer_match(site, ctx, LINEAR_TYPES, "Linear", NAME, _extra)


def check(site: Site, ctx: Ctx) -> str | None:
    m = match(site, ctx)
    return m if isinstance(m, str) else None


def apply(site: Site, ctx: Ctx, m: Match | None = None) -> Match:
    m = m or match(site, ctx)
    assert isinstance(m, Match), m
    apply_after(site, ctx, m, lambda lin, s, t: arith.fold_affine_after_linear(lin.weight, lin.bias, s, t))
    return m
