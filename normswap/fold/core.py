"""Sites, context and the checks shared by the fold rules.

A *site* is one norm: a norm module (all its call sites over all traced regions) or one
functional norm call.  The context indexes the traced regions once: every module's call
sites, every module's names (aliases), which modules own each parameter, and (with example
inputs) the rank of each module's input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from normswap.graph import NodeRef, Region, qualname, region_of
from normswap.norms import NORMS, weight_reparam

from . import arith
from .policy import kind_problem

__all__ = [
    "Site", "Ctx", "Match", "build_ctx", "node_module", "module_problem", "norm_problem",
    "eval_affine", "family", "CONV_TYPES", "CONVT_TYPES", "LINEAR_TYPES",
    "conv_input_exact", "find_producer", "find_consumers", "replace_with_identity",
    "set_params", "fold_after", "describe_node", "direct_use_problem", "conv_rank_problem", "RANK_UNKNOWN",
]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_TYPES = (nn.Linear,)
_ALL_LAYERS = CONV_TYPES + CONVT_TYPES + LINEAR_TYPES


def family(kind: str) -> str | None:
    """The registry's fold family of ``kind``: "bn_like" (eval = per-channel affine on dim 1),
    "affine_only" (only gamma/beta move into the next linear op) or None."""
    k = NORMS.get(kind)
    return k.fold_family if k is not None else None


@dataclass
class Site:
    name: str
    kind: str
    module: nn.Module | None
    calls: list[NodeRef] = field(default_factory=list)
    functional: NodeRef | None = None  # the call_function node of a functional norm


@dataclass
class Match:
    """A rule that applies: which modules absorb the norm, and how."""

    into: list[str]
    pattern: str
    data: dict = field(default_factory=dict)


@dataclass
class Ctx:
    """What the rules know about the model: built once per plan/fold (:func:`build_ctx`)."""

    model: nn.Module
    regions: list[Region]
    #: id(module) -> its call sites over all traced regions
    calls: dict[int, list[NodeRef]]
    #: id(module) -> every name it has in the model (aliases)
    names: dict[int, list[str]]
    #: id(parameter) -> ids of the modules holding it
    param_owners: dict[int, list[int]]
    #: id(module) -> input ranks seen on the example inputs (None: no example inputs)
    ranks: dict[int, set[int]] | None
    allow_training: bool = False
    #: id(module) -> module, every module of the model
    modules_by_id: dict[int, nn.Module] = field(default_factory=dict)
    #: id(tensor) -> qualified name, tensors read directly by a ``get_attr`` node
    attr_uses: dict[int, str] = field(default_factory=dict)
    #: paths of the regions whose forward could not be traced
    untraced_parents: set[str] = field(default_factory=set)
    #: id(module) -> how often it ran on the example inputs (None: no example inputs)
    runtime_calls: dict[int, int] | None = None
    #: id(norm module) -> its eval affine (scale, shift) or a reason (see :func:`eval_affine`)
    affine_cache: dict[int, Any] = field(default_factory=dict)
    #: id(region) -> region whose graph was rewritten (a functional call removed)
    rewritten: dict[int, Region] = field(default_factory=dict)
    #: ids of the graph nodes of norms already folded away (earlier rounds): they act as
    #: the identity, so the graph helpers look through them
    removed: set[int] = field(default_factory=set)
    # --- issue 11 (normswap.fold.export_graph): sites FX cannot prove are proven on a
    # torch.export graph of the example inputs
    #: the example inputs (positional, a tuple) when given
    example_inputs: tuple | None = None
    #: per-context caches of helpers (export_graph: the exported program and its proofs)
    cache: dict = field(default_factory=dict)
    # ---

    def name_of(self, m: nn.Module) -> str:
        n = self.names.get(id(m))
        return n[0] if n else f"<{type(m).__name__}>"

    def calls_of(self, m: nn.Module) -> list[NodeRef]:
        return self.calls.get(id(m), [])

    def ranks_of(self, m: nn.Module) -> set[int] | None:
        if self.ranks is None:
            return None
        return self.ranks.get(id(m)) or None

    def input_of(self, node: fx.Node, extra_ok: bool = False) -> fx.Node | None:
        """The node's single input (see :func:`_single_input`), looking through folded norms."""
        a = _single_input(node, extra_ok)
        while a is not None and id(a) in self.removed:  # a folded norm: identity on its input
            a = a.args[0] if a.args and isinstance(a.args[0], fx.Node) else None
        return a

    def users_of(self, node: fx.Node) -> list[fx.Node]:
        """The node's users, looking through folded norms (which act as the identity)."""
        out: list[fx.Node] = []
        for u in node.users:
            if id(u) in self.removed:
                out.extend(u2 for u2 in self.users_of(u) if u2 not in out)
            elif u not in out:
                out.append(u)
        return out


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


def build_ctx(model: nn.Module, regions: list[Region], ranks=None, allow_training=False) -> Ctx:
    names: dict[int, list[str]] = {}
    param_owners: dict[int, list[int]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        lst = names.setdefault(id(m), [])
        if name not in lst:
            lst.append(name)
    seen: set[int] = set()
    for m in model.modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        for _, p in m.named_parameters(recurse=False):
            owners = param_owners.setdefault(id(p), [])
            if id(m) not in owners:
                owners.append(id(m))
    calls: dict[int, list[NodeRef]] = {}
    for r in regions:
        if r.gm is None:
            continue
        for n in r.gm.graph.nodes:
            if n.op == "call_module":
                m = node_module(r, n)
                if m is not None:
                    calls.setdefault(id(m), []).append(NodeRef(r, n))
    return Ctx(model, regions, calls, names, param_owners, ranks, allow_training,
               modules_by_id={id(m): m for m in model.modules()},
               attr_uses=_attr_uses(regions),
               untraced_parents={r.path for r in regions if r.gm is None},
               runtime_calls=getattr(ranks, "calls", None))


def _attr_uses(regions: list[Region]) -> dict[int, str]:
    """Tensors read directly by a ``get_attr`` node (e.g. ``F.linear(x, self.fc.weight)``):
    id -> qualified name.  A region's own parameters read by its own forward (a leaf layer
    traced alone) are not counted."""
    out: dict[int, str] = {}
    for r in regions:
        if r.gm is None:
            continue
        for n in r.gm.graph.nodes:
            if n.op != "get_attr":
                continue
            target = str(n.target)
            if "." not in target:
                continue  # the region module's own attribute (its own forward)
            obj = r.module
            try:
                for part in target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            if isinstance(obj, torch.Tensor):
                out.setdefault(id(obj), qualname(r, target))
    return out


def direct_use_problem(m: nn.Module, ctx: "Ctx", what: str, calls: "list[NodeRef] | None" = None) -> str | None:
    """Why the calls/tensors of ``m`` seen in the traced graphs may not be all of its uses:
    one of its parameters/buffers is read directly elsewhere (``get_attr``), or it is a
    direct child (under one of its names) of a module whose forward could not be traced."""
    uses = ctx.attr_uses
    for k, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
        if t is not None and id(t) in uses:
            return (f"{what} '{ctx.name_of(m)}': its {k} is also read directly ('{uses[id(t)]}'), "
                    f"so changing it would change that other use")
    runtime = ctx.runtime_calls
    if runtime is not None:
        # every call seen in a traced graph runs once per call of that graph's module
        refs = ctx.calls_of(m) if calls is None else calls
        expected = sum(runtime.get(id(ref.region.module), 0) for ref in refs)
        actual = runtime.get(id(m), 0)
        if actual > expected:
            return (f"{what} '{ctx.name_of(m)}' ran {actual} times on the example inputs but the traced "
                    f"graphs account for {expected}: it is also called from code that could not be traced")
        return None
    bad = ctx.untraced_parents
    for name in ctx.names.get(id(m), []):
        if not name:
            continue
        for path in sorted(bad, key=len, reverse=True):
            if path == "" or name.startswith(path + "."):
                return (f"{what} '{ctx.name_of(m)}' is reachable as '{name}' from untraceable region "
                        f"'{path or '<model>'}', whose code may call it directly: its calls cannot all be "
                        f"seen (pass example inputs to count them)")
    return None


# --------------------------------------------------------------------------- norm checks


def eval_affine(module: nn.Module, kind: str, ctx: "Ctx | None" = None):
    """(scale, shift) float64 of a BN-like norm at eval, or a reason string: the registry's
    answer (``NORMS[kind].eval_affine``), cached per context."""
    if ctx is None:
        return NORMS[kind].eval_affine(module)
    cache = ctx.affine_cache
    if id(module) not in cache:
        cache[id(module)] = NORMS[kind].eval_affine(module)
    return cache[id(module)]


def norm_problem(site: Site, ctx: Ctx) -> str | None:
    """Reasons a norm module cannot be folded whatever its neighbours are."""
    m, kind = site.module, site.kind
    r = kind_problem(kind, m)
    if r:
        return _export_refine(site, ctx, r)  # issue 11: custom forward proven on torch.export
    if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None):
        return "the norm has hooks registered"
    if site.calls:
        r = direct_use_problem(m, ctx, "the norm", site.calls)
        if r:
            return r
    if not ctx.allow_training:
        if ctx.model.training:
            return "the model is in training mode (pass eval=True / --eval to fold its eval-mode behaviour)"
        if m.training:
            return "the norm is in training mode (pass eval=True / --eval)"
    if family(kind) == "bn_like":
        a = eval_affine(m, kind, ctx)
        if isinstance(a, str):
            return a
    else:
        for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
            if isinstance(p, torch.Tensor) and not arith.is_finite(p):
                return "non-finite affine parameters"
    if not site.calls:
        reg = region_of(ctx.regions, site.name)
        # the innermost region around it that has no graph
        bad = [rg for rg in ctx.regions if rg.gm is None and (rg.path == "" or site.name.startswith(rg.path + "."))]
        if bad:
            rg = max(bad, key=lambda x: len(x.path))
            return _export_refine(site, ctx, f"inside untraceable region '{rg.path or '<model>'}' ({rg.error}): "
                                  f"its producer cannot be proven")
        if reg is not None and reg.gm is None:
            return _export_refine(site, ctx, f"inside untraceable region '{reg.path}': its producer cannot be "
                                  f"proven")
        return "not called in the traced graph"
    return None


def _export_refine(site: Site, ctx: Ctx, reason: str) -> str:
    """issue 11: for a LayerNorm/RMSNorm/custom norm FX cannot prove, the reason the torch.export
    graph gives (or a hint to pass example inputs): :func:`normswap.fold.export_graph.refine`."""
    from .export_graph import refine

    return refine(site, ctx, reason)


# --------------------------------------------------------------------------- layer checks


def post_ops_problem(site: Site) -> str | None:
    """A norm whose output passes its own post ops (activation) is not an affine of its input."""
    from normswap.library_norms import post_op_children

    kept = post_op_children(site.module, site.kind) if site.module is not None else []
    if kept:
        what = ", ".join(f"{n} ({type(m).__name__})" for n, m in kept)
        return f"its own {what} follows the normalisation: only a fold into the layer before it is exact"
    return None


def module_problem(m: nn.Module, ctx: Ctx, types=_ALL_LAYERS) -> str | None:
    """Reasons the weights of layer ``m`` cannot be rewritten."""
    name = ctx.name_of(m)
    rp = weight_reparam(m)
    if rp is not None:
        hint = {"spectral": " (pass bake_spectral_norm=True / --bake-spectral-norm)",
                "weight_std": " (pass bake_weight_std=True / --bake-weight-std)"}.get(rp, "")
        return f"'{name}' has a reparametrised weight ({rp}), not a plain parameter{hint}"
    if getattr(m, "parametrizations", None) is not None:
        return f"'{name}' has parametrized weights, not plain parameters"
    t = type(m)
    from normswap.library_norms import is_same_padding_conv

    library_conv = t not in types and nn.Conv2d in types and is_same_padding_conv(m)
    if library_conv:
        from normswap.library_norms import probe_output_channel_affine

        r = probe_output_channel_affine(m)
        if r:
            return f"'{name}' ({t.__name__}): {r}"
    if t not in types and not library_conv:
        if "quant" in t.__module__ or hasattr(m, "weight_fake_quant") or hasattr(m, "qconfig") and m.qconfig is not None:
            return f"'{name}' ({t.__name__}) is quantized: its weights are not plain parameters"
        if isinstance(m, _ALL_LAYERS):
            return f"'{name}' is an unsupported subclass {t.__name__} (exact layer types only)"
        return f"'{name}' ({t.__name__}) is not a supported layer"
    if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None):
        return f"'{name}' has hooks registered, its weights may not be what runs"
    w, b = m.weight, m.bias
    for p in (w, b):
        if p is None:
            continue
        if isinstance(p, nn.parameter.UninitializedParameter):
            return f"'{name}' is an uninitialized lazy module"
        if type(p) is not nn.Parameter:
            return f"'{name}' weights are not plain parameters ({type(p).__name__})"
        if not p.is_floating_point():
            return f"'{name}' weights are not floating point (quantized?)"
        owners = ctx.param_owners.get(id(p), [])
        if len(owners) > 1:
            others = [ctx.name_of(ctx.modules_by_id[o]) for o in owners if o != id(m)]
            return f"'{name}' shares (ties) its parameters with {', '.join(repr(o) for o in others)}"
    if m._forward_hooks or m._forward_pre_hooks:
        return f"'{name}' has hooks registered"
    return direct_use_problem(m, ctx, "layer")


RANK_UNKNOWN = "input rank unknown: pass example inputs"


def _batched_ranks(norm: nn.Module | None) -> set[int] | None:
    """Input ranks at which ``norm`` takes dim 1 as its channel axis (None: any / unknown)."""
    if norm is None:
        return None
    if isinstance(norm, nn.BatchNorm1d):
        return {2, 3}
    if isinstance(norm, nn.InstanceNorm1d):
        return {3}  # a 2-D input is unbatched (C, L): channels on dim 0
    name = type(norm).__name__
    if name.endswith("2d"):
        return {4}
    if name.endswith("3d"):
        return {5}
    return None


def conv_rank_problem(conv: nn.Module, norm: nn.Module | None, ctx: "Ctx", what: str = "called on") -> str | None:
    """Whether the norm's dim 1 is ``conv``'s channel axis: a conv called on unbatched input
    (rank k+1) has its channels on dim 0, which a norm taking rank k+1 input as batched would
    not normalise per conv channel.  Unknown ranks are refused when that is possible."""
    k = len(conv.kernel_size)
    ranks = ctx.ranks_of(conv)
    if ranks:
        if any(r < k + 2 for r in ranks):
            return f"'{ctx.name_of(conv)}' is {what} unbatched input: the norm's dim 1 is not its channel axis"
        return None
    batched = _batched_ranks(norm)
    if batched is None or (k + 1) in batched:
        return RANK_UNKNOWN
    return None


def conv_input_exact(conv: nn.Module) -> str | None:
    """Whether a per-channel affine on a conv's input commutes with its padding."""
    if conv.padding_mode != "zeros":
        return None  # replicate / reflect / circular pad with affine-transformed values
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return None
        # 'same': total padding dilation*(k-1) per dim
        if all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size)):
            return None
        return "zero padding ('same') would see un-normalised zeros"
    if all(p == 0 for p in pad):
        return None
    return f"zero padding {tuple(pad)} would see un-normalised zeros"


def _single_input(node: fx.Node, extra_ok: bool = False) -> fx.Node | None:
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


def find_producer(site: Site, ctx: Ctx, types: tuple[type, ...], what: str, extra_args_ok: bool = False):
    """The single layer module feeding every call of the norm, or a reason.

    Requires: every call of the norm reads the output of a call of the same module of one of
    ``types``; every call of that module feeds only a call of this norm.  ``extra_args_ok``:
    the norm takes more arguments (a condition) after its input.
    """
    prod: nn.Module | None = None
    for ref in site.calls:
        inp = ctx.input_of(ref.node, extra_args_ok)
        if inp is None:
            return "the norm is called with extra arguments"
        if inp.op != "call_module":
            return f"its input is {describe_node(ref.region, inp)}, not a {what}"
        pm = node_module(ref.region, inp)
        if not isinstance(pm, types):  # exact type checked by module_problem (precise reason)
            return f"its input is {describe_node(ref.region, inp)}, not a {what}"
        if prod is None:
            prod = pm
        elif pm is not prod:
            return (f"the norm is called at several places with different producers "
                    f"('{ctx.name_of(prod)}', '{ctx.name_of(pm)}')")
    assert prod is not None
    pname = ctx.name_of(prod)
    own_inputs = {id(ctx.input_of(r.node, extra_args_ok)) for r in site.calls}
    for pref in ctx.calls_of(prod):
        users = ctx.users_of(pref.node)
        if len(users) != 1:
            if id(pref.node) in own_inputs:
                return (f"the output of '{pname}' is used by more than one consumer "
                        f"({', '.join(describe_node(pref.region, u) for u in users)})")
            return (f"'{pname}' is called at several places whose call sites differ "
                    f"(one call's output has {len(users)} users)")
        u = users[0]
        if node_module(pref.region, u) is not site.module or ctx.input_of(u, extra_args_ok) is not pref.node:
            return (f"'{pname}' is called at several places whose call sites differ "
                    f"(one call feeds {describe_node(pref.region, u)})")
    return prod


def find_consumers(site: Site, ctx: Ctx, types: tuple[type, ...], what: str):
    """The layer modules reading the norm's output at every call (and only it), or a reason."""
    consumers: list[nn.Module] = []
    norm_nodes = {id(r.node) for r in site.calls}
    for ref in site.calls:
        users = ctx.users_of(ref.node)
        if not users:
            return "its output is unused"
        for u in users:
            um = node_module(ref.region, u)
            if um is None or not isinstance(um, types):
                return f"its output feeds {describe_node(ref.region, u)}, not a {what}"
            if ctx.input_of(u) is not ref.node:
                return f"its output feeds {describe_node(ref.region, u)} in a non-input position"
            if all(c is not um for c in consumers):
                consumers.append(um)
    for c in consumers:
        for cref in ctx.calls_of(c):
            inp = ctx.input_of(cref.node)
            if inp is None or id(inp) not in norm_nodes:
                return (f"'{ctx.name_of(c)}' is called at several places whose call sites differ "
                        f"(one call reads {describe_node(cref.region, inp)})")
    return consumers


# --------------------------------------------------------------------------- surgery


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
    if isinstance(layer, CONVT_TYPES):
        w, b = arith.fold_affine_after_conv_transpose(layer.weight, layer.bias, s, t, layer.groups)
    elif isinstance(layer, LINEAR_TYPES):
        w, b = arith.fold_affine_after_linear(layer.weight, layer.bias, s, t)
    else:
        w, b = arith.fold_affine_after_conv(layer.weight, layer.bias, s, t)
    set_params(layer, w, b)


def replace_with_identity(ctx: Ctx, module: nn.Module) -> None:
    """Put ``nn.Identity()`` in place of ``module`` under every name it has -- or, for a norm with
    post ops (timm's BatchNormAct2d), a :class:`normswap.layers.PostOps` of its kept children
    (``drop``, ``act``), so only the normalisation disappears."""
    from normswap.library_norms import post_op_children
    from normswap.norms import classify

    kind = classify(module)
    kept = post_op_children(module, kind) if kind else []
    if kept:
        from normswap.layers import PostOps

        ident = PostOps(**{n: m for n, m in kept}).train(module.training)
    else:
        ident = nn.Identity().train(module.training)  # the mode of the module it replaces
    for name in ctx.names.get(id(module), []):
        if not name:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = ctx.model.get_submodule(parent_name) if parent_name else ctx.model
        setattr(parent, leaf, ident)
