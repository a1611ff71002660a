"""Conv1d/2d/3d followed by a BatchNorm-like norm (any groups, stride, dilation, padding mode,
with or without conv bias): scale the conv's output channels, shift its bias."""

from __future__ import annotations

from normswap.reasons import Reason, reason
from normswap.views.base import GraphView, Layer, NormSite

from ._producer import ProducerRule
from .checks import conv_rank_problem

NAME = "conv_bn"


def conv_channels_problem(site: NormSite, view: GraphView, conv: Layer, channels: int) -> Reason | None:
    """The extra check of the conv / conv-transpose producer rules."""
    r = conv_rank_problem(conv, site, view)
    if r:
        return r
    if channels != conv.out_channels and channels != 1:
        return reason("channel_mismatch",
                      detail=f"the norm has {channels} channels, '{conv.name}' outputs {conv.out_channels}")
    return None


rule = ProducerRule(NAME, ("conv",), "Conv1d/2d/3d", conv_channels_problem)
