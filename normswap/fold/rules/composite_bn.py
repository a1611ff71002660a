"""The BatchNorm inside a Conditional / Sandwich BatchNorm (``normswap.layers``) folded into
the conv before it (FX view).

``ConditionalBatchNorm2d(x, c) = gamma(c) * bn(x) + beta(c)`` and
``SandwichBatchNorm2d(x, k) = gamma_k * bn(x) + beta_k``: the inner ``bn`` (running
statistics, its own affine) is a per-channel affine of the conv's output, so it folds into
the conv; the conditional / per-branch affine stays and the inner ``bn`` becomes the identity.
"""

from __future__ import annotations

from torch import nn

from normswap.norms import NORMS, classify, is_composite
from normswap.reasons import Reason, reason
from normswap.views.base import GraphView, Match, NormSite

from .base import FoldRule
from .checks import norm_problem

NAME = "composite_bn"


def _inner(site: NormSite):
    bn = NORMS[site.kind].stat_module(site.module)
    if bn is site.module or type(bn) is not nn.BatchNorm2d:
        return None
    return bn


class CompositeBnRule(FoldRule):
    NAME = NAME
    NOT_APPLICABLE = "{kind} is not a conditional/sandwich BatchNorm"
    REMOVES_NORM = False  # the conditional / per-branch affine stays
    NEEDS = frozenset({"fx"})

    def applies(self, site: NormSite, view: GraphView) -> bool:
        return self.supported(view) and site.functional is None and is_composite(site.kind)

    def match(self, site: NormSite, view: GraphView) -> Match | Reason:
        m = site.module
        bn = _inner(site)
        if bn is None:
            return reason("no_inner_bn", type=type(m).__name__)
        if m._forward_hooks or m._forward_pre_hooks:
            return reason("norm_hooks")
        if not view.allow_training and m.training:
            return reason("norm_training", hint="pass eval=True / --eval-mode")
        inner = NormSite(f"{site.name}.bn", classify(bn), bn, site.calls, type_name=type(bn).__name__)
        r = norm_problem(inner, view)
        if r:
            return r
        prod = view.producer(site, ("conv", "convt"), "Conv/ConvTranspose", extra_args_ok=True)
        if isinstance(prod, str):
            return prod
        r = view.layer_problem(prod, ("conv", "convt"))
        if r:
            return r
        if prod.out_channels != bn.num_features:
            return reason("channel_mismatch", detail=f"{bn.num_features} vs {prod.out_channels}")
        s, t = view.eval_affine(inner)
        return Match([prod.name], NAME, {"producer": prod, "s": s, "t": t, "norm": "inner_identity", "inner": bn})


rule = CompositeBnRule()
