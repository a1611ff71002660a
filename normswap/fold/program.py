"""Fold BatchNorm in a ``torch.export.ExportedProgram`` (``.pt2``) with the eager fold's proofs.

:func:`fold_program` rewrites the program's ATen graph: every BatchNorm op (any overload the
norm-op table :mod:`normswap.norm_ops` knows -- ``batch_norm``,
``_native_batch_norm_legit_no_training``, ``_batch_norm_no_update``, ``cudnn_batch_norm``, ...)
whose input is a convolution (``conv1d/2d/3d``, ``convolution`` incl. ``transposed=True``,
``conv_transpose1d/2d/3d``) or a linear (``linear``, ``addmm`` / ``mm`` on a transposed weight
after ``run_decompositions()``) is folded into that layer's weight and bias, when it is exact:

* the BatchNorm runs in eval mode (running statistics) and its weight, bias and statistics
  are parameters / buffers / constants of the program (not computed in the graph), finite;
* the layer's output has no other user (a skip path, a second norm) than the BatchNorm;
* the layer's weight (and bias) placeholders are used by no other node -- except other calls
  of the same weight (a module called several times, tied weights) that each feed the same
  BatchNorm (same parameters, same eps), so the one rewrite is right for all of them;
* the channel axis of the BatchNorm (dim 1) is the layer's output channel axis: a batched
  convolution, a linear on 2-D input (a BatchNorm1d after a linear on (N, L, C) normalises L);
* the arithmetic is :mod:`normswap.fold.arith` (float64, grouped / depthwise / transposed
  layouts), cast back to the parameter dtype.

Sites are named from ``node.meta["nn_module_stack"]`` (module qualified names), so the report
speaks in the model's module names.  The rewritten program keeps ``graph_signature`` and
``state_dict`` consistent: a new conv bias becomes a parameter with its own placeholder and
``InputSpec``; the folded BatchNorm's placeholders and state entries are removed when nothing
else uses them.  The result is verified on the example inputs; a failed verification returns
the original program unchanged with a failed verification.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from normswap.errors import NormswapError
from normswap.norm_ops import bind, op_signature

from . import arith
from .report import FoldReport

__all__ = ["fold_program", "plan_program", "ProgramSite"]

# --------------------------------------------------------------------------- op tables

_CONV = {"aten::conv1d": 1, "aten::conv2d": 2, "aten::conv3d": 3, "aten::convolution": None,
         "aten::_convolution": None}
_CONVT = {"aten::conv_transpose1d": 1, "aten::conv_transpose2d": 2, "aten::conv_transpose3d": 3}
_LINEAR = {"aten::linear", "aten::addmm", "aten::mm"}
_TRANSPOSE_VIEWS = {"aten::t", "aten::permute", "aten::transpose"}

_PRODUCER_WHAT = "Conv/ConvTranspose/Linear"


def _schema_name(target) -> str | None:
    s = getattr(target, "_schema", None)
    return s.name if s is not None else None


def _arg_index(target, name: str) -> int | None:
    for i, a in enumerate(target._schema.arguments):
        if a.name == name:
            return i
    return None


def _get_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """An ATen node's argument by its schema name (default filled in)."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name != name:
            continue
        if i < len(node.args):
            return node.args[i]
        if name in node.kwargs:
            return node.kwargs[name]
        return a.default_value if a.has_default_value() else default
    return default


def _set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set an ATen node's argument by its schema name."""
    i = _arg_index(node.target, name)
    if i is None:
        raise KeyError(name)
    if i < len(node.args):
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        kw = dict(node.kwargs)
        kw[name] = value
        node.kwargs = kw


def _strip_call_index(path: str) -> str:
    # a module called more than once may appear as "conv@1" in newer torch versions
    return ".".join(p.split("@")[0] for p in path.split("."))


def module_of(node: Any) -> tuple[str, str]:
    """(qualified module name, module type) of the innermost module that emitted ``node``."""
    if not isinstance(node, fx.Node):
        return "", ""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    if isinstance(typ, type):
        typ = f"{typ.__module__}.{typ.__qualname__}"
    return _strip_call_index(str(path)), str(typ)


def _short_op(node: fx.Node) -> str:
    n = _schema_name(node.target) if node.op == "call_function" else None
    if n is None:
        return getattr(node.target, "__name__", str(node.target))
    return n.replace("aten::", "aten.")


# --------------------------------------------------------------------------- program state view


class _Prog:
    """The graph signature and state of a program as lookups by placeholder."""

    def __init__(self, ep):
        from torch.export.graph_signature import InputKind

        self.ep = ep
        self.sig = ep.graph_signature
        self.kind: dict[str, Any] = {}
        self.target: dict[str, str] = {}
        for spec in self.sig.input_specs:
            name = getattr(spec.arg, "name", None)
            if name is None:
                continue
            self.kind[name] = spec.kind
            if spec.target is not None:
                self.target[name] = spec.target
        self.IK = InputKind
        self.state = ep.state_dict
        self.constants = getattr(ep, "constants", {}) or {}

    def is_state(self, node: Any) -> bool:
        return (isinstance(node, fx.Node) and node.op == "placeholder"
                and self.kind.get(node.name) in (self.IK.PARAMETER, self.IK.BUFFER, self.IK.CONSTANT_TENSOR))

    def is_param(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node.op == "placeholder" and self.kind.get(node.name) == self.IK.PARAMETER

    def tensor(self, node: fx.Node) -> torch.Tensor | None:
        key = self.target.get(node.name)
        if key is None:
            return None
        t = self.state.get(key)
        if t is None:
            t = self.constants.get(key)
        return t


# --------------------------------------------------------------------------- plan


@dataclass
class _Producer:
    node: fx.Node  # the conv / linear / addmm / mm node
    family: str  # "conv" | "convt" | "linear" | "addmm" | "mm"
    weight: fx.Node  # the weight placeholder
    weight_view: fx.Node | None  # addmm / mm: the transposing view between weight and op
    bias: fx.Node | None  # bias placeholder (None: no bias)
    groups: int
    name: str  # module qualified name


@dataclass
class _BNCall:
    node: fx.Node
    site: str
    kind: str
    out: fx.Node | None = None  # the node carrying the normalised output (getitem 0 or node)
    roles: dict = field(default_factory=dict)
    producer: _Producer | None = None
    reason: str | None = None


@dataclass
class ProgramSite:
    """One norm site of a program: its module name, kind and fold verdict."""

    norm: str
    kind: str
    into: str | None = None
    pattern: str | None = None
    reason: str | None = None
    calls: list = field(default_factory=list)

    @property
    def foldable(self) -> bool:
        return self.reason is None


def _describe(node: Any, prog: _Prog) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "placeholder":
        key = prog.target.get(node.name)
        return f"'{key}' (a parameter/buffer)" if key else f"the program input '{node.name}'"
    name, _ = module_of(node)
    op = _short_op(node)
    return f"'{name}' ({op})" if name else f"{op} '{node.name}'"


def _site_name(node: fx.Node, roles: dict, prog: _Prog) -> tuple[str, str]:
    """(site name, kind) of a BatchNorm node: the module's qualified name for a BatchNorm module,
    ``<module>.<node name>`` (kind ``functional_bn``) for a functional call."""
    path, _typ = module_of(node)
    rm = roles.get("running_mean")
    key = prog.target.get(rm.name) if isinstance(rm, fx.Node) else None
    if key is None:
        w = roles.get("weight")
        key = prog.target.get(w.name) if isinstance(w, fx.Node) else None
    if key is not None and path and key.rsplit(".", 1)[0] == path:
        return path, "bn"
    return (f"{path}.{node.name}" if path else node.name), "functional_bn"


def _bn_output(node: fx.Node):
    """The node carrying the normalised output of a BatchNorm node, or a reason."""
    val = node.meta.get("val")
    if not isinstance(val, (tuple, list)):
        return node
    out = None
    for u in node.users:
        if u.op == "call_function" and u.target is __import__("operator").getitem:
            if u.args[1] == 0:
                out = u
            elif u.users:
                return f"it uses the BatchNorm's saved statistics (output {u.args[1]})"
        else:
            return f"its tuple output is used by {u.name}"
    return out


def _rank(node: fx.Node) -> int | None:
    v = node.meta.get("val")
    return v.dim() if isinstance(v, torch.Tensor) else None


def _producer(bn_input: Any, prog: _Prog, site: str):
    """The conv / linear producing a BatchNorm's input, or a reason."""
    if not isinstance(bn_input, fx.Node) or bn_input.op != "call_function":
        return f"its input is {_describe(bn_input, prog)}, not a {_PRODUCER_WHAT}"
    n = _schema_name(bn_input.target)
    name, _ = module_of(bn_input)
    name = name or bn_input.name
    if n in _CONV or n in _CONVT:
        transposed = n in _CONVT or bool(_get_arg(bn_input, "transposed", False))
        w = _get_arg(bn_input, "weight")
        b = _get_arg(bn_input, "bias")
        groups = int(_get_arg(bn_input, "groups", 1))
        fam = "convt" if transposed else "conv"
        view = None
    elif n in _LINEAR:
        if n == "aten::linear":
            w, b, view, fam = _get_arg(bn_input, "weight"), _get_arg(bn_input, "bias"), None, "linear"
        else:
            if n == "aten::addmm":
                if _get_arg(bn_input, "beta", 1) != 1 or _get_arg(bn_input, "alpha", 1) != 1:
                    return f"'{name}' is an addmm with beta/alpha != 1"
                b, mat2, fam = _get_arg(bn_input, "self"), _get_arg(bn_input, "mat2"), "addmm"
            else:
                b, mat2, fam = None, _get_arg(bn_input, "mat2"), "mm"
            if not (isinstance(mat2, fx.Node) and mat2.op == "call_function"
                    and _schema_name(mat2.target) in _TRANSPOSE_VIEWS and _rank(mat2) == 2):
                return f"its input is {_describe(bn_input, prog)}, whose weight is not a transposed parameter"
            view, w = mat2, mat2.args[0]
        groups = 1
    else:
        return f"its input is {_describe(bn_input, prog)}, not a {_PRODUCER_WHAT}"
    if not prog.is_param(w):
        what = _describe(w, prog) if isinstance(w, fx.Node) and w.op != "placeholder" else "not a parameter"
        return f"the weight of '{name}' is {what}, not a parameter of the program"
    if b is not None and not prog.is_param(b):
        return f"the bias of '{name}' is {_describe(b, prog)}, not a parameter of the program"
    return _Producer(bn_input, fam, w, view, b, groups, name)


def _channel_problem(call: _BNCall, prod: _Producer, prog: _Prog) -> str | None:
    w = prog.tensor(prod.weight)
    if w is None:
        return f"the weight of '{prod.name}' is not in the program's state"
    rm = call.roles.get("running_mean")
    channels = int(prog.tensor(rm).numel())
    if prod.family == "convt":
        out = int(w.shape[1]) * prod.groups
    else:
        out = int(w.shape[0])
    rank = _rank(prod.node)
    if prod.family in ("conv", "convt"):
        k = w.dim() - 2
        if rank is not None and rank < k + 2:
            return f"'{prod.name}' is called on unbatched input: the norm's dim 1 is not its channel axis"
    else:
        if rank is None:
            return "input rank unknown (no shape metadata in the program)"
        if rank != 2 and channels != 1:
            return (f"the norm sees rank-{rank} input (N, L, C): it normalises dim 1, not the "
                    f"output features (last dim) of '{prod.name}'")
    if channels != out and channels != 1:
        return f"channel mismatch: the norm has {channels} channels, '{prod.name}' outputs {out}"
    return None


def _bn_problem(call: _BNCall, prog: _Prog, eval_: bool) -> str | None:
    r = call.roles
    if r.get("training"):
        if r.get("running_mean") is None:
            return "track_running_stats=False: it normalises with batch statistics even in eval"
        hint = ("eval=True cannot change an exported program's mode: export the model after "
                "model.eval()" if eval_ else "export the model after model.eval()")
        return f"the program runs this BatchNorm in training mode (batch statistics): {hint}"
    if not isinstance(r.get("training", False), bool):
        return "its training flag is computed in the graph"
    for role in ("running_mean", "running_var"):
        if r.get(role) is None:
            return "track_running_stats=False: it normalises with batch statistics even in eval"
    for role in ("running_mean", "running_var", "weight", "bias"):
        v = r.get(role)
        if v is None:
            continue
        if not prog.is_state(v):
            return f"its {role} is {_describe(v, prog)}, not a parameter/buffer of the program"
        if prog.tensor(v) is None:
            return f"its {role} is not in the program's state"
    if not isinstance(r.get("eps"), (int, float)):
        return "its eps is not a constant"
    s, t = _affine(call, prog)
    if not arith.is_finite(prog.tensor(r["running_mean"]), prog.tensor(r["running_var"]), s, t):
        return "non-finite statistics (NaN/Inf in running stats or affine, or var + eps <= 0)"
    return None


def _affine(call: _BNCall, prog: _Prog):
    r = call.roles
    w = prog.tensor(r["weight"]) if r.get("weight") is not None else None
    b = prog.tensor(r["bias"]) if r.get("bias") is not None else None
    return arith.bn_affine(prog.tensor(r["running_mean"]), prog.tensor(r["running_var"]), w, b,
                           float(r["eps"]))


def _bn_key(call: _BNCall) -> tuple:
    r = call.roles
    return tuple(id(r.get(k)) if r.get(k) is not None else None
                 for k in ("weight", "bias", "running_mean", "running_var")) + (float(r["eps"]),)


def _weight_uses(prod: _Producer) -> list[fx.Node]:
    """The op nodes using ``prod``'s weight placeholder (through a transposing view for mm)."""
    out = []
    for u in prod.weight.users:
        if u.op == "call_function" and _schema_name(u.target) in _TRANSPOSE_VIEWS:
            out.extend((u, uu) for uu in u.users)
        else:
            out.append((None, u))
    return out


def _group_problem(call: _BNCall, calls_by_out: dict, prog: _Prog) -> str | None:
    """Every other use of the producer's weight / bias must be the same layer feeding an
    identical BatchNorm; the producer's output must feed only the BatchNorm."""
    prod = call.producer
    users = list(prod.node.users)
    if len(users) != 1:
        names = ", ".join(_describe(u, prog) for u in users)
        return f"the output of '{prod.name}' is used by more than one consumer ({names})"
    key = _bn_key(call)
    for view, u in _weight_uses(prod):
        if u is prod.node:
            continue
        uname = module_of(u)[0] or u.name
        other = calls_by_out.get(u)
        if other is None or other.producer is None:
            if uname == prod.name:
                return (f"'{prod.name}' is called at several places whose call sites differ "
                        f"(one call feeds {_feeds(u, prog)})")
            return (f"the weight of '{prod.name}' is shared (tied) with {_describe(u, prog)}: "
                    f"changing it would change that use")
        op = other.producer
        same = (op.family == prod.family and op.groups == prod.groups and op.bias is prod.bias
                and _bn_key(other) == key and len(op.node.users) == 1)
        if not same:
            if uname == prod.name:
                return (f"'{prod.name}' is called at several places whose call sites differ "
                        f"(its calls feed '{call.site}' and '{other.site}')")
            return (f"the weight of '{prod.name}' is shared (tied) with '{uname}', which feeds "
                    f"'{other.site}': one folded weight cannot serve both")
    if prod.bias is not None:
        for u in prod.bias.users:
            other = calls_by_out.get(u)
            if u is prod.node:
                continue
            if other is None or other.producer is None or other.producer.weight is not prod.weight:
                return (f"the bias of '{prod.name}' is also used by {_describe(u, prog)}: "
                        f"changing it would change that use")
    return None


def _feeds(node: fx.Node, prog: _Prog) -> str:
    us = list(node.users)
    return ", ".join(_describe(u, prog) for u in us) if us else "nothing"


def _plan(ep, eval_: bool = False):
    prog = _Prog(ep)
    calls: list[_BNCall] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        sig = op_signature(node.target)
        if sig is None or sig.kind != "bn":
            continue
        roles = bind(sig, node.args, node.kwargs)
        name, kind = _site_name(node, roles, prog)
        c = _BNCall(node, name, kind, roles=roles)
        calls.append(c)
        r = _bn_problem(c, prog, eval_)
        if r is None:
            out = _bn_output(node)
            if isinstance(out, str):
                r = out
            else:
                c.out = out
        if r is None:
            p = _producer(roles.get("input"), prog, name)
            if isinstance(p, str):
                r = p
            else:
                c.producer = p
                r = _channel_problem(c, p, prog)
        c.reason = r
    # the BatchNorm node reading each producer's output (for the weight-sharing proof)
    by_prod = {c.producer.node: c for c in calls if c.producer is not None}
    for c in calls:
        if c.reason is None:
            c.reason = _group_problem(c, by_prod, prog)
    # a site (a module) folds only when all its calls fold; a weight group only when all fold
    changed = True
    while changed:
        changed = False
        site_bad = {}
        for c in calls:
            if c.reason is not None:
                site_bad.setdefault(c.site, c.reason)
        for c in calls:
            if c.reason is None and c.site in site_bad:
                c.reason = site_bad[c.site]
                changed = True
        w_bad = {}
        for c in calls:
            if c.producer is not None and c.reason is not None:
                w_bad.setdefault(c.producer.weight, c)
        for c in calls:
            if c.reason is None and c.producer.weight in w_bad:
                o = w_bad[c.producer.weight]
                c.reason = (f"'{c.producer.name}' shares its weight with the layer before '{o.site}', "
                            f"which is not folded ({o.reason})")
                changed = True
    sites = _group_calls(calls)
    for s in sites.values():
        if s.reason is None:
            into = []
            for c in s.calls:
                if c.producer.name not in into:
                    into.append(c.producer.name)
            s.into = ", ".join(into)
            fam = s.calls[0].producer.family
            s.pattern = {"conv": "conv_bn", "convt": "convtranspose_bn"}.get(fam, "linear_bn")
            if s.kind == "functional_bn":
                s.pattern = "functional_bn"
    return prog, list(sites.values())


def _group_calls(calls) -> dict[str, ProgramSite]:
    """One site per module: its calls, and the first call's reason it cannot be folded (a site folds
    only when every call does)."""
    sites: dict[str, ProgramSite] = {}
    for c in calls:
        s = sites.setdefault(c.site, ProgramSite(c.site, c.kind))
        s.calls.append(c)
        if c.reason is not None and s.reason is None:
            s.reason = c.reason
    return sites


def plan_program(ep) -> list[ProgramSite]:
    """What :func:`fold_program` would do with each BatchNorm site of ``ep`` (not modified)."""
    return _plan(ep)[1]


# --------------------------------------------------------------------------- rewrite


def _copy_program(ep):
    """A copy of ``ep`` whose graph, signature and state can be changed without touching ``ep``
    (tensors are shared until replaced; nothing is modified in place)."""
    gm = copy.deepcopy(ep.graph_module)
    # the copy may rename nodes whose names shadow builtins ("input" -> "input_1"): the
    # signature and module call graph refer to the original names, so restore them
    for old, new in zip(ep.graph_module.graph.nodes, gm.graph.nodes):
        if new.name != old.name:
            new.name = old.name
    sig = copy.deepcopy(ep.graph_signature)
    state = dict(ep.state_dict)
    constants = dict(getattr(ep, "constants", {}) or {})
    return gm, sig, state, constants


def _rebuild(ep, gm, sig, state, constants):
    from torch.export import ExportedProgram

    gm.graph.lint()
    gm.recompile()
    kwargs = dict(root=gm, graph=gm.graph, graph_signature=sig, state_dict=state,
                  range_constraints=copy.copy(ep.range_constraints),
                  module_call_graph=copy.deepcopy(ep.module_call_graph),
                  example_inputs=ep.example_inputs, constants=constants)
    try:
        return ExportedProgram(**kwargs, verifiers=ep.verifiers)
    except TypeError:
        return ExportedProgram(**kwargs)


def _fake(like: fx.Node, t: torch.Tensor):
    v = like.meta.get("val")
    mode = getattr(v, "fake_mode", None)
    if mode is None:
        return t
    return mode.from_tensor(t, static_shapes=True)


def _new_param(gm: fx.GraphModule, sig, state: dict, key: str, value: torch.Tensor,
               like: fx.Node) -> fx.Node:
    """A new parameter: placeholder after the last parameter placeholder, InputSpec, state."""
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    g = gm.graph
    phs = [n for n in g.nodes if n.op == "placeholder"]
    kinds = {s.arg.name: s.kind for s in sig.input_specs if hasattr(s.arg, "name")}
    last_param = None
    for n in phs:
        if kinds.get(n.name) == InputKind.PARAMETER:
            last_param = n
    names = {n.name for n in g.nodes}
    base = "p_" + "".join(ch if ch.isalnum() else "_" for ch in key)
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    if last_param is not None:
        with g.inserting_after(last_param):
            ph = g.placeholder(name)
    else:
        with g.inserting_before(phs[0] if phs else None):
            ph = g.placeholder(name)
    ph.meta.update({k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace")})
    ph.meta["val"] = _fake(like, value)
    spec = InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=ph.name), target=key, persistent=None)
    specs = list(sig.input_specs)
    idx = 0
    for i, s in enumerate(specs):
        if s.kind == InputKind.PARAMETER:
            idx = i + 1
    specs.insert(idx, spec)
    sig.input_specs[:] = specs if isinstance(sig.input_specs, list) else specs
    if not isinstance(sig.input_specs, list):
        sig.input_specs = specs
    state[key] = torch.nn.Parameter(value, requires_grad=False)
    return ph


def _unique_key(state: dict, constants: dict, key: str) -> str:
    if key not in state and key not in constants:
        return key
    i = 1
    while f"{key}_{i}" in state or f"{key}_{i}" in constants:
        i += 1
    return f"{key}_{i}"


def _drop_unused_state(gm, sig, state, constants, candidates: set[str]) -> list[str]:
    """Remove placeholders (and their specs / state) whose target is in ``candidates`` and that
    no node uses any more; a state key is removed only when no spec refers to it any more."""
    from torch.export.graph_signature import InputKind

    g = gm.graph
    removed = []
    keep_specs = []
    by_name = {n.name: n for n in g.nodes if n.op == "placeholder"}
    for s in sig.input_specs:
        name = getattr(s.arg, "name", None)
        n = by_name.get(name)
        if (s.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
                and s.target in candidates and n is not None and not n.users):
            g.erase_node(n)
            removed.append(s.target)
            continue
        keep_specs.append(s)
    sig.input_specs[:] = keep_specs
    still = {s.target for s in keep_specs if s.target is not None}
    still |= {s.target for s in sig.output_specs if getattr(s, "target", None) is not None}
    for k in removed:
        if k not in still:
            state.pop(k, None)
            constants.pop(k, None)
    return removed


def _apply(ep, sites: list[ProgramSite]):
    gm, sig, state, constants = _copy_program(ep)
    # map the original graph's nodes to the copy's by name
    new_nodes = {n.name: n for n in gm.graph.nodes}
    prog_tensors = _Prog(ep)
    touched: set[str] = set()
    done_weights: set[str] = set()
    for s in sites:
        if s.reason is not None:
            continue
        for c in s.calls:
            prod = c.producer
            bn = new_nodes[c.node.name]
            pnode = new_nodes[prod.node.name]
            # weight: fold once per weight placeholder (every use feeds an identical BN)
            wkey = prog_tensors.target[prod.weight.name]
            if prod.weight.name not in done_weights:
                done_weights.add(prod.weight.name)
                scale, shift = _affine(c, prog_tensors)
                w = prog_tensors.tensor(prod.weight)
                b = prog_tensors.tensor(prod.bias) if prod.bias is not None else None
                if prod.family == "convt":
                    w2, b2 = arith.fold_affine_after_conv_transpose(w, b, scale, shift, prod.groups)
                elif prod.family == "conv":
                    w2, b2 = arith.fold_affine_after_conv(w, b, scale, shift)
                else:
                    w2, b2 = arith.fold_affine_after_linear(w, b, scale, shift)
                state[wkey] = torch.nn.Parameter(arith.cast_like(w2, w), requires_grad=w.requires_grad)
                if b is not None:
                    bkey = prog_tensors.target[prod.bias.name]
                    state[bkey] = torch.nn.Parameter(arith.cast_like(b2, b), requires_grad=b.requires_grad)
                    bias_node = new_nodes[prod.bias.name]
                else:
                    base = wkey[:-len(".weight")] + ".bias" if wkey.endswith(".weight") else wkey + "_bias"
                    bkey = _unique_key(state, constants, base)
                    bias_node = _new_param(gm, sig, state, bkey, arith.cast_like(b2, w),
                                           new_nodes[prod.weight.name])
                    state[bkey].requires_grad_(w.requires_grad)
                    new_nodes[bias_node.name] = bias_node
                new_nodes["__bias__" + prod.weight.name] = bias_node
            bias_node = new_nodes["__bias__" + prod.weight.name]
            if prod.family in ("conv", "convt", "linear"):
                _set_arg(pnode, "bias", bias_node)
            elif prod.family == "addmm":
                _set_arg(pnode, "self", bias_node)
            else:  # mm -> addmm(bias, x, w.t())
                g = gm.graph
                with g.inserting_after(pnode):
                    add = g.call_function(torch.ops.aten.addmm.default, (bias_node, *pnode.args))
                add.meta = dict(pnode.meta)
                pnode.replace_all_uses_with(add)
                add.args = (bias_node, *pnode.args)
                g.erase_node(pnode)
                pnode = add
            # the BatchNorm's output is now the producer's
            out = new_nodes[c.out.name] if c.out is not None else None
            is_output = out is not None and any(u.op == "output" for u in out.users)
            if out is not None:
                out.replace_all_uses_with(pnode)
            for u in list(bn.users):
                gm.graph.erase_node(u)
            gm.graph.erase_node(bn)
            if is_output:
                # the signature (and module call graph) name the program's outputs: the producer
                # takes over the folded BatchNorm's output name
                pnode.name = out.name
            for role in ("weight", "bias", "running_mean", "running_var"):
                v = c.roles.get(role)
                if v is not None and v.name in prog_tensors.target:
                    touched.add(prog_tensors.target[v.name])
            if s.kind == "bn":
                touched.add(f"{s.norm}.num_batches_tracked")
    removed = _drop_unused_state(gm, sig, state, constants, touched)
    return _rebuild(ep, gm, sig, state, constants), removed


# --------------------------------------------------------------------------- norm affines into the next linear


@dataclass
class _AffCall:
    node: fx.Node
    site: str
    kind: str
    roles: dict
    out: fx.Node | None = None
    consumers: list = field(default_factory=list)  # linear nodes
    reason: str | None = None


def _affine_site(node: fx.Node, sig_kind: str, roles: dict, prog: _Prog) -> tuple[str, str]:
    path, _ = module_of(node)
    w = roles.get("weight") if roles.get("weight") is not None else roles.get("bias")
    key = prog.target.get(w.name) if isinstance(w, fx.Node) else None
    if path and key is not None and key.rsplit(".", 1)[0] == path:
        return path, sig_kind
    if path and key is None and w is None:
        return path, sig_kind  # a module without affine (still a module site)
    return (f"{path}.{node.name}" if path else node.name), f"functional_{sig_kind}"


def _affine_problem(c: _AffCall, prog: _Prog) -> str | None:
    r = c.roles
    if c.kind.startswith("functional_"):
        return f"functional {c.kind[len('functional_'):]} norm: only functional batch_norm is folded"
    w, b = r.get("weight"), r.get("bias")
    if w is None and b is None:
        return "no affine to fold (elementwise_affine/affine is off)"
    for role, v in (("weight", w), ("bias", b)):
        if v is not None and not prog.is_state(v):
            return f"its {role} is {_describe(v, prog)}, not a parameter/buffer of the program"
    shape = r.get("normalized_shape") if "normalized_shape" in r else _get_arg(c.node, "normalized_shape")
    shape = tuple(shape) if isinstance(shape, (list, tuple)) else None
    if shape is None or len(shape) != 1:
        return f"normalized_shape {shape} spans several dims: its affine is not per-feature of one layer"
    n = int(shape[0])
    st = [prog.tensor(v) for v in (w, b) if v is not None]
    if not arith.is_finite(*st):
        return "non-finite affine parameters"
    sv = arith.f64(prog.tensor(w)) if w is not None else torch.ones(n, dtype=torch.float64)
    tv = arith.f64(prog.tensor(b)) if b is not None else torch.zeros(n, dtype=torch.float64)
    if bool((sv == 1).all()) and bool((tv == 0).all()):
        return "its affine is already the identity: nothing to fold"
    out = _bn_output(c.node)
    if isinstance(out, str):
        return out
    c.out = out
    users = list(out.users)
    if not users:
        return "its output is unused"
    for u in users:
        if not (u.op == "call_function" and _schema_name(u.target) == "aten::linear"):
            return f"its output feeds {_describe(u, prog)}, not a Linear"
        if _get_arg(u, "input") is not out or _get_arg(u, "weight") is out or _get_arg(u, "bias") is out:
            return f"its output feeds {_describe(u, prog)} in a non-input position"
        lname = module_of(u)[0] or u.name
        lw, lb = _get_arg(u, "weight"), _get_arg(u, "bias")
        if not prog.is_param(lw):
            return f"the weight of '{lname}' is {_describe(lw, prog)}, not a parameter of the program"
        if len(lw.users) != 1:
            others = ", ".join(_describe(x, prog) for x in lw.users if x is not u)
            return f"the weight of '{lname}' is shared (tied) with {others}: changing it would change that use"
        if lb is not None and (not prog.is_param(lb) or len(lb.users) != 1):
            return f"the bias of '{lname}' is also used elsewhere or not a parameter"
        inf = int(prog.tensor(lw).shape[1])
        if inf != n:
            return f"channel mismatch: {n} vs in_features {inf} of '{lname}'"
        c.consumers.append(u)
    return None


def _plan_affine(ep):
    prog = _Prog(ep)
    calls: list[_AffCall] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        sig = op_signature(node.target)
        if sig is None or sig.kind not in ("ln", "rms"):
            continue
        roles = bind(sig, node.args, node.kwargs)
        roles["normalized_shape"] = _get_arg(node, "normalized_shape")
        name, kind = _affine_site(node, sig.kind, roles, prog)
        c = _AffCall(node, name, kind, roles)
        c.reason = _affine_problem(c, prog)
        calls.append(c)
    sites = _group_calls(calls)
    for s in sites.values():
        if s.reason is None:
            into = []
            for c in s.calls:
                for u in c.consumers:
                    n = module_of(u)[0] or u.name
                    if n not in into:
                        into.append(n)
            s.into, s.pattern = ", ".join(into), "norm_affine_linear"
    return prog, list(sites.values())


def _apply_affine(ep, sites: list[ProgramSite]):
    gm, sig, state, constants = _copy_program(ep)
    new_nodes = {n.name: n for n in gm.graph.nodes}
    prog = _Prog(ep)
    touched: set[str] = set()
    for s in sites:
        if s.reason is not None:
            continue
        for c in s.calls:
            w, b = c.roles.get("weight"), c.roles.get("bias")
            n = int(tuple(c.roles["normalized_shape"])[0])
            sv = arith.f64(prog.tensor(w)) if w is not None else torch.ones(n, dtype=torch.float64)
            tv = arith.f64(prog.tensor(b)) if b is not None else torch.zeros(n, dtype=torch.float64)
            for u in c.consumers:
                lw, lb = _get_arg(u, "weight"), _get_arg(u, "bias")
                W = prog.tensor(lw)
                B = prog.tensor(lb) if lb is not None else None
                w2, b2 = arith.fold_affine_before_linear(W, B, sv, tv)
                wkey = prog.target[lw.name]
                state[wkey] = torch.nn.Parameter(arith.cast_like(w2, W), requires_grad=W.requires_grad)
                if lb is not None:
                    state[prog.target[lb.name]] = torch.nn.Parameter(arith.cast_like(b2, B),
                                                                     requires_grad=B.requires_grad)
                else:
                    base = wkey[:-len(".weight")] + ".bias" if wkey.endswith(".weight") else wkey + "_bias"
                    bkey = _unique_key(state, constants, base)
                    ph = _new_param(gm, sig, state, bkey, arith.cast_like(b2, W), new_nodes[lw.name])
                    state[bkey].requires_grad_(W.requires_grad)
                    _set_arg(new_nodes[u.name], "bias", ph)
            nn_ = new_nodes[c.node.name]
            for role, v in (("weight", w), ("bias", b)):
                if v is not None:
                    _set_arg(nn_, role, None)
                    touched.add(prog.target[v.name])
    removed = _drop_unused_state(gm, sig, state, constants, touched)
    return _rebuild(ep, gm, sig, state, constants), removed


# --------------------------------------------------------------------------- verification


def _flat(out) -> list[torch.Tensor]:
    from normswap.onnx_utils import flatten_outputs  # the tensors of a (nested) output, one definition

    return flatten_outputs(out)


def _run(ep, args, kwargs):
    with torch.no_grad():
        return _flat(ep.module()(*args, **kwargs))


def _compare(ref: list[torch.Tensor], out: list[torch.Tensor]) -> dict:
    from .api import compare_outputs  # the eager fold's verification, the same criterion

    return compare_outputs(ref, out)


def _inputs(ep, example_inputs):
    if example_inputs is None:
        ex = getattr(ep, "example_inputs", None)
        if ex is None:
            return None
        args, kwargs = ex
        return tuple(args), dict(kwargs or {})
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict) \
            and isinstance(example_inputs[0], (tuple, list)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


# --------------------------------------------------------------------------- public API


def fold_program(ep, example_inputs=None, *, eval: bool = False):
    """Fold every BatchNorm of an ``ExportedProgram`` that can be folded exactly into the
    convolution / linear before it; skip every other one with a reason naming the site.

    Returns ``(folded_program, FoldReport)``; ``ep`` is not modified.  ``example_inputs``
    (a tensor, a tuple of positional inputs, or ``(args, kwargs)``; default: the program's own
    ``example_inputs``) verify the result: when the folded program's outputs differ, the
    original program is returned unchanged with a failed verification.  ``eval=True`` cannot
    change the mode a program was exported in: train-mode BatchNorms are refused either way.
    """
    if not isinstance(ep, torch.export.ExportedProgram):
        raise NormswapError(f"fold_program needs a torch.export.ExportedProgram, got {type(ep).__name__}")
    report = FoldReport()
    t0 = time.perf_counter()
    prog, sites = _plan(ep, eval)
    for s in sites:
        if s.reason is None:
            report.folded.append({"norm": s.norm, "kind": s.kind, "into": s.into, "pattern": s.pattern})
        else:
            report.skipped.append({"norm": s.norm, "kind": s.kind, "reason": s.reason})
    if eval and any("training mode" in (s.reason or "") for s in sites):
        report.notes.append("eval=True: an exported program keeps the mode it was exported in; "
                            "re-export the model after model.eval() to fold its BatchNorms")
    if not report.folded:
        result = ep
        removed: list[str] = []
    else:
        result, removed = _apply(ep, sites)
    # second step: LayerNorm / RMSNorm affines into the following linear(s)
    _, asites = _plan_affine(result)
    for s in asites:
        if s.reason is None:
            report.folded.append({"norm": s.norm, "kind": s.kind, "into": s.into, "pattern": s.pattern})
        else:
            report.skipped.append({"norm": s.norm, "kind": s.kind, "reason": s.reason})
    if any(s.reason is None for s in asites):
        result, removed2 = _apply_affine(result, asites)
        removed = removed + removed2
    if removed:
        report.notes.append(f"removed {len(removed)} unused parameters/buffers of folded BatchNorms "
                            f"from the program's state")
    ex = _inputs(ep, example_inputs)
    if ex is None:
        report.notes.append("no example inputs (and none stored in the program): not verified")
    elif report.folded:
        try:
            ref = _run(ep, *ex)
        except Exception as e:  # noqa: BLE001
            raise NormswapError(f"the example inputs do not run through the program: {type(e).__name__}: {e}") from e
        try:
            out = _run(result, *ex)
            v = _compare(ref, out)
        except Exception as e:  # noqa: BLE001
            v = {"max_abs_error": None, "ok": False, "error": f"{type(e).__name__}: {e}"}
        report.verification = v
        if not v["ok"]:
            report.notes.append("the folded program's outputs differ from the original's on the example "
                                "inputs: the original program is returned unchanged")
            for f in report.folded:
                report.skipped.append({"norm": f["norm"], "kind": f["kind"],
                                       "reason": "not applied: the folded program failed verification"})
            report.folded = []
            result = ep
    report.notes.append(f"folded the exported program's graph in {time.perf_counter() - t0:.3f} s")
    return result, report
