"""The rules that fold a BN-like norm into the layer before it: one class, parameterised by
the layer types, the pattern name and the rule's extra check."""

from __future__ import annotations

from typing import Callable

from ..core import (Ctx, Match, Site, eval_affine, family, find_producer, fold_after, module_problem,
                    node_module, norm_problem, replace_with_identity)
from .base import FoldRule

#: every layer type a producer rule is about (a site belongs to the rule of its input's type)
_LAYER_TYPES: list[tuple[type, ...]] = []


def first_input_type(site: Site, ctx: Ctx):
    """The layer type (one of the producer rules' types) of the norm's first call's input."""
    for ref in site.calls:
        if ref.node.args:
            m = node_module(ref.region, ctx.input_of(ref.node, True) or ref.node.args[0])
            for types in _LAYER_TYPES:
                for t in types:
                    if isinstance(m, t):
                        return t
            return None
    return None


class ProducerRule(FoldRule):
    """``layer -> norm``: scale the layer's output channels, shift its bias."""

    NOT_APPLICABLE = "{kind} is not a BatchNorm-like norm"
    PRODUCER = True

    def __init__(self, name: str, types: tuple[type, ...], what: str,
                 extra_check: Callable[[Site, Ctx, object, int], str | None] | None = None):
        self.NAME = name
        self.types = types
        self.what = what
        self.extra_check = extra_check
        _LAYER_TYPES.append(types)

    def applies(self, site: Site, ctx: Ctx) -> bool:
        return site.functional is None and family(site.kind) == "bn_like" \
            and first_input_type(site, ctx) in self.types

    def is_about(self, site: Site, ctx: Ctx) -> bool:
        # asked directly, a producer rule is about every BN-like norm (its reasons name the input)
        return site.functional is None and family(site.kind) == "bn_like"

    def match(self, site: Site, ctx: Ctx) -> Match | str:
        r = norm_problem(site, ctx)
        if r:
            return r
        prod = find_producer(site, ctx, self.types, self.what)
        if isinstance(prod, str):
            return prod
        r = module_problem(prod, ctx, self.types)
        if r:
            return r
        channels = getattr(site.module, "num_features", None)
        if channels is None:
            channels = eval_affine(site.module, site.kind, ctx)[0].numel()
        if self.extra_check is not None:
            r = self.extra_check(site, ctx, prod, channels)
            if r:
                return r
        return Match([ctx.name_of(prod)], self.NAME, {"producer": prod})

    def removed_nodes(self, site: Site, m: Match) -> list:
        # a norm with post ops (an activation) stays in the graph as that activation: later
        # planning rounds must not look through it
        from normswap.library_norms import post_op_children

        if site.module is not None and post_op_children(site.module, site.kind):
            return []
        return super().removed_nodes(site, m)

    def apply(self, site: Site, ctx: Ctx, m: Match) -> None:
        s, t = eval_affine(site.module, site.kind, ctx)
        fold_after(m.data["producer"], s, t)
        replace_with_identity(ctx, site.module)
