"""The checks the rules share, on what a view says: the norm's own problems and the exactness of
moving a per-channel affine across a layer (channel axis, ranks, padding)."""

from __future__ import annotations

from normswap.reasons import Reason, reason
from normswap.views.base import GraphView, Layer, NormSite, family

__all__ = ["norm_problem", "conv_rank_problem", "conv_input_exact", "consumer_exact", "RANK_UNKNOWN"]

RANK_UNKNOWN = reason("rank_unknown")


def norm_problem(site: NormSite, view: GraphView) -> Reason | None:
    """Why a norm cannot be folded whatever its neighbours are (kind, hooks, uses, mode,
    statistics, visibility), in that order."""
    r = view.kind_problem(site)
    if r:
        return r
    if view.hooks(site):
        return reason("norm_hooks")
    r = view.uses_problem(site) or view.mode_problem(site)
    if r:
        return r
    if family(site.kind) == "bn_like":
        a = view.eval_affine(site)
        if isinstance(a, str):
            return a
    elif view.nonfinite_affine(site):
        return reason("nonfinite_affine")
    return view.unseen_problem(site)


def conv_rank_problem(layer: Layer, site: NormSite, view: GraphView, what: str = "called on") -> Reason | None:
    """Whether the norm's dim 1 is the conv's channel axis: a conv called on unbatched input
    (rank k+1) has its channels on dim 0.  Unknown ranks are refused when that is possible."""
    k = layer.dims
    if layer.ranks:
        if any(r < k + 2 for r in layer.ranks):
            return reason("unbatched", layer=layer.name, what=what)
        return None
    batched = view.batched_ranks(site)
    if batched is None or (k + 1) in batched:
        return RANK_UNKNOWN
    return None


def conv_input_exact(layer: Layer) -> str | None:
    """Whether a per-channel affine on a conv's input commutes with its padding (None: it does),
    else the padding that would see un-normalised zeros."""
    if layer.padding_mode != "zeros":
        return None  # replicate / reflect / circular pad with affine-transformed values
    pad = layer.padding
    if isinstance(pad, str):
        if pad == "valid" or all(d * (k - 1) == 0 for d, k in zip(layer.dilation, layer.kernel_size)):
            return None
        return "('same')"
    if all(p == 0 for p in pad):
        return None
    return str(tuple(pad))


def consumer_exact(site: NormSite, view: GraphView, layer: Layer, channels: int, last: bool) -> Reason | None:
    """Whether a per-channel affine over ``channels`` on the norm's output commutes into ``layer``
    (``last``: the affine is over the last dim -- LayerNorm / RMSNorm --, else dim 1)."""
    name = layer.name
    if layer.family == "convt":
        return reason("convtranspose_next", layer=name)
    if layer.family == "linear":
        if last:
            if channels not in (1, layer.in_channels):
                return reason("channel_mismatch", detail=f"{channels} vs in_features {layer.in_channels} of '{name}'")
            return None
        if channels == 1:
            return None
        ranks = view.ranks(site)
        if ranks is None:
            if channels != layer.in_channels:
                return reason("dim1_not_in_features", layer=name)
            return RANK_UNKNOWN
        if ranks != {2}:
            return reason("rank_nlc_next", rank=max(ranks), layer=name)
        return None
    if last:
        return reason("conv_last_dim", layer=name)
    if channels not in (1, layer.in_channels):
        return reason("channel_mismatch", detail=f"{channels} vs in_channels {layer.in_channels} of '{name}'")
    pad = conv_input_exact(layer)
    if pad:
        return reason("zero_padding", layer=name, padding=pad)
    return conv_rank_problem(layer, site, view, "called on")
