"""A functional ``F.batch_norm(x, running_mean, running_var, weight, bias, training=False,
momentum, eps)`` call in a traced graph, with constant statistics (``get_attr`` buffers)
and a Conv/ConvTranspose module as its input: fold into the conv and remove the call from
the graph.  The region that held the call becomes a ``torch.fx.GraphModule`` (the whole
model when the call sits in the root's forward).  Arguments are bound by role with the one
op table (:mod:`normswap.norm_ops`)."""

from __future__ import annotations

import torch.fx as fx

from normswap.norm_ops import bind, op_signature

from .. import arith
from ..core import (CONV_TYPES, CONVT_TYPES, LINEAR_TYPES, Ctx, Match, Site, conv_rank_problem, describe_node,
                    fold_after, module_problem, node_module)
from .base import FoldRule

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
    """The tensor behind a get_attr node (None stays None), or a reason."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return f"{describe_node(region, node)} is not a constant attribute"
    obj = region.gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


class FunctionalBnRule(FoldRule):
    NAME = NAME
    NOT_APPLICABLE = "not a functional batch_norm"

    def applies(self, site: Site, ctx: Ctx) -> bool:
        return site.functional is not None

    def is_about(self, site: Site, ctx: Ctx) -> bool:
        return site.functional is not None and site.kind == "bn"

    def match(self, site: Site, ctx: Ctx) -> Match | str:
        if site.kind != "bn":
            return f"functional {site.kind} norm: only functional batch_norm is folded"
        if not ctx.allow_training and ctx.model.training:
            return "the model is in training mode (pass eval=True / --eval)"
        ref = site.functional
        region, node = ref.region, ref.node
        a = _bind(node)
        if a is None:
            return f"unsupported functional batch_norm call ({getattr(node.target, '__name__', node.target)})"
        if a.get("training") is not False:
            return "functional batch_norm with training=True (or not a constant): uses batch statistics"
        if not isinstance(a.get("eps"), (int, float)):
            return "eps is not a constant"
        if a.get("running_mean") is None or a.get("running_var") is None:
            return "functional batch_norm without running statistics"
        tensors = {}
        for k in ("running_mean", "running_var", "weight", "bias"):
            v = _attr(region, a.get(k))
            if isinstance(v, str):
                return f"{k}: {v}"
            tensors[k] = v
        s, t = arith.bn_affine(tensors["running_mean"], tensors["running_var"], tensors["weight"],
                               tensors["bias"], a["eps"])
        if not arith.is_finite(*tensors.values()) or not arith.is_finite(s, t):
            return "non-finite statistics (NaN/Inf in running stats or affine, or var + eps <= 0)"
        x = a.get("input")
        while isinstance(x, fx.Node) and id(x) in ctx.removed:  # a norm folded in an earlier round
            x = x.args[0] if x.args else None
        if not isinstance(x, fx.Node) or x.op != "call_module":
            return f"its input is {describe_node(region, x)}, not a Conv/ConvTranspose module"
        prod = node_module(region, x)
        if type(prod) in LINEAR_TYPES:
            return "functional batch_norm after a Linear: its channel axis cannot be proven (no rank)"
        if type(prod) not in CONV_TYPES + CONVT_TYPES:
            return f"its input is {describe_node(region, x)}, not a Conv/ConvTranspose module"
        pname = ctx.name_of(prod)
        if len(ctx.users_of(x)) != 1:
            return f"the output of '{pname}' is used by more than one consumer"
        if len(ctx.calls_of(prod)) != 1:
            return f"'{pname}' is called at several places whose call sites differ"
        r = module_problem(prod, ctx, CONV_TYPES + CONVT_TYPES)
        if r:
            return r
        if s.numel() != prod.out_channels:
            return f"channel mismatch: {s.numel()} vs {prod.out_channels}"
        # batch_norm takes dim 1 as channels at any rank: a conv on unbatched input has them on dim 0
        r = conv_rank_problem(prod, None, ctx)
        if r:
            return r
        return Match([pname], NAME, {"producer": prod, "s": s, "t": t, "input": x})

    def apply(self, site: Site, ctx: Ctx, m: Match) -> None:
        fold_after(m.data["producer"], m.data["s"], m.data["t"])
        region, node = site.functional.region, site.functional.node
        args = [a for a in node.all_input_nodes if a is not m.data["input"]]
        node.replace_all_uses_with(m.data["input"])
        region.gm.graph.erase_node(node)
        for a in args:
            if a.op == "get_attr" and not a.users:
                region.gm.graph.erase_node(a)
        region.gm.recompile()
        ctx.rewritten[id(region)] = region


rule = FunctionalBnRule()
