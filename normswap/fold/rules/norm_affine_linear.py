"""The affine (gamma, beta) of LayerNorm / RMSNorm / GroupNorm folded into the following
Linear (or conv) layers, when every consumer of the norm's output is such a layer (as done
before quantising transformers).  The norm stays (same class) with an identity affine
(weight ones, bias zeros), so its state dict keeps its keys.

* LayerNorm / RMSNorm over the last dim (registry layout "token"): affine over the last dim
  -> Linear on the last dim.
* GroupNorm, LayerNorm2d (layout "conv"): per-channel affine (dim 1) -> conv on channels (exact
  without zero padding) or Linear on (N, C) input.
"""

from __future__ import annotations

import torch

from normswap.norms import NORMS

from ..core import (CONV_TYPES, CONVT_TYPES, LINEAR_TYPES, Ctx, Match, Site, family, find_consumers,
                    module_problem, norm_problem)
from ..export_graph import apply_match as export_apply
from ..export_graph import export_match
from .base import FoldRule
from .bn_next import apply_to_consumers, consumer_exact

NAME = "norm_affine_linear"


def _affine(m, kind):
    """(s, t) float64 of the norm's affine, or a reason."""
    k = NORMS[kind]
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    if k.has_affine(m) is False or (w is None and b is None):
        return "no affine to fold (elementwise_affine/affine is off)"
    if k.layout == "token":
        shape = tuple(m.normalized_shape)
        if len(shape) != 1:
            return f"normalized_shape {shape} spans several dims: its affine is not per-feature of one layer"
        n = shape[0]
    else:  # per channel on dim 1: GroupNorm's num_channels, LayerNorm2d's normalized_shape (C,)
        n = getattr(m, "num_channels", None) or tuple(m.normalized_shape)[0]
    s = w.detach().double() if w is not None else torch.ones(n, dtype=torch.float64)
    t = b.detach().double() if b is not None else torch.zeros(n, dtype=torch.float64)
    if bool((s == 1).all()) and bool((t == 0).all()):
        return "its affine is already the identity: nothing to fold"
    return s.reshape(-1), t.reshape(-1)


class NormAffineLinearRule(FoldRule):
    NAME = NAME
    NOT_APPLICABLE = "{kind} has no affine-only fold"
    REMOVES_NORM = False  # the norm stays, with an identity affine

    def applies(self, site: Site, ctx: Ctx) -> bool:
        # issue 11: custom norms too (an RMSNorm forward proven on a torch.export graph)
        return site.functional is None and (family(site.kind) == "affine_only" or site.kind == "custom")

    def match(self, site: Site, ctx: Ctx) -> Match | str:
        # --- issue 11: sites FX cannot prove (untraceable region, custom forward), proven on the
        # torch.export graph of the example inputs (normswap.fold.export_graph); its reasons come
        # back through norm_problem
        m = export_match(site, ctx)
        if m is not None:  # a Match, or the export graph's reason
            return m
        # ---
        r = norm_problem(site, ctx)
        if r:
            return r
        a = _affine(site.module, site.kind)
        if isinstance(a, str):
            return a
        s, _ = a
        for pname in ("weight", "bias"):  # they are reset to the identity: no one else may hold them
            p = getattr(site.module, pname, None)
            owners = ctx.param_owners.get(id(p), []) if isinstance(p, torch.Tensor) else []
            others = [ctx.name_of(ctx.modules_by_id[o]) for o in owners if o != id(site.module)]
            if others:
                return (f"its {pname} is shared (tied) with {', '.join(repr(o) for o in others)}: resetting it "
                        f"to the identity would change that module")
        cons = find_consumers(site, ctx, CONV_TYPES + CONVT_TYPES + LINEAR_TYPES, "Linear/conv")
        if isinstance(cons, str):
            return cons
        last = NORMS[site.kind].layout == "token"
        for layer in cons:
            r = module_problem(layer, ctx, CONV_TYPES + LINEAR_TYPES) or \
                consumer_exact(site, ctx, layer, s.numel(), last)
            if r:
                return r
        return Match([ctx.name_of(c) for c in cons], NAME, {"consumers": cons})

    def apply(self, site: Site, ctx: Ctx, m: Match) -> None:
        if m.data.get("graph") == "torch.export":  # issue 11 (normswap.fold.export_graph)
            export_apply(site, ctx, m)
            return
        s, t = _affine(site.module, site.kind)
        apply_to_consumers(ctx, m, s, t)
        with torch.no_grad():
            if getattr(site.module, "weight", None) is not None:
                site.module.weight.fill_(1)
            if getattr(site.module, "bias", None) is not None:
                site.module.bias.zero_()


rule = NormAffineLinearRule()
