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

from ..core import CONV_TYPES, Ctx, Match, Site, describe_node, eval_affine, family, fold_after, norm_problem, \
    replace_with_identity
from .base import FoldRule

NAME = "traced_conv_bn"

_CONV_FNS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


def _conv_call(site: Site, ctx: Ctx):
    if len(site.calls) != 1:
        return None
    ref = site.calls[0]
    inp = ctx.input_of(ref.node)
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


def _get_attr_count(ctx: Ctx, tensor) -> int:
    n = 0
    for r in ctx.regions:
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

    def applies(self, site: Site, ctx: Ctx) -> bool:
        return site.functional is None and family(site.kind) == "bn_like" and _conv_call(site, ctx) is not None

    def match(self, site: Site, ctx: Ctx) -> Match | str:
        r = norm_problem(site, ctx)
        if r:
            return r
        ref, conv = _conv_call(site, ctx)
        where = describe_node(ref.region, conv)
        w_node, b_node = _arg(conv, 1, "weight"), _arg(conv, 2, "bias")
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr" and str(w_node.target).endswith(".weight")):
            return f"its input {where} does not read a module's weight directly"
        path = str(w_node.target)[: -len(".weight")]
        try:
            owner = ref.region.module.get_submodule(path)
        except AttributeError:
            return f"its input {where} reads an attribute that is not a module's weight"
        qual = f"{ref.region.path}.{path}" if ref.region.path else path
        if not isinstance(owner, CONV_TYPES):
            return f"'{qual}' ({type(owner).__name__}) is not a Conv1d/2d/3d"
        if b_node is None:
            if owner.bias is not None:
                return f"the call in '{qual}' ignores its bias"
        elif not (isinstance(b_node, fx.Node) and b_node.op == "get_attr" and str(b_node.target) == f"{path}.bias"):
            return f"the call in '{qual}' does not use its own bias"
        for what, p in (("weight", owner.weight), ("bias", owner.bias)):
            if p is None:
                continue
            if type(p) is not torch.nn.Parameter or not p.is_floating_point():
                return f"'{qual}' {what} is not a plain floating-point parameter"
            if len(ctx.param_owners.get(id(p), [])) > 1:
                return f"'{qual}' shares (ties) its {what} with another module"
            if _get_attr_count(ctx, p) != 1:
                return f"'{qual}' {what} is read at more than one place in the traced graphs"
        for n in (w_node, b_node):
            if isinstance(n, fx.Node) and list(n.users) != [conv]:
                return f"'{qual}' weights are used by more than the convolution call"
        users = ctx.users_of(conv)
        if users != [ref.node]:
            return (f"the output of the convolution in '{qual}' is used by more than one consumer "
                    f"({', '.join(describe_node(ref.region, u) for u in users)})")
        if ctx.calls_of(owner):
            return f"'{qual}' is also called as a module elsewhere"
        if owner._forward_hooks or owner._forward_pre_hooks:
            return f"'{qual}' has hooks registered"
        for name in ctx.names.get(id(owner), []):
            for bad in ctx.untraced_parents:
                if bad == "" or name.startswith(bad + "."):
                    return f"'{qual}' is reachable from untraceable region '{bad or '<model>'}'"
        channels = eval_affine(site.module, site.kind, ctx)[0].numel()
        if channels != owner.weight.shape[0] and channels != 1:
            return f"channel mismatch: the norm has {channels} channels, '{qual}' outputs {owner.weight.shape[0]}"
        return Match([ctx.name_of(owner)], NAME, {"producer": owner, "conv": conv, "region": ref.region,
                                                   "path": path, "had_bias": b_node is not None})

    def apply(self, site: Site, ctx: Ctx, m: Match) -> None:
        s, t = eval_affine(site.module, site.kind, ctx)
        owner = m.data["producer"]
        fold_after(owner, s, t)
        if not m.data["had_bias"]:
            # the traced call passed bias=None: make it read the new bias (if the graph is installed)
            conv: fx.Node = m.data["conv"]
            gm = m.data["region"].gm
            try:  # FX copied the attribute path as a shell module holding the weight: add the bias
                shell = gm.get_submodule(m.data["path"])
            except AttributeError:
                shell = None
            if shell is not None and shell is not owner:
                shell.register_parameter("bias", owner.bias)
            with conv.graph.inserting_before(conv):
                b = conv.graph.get_attr(f"{m.data['path']}.bias")
            args = list(conv.args)
            if len(args) > 2:
                args[2] = b
                conv.args = tuple(args)
            else:
                conv.kwargs = {**conv.kwargs, "bias": b}
        replace_with_identity(ctx, site.module)


rule = TracedConvRule()
