"""ConvTranspose1d/2d/3d followed by a BatchNorm-like norm, any groups.

The weight layout is ``(in, out/groups, *k)``: output channel ``g*(out/groups) + j`` is
column ``j`` within group ``g`` (torch's ``fuse_conv_bn_weights(transpose=True)`` scales
dim 1 by the whole vector, wrong for groups > 1; see ``arith.fold_affine_after_conv_transpose``)."""

from __future__ import annotations

from ._producer import ProducerRule
from .conv_bn import conv_channels_problem

NAME = "convtranspose_bn"

rule = ProducerRule(NAME, ("convt",), "ConvTranspose1d/2d/3d", conv_channels_problem)
