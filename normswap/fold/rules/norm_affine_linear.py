"""The affine (gamma, beta) of LayerNorm / RMSNorm / GroupNorm folded into the following
Linear (or conv) layers, when every consumer of the norm's output is such a layer (as done
before quantising transformers).  The norm stays (same class) with an identity affine
(weight ones, bias zeros), so its state dict keeps its keys.

* LayerNorm / RMSNorm over the last dim: affine over the last dim -> Linear on the last dim.
* GroupNorm: per-channel affine (dim 1) -> conv on channels (exact without zero padding) or
  Linear on (N, C) input.
"""

from __future__ import annotations

import torch

from ..core import (AFFINE_ONLY, CONV_TYPES, CONVT_TYPES, LINEAR_TYPES, Ctx, Match, Site,
                    find_consumers, module_problem, norm_problem, set_params)
from .bn_next import consumer_exact, fold_into

NAME = "norm_affine_linear"


def _affine(m, kind):
    """(s, t) float64 of the norm's affine, or a reason."""
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    if w is None and b is None:
        return "no affine to fold (elementwise_affine/affine is off)"
    if kind in ("ln", "rms"):
        shape = tuple(m.normalized_shape)
        if len(shape) != 1:
            return f"normalized_shape {shape} spans several dims: its affine is not per-feature of one layer"
        n = shape[0]
    else:
        n = m.num_channels
    s = w.detach().double() if w is not None else torch.ones(n, dtype=torch.float64)
    t = b.detach().double() if b is not None else torch.zeros(n, dtype=torch.float64)
    if bool((s == 1).all()) and bool((t == 0).all()):
        return "its affine is already the identity: nothing to fold"
    return s.reshape(-1), t.reshape(-1)


def applies(site: Site, ctx: Ctx) -> bool:
    return site.functional is None and site.kind in AFFINE_ONLY


def match(site: Site, ctx: Ctx):
    if not applies(site, ctx):
        return f"{site.kind} has no affine-only fold"
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
        others = [ctx.name_of(ctx.extra["modules_by_id"][o]) for o in owners if o != id(site.module)]
        if others:
            return (f"its {pname} is shared (tied) with {', '.join(repr(o) for o in others)}: resetting it "
                    f"to the identity would change that module")
    cons = find_consumers(site, ctx, CONV_TYPES + CONVT_TYPES + LINEAR_TYPES, "Linear/conv")
    if isinstance(cons, str):
        return cons
    last = site.kind in ("ln", "rms")
    for layer in cons:
        r = module_problem(layer, ctx, CONV_TYPES + LINEAR_TYPES) or \
            consumer_exact(site, ctx, layer, s.numel(), last)
        if r:
            return r
    return Match([ctx.name_of(c) for c in cons], NAME, {"consumers": cons})


def check(site: Site, ctx: Ctx) -> str | None:
    m = match(site, ctx)
    return m if isinstance(m, str) else None


def apply(site: Site, ctx: Ctx, m: Match | None = None) -> Match:
    m = m or match(site, ctx)
    assert isinstance(m, Match), m
    s, t = _affine(site.module, site.kind)
    for layer in m.data["consumers"]:
        w, b = fold_into(layer, s, t)
        set_params(layer, w, b)
    with torch.no_grad():
        if getattr(site.module, "weight", None) is not None:
            site.module.weight.fill_(1)
        if getattr(site.module, "bias", None) is not None:
            site.module.bias.zero_()
    return m
