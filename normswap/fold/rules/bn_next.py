"""A BatchNorm-like norm folded into the layer *after* it (used when nothing foldable
precedes it, e.g. a BN on the model input or after a pooling/add).

Exact only when:

* the norm's output feeds only that layer (at every call), and that layer reads only it;
* Linear: the norm's channel axis (dim 1) is the Linear's input feature axis, i.e. (N, C)
  input (or a one-channel norm, a scalar affine);
* Conv1d/2d/3d: the conv never sees padded zeros (padding 0, or padding_mode
  replicate/reflect/circular, which pad with normalised values, so the per-channel affine
  commutes with the padding).  A ConvTranspose is never exact: its border outputs receive
  fewer contributions, so the shift is not a per-channel bias.
"""

from __future__ import annotations

from normswap.reasons import Reason, reason
from normswap.views.base import GraphView, Match, NormSite, family

from .base import FoldRule
from .checks import consumer_exact, norm_problem

NAME = "bn_next"


class BnNextRule(FoldRule):
    NAME = NAME
    NOT_APPLICABLE = "{kind} is not a BatchNorm-like norm"

    def applies(self, site: NormSite, view: GraphView) -> bool:
        return site.functional is None and family(site.kind) == "bn_like"

    def match(self, site: NormSite, view: GraphView) -> Match | Reason:
        r = norm_problem(site, view) or view.post_ops_problem(site)
        if r:
            return r
        cons = view.consumers(site, ("conv", "convt", "linear"), "Conv/Linear")
        if isinstance(cons, str):
            return cons
        if len(cons) != 1:
            return reason("feeds_several", layers=", ".join(c.name for c in cons))
        layer = cons[0]
        channels = view.channels(site)
        r = view.layer_problem(layer, ("conv", "linear")) or consumer_exact(site, view, layer, channels, False)
        if r:
            return r
        s, t = view.eval_affine(site)
        return Match([layer.name], NAME, {"consumers": [layer], "s": s, "t": t, "norm": "identity"})


rule = BnNextRule()
