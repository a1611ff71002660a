"""The rules that fold a BN-like norm into the layer before it: one class, parameterised by the
layer families, the pattern name and the rule's extra check."""

from __future__ import annotations

from typing import Callable

from normswap.reasons import Reason
from normswap.views.base import GraphView, Layer, Match, NormSite, family

from .base import FoldRule
from .checks import norm_problem


class ProducerRule(FoldRule):
    """``layer -> norm``: scale the layer's output channels, shift its bias."""

    NOT_APPLICABLE = "{kind} is not a BatchNorm-like norm"
    PRODUCER = True

    def __init__(self, name: str, families: tuple, what: str,
                 extra_check: Callable[[NormSite, GraphView, Layer, int], Reason | None] | None = None):
        self.NAME = name
        self.families = families
        self.what = what
        self.extra_check = extra_check

    def _site_ok(self, site: NormSite, view: GraphView) -> bool:
        return (site.functional is None or view.FUNCTIONAL_AS_MODULE) and family(site.kind) == "bn_like"

    def applies(self, site: NormSite, view: GraphView) -> bool:
        return self._site_ok(site, view) and view.first_input_family(site) in self.families

    def is_about(self, site: NormSite, view: GraphView) -> bool:
        # asked directly, a producer rule is about every BN-like norm (its reasons name the input)
        return self._site_ok(site, view)

    def match(self, site: NormSite, view: GraphView) -> Match | Reason:
        r = norm_problem(site, view)
        if r:
            return r
        prod = view.producer(site, self.families, self.what)
        if isinstance(prod, str):
            return prod
        r = view.layer_problem(prod, self.families)
        if r:
            return r
        channels = view.channels(site)
        if self.extra_check is not None:
            r = self.extra_check(site, view, prod, channels)
            if r:
                return r
        s, t = view.eval_affine(site)
        pattern = "functional_bn" if site.functional is not None else self.NAME
        return Match([prod.name], pattern, {"producer": prod, "s": s, "t": t, "norm": "identity",
                                            "keeps_node": view.post_ops_problem(site) is not None})
