"""Shared logic of the rules that fold a BN-like norm into the layer before it."""

from __future__ import annotations

from ..core import (BN_LIKE, Ctx, Match, Site, eval_affine, find_producer, module_problem,
                    norm_problem, replace_with_identity, set_params)


def producer_match(site: Site, ctx: Ctx, types, what: str, pattern: str, extra_check=None):
    if site.functional is not None or site.kind not in BN_LIKE:
        return f"{site.kind} is not a BatchNorm-like norm"
    r = norm_problem(site, ctx)
    if r:
        return r
    prod = find_producer(site, ctx, types, what)
    if isinstance(prod, str):
        return prod
    r = module_problem(prod, ctx, types)
    if r:
        return r
    channels = getattr(site.module, "num_features", None)
    if channels is None:
        channels = eval_affine(site.module, site.kind, ctx)[0].numel()
    if extra_check is not None:
        r = extra_check(site, ctx, prod, channels)
        if r:
            return r
    return Match([ctx.name_of(prod)], pattern, {"producer": prod})


def apply_after(site: Site, ctx: Ctx, m: Match, fold_fn) -> None:
    prod = m.data["producer"]
    s, t = eval_affine(site.module, site.kind, ctx)
    w, b = fold_fn(prod, s, t)
    set_params(prod, w, b)
    replace_with_identity(ctx, site.module)
