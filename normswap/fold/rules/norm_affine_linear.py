"""The affine (gamma, beta) of LayerNorm / RMSNorm / GroupNorm folded into the following
Linear (or conv) layers, when every consumer of the norm's output is such a layer (as done
before quantising transformers).  The norm stays (same class) with an identity affine
(weight ones, bias zeros), so its state dict keeps its keys.

* LayerNorm / RMSNorm over the last dim (registry layout "token"): affine over the last dim
  -> Linear on the last dim.
* GroupNorm, LayerNorm2d (layout "conv"): per-channel affine (dim 1) -> conv on channels (exact
  without zero padding) or Linear on (N, C) input.
* A custom RMSNorm (HF ``LlamaRMSNorm``), only on a view that proves its forward (the export view).
"""

from __future__ import annotations

from normswap.reasons import Reason
from normswap.views.base import GraphView, Match, NormSite, family

from .base import FoldRule
from .checks import consumer_exact, norm_problem

NAME = "norm_affine_linear"


class NormAffineLinearRule(FoldRule):
    NAME = NAME
    NOT_APPLICABLE = "{kind} has no affine-only fold"
    REMOVES_NORM = False  # the norm stays, with an identity affine

    def applies(self, site: NormSite, view: GraphView) -> bool:
        return site.functional is None and (family(site.kind) == "affine_only" or site.kind == "custom")

    def match(self, site: NormSite, view: GraphView) -> Match | Reason:
        r = norm_problem(site, view)
        if r:
            return r
        a = view.norm_affine(site)
        if isinstance(a, str):
            return a
        s, t = a
        r = view.tied_problem(site)
        if r:
            return r
        cons = view.consumers(site, ("conv", "convt", "linear"), "Linear/conv")
        if isinstance(cons, str):
            return cons
        last = view.affine_last_dim(site)
        for layer in cons:
            r = view.layer_problem(layer, ("conv", "linear")) or consumer_exact(site, view, layer, s.numel(), last)
            if r:
                return r
        return Match([c.name for c in cons], NAME, {"consumers": cons, "s": s, "t": t, "norm": "reset_affine"})


rule = NormAffineLinearRule()
