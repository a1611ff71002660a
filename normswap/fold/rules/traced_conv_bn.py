"""A BatchNorm-like norm after a convolution written as an ``nn.Conv2d`` subclass with its own
``forward`` (EfficientNet-PyTorch's ``Conv2dStaticSamePadding``: pad, then
``F.conv2d(x, self.weight, self.bias, ...)``).  FX traces into such a forward, so the norm's
input is a ``conv2d`` call_function whose weight is a ``get_attr``.

Folded only when the trace proves it exact: the weight (and bias) are read by exactly that one
call in every traced graph, the call's output feeds only the norm, the owning module is a
Conv1d/2d/3d (any subclass: its forward is in the trace) that no untraceable code can reach,
and its weights are plain, untied parameters.  Scaling output channel ``o`` of a convolution's
weight and bias scales output channel ``o`` of its result, whatever the input padding was.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from normswap.reasons import Reason, reason
from normswap.views.base import GraphView, Match, NormSite, family
from normswap.views.fx import CONV_TYPES, describe_node

from .base import FoldRule
from .checks import norm_problem

NAME = "traced_conv_bn"

_CONV_FNS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


def _conv_call(site: NormSite, view):
    if len(site.calls) != 1:
        return None
    ref = site.calls[0]
    inp = view.input_of(ref.node)
    if isinstance(inp, fx.Node) and inp.op == "call_function" and inp.target in _CONV_FNS:
        return ref, inp
    return None


def _arg(node: fx.Node, i: int, name: str):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name)


def _resolve(region, target: str):
    obj = region.module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _get_attr_count(view, tensor) -> int:
    n = 0
    for r in view.regions:
        if r.gm is None:
            continue
        for node in r.gm.graph.nodes:
            if node.op == "get_attr":
                try:
                    if _resolve(r, str(node.target)) is tensor:
                        n += 1
                except AttributeError:
                    pass
    return n


class TracedConvRule(FoldRule):
    NAME = NAME
    NOT_APPLICABLE = "{kind}: its input is not a traced convolution call"
    PRODUCER = True
    NEEDS = frozenset({"fx"})

    def applies(self, site: NormSite, view: GraphView) -> bool:
        return (self.supported(view) and site.functional is None and family(site.kind) == "bn_like"
                and _conv_call(site, view) is not None)

    def _owner(self, ref, conv):
        """(owner conv module, qualified name, weight path, bias node) or a reason."""
        where = describe_node(ref.region, conv)
        w_node, b_node = _arg(conv, 1, "weight"), _arg(conv, 2, "bias")
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr" and str(w_node.target).endswith(".weight")):
            return reason("traced_no_weight", where=where)
        path = str(w_node.target)[: -len(".weight")]
        try:
            owner = ref.region.module.get_submodule(path)
        except AttributeError:
            return reason("traced_not_weight", where=where)
        qual = f"{ref.region.path}.{path}" if ref.region.path else path
        if not isinstance(owner, CONV_TYPES):
            return reason("traced_not_conv", layer=qual, type=type(owner).__name__)
        if b_node is None:
            if owner.bias is not None:
                return reason("traced_ignores_bias", layer=qual)
        elif not (isinstance(b_node, fx.Node) and b_node.op == "get_attr" and str(b_node.target) == f"{path}.bias"):
            return reason("traced_other_bias", layer=qual)
        return owner, qual, path, w_node, b_node

    def _uses(self, view, ref, conv, owner, qual, w_node, b_node):
        for what, p in (("weight", owner.weight), ("bias", owner.bias)):
            if p is None:
                continue
            if type(p) is not torch.nn.Parameter or not p.is_floating_point():
                return reason("traced_not_plain", layer=qual, param=what)
            if len(view.param_owners.get(id(p), [])) > 1:
                return reason("traced_tied", layer=qual, param=what)
            if _get_attr_count(view, p) != 1:
                return reason("traced_read_twice", layer=qual, param=what)
        for n in (w_node, b_node):
            if isinstance(n, fx.Node) and list(n.users) != [conv]:
                return reason("traced_weight_uses", layer=qual)
        users = view.users_of(conv)
        if users != [ref.node]:
            return reason("traced_conv_users", layer=qual, users=', '.join(describe_node(ref.region, u) for u in users))
        if view.calls_of(owner):
            return reason("traced_called_elsewhere", layer=qual)
        if owner._forward_hooks or owner._forward_pre_hooks:
            return reason("layer_hooks_short", layer=qual)
        for name in view.names.get(id(owner), []):
            for bad in view.untraced_parents:
                if bad == "" or name.startswith(bad + "."):
                    return reason("traced_untraceable", layer=qual, region=bad or '<model>')
        return None

    def match(self, site: NormSite, view: GraphView) -> Match | Reason:
        r = norm_problem(site, view)
        if r:
            return r
        ref, conv = _conv_call(site, view)
        got = self._owner(ref, conv)
        if isinstance(got, str):
            return got
        owner, qual, path, w_node, b_node = got
        r = self._uses(view, ref, conv, owner, qual, w_node, b_node)
        if r:
            return r
        s, t = view.eval_affine(site)
        channels = s.numel()
        if channels != owner.weight.shape[0] and channels != 1:
            return reason("channel_mismatch", detail=f"the norm has {channels} channels, '{qual}' outputs "
                                                     f"{owner.weight.shape[0]}")
        layer = view.layer(owner)
        return Match([view.name_of(owner)], NAME, {
            "producer": layer, "s": s, "t": t, "norm": "identity",
            "traced": {"conv": conv, "region": ref.region, "path": path, "had_bias": b_node is not None}})


rule = TracedConvRule()
