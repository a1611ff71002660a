"""Conv1d/2d/3d followed by a BatchNorm-like norm (any groups, stride, dilation, padding mode,
with or without conv bias): scale the conv's output channels, shift its bias."""

from __future__ import annotations

from .. import arith
from ..core import BN_LIKE, conv_rank_problem, CONV_TYPES, CONVT_TYPES, LINEAR_TYPES, Ctx, Match, Site
from ._producer import apply_after, producer_match

NAME = "conv_bn"
_LAYER_TYPES = (*CONV_TYPES, *CONVT_TYPES, *LINEAR_TYPES)


def _extra(site: Site, ctx: Ctx, conv, channels: int) -> str | None:
    r = conv_rank_problem(conv, site.module, ctx)
    if r:
        return r
    if channels != conv.out_channels and channels != 1:
        return f"channel mismatch: the norm has {channels} channels, '{ctx.name_of(conv)}' outputs {conv.out_channels}"
    return None


def applies(site: Site, ctx: Ctx) -> bool:
    return site.functional is None and site.kind in BN_LIKE and _first_input_type(site) in CONV_TYPES


def _first_input_type(site: Site):
    from ..core import node_module
    for ref in site.calls:
        if ref.node.args:
            m = node_module(ref.region, ref.node.args[0])
            for t in _LAYER_TYPES:
                if isinstance(m, t):
                    return t
            return None
    return None


def match(site: Site, ctx: Ctx):
    return producer_match(site, ctx, CONV_TYPES, "Conv1d/2d/3d", NAME, _extra)


def check(site: Site, ctx: Ctx) -> str | None:
    m = match(site, ctx)
    return m if isinstance(m, str) else None


def apply(site: Site, ctx: Ctx, m: Match | None = None) -> Match:
    m = m or match(site, ctx)
    assert isinstance(m, Match), m
    apply_after(site, ctx, m, lambda conv, s, t: arith.fold_affine_after_conv(conv.weight, conv.bias, s, t))
    return m
