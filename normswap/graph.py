"""torch.fx analysis of a model, robust to parts FX cannot trace.

:func:`trace_regions` traces a model with every norm module (``norms.classify() is not
None``) kept as a leaf, so each norm is one ``call_module`` node whose producer and
consumers are visible.  When a submodule cannot be traced (data-dependent control flow,
...), it becomes a leaf and is analysed on its own, recursively; a module whose own
forward cannot be traced gets ``gm=None`` and its children become regions of their own.
Tracing never raises.

In ``region.gm`` a ``call_module`` node's target is relative to ``region.module``;
:func:`qualname` turns it into the model-level qualified name.  The GraphModule shares
submodule objects with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn

from normswap.norm_ops import op_signature
from normswap.norms import classify, is_weight_std_conv

__all__ = [
    "Region",
    "trace_regions",
    "qualname",
    "NodeRef",
    "norm_nodes",
    "functional_nodes",
    "find_module_nodes",
    "producer_info",
    "consumer_info",
    "PRODUCER_TYPES",
    "producer_kind",
    "producer_op",
    "PRODUCER_OPS",
    "region_of",
    "LAYER_TYPES",
    "LAYER_OPS",
    "family_of_report",
]

#: the one layer table: exact module types and ATen op names -> layer family ("conv", "convt",
#: "linear").  The fold views, the audit readers and the TorchScript / torch.export readers all
#: derive their producer lookups from it.
LAYER_TYPES: dict[type, str] = {
    nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.ConvTranspose1d: "convt", nn.ConvTranspose2d: "convt", nn.ConvTranspose3d: "convt",
    nn.Linear: "linear",
}
LAYER_OPS: dict[str, str] = {
    "aten::conv1d": "conv", "aten::conv2d": "conv", "aten::conv3d": "conv",
    "aten::convolution": "conv", "aten::_convolution": "conv",  # transposed=True: "convt"
    "aten::conv_transpose1d": "convt", "aten::conv_transpose2d": "convt", "aten::conv_transpose3d": "convt",
    "aten::linear": "linear", "aten::addmm": "linear", "aten::mm": "linear",
}
#: the report names of the families (audit JSON: "conv_transpose")
_REPORT = {"conv": "conv", "convt": "conv_transpose", "linear": "linear"}

#: module types whose output a per-channel affine can be folded into (or out of), lazy ones
#: included, by report name
PRODUCER_TYPES: dict[type, str] = {t: _REPORT[f] for t, f in LAYER_TYPES.items()}
for _n, _k in (("LazyConv1d", "conv"), ("LazyConv2d", "conv"), ("LazyConv3d", "conv"),
               ("LazyConvTranspose1d", "conv_transpose"), ("LazyConvTranspose2d", "conv_transpose"),
               ("LazyConvTranspose3d", "conv_transpose"), ("LazyLinear", "linear")):
    if hasattr(nn, _n):
        PRODUCER_TYPES[getattr(nn, _n)] = _k

#: a layer class name (FX modules, TorchScript ``original_name``, ``nn_module_stack`` types) or an
#: aten op name -> "conv" / "conv_transpose" / "linear" (derived from the tables above)
PRODUCER_OPS: dict[str, str] = {t.__name__: k for t, k in PRODUCER_TYPES.items()}
PRODUCER_OPS.update({op.split("::")[1]: _REPORT[f] for op, f in LAYER_OPS.items() if not op.startswith("aten::_")
                     and op != "aten::convolution"})


def family_of_report(name: str | None) -> str | None:
    """The layer family of a report name ("conv_transpose" -> "convt"), None for non-layers."""
    return {v: k for k, v in _REPORT.items()}.get(name)


def producer_op(name: str | None, default: str = "other") -> str:
    """The producer table's kind of a class or aten op name ("aten::conv2d", "conv2d.default",
    "torch.nn.modules.conv.Conv2d" and "Conv2d" all work); ``default`` when not a producer."""
    if not name:
        return default
    s = str(name)
    for cand in (s, s.split("::")[-1], s.rsplit(".", 1)[-1], s.split("::")[-1].split(".")[0]):
        if cand in PRODUCER_OPS:
            return PRODUCER_OPS[cand]
    return default


def producer_kind(module: nn.Module) -> str:
    """'conv' / 'conv_transpose' / 'linear' for exact producer types (parametrized ones
    included), else 'other'."""
    t = type(module)
    if t.__name__.startswith("Parametrized") and getattr(module, "parametrizations", None) is not None:
        t = next((b for b in t.__bases__ if issubclass(b, nn.Module)), t)
    return PRODUCER_TYPES.get(t, "other")


@dataclass
class Region:
    """One traced (or untraceable) part of a model."""

    path: str  # qualified name of ``module`` in the model ("" for the root)
    module: nn.Module
    gm: fx.GraphModule | None
    error: str | None = None
    #: qualified names (model level) of submodules made leaves because they could not be traced
    untraceable_leaves: list[str] = field(default_factory=list)

    @property
    def traced(self) -> bool:
        return self.gm is not None

    def __repr__(self) -> str:  # short: a GraphModule repr is huge
        state = "traced" if self.gm is not None else f"no graph ({self.error})"
        return f"Region(path={self.path!r}, {type(self.module).__name__}, {state})"


def qualname(region: Region, target: str) -> str:
    """Model-level qualified name of a node target relative to ``region.module``."""
    return f"{region.path}.{target}" if region.path else target


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _LeafTracer(fx.Tracer):
    """FX tracer keeping norms and given untraceable modules as leaves."""

    def __init__(self, leaves: set[int]):
        super().__init__()
        self._extra_leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._extra_leaves:
            return True
        if classify(m) is not None:
            return True
        if is_weight_std_conv(m):
            return True  # its forward standardises its weight: a weight site, not a functional BN
        if isinstance(m, torch.jit.ScriptModule):
            return True  # analysed from its own TorchScript graph
        return super().is_leaf_module(m, module_qualified_name)


def _is_default_leaf(m: nn.Module) -> bool:
    """Would the tracer treat ``m`` as a leaf without our extra leaves?"""
    if classify(m) is not None or isinstance(m, torch.jit.ScriptModule) or is_weight_std_conv(m):
        return True
    try:
        return fx.Tracer().is_leaf_module(m, "")
    except Exception:
        return False


def short_error(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, the message cut to ``limit`` characters (for reasons)."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[:limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _none_defaults(module: nn.Module) -> dict | None:
    """forward parameters that default to None are traced as None (``if mask is not None``
    then takes the branch an ordinary call without that argument takes)."""
    import inspect

    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    out = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is None:
            out[name] = None
    return out or None


def _trace_once(module: nn.Module, leaves: set[int]):
    """Return (gm, None, None) or (None, exception, failing-submodule-qualname-or-None).

    Traced as is first; when that fails and forward has parameters defaulting to None,
    again with those specialised to None (FX then asserts they are None at run time)."""
    gm, err, failing = _trace_with(module, leaves, None)
    if gm is None:
        concrete = _none_defaults(module)
        if concrete:
            gm2, err2, failing2 = _trace_with(module, leaves, concrete)
            if gm2 is not None:
                return gm2, None, None
            return None, err2, failing2
    return gm, err, failing


def _trace_with(module: nn.Module, leaves: set[int], concrete_args: dict | None):
    tracer = _LeafTracer(leaves)
    try:
        graph = tracer.trace(module, concrete_args=concrete_args)
        name = type(module).__name__
        gm = fx.GraphModule(tracer.root, graph, name)
        return gm, None, None
    except Exception as e:  # noqa: BLE001 - anything FX raises means "untraceable"
        failing = None  # unknown
        stack = getattr(tracer, "module_stack", None)
        if stack is not None:
            failing = ""  # failed in the root's own code
            if len(stack):
                try:
                    failing = list(stack.values())[-1][0]
                except Exception:
                    failing = None
        return None, e, failing


def _trace_module(module: nn.Module, path: str, out: list[Region], depth: int = 0) -> None:
    leaves: set[int] = set()
    bad: list[tuple[str, nn.Module]] = []  # (relative qualname, module)
    gm = err = None
    for _ in range(200):  # bounded: each failure adds one leaf
        gm, err, failing = _trace_once(module, leaves)
        if gm is not None:
            break
        if failing == "":
            break  # the module's own forward is untraceable
        sub = None
        if failing:  # the deepest module being traced when it failed
            try:
                sub = module.get_submodule(failing)
            except Exception:
                sub = None
        if sub is None or sub is module or id(sub) in leaves:
            sub_name, sub = _find_untraceable_child(module, leaves)
            if sub is None:
                break
            failing = sub_name
        leaves.add(id(sub))
        bad.append((failing, sub))
    if gm is not None:
        out.append(Region(path, module, gm, None, [_join(path, n) for n, _ in bad]))
        for rel, sub in bad:
            _trace_module(sub, _join(path, rel), out, depth + 1)
        return
    # the module's own forward cannot be traced: children become regions of their own
    out.append(Region(path, module, None, short_error(err) if err is not None else "untraceable"))
    for name, child in module.named_children():
        if _is_default_leaf(child):
            continue
        _trace_module(child, _join(path, name), out, depth + 1)


def _find_untraceable_child(module: nn.Module, leaves: set[int]):
    """Fallback when the tracer's module stack did not say: the first child that fails alone."""
    for name, child in module.named_children():
        if id(child) in leaves or _is_default_leaf(child):
            continue
        gm, err, _ = _trace_once(child, set())
        if gm is None:
            return name, child
    return None, None


def trace_regions(model: nn.Module) -> list[Region]:
    """Trace ``model`` into regions (root first).  Never raises for untraceable code."""
    out: list[Region] = []
    if classify(model) is not None:
        # the model is itself a norm: nothing to trace around it
        out.append(Region("", model, None, "the model is a single norm module"))
        return out
    _trace_module(model, "", out)
    return out


# --------------------------------------------------------------------------- graph queries


@dataclass
class NodeRef:
    region: Region
    node: fx.Node

    @property
    def name(self) -> str:
        if self.node.op == "call_module":
            return qualname(self.region, str(self.node.target))
        return qualname(self.region, self.node.name)


def region_of(regions: list[Region], qual: str) -> Region | None:
    """The innermost region containing the module named ``qual``."""
    best = None
    for r in regions:
        if r.path == "" or qual == r.path or qual.startswith(r.path + "."):
            if best is None or len(r.path) > len(best.path):
                best = r
    return best


def find_module_nodes(regions: list[Region], qual: str) -> list[NodeRef]:
    """All call_module nodes (over all traced regions) whose module is ``qual``."""
    refs = []
    for r in regions:
        if r.gm is None:
            continue
        if r.path and not qual.startswith(r.path + "."):
            continue
        for n in r.gm.graph.nodes:
            if n.op == "call_module" and qualname(r, str(n.target)) == qual:
                refs.append(NodeRef(r, n))
    return refs


def norm_nodes(regions: list[Region]) -> Iterator[tuple[str, NodeRef, str]]:
    """(qualified name, node, kind) for each call of a norm module in the traced regions."""
    for r in regions:
        if r.gm is None:
            continue
        for n in r.gm.graph.nodes:
            if n.op != "call_module":
                continue
            try:
                mod = r.module.get_submodule(str(n.target))
            except Exception:
                continue
            kind = classify(mod)
            if kind is not None:
                yield qualname(r, str(n.target)), NodeRef(r, n), kind


def functional_nodes(regions: list[Region]) -> Iterator[tuple[str, NodeRef, str]]:
    """(site name ``<region>.<node name>``, node, kind) for functional norm calls."""
    for r in regions:
        if r.gm is None:
            continue
        for n in r.gm.graph.nodes:
            if n.op == "call_function":
                sig = op_signature(n.target) if not isinstance(n.target, str) else None
                if sig is not None:
                    yield qualname(r, n.name), NodeRef(r, n), sig.kind


def _node_module(region: Region, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return region.module.get_submodule(str(node.target))
    except Exception:
        return None


def _describe(region: Region, node: fx.Node) -> dict:
    """A small JSON-able description of a node."""
    if node.op == "call_module":
        mod = _node_module(region, node)
        kind = producer_kind(mod) if mod is not None else "other"
        return {"name": qualname(region, str(node.target)), "op": kind,
                "type": type(mod).__name__ if mod is not None else None}
    if node.op == "placeholder":
        return {"name": node.name, "op": "input", "type": None}
    if node.op == "get_attr":
        return {"name": qualname(region, str(node.target)), "op": "attr", "type": None}
    if node.op == "output":
        return {"name": "output", "op": "output", "type": None}
    target = node.target
    tname = getattr(target, "__name__", None) or str(target)
    return {"name": qualname(region, node.name), "op": "other", "type": tname}


def producer_info(ref: NodeRef) -> dict:
    """The op feeding a norm node: {'name', 'op' (conv/conv_transpose/linear/other/input),
    'type', 'other_users' (bool: the producer's output has users besides this norm),
    'users' (int), 'producer_calls' (how many call sites the producer module has)}."""
    node = ref.node
    inp = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(inp, fx.Node):
        return {"name": None, "op": "other", "type": None, "other_users": False, "users": 0,
                "producer_calls": 0}
    d = _describe(ref.region, inp)
    users = list(inp.users)
    d["users"] = len(users)
    d["other_users"] = any(u is not node for u in users)
    if inp.op == "call_module":
        d["producer_calls"] = sum(
            1 for n in ref.region.gm.graph.nodes
            if n.op == "call_module" and n.target == inp.target)
    else:
        d["producer_calls"] = 1
    return d


def consumer_info(ref: NodeRef) -> list[dict]:
    """Descriptions of the nodes that use a norm node's output."""
    return [_describe(ref.region, u) for u in ref.node.users]
