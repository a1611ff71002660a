"""The BatchNorm inside a Conditional / Sandwich BatchNorm (``normswap.layers``) folded into
the conv before it.

``ConditionalBatchNorm2d(x, c) = gamma(c) * bn(x) + beta(c)`` and
``SandwichBatchNorm2d(x, k) = gamma_k * bn(x) + beta_k``: the inner ``bn`` (running
statistics, and for Sandwich BN its shared affine) is a per-channel affine at eval, so it
folds into the producing conv exactly; the inner ``bn`` becomes ``nn.Identity`` and the
conditional / per-branch affine stays (it depends on a second input).  The rule is about
every kind the registry marks ``composite``.
"""

from __future__ import annotations

from torch import nn

from normswap.norms import NORMS, classify, is_composite

from ..core import (CONV_TYPES, CONVT_TYPES, Ctx, Match, Site, eval_affine, find_producer, fold_after,
                    module_problem, norm_problem, replace_with_identity)
from .base import FoldRule

NAME = "composite_bn"


def _inner(site: Site):
    bn = NORMS[site.kind].stat_module(site.module)
    if bn is site.module or type(bn) is not nn.BatchNorm2d:
        return None
    return bn


class CompositeBnRule(FoldRule):
    NAME = NAME
    NOT_APPLICABLE = "{kind} is not a conditional/sandwich BatchNorm"
    REMOVES_NORM = False  # the conditional / per-branch affine stays

    def applies(self, site: Site, ctx: Ctx) -> bool:
        return site.functional is None and is_composite(site.kind)

    def match(self, site: Site, ctx: Ctx) -> Match | str:
        m = site.module
        bn = _inner(site)
        if bn is None:
            return f"{type(m).__name__} has no plain BatchNorm2d 'bn' inside"
        if m._forward_hooks or m._forward_pre_hooks:
            return "the norm has hooks registered"
        if not ctx.allow_training and m.training:
            return "the norm is in training mode (pass eval=True / --eval)"
        inner = Site(f"{site.name}.bn", classify(bn), bn, site.calls)
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
        return Match([ctx.name_of(prod)], NAME, {"producer": prod, "bn": bn, "kind": inner.kind})

    def apply(self, site: Site, ctx: Ctx, m: Match) -> None:
        bn = m.data["bn"]
        s, t = eval_affine(bn, m.data["kind"], ctx)
        fold_after(m.data["producer"], s, t)
        replace_with_identity(ctx, bn)


rule = CompositeBnRule()
