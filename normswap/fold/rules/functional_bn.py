"""A functional ``F.batch_norm(x, running_mean, running_var, weight, bias, training=False,
momentum, eps)`` call in a traced FX graph, with constant statistics (``get_attr`` buffers)
and a Conv/ConvTranspose module as its input: fold into the conv and remove the call from
the graph.  The region that held the call becomes a ``torch.fx.GraphModule`` (the whole
model when the call sits in the root's forward).  Arguments are bound by role with the one
op table (:mod:`normswap.norm_ops`).  (On an ATen view a functional batch_norm is an ordinary
site of the producer rules.)"""

from __future__ import annotations

import torch.fx as fx

from normswap import arith
from normswap.norm_ops import bind, op_signature
from normswap.reasons import Reason, reason
from normswap.views.base import GraphView, Match, NormSite
from normswap.views.fx import describe_node, node_module

from .base import FoldRule
from .checks import conv_rank_problem

NAME = "functional_bn"
#: the ops whose result is the normalised tensor itself (others return tuples)
_REMOVABLE = ("F.batch_norm", "aten::batch_norm")


def _bind(node: fx.Node):
    sig = op_signature(node.target)
    if sig is None or sig.kind != "bn" or sig.name not in _REMOVABLE:
        return None
    if len(node.args) > len(sig.params) or any(k not in sig.params for k in node.kwargs):
        return None
    return bind(sig, node.args, node.kwargs)


def _attr(region, node):
    """The tensor behind a get_attr node (None stays None), or the node's description."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return describe_node(region, node), False
    obj = region.gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


class FunctionalBnRule(FoldRule):
    NAME = NAME
    NOT_APPLICABLE = "not a functional batch_norm"
    NEEDS = frozenset({"fx"})

    def applies(self, site: NormSite, view: GraphView) -> bool:
        return self.supported(view) and site.functional is not None

    def is_about(self, site: NormSite, view: GraphView) -> bool:
        return site.functional is not None and site.kind == "bn"

    def _stats(self, region, a):
        tensors = {}
        for k in ("running_mean", "running_var", "weight", "bias"):
            v = _attr(region, a.get(k))
            if isinstance(v, tuple):
                return reason("not_constant_attr", role=k, what=v[0])
            tensors[k] = v
        return tensors

    def match(self, site: NormSite, view: GraphView) -> Match | Reason:
        if site.kind != "bn":
            return reason("functional_kind", kind=site.kind)
        if not view.allow_training and view.model.training:
            return reason("model_training_short", hint="pass eval=True / --eval-mode")
        region, node = site.functional.region, site.functional.node
        a = _bind(node)
        if a is None:
            return reason("functional_unsupported", target=getattr(node.target, "__name__", node.target))
        if a.get("training") is not False:
            return reason("functional_training")
        if not isinstance(a.get("eps"), (int, float)):
            return reason("eps_not_constant")
        if a.get("running_mean") is None or a.get("running_var") is None:
            return reason("functional_no_stats")
        tensors = self._stats(region, a)
        if isinstance(tensors, str):
            return tensors
        s, t = arith.bn_affine(tensors["running_mean"], tensors["running_var"], tensors["weight"],
                               tensors["bias"], a["eps"])
        if not arith.is_finite(*tensors.values()) or not arith.is_finite(s, t):
            return reason("nonfinite_stats")
        return self._producer(site, view, a, s, t)

    def _producer(self, site, view, a, s, t):
        region = site.functional.region
        x = a.get("input")
        while isinstance(x, fx.Node) and id(x) in view.removed:  # a norm folded in an earlier round
            x = x.args[0] if x.args else None
        if not isinstance(x, fx.Node) or x.op != "call_module":
            return reason("input_not_layer", input=describe_node(region, x), what="Conv/ConvTranspose module")
        prod = node_module(region, x)
        from normswap.views.fx import CONV_TYPES, CONVT_TYPES, LINEAR_TYPES

        if type(prod) in LINEAR_TYPES:
            return reason("functional_after_linear")
        if type(prod) not in CONV_TYPES + CONVT_TYPES:
            return reason("input_not_layer", input=describe_node(region, x), what="Conv/ConvTranspose module")
        pname = view.name_of(prod)
        if len(view.users_of(x)) != 1:
            return reason("producer_users", layer=pname, users="")
        if len(view.calls_of(prod)) != 1:
            return reason("producer_call_sites", layer=pname, detail="")
        layer = view.layer(prod)
        r = view.layer_problem(layer, ("conv", "convt"))
        if r:
            return r
        if s.numel() != prod.out_channels:
            return reason("channel_mismatch", detail=f"{s.numel()} vs {prod.out_channels}")
        # batch_norm takes dim 1 as channels at any rank: a conv on unbatched input has them on dim 0
        r = conv_rank_problem(layer, site, view)
        if r:
            return r
        return Match([pname], NAME, {"producer": layer, "s": s, "t": t, "norm": "erase_call", "input": x})


rule = FunctionalBnRule()
