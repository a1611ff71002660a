"""Batch Group Normalization."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BatchGroupNorm2d"]


class BatchGroupNorm2d(nn.Module):
    r"""Batch Group Normalization (Zhou et al., arXiv 2012.02782, 2020).

    The ``C`` channels are split into ``G = num_groups`` groups of ``C/G`` consecutive
    channels.  ``x`` of shape ``(N, C, H, W)`` (any ``(N, C, *)``) is reshaped to
    ``(N, G, C/G*H*W)`` and the statistics are taken over dims ``(0, 2)``, i.e. over the
    batch *and* the group's channels and positions, one mean/variance per group::

        training:  mu_g  = mean(x_g),  var_g = mean((x_g - mu_g) ** 2)     # biased
                   x_hat = (x_g - mu_g) / sqrt(var_g + eps)
                   running_mean = (1 - momentum) * running_mean + momentum * mu_g
                   running_var  = (1 - momentum) * running_var  + momentum * var_g * n / (n - 1)
                   (n = N * C/G * H * W, the unbiased variance as in BatchNorm)
        eval:      x_hat = (x_g - running_mean_g) / sqrt(running_var_g + eps)
        output:    y = gamma * x_hat + beta       # per-channel gamma, beta of shape (C,)

    Buffers ``running_mean`` (init 0) / ``running_var`` (init 1) have shape ``(G,)``.
    ``G = 1`` is BatchNorm with one statistic for all channels; in eval mode the layer is a
    per-channel affine (foldable).
    """

    def __init__(
        self, num_features: int, num_groups: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True
    ) -> None:
        super().__init__()
        num_features, num_groups = int(num_features), int(num_groups)
        if num_features <= 0 or num_groups <= 0:
            raise ValueError(f"num_features and num_groups must be positive, got {num_features}, {num_groups}")
        if num_features % num_groups != 0:
            raise ValueError(f"num_features ({num_features}) must be divisible by num_groups ({num_groups})")
        if momentum is None or not (0.0 <= float(momentum) <= 1.0):
            raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_groups))
        self.register_buffer("running_var", torch.ones(num_groups))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            with torch.no_grad():
                self.weight.fill_(1.0)
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"BatchGroupNorm2d expects (N, C, H, W) (or (N, C, *)) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {x.shape[1]}")
        g = self.num_groups
        xg = x.reshape(x.shape[0], g, -1)
        if self.training:
            mean = xg.mean(dim=(0, 2))
            var = xg.var(dim=(0, 2), unbiased=False)
            n = xg.numel() // g
            if n <= 1:
                raise ValueError(f"expected more than 1 value per group in training, got input shape {tuple(x.shape)}")
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1.0 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1.0 - m).add_(var.detach().to(self.running_var.dtype) * (n / (n - 1)), alpha=m)
        else:
            mean, var = self.running_mean, self.running_var
        xg = (xg - mean.view(1, g, 1)) / torch.sqrt(var.view(1, g, 1) + self.eps)
        y = xg.reshape(x.shape)
        if self.affine:
            shape = (1, self.num_features) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps:g}, "
            f"momentum={self.momentum:g}, affine={self.affine}"
        )
