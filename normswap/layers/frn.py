"""Filter Response Normalization with a Thresholded Linear Unit."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FilterResponseNorm2d"]


class FilterResponseNorm2d(nn.Module):
    r"""Filter Response Normalization + TLU (Singh & Krishnan, CVPR 2020, arXiv 1911.09737).

    For an input ``x`` of shape ``(N, C, H, W)`` (any ``(N, C, *)`` with at least one
    spatial dim works), per sample and per channel::

        nu2 = mean(x ** 2, dims=(H, W))
        y   = gamma * x / sqrt(nu2 + |eps|) + beta
        z   = max(y, tau)                         # TLU

    ``gamma`` is :attr:`weight` (init 1), ``beta`` is :attr:`bias` (init 0) and ``tau``
    is :attr:`tau` (init 0), all of shape ``(C,)``.  ``eps`` is a buffer of shape ``(1,)``,
    or a learnable :class:`~torch.nn.Parameter` when ``learnable_eps=True``; the absolute
    value keeps the denominator positive when ``eps`` is learned (the paper suggests a
    learnable eps for 1x1 feature maps, where ``nu2`` alone is ``x**2``).

    There are no batch statistics, so training and evaluation compute the same function,
    and the result is not an eval-time per-channel affine (it depends on each sample's
    ``nu2`` and on the TLU).  The forward pass uses Pow/ReduceMean/Abs/Add/Sqrt/Div/Mul/
    Add/Max only and has no Python control flow on tensor values.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False) -> None:
        super().__init__()
        if int(num_features) <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = int(num_features)
        self.learnable_eps = bool(learnable_eps)
        self.weight = nn.Parameter(torch.ones(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))
        self.tau = nn.Parameter(torch.zeros(self.num_features))
        eps_t = torch.tensor([float(eps)])
        if self.learnable_eps:
            self.eps = nn.Parameter(eps_t)
        else:
            self.register_buffer("eps", eps_t)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.tau.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3:
            raise ValueError(
                f"FilterResponseNorm2d expects (N, C, H, W) input (or (N, C, *) with spatial dims), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {x.shape[1]}")
        dims = tuple(range(2, x.dim()))
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        nu2 = x.pow(2).mean(dim=dims, keepdim=True)
        x = x / torch.sqrt(nu2 + torch.abs(self.eps))
        y = self.weight.view(shape) * x + self.bias.view(shape)
        return torch.maximum(y, self.tau.view(shape))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={float(self.eps.detach().abs()):g}, learnable_eps={self.learnable_eps}"
