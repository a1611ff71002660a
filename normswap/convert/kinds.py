"""Which norms can become which, and how the replacement modules are built.

Layouts
-------
``conv``  -- the norm normalises per channel on dim 1 of an ``(N, C, *)`` tensor
             (BatchNorm, GroupNorm, InstanceNorm, FRN, BGN, PowerNorm).
``token`` -- the norm normalises over the last dim of an ``(..., D)`` tensor
             (``nn.LayerNorm`` with a 1-D ``normalized_shape``, ``nn.RMSNorm``).

Targets (``--to``)
------------------
conv layout:  ``gn``  ``nn.GroupNorm(G, C)``;  ``in`` ``nn.InstanceNorm{1,2,3}d(C, affine=True)``;
              ``ln``  channel LayerNorm, implemented as ``nn.GroupNorm(1, C)`` (statistics over C and
              all positions of each sample -- the "LayerNorm for conv nets" of Wu & He 2018; chosen
              over ConvNeXt's per-position channel LayerNorm because it is a stock torch module that
              Opacus accepts and that exports to a precise ONNX decomposition);
              ``bn``  ``nn.BatchNorm{1,2,3}d(C)`` with running statistics (foldable);
              ``bgn`` :class:`normswap.layers.BatchGroupNorm2d`; ``frn`` FRN + TLU;
              ``affine`` :class:`ChannelAffine` (a frozen per-channel scale and shift).
token layout: ``rms`` ``nn.RMSNorm(D)``; ``ln`` ``nn.LayerNorm(D)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import NormswapError

TARGETS = ("gn", "in", "ln", "bn", "bgn", "frn", "affine", "rms")

CONV_SOURCES = ("bn", "frozen_bn", "gn", "in", "frn", "bgn", "powernorm")
CONV_TARGETS = ("gn", "in", "ln", "bn", "bgn", "frn", "affine")
TOKEN_SOURCES = ("ln", "rms")
TOKEN_TARGETS = ("rms", "ln")

#: targets whose statistics are per sample (normalised output z depends on the sample only)
PER_SAMPLE_TARGETS = ("gn", "in", "ln", "frn")
#: targets that are, at eval, a per-channel affine map of x given calibration-level statistics
DATASET_STAT_TARGETS = ("bn", "bgn", "affine")


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


# ------------------------------------------------------------------------------ classification

def _fallback_classify(m: nn.Module) -> str | None:
    t = type(m)
    if t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        return "bn"
    if t is nn.GroupNorm:
        return "gn"
    if t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        return "in"
    if t is nn.LayerNorm:
        return "ln"
    if t is getattr(nn, "RMSNorm", None):
        return "rms"
    if t.__name__ == "FrozenBatchNorm2d":
        return "frozen_bn"
    try:
        from .. import layers as L
    except Exception:  # pragma: no cover
        return None
    table = {
        getattr(L, "FilterResponseNorm2d", None): "frn",
        getattr(L, "BatchGroupNorm2d", None): "bgn",
        getattr(L, "PowerNorm2d", None): "powernorm",
        getattr(L, "ConditionalBatchNorm2d", None): "cbn",
        getattr(L, "SandwichBatchNorm2d", None): "sabn",
    }
    return table.get(t)


def classify(m: nn.Module) -> str | None:
    """Kind name of a norm module (``normswap.norms.classify`` when available)."""
    try:
        from ..norms import classify as _classify  # audit builder's registry
    except Exception:
        return _fallback_classify(m)
    try:
        kind = _classify(m)
    except Exception:
        kind = None
    return kind if kind is not None else _fallback_classify(m)


def layout_of(kind: str, module: nn.Module) -> str | None:
    if kind in CONV_SOURCES:
        return "conv"
    if kind in TOKEN_SOURCES:
        shape = getattr(module, "normalized_shape", None)
        if shape is not None and len(tuple(shape)) == 1:
            return "token"
    return None


def valid_targets(kind: str) -> tuple[str, ...]:
    if kind in CONV_SOURCES:
        return tuple(t for t in CONV_TARGETS if t != kind)
    if kind in TOKEN_SOURCES:
        return tuple(t for t in TOKEN_TARGETS if t != kind)
    return ()


def valid_pairs_text() -> str:
    conv = ", ".join(CONV_SOURCES)
    return (f"conv-layout sources ({conv}) -> {', '.join(CONV_TARGETS)}; "
            f"token-layout sources (ln with 1-D normalized_shape, rms) -> {', '.join(TOKEN_TARGETS)}; "
            "a kind never converts to itself")


def default_sources(to: str) -> tuple[str, ...]:
    if to == "rms":
        return ("ln",)
    if to == "bn":
        return ("gn", "in", "bgn", "frn", "powernorm")
    return ("bn", "frozen_bn")


def check_pair(kind: str, to: str, module: nn.Module | None = None) -> None:
    if to not in TARGETS:
        raise NormswapError(f"unknown target {to!r}; choose one of {', '.join(TARGETS)}")
    ok = valid_targets(kind)
    if module is not None and kind in TOKEN_SOURCES and layout_of(kind, module) is None:
        ok = ()
    if to not in ok:
        hint = f"valid targets for {kind}: {', '.join(ok)}" if ok else f"{kind} layers cannot be converted"
        raise NormswapError(f"cannot convert {kind} to {to}: {hint} (valid pairs: {valid_pairs_text()})")


# ------------------------------------------------------------------------------ construction

def divisors(c: int) -> list[int]:
    return [d for d in range(1, c + 1) if c % d == 0]


def naive_groups(c: int) -> int:
    """The group count Opacus' ModuleValidator.fix picks: gcd(32, C)."""
    return math.gcd(32, int(c))


def source_eps(module: nn.Module, default: float = 1e-5) -> float:
    eps = getattr(module, "eps", None)
    if isinstance(eps, torch.Tensor):
        eps = float(eps.detach().abs().reshape(-1)[0])
    if eps is None:
        return default
    return float(eps)


def build_target(to: str, channels: int, ndim: int, *, groups: int | None, eps: float,
                 name: str = "") -> nn.Module:
    """A fresh replacement module (gamma = 1, beta = 0, default statistics)."""
    c = int(channels)
    where = f" at {name}" if name else ""
    if to == "gn":
        return nn.GroupNorm(int(groups or naive_groups(c)), c, eps=eps)
    if to == "ln":
        return nn.GroupNorm(1, c, eps=eps)
    if to == "in":
        cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}.get(ndim)
        if cls is None:
            raise NormswapError(f"--to in needs a feature map with spatial dims (N, C, ...){where}; "
                                f"the layer sees {ndim}-D inputs; use --to gn or ln")
        return cls(c, eps=eps, affine=True)
    if to == "bn":
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(ndim)
        if cls is None:
            raise NormswapError(f"--to bn supports 2-D to 5-D inputs{where}; the layer sees {ndim}-D inputs")
        return cls(c, eps=eps)
    if to == "bgn":
        from ..layers import BatchGroupNorm2d
        return BatchGroupNorm2d(c, int(groups or naive_groups(c)), eps=eps)
    if to == "frn":
        if ndim < 3:
            raise NormswapError(f"--to frn needs a feature map with spatial dims (N, C, ...){where}; "
                                f"the layer sees {ndim}-D inputs")
        from ..layers import FilterResponseNorm2d
        return FilterResponseNorm2d(c, eps=1e-6)
    if to == "affine":
        return ChannelAffine(c)
    if to == "rms":
        return nn.RMSNorm(c, eps=eps)
    if to == "ln":  # pragma: no cover - handled above for conv; token below
        pass
    raise NormswapError(f"unknown target {to!r}")


def build_token_target(to: str, dim: int, eps: float) -> nn.Module:
    if to == "rms":
        return nn.RMSNorm(int(dim), eps=eps)
    if to == "ln":
        return nn.LayerNorm(int(dim), eps=eps)
    raise NormswapError(f"cannot build token-layout target {to!r}; choose rms or ln")
