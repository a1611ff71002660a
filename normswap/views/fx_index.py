"""FX graph helpers of the FX view: the module behind a ``call_module`` node, node descriptions
(as reasons name them), a node's single input, the tensors read directly by ``get_attr``, and
whether a layer module's weights may be rewritten (:func:`module_problem`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from normswap.graph import Region, qualname
from normswap.norms import weight_reparam
from normswap.reasons import Reason, reason

from .modules import _ALL_LAYERS

__all__ = ["node_module", "describe_node", "module_problem", "single_input", "attr_uses", "hooked"]


def node_module(region: Region, node: Any) -> nn.Module | None:
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    try:
        return region.module.get_submodule(str(node.target))
    except Exception:
        return None


def describe_node(region: Region, node: Any) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        m = node_module(region, node)
        return f"'{qualname(region, str(node.target))}' ({type(m).__name__})"
    if node.op == "placeholder":
        where = f"region '{region.path}'" if region.path else "the model"
        return f"an input of {where}"
    if node.op == "get_attr":
        return f"attribute '{qualname(region, str(node.target))}'"
    if node.op == "output":
        return "the graph output"
    t = getattr(node.target, "__name__", None) or str(node.target)
    return f"'{t}' ({node.op})"


def hooked(m: nn.Module, backward: bool = True) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or (backward and getattr(m, "_backward_hooks", None)))



def module_problem(view, m: nn.Module, types=_ALL_LAYERS) -> Reason | None:
    """Reasons the weights of layer ``m`` cannot be rewritten."""
    from normswap.library_norms import is_same_padding_conv, probe_output_channel_affine

    name = view.name_of(m)
    rp = weight_reparam(m)
    if rp is not None:
        hint = {"spectral": " (pass bake_spectral_norm=True / --bake-spectral-norm)",
                "weight_std": " (pass bake_weight_std=True / --bake-weight-std)"}.get(rp, "")
        return reason("layer_reparam", layer=name, reparam=rp, hint=hint)
    if getattr(m, "parametrizations", None) is not None:
        return reason("layer_parametrized", layer=name)
    t = type(m)
    library_conv = t not in types and nn.Conv2d in types and is_same_padding_conv(m)
    if library_conv:
        r = probe_output_channel_affine(m)
        if r:
            return reason("layer_probe", layer=name, type=t.__name__, problem=r)
    if t not in types and not library_conv:
        if "quant" in t.__module__ or hasattr(m, "weight_fake_quant") or hasattr(m, "qconfig") and m.qconfig is not None:
            return reason("layer_quantized", layer=name, type=t.__name__)
        if isinstance(m, _ALL_LAYERS):
            return reason("layer_subclass", layer=name, type=t.__name__)
        return reason("layer_unsupported", layer=name, type=t.__name__)
    if hooked(m):
        return reason("layer_hooks", layer=name)
    for p in (m.weight, m.bias):
        if p is None:
            continue
        if isinstance(p, nn.parameter.UninitializedParameter):
            return reason("layer_lazy", layer=name)
        if type(p) is not nn.Parameter:
            return reason("layer_not_param", layer=name, type=type(p).__name__)
        if not p.is_floating_point():
            return reason("layer_not_float", layer=name)
        owners = view.param_owners.get(id(p), [])
        if len(owners) > 1:
            others = [view.name_of(view.modules_by_id[o]) for o in owners if o != id(m)]
            return reason("layer_tied", layer=name, others=", ".join(repr(o) for o in others))
    return view.direct_use_problem(m, "layer")


def single_input(node: fx.Node, extra_ok: bool = False) -> fx.Node | None:
    """The node's only input (with ``extra_ok``: its first positional input, provided the
    other arguments do not use that same node)."""
    if not node.args or (not extra_ok and (len(node.args) != 1 or node.kwargs)):
        return None
    a = node.args[0]
    if not isinstance(a, fx.Node):
        return None
    if extra_ok and any(a in n.all_input_nodes or n is a for n in node.args[1:] if isinstance(n, fx.Node)):
        return None
    if extra_ok and any(v is a for v in node.kwargs.values()):
        return None
    return a



def attr_uses(regions: list[Region]) -> dict[int, str]:
    """Tensors read directly by a ``get_attr`` node (e.g. ``F.linear(x, self.fc.weight)``):
    id -> qualified name.  A region's own parameters read by its own forward are not counted."""
    out: dict[int, str] = {}
    for r in regions:
        if r.gm is None:
            continue
        for n in r.gm.graph.nodes:
            if n.op != "get_attr":
                continue
            target = str(n.target)
            if "." not in target:
                continue
            obj = r.module
            try:
                for part in target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            if isinstance(obj, torch.Tensor):
                out.setdefault(id(obj), qualname(r, target))
    return out
