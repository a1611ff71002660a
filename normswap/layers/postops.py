"""What is left of a norm with post ops (timm's ``BatchNormAct2d``: BN, then ``drop``, then
``act``) once its normalisation was folded into the layer before it."""

from __future__ import annotations

from torch import nn

__all__ = ["PostOps"]


class PostOps(nn.Module):
    """Apply the kept children in order (``drop`` then ``act``); the children keep their names,
    so the state-dict keys of a parametrised activation (``bn1.act.weight`` of a PReLU) stay."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, m in children.items():
            self.add_module(name, m)

    def forward(self, x):
        for m in self.children():
            x = m(x)
        return x
