"""The BatchNorm inside a Conditional / Sandwich BatchNorm (``normswap.layers``) folded into
the conv before it.

``ConditionalBatchNorm2d(x, c) = gamma(c) * bn(x) + beta(c)`` and
``SandwichBatchNorm2d(x, k) = gamma_k * bn(x) + beta_k``: the inner ``bn`` (running
statistics, and for Sandwich BN its shared affine) is a per-channel affine at eval, so it
folds into the producing conv exactly; the inner ``bn`` becomes ``nn.Identity`` and the
conditional / per-branch affine stays (it depends on a second input).
"""

from __future__ import annotations

from torch import nn

from .. import arith
from ..core import (CONV_TYPES, CONVT_TYPES, Ctx, Match, Site, eval_affine, find_producer,
                    module_problem, norm_problem, replace_with_identity, set_params)

NAME = "composite_bn"
KINDS = ("cbn", "sabn")


def applies(site: Site, ctx: Ctx) -> bool:
    return site.functional is None and site.kind in KINDS


def _inner(site: Site):
    bn = getattr(site.module, "bn", None)
    if type(bn) is not nn.BatchNorm2d:
        return None
    return bn


def match(site: Site, ctx: Ctx):
    if not applies(site, ctx):
        return f"{site.kind} is not a conditional/sandwich BatchNorm"
    m = site.module
    bn = _inner(site)
    if bn is None:
        return f"{type(m).__name__} has no plain BatchNorm2d 'bn' inside"
    if m._forward_hooks or m._forward_pre_hooks:
        return "the norm has hooks registered"
    if not ctx.allow_training and m.training:
        return "the norm is in training mode (pass eval=True / --eval)"
    inner = Site(f"{site.name}.bn", "bn", bn, site.calls)
    r = norm_problem(inner, ctx)
    if r:
        return r
    prod = find_producer(site, ctx, CONV_TYPES + CONVT_TYPES, "Conv/ConvTranspose", extra_args_ok=True)
    if isinstance(prod, str):
        return prod
    r = module_problem(prod, ctx, CONV_TYPES + CONVT_TYPES)
    if r:
        return r
    if prod.out_channels != bn.num_features:
        return f"channel mismatch: {bn.num_features} vs {prod.out_channels}"
    return Match([ctx.name_of(prod)], NAME, {"producer": prod, "bn": bn})


def check(site: Site, ctx: Ctx) -> str | None:
    m = match(site, ctx)
    return m if isinstance(m, str) else None


def apply(site: Site, ctx: Ctx, m: Match | None = None) -> Match:
    m = m or match(site, ctx)
    assert isinstance(m, Match), m
    prod, bn = m.data["producer"], m.data["bn"]
    s, t = eval_affine(bn, "bn", ctx)
    if isinstance(prod, CONVT_TYPES):
        w, b = arith.fold_affine_after_conv_transpose(prod.weight, prod.bias, s, t, prod.groups)
    else:
        w, b = arith.fold_affine_after_conv(prod.weight, prod.bias, s, t)
    set_params(prod, w, b)
    replace_with_identity(ctx, bn)
    return m
