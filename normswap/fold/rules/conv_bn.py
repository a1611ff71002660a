"""Conv1d/2d/3d followed by a BatchNorm-like norm (any groups, stride, dilation, padding mode,
with or without conv bias): scale the conv's output channels, shift its bias."""

from __future__ import annotations

from ..core import CONV_TYPES, Ctx, Site, conv_rank_problem
from ._producer import ProducerRule

NAME = "conv_bn"


def conv_channels_problem(site: Site, ctx: Ctx, conv, channels: int) -> str | None:
    """The extra check of the conv / conv-transpose producer rules."""
    r = conv_rank_problem(conv, site.module, ctx)
    if r:
        return r
    if channels != conv.out_channels and channels != 1:
        return f"channel mismatch: the norm has {channels} channels, '{ctx.name_of(conv)}' outputs {conv.out_channels}"
    return None


rule = ProducerRule(NAME, CONV_TYPES, "Conv1d/2d/3d", conv_channels_problem)
