"""Reading an ATen graph (a ``torch.export`` program): arguments by schema name, the module that
emitted a node (``nn_module_stack``), the program's state behind a placeholder, identity ops,
and the proof that a custom norm's ops are an RMSNorm.  Used by :mod:`normswap.views.aten` and
the program applier."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from normswap.graph import LAYER_OPS

__all__ = ["schema", "get_arg", "set_arg", "module_of", "short_op", "rank", "val", "is_assert", "is_identity",
           "is_dead", "bn_output", "ProgramState", "rms_call", "CONV", "CONVT", "LINEAR", "TRANSPOSE_VIEWS",
           "VIEWS", "CASTS", "strip_call_index"]

CONV = {op for op, f in LAYER_OPS.items() if f == "conv"}
CONVT = {op for op, f in LAYER_OPS.items() if f == "convt"}
LINEAR = {op for op, f in LAYER_OPS.items() if f == "linear"}
TRANSPOSE_VIEWS = {"aten::t", "aten::permute", "aten::transpose"}
VIEWS = {"aten::view", "aten::reshape", "aten::_unsafe_view"}
CASTS = {"aten::to", "aten::_to_copy"}


def schema(node: Any) -> str | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    s = getattr(node.target, "_schema", None)
    return s.name if s is not None else None


def get_arg(node: fx.Node, name: str, default: Any = None) -> Any:
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


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set an ATen node's argument by its schema name."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name != name:
            continue
        if i < len(node.args):
            args = list(node.args)
            args[i] = value
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, name: value}
        return
    raise KeyError(name)


def strip_call_index(path: str) -> str:
    # a module called more than once may appear as "conv@1" in newer torch versions
    return ".".join(p.split("@")[0] for p in str(path).split("."))


def module_of(node: Any, prefix: str = "") -> tuple[str, str]:
    """(qualified module name, module type) of the innermost module that emitted ``node``."""
    if not isinstance(node, fx.Node):
        return "", ""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    if isinstance(typ, type):
        typ = f"{typ.__module__}.{typ.__qualname__}"
    path = strip_call_index(str(path))
    if prefix:
        p = prefix.rstrip(".")
        path = path[len(prefix):] if path.startswith(prefix) else ("" if path == p else path)
    return path, str(typ)


def short_op(node: fx.Node) -> str:
    n = schema(node)
    if n is None:
        return getattr(node.target, "__name__", str(node.target))
    return n.replace("aten::", "aten.")


def val(node: Any):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def rank(node: Any) -> int | None:
    v = val(node)
    return v.dim() if v is not None else None


def is_assert(node: fx.Node) -> bool:
    n = schema(node) or ""
    return n.startswith("aten::_assert") or n.startswith("aten::sym_constrain")


def is_identity(node: fx.Node) -> bool:
    """An op whose output equals its first input (eval dropout, alias, clone, same-dtype copy)."""
    n = schema(node)
    if n == "aten::dropout":
        return get_arg(node, "train", True) is False
    if n in ("aten::alias", "aten::clone", "aten::contiguous", "aten::detach"):
        return True
    if n in CASTS:
        a, v = val(node.args[0]) if node.args else None, val(node)
        return a is not None and v is not None and a.dtype == v.dtype and a.device == v.device
    return False


def is_dead(node: fx.Node) -> bool:
    """A functional op whose result nothing reads (e.g. a slice taken only for its shape)."""
    s = getattr(node.target, "_schema", None)
    return node.op == "call_function" and not node.users and s is not None and not s.is_mutable


def bn_output(node: fx.Node):
    """The node carrying the normalised output of a norm node (its getitem 0 for tuple ops),
    None when that output is unused, or a reason text when the tuple's other outputs are used."""
    if not isinstance(node.meta.get("val"), (tuple, list)):
        return node
    out = None
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem:
            if u.args[1] == 0:
                out = u
            elif u.users:
                return ("saved_stats", {"index": u.args[1]})
        else:
            return ("tuple_output", {"user": u.name})
    return out


class ProgramState:
    """Placeholders of an exported program and the tensors behind them: the program's own state
    (``ep.state_dict`` / ``ep.constants``), or -- for a program exported from an eager model --
    the eager model's tensors (``model`` given; ``prefix``: the wrapper's name prefix)."""

    def __init__(self, ep, model=None, prefix: str = ""):
        from torch.export.graph_signature import InputKind

        self.ep, self.model, self.prefix = ep, model, prefix
        self.IK = InputKind
        self.kind: dict[str, Any] = {}
        self.target: dict[str, str] = {}
        nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        self.node_of: dict[str, fx.Node] = {}
        for spec in ep.graph_signature.input_specs:
            name = getattr(spec.arg, "name", None)
            if name is None:
                continue
            self.kind[name] = spec.kind
            if spec.target is not None:
                t = spec.target
                self.target[name] = t[len(prefix):] if prefix and t.startswith(prefix) else t
                if spec.target and name in nodes:
                    self.node_of[self.target[name]] = nodes[name]
        self.state = ep.state_dict
        self.constants = getattr(ep, "constants", {}) or {}
        self.eager: dict[str, torch.Tensor] = {}
        if model is not None:
            for n, t in list(model.named_parameters(remove_duplicate=False)) + \
                    list(model.named_buffers(remove_duplicate=False)):
                self.eager[n] = t
        self.ph_of: dict[int, fx.Node] = {}  # id(tensor) -> placeholder
        for key, node in self.node_of.items():
            t = self.tensor(node)
            if t is not None:
                self.ph_of.setdefault(id(t), node)

    def is_state(self, node: Any) -> bool:
        return (isinstance(node, fx.Node) and node.op == "placeholder"
                and self.kind.get(node.name) in (self.IK.PARAMETER, self.IK.BUFFER, self.IK.CONSTANT_TENSOR))

    def is_param(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node.op == "placeholder" and self.kind.get(node.name) == self.IK.PARAMETER

    def tensor(self, node: Any) -> torch.Tensor | None:
        if not isinstance(node, fx.Node):
            return None
        key = self.target.get(node.name)
        if key is None:
            return None
        if self.model is not None:
            return self.eager.get(key)
        t = self.state.get(key if not self.prefix else self.prefix + key)
        if t is None:
            t = self.constants.get(key)
        return t


def _through_casts(node: Any, nodes: set, used: list) -> Any:
    while isinstance(node, fx.Node) and schema(node) in CASTS and id(node) in nodes:
        used.append(node)
        node = node.args[0]
    return node


def rms_call(out: fx.Node, wph: fx.Node, n: int, group: set, describe):
    """Prove that ``out`` is ``weight * cast(cast(x) * rsqrt(mean(cast(x)^2, -1, keepdim) + eps))``
    (any order of the multiplications' operands); the matched nodes, or a reason text."""
    bad = "its forward is not x * rsqrt(mean(x^2, -1) + eps) * weight"
    used = [out]
    if schema(out) != "aten::mul" or len(out.args) != 2:
        return bad
    a, b = out.args
    z = b if a is wph else a if b is wph else None
    if z is None:
        return bad
    y = _through_casts(z, group, used)
    if schema(y) != "aten::mul" or id(y) not in group or len(y.args) != 2:
        return bad
    used.append(y)
    r = x1 = None
    for p, q in (y.args, y.args[::-1]):
        if schema(q) == "aten::rsqrt" and id(q) in group:
            r, x1 = q, p
            break
    if r is None:
        return bad
    used.append(r)
    add = r.args[0]
    if schema(add) != "aten::add" or id(add) not in group or not isinstance(add.args[1], (int, float)) \
            or not add.args[1] > 0 or get_arg(add, "alpha", 1) != 1:
        return bad
    used.append(add)
    mean = add.args[0]
    if schema(mean) != "aten::mean" or id(mean) not in group:
        return bad
    dims = get_arg(mean, "dim")
    sq = mean.args[0]
    rk = rank(sq)
    if not get_arg(mean, "keepdim", False) or not isinstance(dims, (list, tuple)) or len(dims) != 1 \
            or rk is None or int(dims[0]) % rk != rk - 1:
        return f"{bad} (its mean is not over the last dim)"
    used.append(mean)
    if schema(sq) == "aten::pow" and sq.args[1] == 2:
        x2 = sq.args[0]
    elif schema(sq) == "aten::mul" and len(sq.args) == 2 and sq.args[0] is sq.args[1]:
        x2 = sq.args[0]
    else:
        return bad
    if id(sq) not in group:
        return bad
    used.append(sq)
    root1 = _through_casts(x1, group, used)
    root2 = _through_casts(x2, group, used)
    if root1 is not root2 or not isinstance(root1, fx.Node) or id(root1) in group:
        return bad
    v = val(root1)
    if v is None or v.dim() < 1 or int(v.shape[-1]) != n:
        return f"{bad} (its input's last dim is not {n})"
    for node in used[1:]:  # intermediate values are used only inside the pattern (a copy of the
        # input, e.g. HF's ``x.to(float32)``, which the tracer reuses for later reads of x, may be)
        if schema(node) in CASTS:
            continue
        if any(id(u) not in group and not is_assert(u) for u in node.users):
            return f"an intermediate value of it is used outside it ({describe(node)})"
    return used
