"""ConvTranspose1d/2d/3d followed by a BatchNorm-like norm, any groups.

The weight layout is ``(in, out/groups, *k)``: output channel ``g*(out/groups) + j`` is
column ``j`` within group ``g`` (torch's ``fuse_conv_bn_weights(transpose=True)`` scales
dim 1 by the whole vector, wrong for groups > 1)."""

from __future__ import annotations

from .. import arith
from ..core import BN_LIKE, conv_rank_problem, CONVT_TYPES, Ctx, Match, Site
from ._producer import apply_after, producer_match
from .conv_bn import _first_input_type

NAME = "convtranspose_bn"


def _extra(site: Site, ctx: Ctx, convt, channels: int) -> str | None:
    r = conv_rank_problem(convt, site.module, ctx)
    if r:
        return r
    if channels != convt.out_channels and channels != 1:
        return f"channel mismatch: the norm has {channels} channels, '{ctx.name_of(convt)}' outputs {convt.out_channels}"
    return None


def applies(site: Site, ctx: Ctx) -> bool:
    return site.functional is None and site.kind in BN_LIKE and _first_input_type(site) in CONVT_TYPES


def match(site: Site, ctx: Ctx):
    return producer_match(site, ctx, CONVT_TYPES, "ConvTranspose1d/2d/3d", NAME, _extra)


def check(site: Site, ctx: Ctx) -> str | None:
    m = match(site, ctx)
    return m if isinstance(m, str) else None


def apply(site: Site, ctx: Ctx, m: Match | None = None) -> Match:
    m = m or match(site, ctx)
    assert isinstance(m, Match), m
    apply_after(site, ctx, m, lambda ct, s, t: arith.fold_affine_after_conv_transpose(
        ct.weight, ct.bias, s, t, ct.groups))
    return m
