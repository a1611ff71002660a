"""``ChannelAffine``: the module convert writes for ``--to affine`` (and recipes rebuild); not a norm."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelAffine"]


class ChannelAffine(nn.Module):
    """A frozen per-channel affine ``y = x * weight + bias`` on dim 1 of an ``(N, C, *)`` tensor.

    What an eval-mode BatchNorm computes, without the statistics (exact replacement, trivially
    foldable, no batch dependence).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.weight = nn.Parameter(torch.ones(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
