"""The eager applier: carries a planned fold out on the user's modules (a deep copy).

Matches come from the FX view or from the eager model's export view; either way their layers are
eager modules.  A layer before the norm absorbs the affine in its output channels
(``fold_after``), layers after it in their inputs (``fold_before``); the norm then becomes
``nn.Identity`` under every name it has (a norm with post ops -- timm's ``BatchNormAct2d`` -- a
:class:`normswap.layers.PostOps` of its activation), keeps its class with an identity affine
(LayerNorm / RMSNorm / GroupNorm), or -- a functional call -- is erased from its FX graph, whose
region then becomes a ``GraphModule`` (:func:`install`).  The arithmetic is
:mod:`normswap.arith` (float64, cast back).
"""

from __future__ import annotations

import torch
from torch import nn

from normswap import arith
from normswap.norms import classify, post_op_children
from normswap.views.base import Match, NormSite

__all__ = ["EagerApplier", "set_params", "fold_after", "install", "replace_with_identity"]

_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def set_params(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Replace a layer's weight and bias (float64 values) in place, in the layer's dtype."""
    w = layer.weight
    with torch.no_grad():
        w.copy_(arith.cast_like(weight, w))
        if layer.bias is None:
            layer.bias = nn.Parameter(arith.cast_like(bias, w), requires_grad=w.requires_grad)
        else:
            layer.bias.copy_(arith.cast_like(bias, layer.bias))


def fold_after(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    """Fold a per-output-channel affine ``y * s + t`` into the producing layer's weights."""
    if isinstance(layer, _CONVT):
        w, b = arith.fold_affine_after_conv_transpose(layer.weight, layer.bias, s, t, layer.groups)
    elif isinstance(layer, nn.Linear):
        w, b = arith.fold_affine_after_linear(layer.weight, layer.bias, s, t)
    else:
        w, b = arith.fold_affine_after_conv(layer.weight, layer.bias, s, t)
    set_params(layer, w, b)


def fold_before(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    """Fold a per-input-channel affine into a consuming conv / Linear."""
    if isinstance(layer, nn.Linear):
        w, b = arith.fold_affine_before_linear(layer.weight, layer.bias, s, t)
    else:
        w, b = arith.fold_affine_before_conv(layer.weight, layer.bias, s, t, layer.groups)
    set_params(layer, w, b)


def fold_before_exported(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    """:func:`fold_before` for a fold proven on the export graph: a Linear, or HF's ``Conv1D``
    (``y = x @ W + b`` with ``W`` (in, out): a Linear with weight ``W.T``); no bias appears where
    the shift is zero (an RMSNorm), so state-dict keys are kept."""
    no_shift = bool((t == 0).all())
    if isinstance(layer, nn.Linear):
        w2, b2 = arith.fold_affine_before_linear(layer.weight, layer.bias, s, t)
        if no_shift and layer.bias is None:
            with torch.no_grad():
                layer.weight.copy_(arith.cast_like(w2, layer.weight))
        else:
            set_params(layer, w2, b2)
        return
    W = layer.weight
    w2, b2 = arith.fold_affine_before_linear(W.detach().t(), layer.bias, s, t)
    with torch.no_grad():
        W.copy_(arith.cast_like(w2.t(), W))
        if layer.bias is None and not no_shift:
            layer.bias = nn.Parameter(arith.cast_like(b2, W), requires_grad=W.requires_grad)
        elif layer.bias is not None:
            layer.bias.copy_(arith.cast_like(b2, layer.bias))


def replace_with_identity(view, module: nn.Module) -> None:
    """Put ``nn.Identity()`` in place of ``module`` under every name it has -- or, for a norm with
    post ops (timm's BatchNormAct2d), a :class:`normswap.layers.PostOps` of its kept children."""
    kind = classify(module)
    kept = post_op_children(module, kind) if kind else []
    if kept:
        from normswap.layers import PostOps

        ident = PostOps(**{n: m for n, m in kept}).train(module.training)
    else:
        ident = nn.Identity().train(module.training)  # the mode of the module it replaces
    for name in view.names.get(id(module), []):
        if not name:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = view.model.get_submodule(parent_name) if parent_name else view.model
        setattr(parent, leaf, ident)


def _reset_affine(module: nn.Module) -> None:
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.fill_(1)
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            module.bias.zero_()


def _traced_bias(m: Match) -> None:
    """A traced subclassed conv called with ``bias=None``: make the call read the new bias."""
    tr = m.data["traced"]
    if tr["had_bias"]:
        return
    owner = m.data["producer"].handle
    conv, gm, path = tr["conv"], tr["region"].gm, tr["path"]
    try:  # FX copied the attribute path as a shell module holding the weight: add the bias
        shell = gm.get_submodule(path)
    except AttributeError:
        shell = None
    if shell is not None and shell is not owner:
        shell.register_parameter("bias", owner.bias)
    with conv.graph.inserting_before(conv):
        b = conv.graph.get_attr(f"{path}.bias")
    args = list(conv.args)
    if len(args) > 2:
        args[2] = b
        conv.args = tuple(args)
    else:
        conv.kwargs = {**conv.kwargs, "bias": b}


def _erase_call(site: NormSite, view, m: Match) -> None:
    region, node = site.functional.region, site.functional.node
    args = [a for a in node.all_input_nodes if a is not m.data["input"]]
    node.replace_all_uses_with(m.data["input"])
    region.gm.graph.erase_node(node)
    for a in args:
        if a.op == "get_attr" and not a.users:
            region.gm.graph.erase_node(a)
    region.gm.recompile()
    view.rewritten[id(region)] = region


class EagerApplier:
    """Applies matches to the eager modules of the FX view's model (``export``: a match proven on
    the export view)."""

    def __init__(self, view, export: bool = False):
        self.view = view
        self.export = export

    def for_export(self) -> "EagerApplier":
        return EagerApplier(self.view, export=True)

    def apply(self, site: NormSite, m: Match) -> None:
        d = m.data
        s, t = d["s"], d["t"]
        if "producer" in d:
            fold_after(d["producer"].handle, s, t)
            if "traced" in d:
                _traced_bias(m)
        for layer in d.get("consumers", ()):
            (fold_before_exported if self.export else fold_before)(layer.handle, s, t)
        action = d["norm"]
        if action == "identity":
            replace_with_identity(self.view, site.module)
        elif action == "inner_identity":
            replace_with_identity(self.view, d["inner"])
        elif action == "reset_affine":
            _reset_affine(site.module)
        elif action == "erase_call":
            _erase_call(site, self.view, m)


def install(view, model: nn.Module) -> nn.Module:
    """Put each rewritten region's GraphModule in place of its module (deepest first)."""
    for region in sorted(view.rewritten.values(), key=lambda r: -len(r.path)):
        gm = region.gm
        for node in gm.graph.nodes:  # modules replaced in the model since tracing
            if node.op != "call_module":
                continue
            target = str(node.target)
            try:
                cur = region.module.get_submodule(target)
            except AttributeError:
                continue
            parent, _, leaf = target.rpartition(".")
            holder = gm.get_submodule(parent) if parent else gm
            if getattr(holder, leaf, None) is not cur:
                setattr(holder, leaf, cur)
        gm.recompile()
        # GraphModule() makes the root and its path containers fresh modules (training=True)
        originals = {id(x) for x in region.module.modules()}
        for x in gm.modules():
            if id(x) not in originals:
                x.training = region.module.training
        if region.path == "":
            model = gm
        else:
            for name in view.names.get(id(region.module), [region.path]):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, gm)
    return model
