"""Power Normalization (quadratic-mean batch normalization without mean subtraction)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PowerNorm2d"]


class PowerNorm2d(nn.Module):
    r"""Power Normalization (Shen, Yao, Gholami, Mahoney, Keutzer, ICML 2020, arXiv 2003.07845).

    No mean subtraction.  For ``x`` of shape ``(N, C, H, W)`` (also ``(N, C)`` and
    ``(N, C, L)``; statistics are taken over every dim except the channel dim 1)::

        training:  psi2 = mean(x ** 2, dims=(N, H, W))              # per channel, shape (C,)
                   y    = gamma * x / sqrt(psi2 + eps) + beta
                   running_phi = (1 - momentum) * running_phi + momentum * psi2
        eval:      y    = gamma * x / sqrt(running_phi + eps) + beta

    ``running_phi`` (init 1) is the running quadratic mean, updated like BatchNorm's
    ``running_var`` (no Bessel correction: there is no mean to estimate).  ``gamma``/``beta``
    are :attr:`weight`/:attr:`bias` of shape ``(C,)`` when ``affine=True``.

    Simplification (documented deviation from the paper): the paper's PN normalises the
    training forward pass with the *running* quadratic mean of the previous step and uses
    an approximate backward pass (with a running estimate of the gradient statistic); this
    layer instead normalises with the current batch's ``psi2`` in training and relies on
    ordinary autograd.  The evaluation-mode function is the paper's (running statistic,
    a per-channel affine, so it can be folded).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True) -> None:
        super().__init__()
        if int(num_features) <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if momentum is None or not (0.0 <= float(momentum) <= 1.0):
            raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(self.num_features))
            self.bias = nn.Parameter(torch.zeros(self.num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_phi", torch.ones(self.num_features))

    def reset_running_stats(self) -> None:
        self.running_phi.fill_(1.0)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            with torch.no_grad():
                self.weight.fill_(1.0)
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"PowerNorm2d expects (N, C), (N, C, L) or (N, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {x.shape[1]}")
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        if self.training:
            dims = (0,) + tuple(range(2, x.dim()))
            psi2 = x.pow(2).mean(dim=dims)
            with torch.no_grad():
                self.running_phi.mul_(1.0 - self.momentum).add_(psi2.detach().to(self.running_phi.dtype), alpha=self.momentum)
        else:
            psi2 = self.running_phi
        y = x / torch.sqrt(psi2.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum:g}, affine={self.affine}"
