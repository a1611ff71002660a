"""A functional ``F.batch_norm(x, running_mean, running_var, weight, bias, training=False,
momentum, eps)`` call in a traced graph, with constant statistics (``get_attr`` buffers)
and a Conv/ConvTranspose module as its input: fold into the conv and remove the call from
the graph.  The region that held the call becomes a ``torch.fx.GraphModule`` (the whole
model when the call sits in the root's forward)."""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import arith
from ..core import (CONV_TYPES, CONVT_TYPES, LINEAR_TYPES, Ctx, Match, Site, conv_rank_problem, describe_node,
                    module_problem, node_module, set_params)

NAME = "functional_bn"
_SIG = inspect.signature(F.batch_norm)


def _bind(node: fx.Node):
    if node.target is F.batch_norm:
        try:
            b = _SIG.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        b.apply_defaults()
        return dict(b.arguments)
    if node.target is torch.batch_norm and not node.kwargs and len(node.args) == 9:
        x, w, bias, rm, rv, training, momentum, eps, _ = node.args
        return {"input": x, "running_mean": rm, "running_var": rv, "weight": w, "bias": bias,
                "training": training, "momentum": momentum, "eps": eps}
    return None


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


def applies(site: Site, ctx: Ctx) -> bool:
    return site.functional is not None and site.kind == "bn"


def match(site: Site, ctx: Ctx):
    if not applies(site, ctx):
        return "not a functional batch_norm"
    ref = site.functional
    region, node = ref.region, ref.node
    a = _bind(node)
    if a is None:
        return f"unsupported functional batch_norm call ({getattr(node.target, '__name__', node.target)})"
    if a["training"] is not False:
        return "functional batch_norm with training=True (or not a constant): uses batch statistics"
    if not isinstance(a["eps"], (int, float)):
        return "eps is not a constant"
    if a["running_mean"] is None or a["running_var"] is None:
        return "functional batch_norm without running statistics"
    tensors = {}
    for k in ("running_mean", "running_var", "weight", "bias"):
        v = _attr(region, a[k])
        if isinstance(v, str):
            return f"{k}: {v}"
        tensors[k] = v
    s, t = arith.bn_affine(tensors["running_mean"], tensors["running_var"], tensors["weight"],
                           tensors["bias"], a["eps"])
    if not arith.is_finite(*tensors.values()) or not arith.is_finite(s, t):
        return "non-finite statistics (NaN/Inf in running stats or affine, or var + eps <= 0)"
    x = a["input"]
    if not isinstance(x, fx.Node) or x.op != "call_module":
        return f"its input is {describe_node(region, x)}, not a Conv/ConvTranspose module"
    prod = node_module(region, x)
    if type(prod) in LINEAR_TYPES:
        return "functional batch_norm after a Linear: its channel axis cannot be proven (no rank)"
    if type(prod) not in CONV_TYPES + CONVT_TYPES:
        return f"its input is {describe_node(region, x)}, not a Conv/ConvTranspose module"
    pname = ctx.name_of(prod)
    if len(x.users) != 1:
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


def check(site: Site, ctx: Ctx) -> str | None:
    m = match(site, ctx)
    return m if isinstance(m, str) else None


def apply(site: Site, ctx: Ctx, m: Match | None = None) -> Match:
    m = m or match(site, ctx)
    assert isinstance(m, Match), m
    prod, s, t = m.data["producer"], m.data["s"], m.data["t"]
    if type(prod) in CONVT_TYPES:
        w, b = arith.fold_affine_after_conv_transpose(prod.weight, prod.bias, s, t, prod.groups)
    else:
        w, b = arith.fold_affine_after_conv(prod.weight, prod.bias, s, t)
    set_params(prod, w, b)
    region, node = site.functional.region, site.functional.node
    args = [a for a in node.all_input_nodes if a is not m.data["input"]]
    node.replace_all_uses_with(m.data["input"])
    region.gm.graph.erase_node(node)
    for a in args:
        if a.op == "get_attr" and not a.users:
            region.gm.graph.erase_node(a)
    region.gm.recompile()
    ctx.extra.setdefault("rewritten", {})[id(region)] = region
    return m
