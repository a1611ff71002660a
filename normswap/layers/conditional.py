"""BatchNorm variants whose affine depends on a condition: Conditional BN and Sandwich BN."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConditionalBatchNorm2d", "SandwichBatchNorm2d"]


def _check_4d(name: str, x: Tensor, c: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} expects (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != c:
        raise ValueError(f"expected {c} channels, got {x.shape[1]}")


class ConditionalBatchNorm2d(nn.Module):
    r"""Conditional Batch Normalization (de Vries, Strub, Mary, Larochelle, Pietquin,
    Courville, "Modulating early visual processing by language", NeurIPS 2017, arXiv 1707.00683).

    ``self.bn`` is ``nn.BatchNorm2d(C, affine=False)`` (batch statistics in training,
    running statistics in eval, exactly as BatchNorm).  The affine is predicted per sample
    from a condition, either a class index or a conditioning vector::

        x_hat        = bn(x)                                   # (x - mu) / sqrt(var + eps)
        gamma, beta  = embed(y).chunk(2, dim=1)                # num_classes given; y: int (N,)
                    or proj(c).chunk(2, dim=1)                 # cond_dim given;    c: float (N, cond_dim)
        out          = gamma[:, :, None, None] * x_hat + beta[:, :, None, None]

    ``embed = nn.Embedding(num_classes, 2C)`` or ``proj = nn.Linear(cond_dim, 2C)``; exactly
    one of ``num_classes`` / ``cond_dim`` must be given.  Initialisation makes the layer
    start as plain (affine-free) BN, i.e. gamma = 1, beta = 0: the embedding's first C
    columns are 1 and the rest 0; the projection has zero weight and bias ``[1]*C + [0]*C``
    (de Vries et al. likewise initialise the predicted delta-gamma/delta-beta to zero).

    The eval-mode BN part is a per-channel affine; the conditional affine is not (it depends
    on the condition), so only the BN statistics are foldable.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int | None = None,
        cond_dim: int | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if (num_classes is None) == (cond_dim is None):
            raise ValueError("give exactly one of num_classes (class-conditional) or cond_dim (vector-conditional)")
        if int(num_features) <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        c = self.num_features = int(num_features)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.cond_dim = None if cond_dim is None else int(cond_dim)
        self.bn = nn.BatchNorm2d(c, eps=eps, momentum=momentum, affine=False)
        if self.num_classes is not None:
            if self.num_classes <= 0:
                raise ValueError(f"num_classes must be positive, got {num_classes}")
            self.embed = nn.Embedding(self.num_classes, 2 * c)
            self.proj = None
        else:
            if self.cond_dim <= 0:
                raise ValueError(f"cond_dim must be positive, got {cond_dim}")
            self.embed = None
            self.proj = nn.Linear(self.cond_dim, 2 * c)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.num_features
        with torch.no_grad():
            if self.embed is not None:
                self.embed.weight[:, :c].fill_(1.0)
                self.embed.weight[:, c:].zero_()
            else:
                self.proj.weight.zero_()
                self.proj.bias[:c].fill_(1.0)
                self.proj.bias[c:].zero_()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        _check_4d(type(self).__name__, x, self.num_features)
        if self.embed is not None:
            gb = self.embed(cond)
        else:
            gb = self.proj(cond)
        gamma, beta = gb.chunk(2, dim=1)
        return gamma[:, :, None, None] * self.bn(x) + beta[:, :, None, None]

    def extra_repr(self) -> str:
        cond = f"num_classes={self.num_classes}" if self.num_classes is not None else f"cond_dim={self.cond_dim}"
        return f"{self.num_features}, {cond}, eps={self.bn.eps:g}, momentum={self.bn.momentum}"


class SandwichBatchNorm2d(nn.Module):
    r"""Sandwich Batch Normalization (Gong, Chen, Chen, Wang, "Sandwich Batch Normalization:
    A Drop-In Replacement for Feature Distribution Heterogeneity", arXiv 2102.11382, 2021).

    A BatchNorm with a *shared* affine (``self.bn = nn.BatchNorm2d(C, affine=True)``),
    followed by a per-branch ("independent") affine selected by an index::

        h            = gamma_sa * (x - mu) / sqrt(var + eps) + beta_sa    # = bn(x)
        gamma_i, beta_i = embed(branch).chunk(2, dim=1)                    # embed: Embedding(K, 2C)
        out          = gamma_i[:, :, None, None] * h + beta_i[:, :, None, None]

    ``branch`` is an int tensor of shape ``(N,)`` (one branch per sample) or a Python int
    (the same branch for the whole batch).  The independent affine starts at gamma_i = 1,
    beta_i = 0.  For a fixed branch the eval-mode layer is a per-channel affine.
    """

    def __init__(self, num_features: int, num_branches: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if int(num_features) <= 0 or int(num_branches) <= 0:
            raise ValueError(f"num_features and num_branches must be positive, got {num_features}, {num_branches}")
        c = self.num_features = int(num_features)
        self.num_branches = int(num_branches)
        self.bn = nn.BatchNorm2d(c, eps=eps, momentum=momentum, affine=True)
        self.embed = nn.Embedding(self.num_branches, 2 * c)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.num_features
        with torch.no_grad():
            self.embed.weight[:, :c].fill_(1.0)
            self.embed.weight[:, c:].zero_()

    def forward(self, x: Tensor, branch: Tensor | int) -> Tensor:
        _check_4d(type(self).__name__, x, self.num_features)
        if isinstance(branch, Tensor):
            gb = self.embed(branch)
            if gb.dim() == 1:  # a 0-d branch tensor: same branch for every sample
                gb = gb.unsqueeze(0)
        else:
            b = int(branch)
            if not 0 <= b < self.num_branches:
                raise IndexError(f"branch {b} out of range for {self.num_branches} branches")
            gb = self.embed.weight[b].unsqueeze(0)
        gamma, beta = gb.chunk(2, dim=1)
        return gamma[:, :, None, None] * self.bn(x) + beta[:, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_branches={self.num_branches}, eps={self.bn.eps:g}, momentum={self.bn.momentum}"
