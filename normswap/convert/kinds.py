"""Which norms can become which, and how the replacement modules are built.

Sources are asked of the registry (:mod:`normswap.norms`): a norm can be converted when its
kind has a convert layout (``NORMS[kind].convert_layout(module)``):

``conv``  -- the norm normalises per channel on dim 1 of an ``(N, C, *)`` tensor
             (BatchNorm, GroupNorm, InstanceNorm, FRN, BGN, PowerNorm, ...).
``token`` -- the norm normalises over the last dim of an ``(..., D)`` tensor
             (``nn.LayerNorm`` with a 1-D ``normalized_shape``, ``nn.RMSNorm``).

Targets (``--to``) are the one map :data:`TARGETS` ``{name: TargetSpec}``; the CLI imports its
keys for its choices and the descriptions for its help.  ``ln`` on a conv feature map is a channel
LayerNorm implemented as ``nn.GroupNorm(1, C)`` (statistics over C and all positions of each
sample -- the "LayerNorm for conv nets" of Wu & He 2018; chosen over ConvNeXt's per-position
channel LayerNorm because it is a stock torch module that Opacus accepts and that exports to a
precise ONNX decomposition).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..errors import NormswapError
from ..layers.affine import ChannelAffine
from ..norms import NORMS

__all__ = ["TARGETS", "TargetSpec", "ChannelAffine", "register_opacus", "DEFAULT_SOURCES", "source_kinds", "valid_targets",
           "valid_pairs_text", "default_sources", "check_pair", "build_target", "divisors", "naive_groups"]


def _channel_affine_grad_sample(layer: ChannelAffine, activations, backprops) -> dict:
    """Per-sample gradients of a :class:`ChannelAffine` (for Opacus): sum over every axis but
    the batch (0) and channel (1) axes of ``x * g`` (weight) and ``g`` (bias)."""
    x = activations[0] if isinstance(activations, (list, tuple)) else activations
    g = backprops
    dims = tuple(range(2, g.dim()))
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = (x * g).sum(dims) if dims else x * g
    if layer.bias.requires_grad:
        out[layer.bias] = g.sum(dims) if dims else g
    return out


def register_opacus() -> bool:
    """Register the grad sampler of :class:`ChannelAffine` with Opacus (``--to affine`` layers
    then train under ``PrivacyEngine`` with exact per-sample gradients, like nn.Conv2d / GroupNorm);
    done automatically when opacus is already imported when the layers are built.  Without it,
    Opacus >= 1.2 falls back to its functorch per-sample gradients.  Returns False when opacus
    is not installed."""
    try:
        from opacus.grad_sample import GradSampleModule
        from opacus.grad_sample.utils import register_grad_sampler
    except Exception:  # noqa: BLE001 - opacus is optional
        return False
    if ChannelAffine not in GradSampleModule.GRAD_SAMPLERS:
        register_grad_sampler(ChannelAffine)(_channel_affine_grad_sample)
    return True


# ------------------------------------------------------------------------------ group counts

def divisors(c: int) -> list[int]:
    return [d for d in range(1, c + 1) if c % d == 0]


def naive_groups(c: int) -> int:
    """The group count Opacus' ModuleValidator.fix picks: gcd(32, C)."""
    return math.gcd(32, int(c))


def _gn_candidates(c: int, groups, name: str) -> list[int]:
    if groups == "auto":
        return divisors(c)
    g = int(groups)
    if c % g:
        raise NormswapError(f"--groups {g} does not divide the {c} channels of {name}; "
                            f"divisors: {', '.join(map(str, divisors(c)))} (or use auto)")
    cands = [g]
    if naive_groups(c) != g:
        cands.append(naive_groups(c))  # for the naive error
    return cands


# ------------------------------------------------------------------------------ builders
# builder(channels, ndim, *, groups, eps, where) -> a fresh module (gamma = 1, beta = 0)

def _build_gn(c, ndim, *, groups, eps, where):
    return nn.GroupNorm(int(groups or naive_groups(c)), c, eps=eps)


def _build_channel_ln(c, ndim, *, groups, eps, where):
    return nn.GroupNorm(1, c, eps=eps)


def _build_in(c, ndim, *, groups, eps, where):
    cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}.get(ndim)
    if cls is None:
        raise NormswapError(f"--to in needs a feature map with spatial dims (N, C, ...){where}; "
                            f"the layer sees {ndim}-D inputs; use --to gn or ln")
    return cls(c, eps=eps, affine=True)


def _build_bn(c, ndim, *, groups, eps, where):
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(ndim)
    if cls is None:
        raise NormswapError(f"--to bn supports 2-D to 5-D inputs{where}; the layer sees {ndim}-D inputs")
    return cls(c, eps=eps)


def _build_bgn(c, ndim, *, groups, eps, where):
    from ..layers import BatchGroupNorm2d
    return BatchGroupNorm2d(c, int(groups or naive_groups(c)), eps=eps)


def _build_frn(c, ndim, *, groups, eps, where):
    if ndim < 3:
        raise NormswapError(f"--to frn needs a feature map with spatial dims (N, C, ...){where}; "
                            f"the layer sees {ndim}-D inputs")
    from ..layers import FilterResponseNorm2d
    return FilterResponseNorm2d(c, eps=eps)


def _build_affine(c, ndim, *, groups, eps, where):
    if "opacus" in sys.modules:
        register_opacus()
    return ChannelAffine(c)


def _build_rms(c, ndim, *, groups, eps, where):
    return nn.RMSNorm(int(c), eps=eps)


def _build_token_ln(c, ndim, *, groups, eps, where):
    return nn.LayerNorm(int(c), eps=eps)


# ------------------------------------------------------------------------------ the targets

@dataclass(frozen=True)
class TargetSpec:
    """One ``--to`` target: its builders per layout and the facts calibration asks of it."""

    name: str
    #: layout ("conv" / "token") -> builder(channels, ndim, *, groups, eps, where)
    builders: dict[str, Callable[..., nn.Module]]
    #: "sample": per-sample statistics (the normalised output depends on the sample only);
    #: "dataset": at eval a per-channel affine of x given calibration-level statistics
    statistics: str
    description: str
    #: conv layout: candidate group counts ``fn(C, groups, site_name)`` (per-sample targets)
    candidates: Callable[[int, object, str], list[int]] | None = None
    #: --groups applies (the group count is a free choice)
    grouped: bool = False
    #: the target's own eps (None: the source's)
    eps: float | None = None
    #: the source kinds converted by default (None: :data:`DEFAULT_SOURCES`)
    default_sources: Callable[[], tuple[str, ...]] | None = field(default=None, compare=False)

    @property
    def layouts(self) -> tuple[str, ...]:
        return tuple(self.builders)

    def build(self, layout: str, channels: int, ndim: int, *, groups: int | None, eps: float,
              name: str = "") -> nn.Module:
        """A fresh replacement module (gamma = 1, beta = 0, default statistics)."""
        builder = self.builders.get(layout)
        if builder is None:
            raise NormswapError(f"cannot build {layout}-layout target {self.name!r}; "
                                f"choose {', '.join(targets_for(layout))}")
        where = f" at {name}" if name else ""
        return builder(int(channels), ndim, groups=groups, eps=self.eps if self.eps is not None else eps,
                       where=where)


def bn_sources() -> tuple[str, ...]:
    """The BatchNorm kinds: what convert replaces unless told otherwise -- the registry's kinds
    marked ``convert_default`` (bn, frozen_bn, timm's bn_act, ... and any kind registered so)."""
    return tuple(k for k, nk in NORMS.items() if nk.convert_default)


def __getattr__(name: str):
    if name == "DEFAULT_SOURCES":  # always current: kinds may be registered later
        return bn_sources()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _non_bn_conv_sources() -> tuple[str, ...]:
    return tuple(k for k in source_kinds("conv") if k not in bn_sources())


def _layer_norm_sources() -> tuple[str, ...]:
    return tuple(k for k in source_kinds("token") if k == "ln")


TARGETS: dict[str, TargetSpec] = {spec.name: spec for spec in (
    TargetSpec("gn", {"conv": _build_gn}, "sample",
               "GroupNorm (--groups auto picks the divisor of C with the least calibration error)",
               candidates=_gn_candidates, grouped=True),
    TargetSpec("in", {"conv": _build_in}, "sample", "InstanceNorm (affine)",
               candidates=lambda c, groups, name: [c]),
    TargetSpec("ln", {"conv": _build_channel_ln, "token": _build_token_ln}, "sample",
               "channel LayerNorm (GroupNorm with one group), or LayerNorm on token models",
               candidates=lambda c, groups, name: [1]),
    TargetSpec("bn", {"conv": _build_bn}, "dataset", "BatchNorm with running statistics (foldable)",
               default_sources=_non_bn_conv_sources),
    TargetSpec("bgn", {"conv": _build_bgn}, "dataset", "Batch Group Norm", grouped=True),
    TargetSpec("frn", {"conv": _build_frn}, "sample", "FRN + TLU",
               candidates=lambda c, groups, name: [0], eps=1e-6),
    TargetSpec("affine", {"conv": _build_affine}, "dataset",
               "per-channel affine y = x*w + b (exact for eval BatchNorm; no batch statistics; trainable under Opacus)"),
    TargetSpec("rms", {"token": _build_rms}, "sample", "RMSNorm (token models, from LayerNorm)",
               default_sources=_layer_norm_sources),
)}


def targets_for(layout: str) -> tuple[str, ...]:
    return tuple(t for t, spec in TARGETS.items() if layout in spec.builders)


def source_kinds(layout: str | None = None) -> tuple[str, ...]:
    """Registered kinds convert can replace (with the given layout)."""
    return tuple(k for k, nk in NORMS.items() if nk.layout is not None and (layout is None or nk.layout == layout))


def valid_targets(kind: str) -> tuple[str, ...]:
    layout = NORMS[kind].layout if kind in NORMS else None
    if layout is None:
        return ()
    return tuple(t for t in targets_for(layout) if t != kind)


def valid_pairs_text() -> str:
    conv = ", ".join(source_kinds("conv"))
    token = ", ".join(f"{k} with 1-D normalized_shape" if k == "ln" else k for k in source_kinds("token"))
    return (f"conv-layout sources ({conv}) -> {', '.join(targets_for('conv'))}; "
            f"token-layout sources ({token}) -> {', '.join(targets_for('token'))}; "
            "a kind never converts to itself")


def default_sources(to: str) -> tuple[str, ...]:
    spec = TARGETS[to]
    return spec.default_sources() if spec.default_sources is not None else bn_sources()


def check_pair(kind: str, to: str, module: nn.Module | None = None) -> None:
    if to not in TARGETS:
        raise NormswapError(f"unknown target {to!r}; choose one of {', '.join(TARGETS)}")
    ok = valid_targets(kind)
    if module is not None and ok and NORMS[kind].convert_layout(module) is None:
        ok = ()
    if to not in ok:
        hint = f"valid targets for {kind}: {', '.join(ok)}" if ok else f"{kind} layers cannot be converted"
        raise NormswapError(f"cannot convert {kind} to {to}: {hint} (valid pairs: {valid_pairs_text()})")


def build_target(to: str, channels: int, ndim: int, *, groups: int | None, eps: float,
                 name: str = "", layout: str = "conv") -> nn.Module:
    """A fresh replacement module of target ``to`` (gamma = 1, beta = 0, default statistics)."""
    if to not in TARGETS:
        raise NormswapError(f"unknown target {to!r}")
    return TARGETS[to].build(layout, channels, ndim, groups=groups, eps=eps, name=name)
