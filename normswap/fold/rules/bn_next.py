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

from .. import arith
from ..core import (CONV_TYPES, CONVT_TYPES, LINEAR_TYPES, RANK_UNKNOWN, Ctx, Match, Site, conv_input_exact,
                    conv_rank_problem, eval_affine, family, find_consumers, module_problem, norm_problem,
                    post_ops_problem, replace_with_identity, set_params)
from .base import FoldRule

NAME = "bn_next"


def fold_into(layer, s, t):
    if isinstance(layer, LINEAR_TYPES):
        return arith.fold_affine_before_linear(layer.weight, layer.bias, s, t)
    return arith.fold_affine_before_conv(layer.weight, layer.bias, s, t, layer.groups)


def consumer_exact(site: Site, ctx: Ctx, layer, channels: int, channel_axis_last: bool) -> str | None:
    """Whether a per-channel affine over ``channels`` on the norm's output commutes into ``layer``.

    ``channel_axis_last``: the affine is over the last dim (LayerNorm/RMSNorm), else dim 1.
    """
    name = ctx.name_of(layer)
    if isinstance(layer, CONVT_TYPES):
        return (f"'{name}' is a ConvTranspose: its border outputs receive fewer contributions, "
                f"so the shift is not a per-channel bias")
    if isinstance(layer, LINEAR_TYPES):
        if channel_axis_last:
            if channels not in (1, layer.in_features):
                return f"channel mismatch: {channels} vs in_features {layer.in_features} of '{name}'"
            return None
        if channels == 1:
            return None
        ranks = ctx.ranks_of(site.module)
        if ranks is None:
            if channels != layer.in_features:
                return f"the norm's channel axis (dim 1) is not the input feature axis of '{name}'"
            return RANK_UNKNOWN
        if ranks != {2}:
            return (f"the norm sees rank-{max(ranks)} input: its channel axis (dim 1) is not the "
                    f"input feature axis (last dim) of '{name}'")
        return None
    # conv
    if channel_axis_last:
        return f"'{name}' is a conv: the norm's affine is over the last dim, not channels"
    if channels not in (1, layer.in_channels):
        return f"channel mismatch: {channels} vs in_channels {layer.in_channels} of '{name}'"
    r = conv_input_exact(layer)
    if r:
        return f"folding into '{name}': {r}"
    return conv_rank_problem(layer, site.module, ctx, "called on")


def apply_to_consumers(ctx: Ctx, m: Match, s, t) -> None:
    for layer in m.data["consumers"]:
        w, b = fold_into(layer, s, t)
        set_params(layer, w, b)


class BnNextRule(FoldRule):
    NAME = NAME
    NOT_APPLICABLE = "{kind} is not a BatchNorm-like norm"

    def applies(self, site: Site, ctx: Ctx) -> bool:
        return site.functional is None and family(site.kind) == "bn_like"

    def match(self, site: Site, ctx: Ctx) -> Match | str:
        r = norm_problem(site, ctx) or post_ops_problem(site)
        if r:
            return r
        cons = find_consumers(site, ctx, CONV_TYPES + CONVT_TYPES + LINEAR_TYPES, "Conv/Linear")
        if isinstance(cons, str):
            return cons
        if len(cons) != 1:
            return f"its output feeds several layers ({', '.join(ctx.name_of(c) for c in cons)})"
        layer = cons[0]
        channels = getattr(site.module, "num_features", None) or eval_affine(site.module, site.kind, ctx)[0].numel()
        r = module_problem(layer, ctx, CONV_TYPES + LINEAR_TYPES) or consumer_exact(site, ctx, layer, channels, False)
        if r:
            return r
        return Match([ctx.name_of(layer)], NAME, {"consumers": [layer]})

    def apply(self, site: Site, ctx: Ctx, m: Match) -> None:
        s, t = eval_affine(site.module, site.kind, ctx)
        apply_to_consumers(ctx, m, s, t)
        replace_with_identity(ctx, site.module)


rule = BnNextRule()
