"""LayerNorm / RMSNorm affines into the following Linear(s), proven on a ``torch.export`` graph.

Hugging Face models (BERT, MiniLM, GPT-2, Llama, ...) cannot be traced by
``torch.fx.symbolic_trace`` (``**kwargs`` forwards, control flow on input shapes, dataclass
outputs), so :mod:`normswap.graph` sees their norms inside untraceable regions and the eager
rule (:mod:`normswap.fold.rules.norm_affine_linear`) cannot prove their consumers.  With example
inputs, this module exports the model once (``torch.export.export(model, inputs, strict=False)``)
and proves, on its ATen graph, what the eager rule proves on the FX graph; the fold itself is
applied to the *eager* modules (the user gets an eager model back):

* the norm is an ``nn.LayerNorm`` / ``nn.RMSNorm`` (one ``aten.layer_norm`` / ``aten.rms_norm``
  per call, reading the module's own weight/bias placeholders), or a custom norm (HF's
  ``LlamaRMSNorm``, ...) whose ATen ops are proven to be
  ``weight * cast(cast(x) * rsqrt(mean(cast(x)^2, -1, keepdim) + eps))`` and nothing else
  (Gemma's ``(1 + weight)`` and any other forward stay refused);
* every call's output is read only by Linear layers -- ``aten.linear`` with the output as its
  input, or HF's ``Conv1D`` (``addmm(bias, view(x, [-1, n]), weight)``, a transposed Linear) --
  looking through eval-mode dropout and same-dtype copies; a residual add, a graph output or any
  other use forbids the fold;
* the affine is over exactly the layers' in-features (the last dim, ``normalized_shape == (n,)``);
* each layer's weight and bias are plain, untied parameters used only by those calls, and every
  module ran on the example inputs exactly as often as the export graph shows it called.

Node -> module mapping uses the placeholders' parameter names (``graph_signature``) and, for
custom norms, ``node.meta["nn_module_stack"]``.  After the fold the norm keeps its class with an
identity affine (weight 1, bias 0), as the eager rule does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from normswap.norm_ops import bind, op_signature
from normswap.norms import weight_reparam

from . import arith

__all__ = ["PATTERN", "applies", "wants_export", "export_match", "refine", "apply_match", "is_conv1d",
           "HINT"]

PATTERN = "norm_affine_linear"
HINT = ("pass example inputs: normswap then proves its producers and consumers on a torch.export "
        "graph of them")
_KINDS = ("ln", "rms", "custom")
_VIEWS = {"aten::view", "aten::reshape", "aten::_unsafe_view"}
_CASTS = {"aten::to", "aten::_to_copy"}


# --------------------------------------------------------------------------- small helpers


def _schema(node: Any) -> str | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    s = getattr(node.target, "_schema", None)
    return s.name if s is not None else None


def _arg(node: fx.Node, name: str, default: Any = None) -> Any:
    from .program import _get_arg

    return _get_arg(node, name, default)


def _val(node: Any):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _is_assert(node: fx.Node) -> bool:
    n = _schema(node) or ""
    return n.startswith("aten::_assert") or n.startswith("aten::sym_constrain")


def _is_identity(node: fx.Node) -> bool:
    """An op whose output equals its first input (eval dropout, alias, clone, same-dtype copy)."""
    n = _schema(node)
    if n == "aten::dropout":
        return _arg(node, "train", True) is False
    if n in ("aten::alias", "aten::clone", "aten::contiguous", "aten::detach"):
        return True
    if n in _CASTS:
        a, v = _val(node.args[0]) if node.args else None, _val(node)
        return a is not None and v is not None and a.dtype == v.dtype and a.device == v.device
    return False


def _strip_call_index(path: str) -> str:
    return ".".join(p.split("@")[0] for p in str(path).split("."))


def _short_error(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 240:
        msg = msg[:237] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def is_conv1d(m: nn.Module) -> bool:
    """HF's ``Conv1D`` (GPT-2, ...) by structure: ``nf``, weight (in, nf), bias (nf,), no children."""
    if type(m).__name__ != "Conv1D" or next(m.children(), None) is not None:
        return False
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    nf = getattr(m, "nf", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not isinstance(nf, int) or w.shape[1] != nf:
        return False
    return b is None or (isinstance(b, torch.Tensor) and tuple(b.shape) == (nf,))


class _Flat(nn.Module):
    """Exports a model whose outputs are not pytree-registered: dataclass outputs become dicts."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return _plain(self.model(*args))


def _plain(out):
    import dataclasses

    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return {f.name: _plain(getattr(out, f.name)) for f in dataclasses.fields(out)
                if getattr(out, f.name) is not None}
    if isinstance(out, dict):
        return {k: _plain(v) for k, v in out.items() if v is not None}
    if isinstance(out, (list, tuple)):
        return [_plain(v) for v in out]
    return out


# --------------------------------------------------------------------------- the exported graph


class _Graph:
    """The exported program of the context's model and lookups into it."""

    def __init__(self, ep, prefix: str, model: nn.Module):
        self.ep = ep
        self.prefix = prefix
        self.graph = ep.graph
        tensors: dict[str, torch.Tensor] = {}
        for n, t in model.named_parameters(remove_duplicate=False):
            tensors[n] = t
        for n, t in model.named_buffers(remove_duplicate=False):
            tensors[n] = t
        self.tensor_of: dict[str, torch.Tensor] = {}  # placeholder name -> eager tensor
        self.ph_of: dict[int, fx.Node] = {}  # id(eager tensor) -> placeholder
        self.param_ph: set[str] = set()
        from torch.export.graph_signature import InputKind

        nodes = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        for spec in ep.graph_signature.input_specs:
            name = getattr(spec.arg, "name", None)
            if name is None or spec.target is None or name not in nodes:
                continue
            target = spec.target[len(prefix):] if prefix and spec.target.startswith(prefix) else spec.target
            t = tensors.get(target)
            if t is None:
                continue
            self.tensor_of[name] = t
            self.ph_of.setdefault(id(t), nodes[name])
            if spec.kind == InputKind.PARAMETER:
                self.param_ph.add(name)
        self._by_module: dict[str, list[fx.Node]] | None = None

    def module_path(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = _strip_call_index(list(stack.values())[-1][0])
        if self.prefix:
            p = self.prefix.rstrip(".")
            path = path[len(self.prefix):] if path.startswith(self.prefix) else ("" if path == p else path)
        return path

    def nodes_of(self, paths) -> list[fx.Node]:
        if self._by_module is None:
            self._by_module = {}
            for n in self.graph.nodes:
                if n.op == "call_function":
                    self._by_module.setdefault(self.module_path(n), []).append(n)
        out: list[fx.Node] = []
        for p in paths:
            out.extend(self._by_module.get(p, []))
        return out

    def describe(self, node: Any) -> str:
        if not isinstance(node, fx.Node):
            return repr(node)
        if node.op == "output":
            return "the graph output"
        if node.op == "placeholder":
            return f"the input '{node.name}'"
        op = (_schema(node) or getattr(node.target, "__name__", str(node.target))).replace("aten::", "aten.")
        path = self.module_path(node)
        return f"'{path}' ({op})" if path else f"{op} '{node.name}'"


def _export(ctx):
    """The context's model exported on its example inputs (cached), or why it could not be."""
    cache = ctx.cache
    if "export_graph" in cache:
        return cache["export_graph"]
    model, ex = ctx.model, tuple(ctx.example_inputs)
    result: Any
    try:
        result = _Graph(torch.export.export(model, ex, strict=False), "", model)
    except Exception as e:  # noqa: BLE001
        result = f"torch.export on the example inputs failed too ({_short_error(e)})"
        if "pytree" in str(e) or "not a known type" in str(e):
            try:
                result = _Graph(torch.export.export(_Flat(model), ex, strict=False), "model.", model)
            except Exception as e2:  # noqa: BLE001
                result = f"torch.export on the example inputs failed too ({_short_error(e2)})"
    cache["export_graph"] = result
    return result


# --------------------------------------------------------------------------- site selection


def applies(site, ctx) -> bool:
    """Is the site a module norm this module may prove (LayerNorm / RMSNorm / custom)?"""
    return site.functional is None and site.module is not None and site.kind in _KINDS


def wants_export(site, ctx) -> bool:
    """The FX graphs cannot prove the site: it has no FX call (inside an untraceable region),
    or it is a custom norm whose forward only an ATen graph can show."""
    if not applies(site, ctx):
        return False
    if site.kind == "custom":
        return True
    if not site.calls:
        return any(r.gm is None for r in ctx.regions)
    return _fx_boundary(site, ctx)


def _fx_boundary(site, ctx) -> bool:
    """An FX call of the norm whose output leaves the traced graph into code FX could not trace:
    an untraceable leaf module, or the output of a region other than the model's."""
    from normswap.graph import qualname

    for ref in site.calls:
        leaves = set(ref.region.untraceable_leaves)
        for u in ctx.users_of(ref.node):
            if u.op == "output" and ref.region.path != "":
                return True
            if u.op == "call_module" and qualname(ref.region, str(u.target)) in leaves:
                return True
    return False


# --------------------------------------------------------------------------- proofs


@dataclass
class _Call:
    out: fx.Node  # the node carrying the normalised (and affine-transformed) output
    nodes: list = field(default_factory=list)  # the norm's own nodes
    consumers: list = field(default_factory=list)  # (module, op node, via node)


def _norm_params(m: nn.Module, kind: str):
    """(weight, bias, n, s, t) of the norm's affine, or a reason."""
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    w = w if isinstance(w, torch.Tensor) else None
    b = b if isinstance(b, torch.Tensor) else None
    if kind in ("ln", "rms"):
        if getattr(m, "elementwise_affine", True) is False or (w is None and b is None):
            return "no affine to fold (elementwise_affine/affine is off)"
        shape = tuple(m.normalized_shape)
        if len(shape) != 1:
            return f"normalized_shape {shape} spans several dims: its affine is not per-feature of one layer"
        n = int(shape[0])
    else:
        if w is None or w.dim() != 1:
            return f"custom norm {type(m).__name__}: no 1-D weight"
        extra = [k for k, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
                 if k != "weight"]
        if extra:
            return f"custom norm {type(m).__name__}: it holds {', '.join(extra)} besides its weight"
        b, n = None, int(w.numel())
    for p in (w, b):
        if p is not None and not arith.is_finite(p):
            return "non-finite affine parameters"
    s = arith.f64(w.detach()).reshape(-1) if w is not None else torch.ones(n, dtype=torch.float64)
    t = arith.f64(b.detach()).reshape(-1) if b is not None else torch.zeros(n, dtype=torch.float64)
    if bool((s == 1).all()) and bool((t == 0).all()):
        return "its affine is already the identity: nothing to fold"
    return w, b, n, s, t


def _aten_calls(g: _Graph, m: nn.Module, w, b, n: int):
    """The ``aten.layer_norm`` / ``aten.rms_norm`` calls of an nn norm module, or a reason."""
    from .program import _bn_output

    own = {id(g.ph_of.get(id(p))) for p in (w, b) if p is not None and id(p) in g.ph_of}
    if not own:
        return "its weight is not a placeholder of the exported program"
    calls = []
    for node in g.graph.nodes:
        sig = op_signature(node.target) if node.op == "call_function" else None
        if sig is None or sig.kind not in ("ln", "rms"):
            continue
        roles = bind(sig, node.args, node.kwargs)
        mine = [roles.get(k) for k in ("weight", "bias") if isinstance(roles.get(k), fx.Node)]
        if not any(id(x) in own for x in mine):
            continue
        for k, p in (("weight", w), ("bias", b)):
            ph = g.ph_of.get(id(p)) if p is not None else None
            if roles.get(k) is not ph:
                return f"a call of it in the exported graph does not use its own {k} ({g.describe(node)})"
        shape = _arg(node, "normalized_shape")
        if not isinstance(shape, (list, tuple)) or [int(x) for x in shape] != [n]:
            return f"it normalises over {shape} in the exported graph, not the last dim ({n})"
        out = _bn_output(node)
        if isinstance(out, str) or out is None:
            return out or "its normalised output is unused"
        calls.append(_Call(out, [node] + [u for u in node.users]))
    return calls


def _through_casts(node: Any, nodes: set, used: list) -> Any:
    while isinstance(node, fx.Node) and _schema(node) in _CASTS and id(node) in nodes:
        used.append(node)
        node = node.args[0]
    return node


def _rms_call(g: _Graph, out: fx.Node, wph: fx.Node, n: int, group: set):
    """Prove that ``out`` is ``weight * cast(cast(x) * rsqrt(mean(cast(x)^2, -1, keepdim) + eps))``
    (any order of the multiplications' operands); returns the matched nodes or a reason."""
    bad = "its forward is not x * rsqrt(mean(x^2, -1) + eps) * weight"
    used = [out]
    if _schema(out) != "aten::mul" or len(out.args) != 2:
        return bad
    a, b = out.args
    z = b if a is wph else a if b is wph else None
    if z is None:
        return bad
    y = _through_casts(z, group, used)
    if _schema(y) != "aten::mul" or id(y) not in group or len(y.args) != 2:
        return bad
    used.append(y)
    r = x1 = None
    for p, q in (y.args, y.args[::-1]):
        if _schema(q) == "aten::rsqrt" and id(q) in group:
            r, x1 = q, p
            break
    if r is None:
        return bad
    used.append(r)
    e = r.args[0]
    if _schema(e) != "aten::add" or id(e) not in group or not isinstance(e.args[1], (int, float)) \
            or not e.args[1] > 0 or _arg(e, "alpha", 1) != 1:
        return bad
    used.append(e)
    mean = e.args[0]
    if _schema(mean) != "aten::mean" or id(mean) not in group:
        return bad
    dims = _arg(mean, "dim")
    sq = mean.args[0]
    rank = _val(sq).dim() if _val(sq) is not None else None
    if not _arg(mean, "keepdim", False) or not isinstance(dims, (list, tuple)) or len(dims) != 1 \
            or rank is None or int(dims[0]) % rank != rank - 1:
        return f"{bad} (its mean is not over the last dim)"
    used.append(mean)
    if _schema(sq) == "aten::pow" and sq.args[1] == 2:
        x2 = sq.args[0]
    elif _schema(sq) == "aten::mul" and len(sq.args) == 2 and sq.args[0] is sq.args[1]:
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
    v = _val(root1)
    if v is None or v.dim() < 1 or int(v.shape[-1]) != n:
        return f"{bad} (its input's last dim is not {n})"
    for node in used[1:]:  # the intermediate values are used only inside the pattern (a copy of
        # the input, e.g. HF's ``x.to(float32)``, which the tracer reuses for later reads of x, may be)
        if _schema(node) in _CASTS:
            continue
        if any(id(u) not in group and not _is_assert(u) for u in node.users):
            return f"an intermediate value of it is used outside it ({g.describe(node)})"
    return used


def _custom_calls(g: _Graph, m: nn.Module, w, n: int, names: list[str]):
    wph = g.ph_of.get(id(w))
    if wph is None:
        return "its weight is not a placeholder of the exported program"
    nodes = g.nodes_of([x for x in names if x])
    group = {id(x) for x in nodes}
    outs = [x for x in nodes if not _is_assert(x) and _schema(x) not in _CASTS
            and any(id(u) not in group for u in x.users)]
    if not outs:
        return "it is not called in the exported graph"
    calls, covered = [], set()
    for out in outs:
        used = _rms_call(g, out, wph, n, group)
        if isinstance(used, str):
            return f"custom norm {type(m).__name__}: {used}"
        covered.update(id(x) for x in used)
        calls.append(_Call(out, used))
    rest = [x for x in nodes if id(x) not in covered and not _is_assert(x) and not _is_identity(x)
            and not _dead(x)]
    if rest:
        return (f"custom norm {type(m).__name__}: its forward computes more than an RMSNorm "
                f"({', '.join(g.describe(x) for x in rest[:3])})")
    return calls


def _dead(node: fx.Node) -> bool:
    """A functional op whose result nothing reads (e.g. a slice taken only for its shape)."""
    s = getattr(node.target, "_schema", None)
    return node.op == "call_function" and not node.users and s is not None and not s.is_mutable


def _readers(node: fx.Node):
    """(user, the node it reads) for the value of ``node``, through identity ops, without asserts
    and unread functional results."""
    for u in node.users:
        if _is_assert(u) or _dead(u):
            continue
        if _is_identity(u):
            yield from _readers(u)
        else:
            yield u, node


def _consumer(g: _Graph, u: fx.Node, via: fx.Node, n: int, ctx):
    """(module, op node) of a Linear / Conv1D reading ``via`` as its input, or a reason."""
    name = _schema(u)
    if name == "aten::linear":
        if _arg(u, "input") is not via or _arg(u, "weight") is via or _arg(u, "bias") is via:
            return f"its output feeds {g.describe(u)} in a non-input position"
        wn, bn = _arg(u, "weight"), _arg(u, "bias")
        mod = _owner(g, wn, ctx, u)
        if isinstance(mod, str):
            return mod
        if type(mod) is not nn.Linear:
            return f"its output feeds '{ctx.name_of(mod)}' ({type(mod).__name__}), not a Linear"
        bias = g.tensor_of.get(bn.name) if isinstance(bn, fx.Node) else None
        if bias is not mod.bias:
            return f"'{ctx.name_of(mod)}' is called with another bias than its own"
        return mod, u
    if name in _VIEWS:
        vi, vo = _val(via), _val(u)
        users = [x for x in u.users if not _is_assert(x)]
        if vi is None or vo is None or vo.dim() != 2 or int(vo.shape[-1]) != n or int(vi.shape[-1]) != n \
                or len(users) != 1:
            return f"its output feeds {g.describe(u)}, not a Linear"
        mm = users[0]
        mname = _schema(mm)
        if mname == "aten::addmm":
            if _arg(mm, "mat1") is not u or _arg(mm, "beta", 1) != 1 or _arg(mm, "alpha", 1) != 1:
                return f"its output feeds {g.describe(mm)}, not a Linear"
            wn, bn = _arg(mm, "mat2"), _arg(mm, "self")
        elif mname == "aten::mm":
            if _arg(mm, "self") is not u:
                return f"its output feeds {g.describe(mm)}, not a Linear"
            wn, bn = _arg(mm, "mat2"), None
        else:
            return f"its output feeds {g.describe(mm)}, not a Linear"
        mod = _owner(g, wn, ctx, mm)
        if isinstance(mod, str):
            return mod
        if not is_conv1d(mod):
            return f"its output feeds '{ctx.name_of(mod)}' ({type(mod).__name__}), not a Linear / Conv1D"
        if (g.tensor_of.get(bn.name) if isinstance(bn, fx.Node) else None) is not mod.bias:
            return f"'{ctx.name_of(mod)}' is called with another bias than its own"
        return mod, mm
    what = g.describe(u)
    if name in ("aten::add", "aten::sub", "aten::add_", "aten::sub_"):
        return (f"its output also feeds a residual/skip path ({what}): folding its affine into the "
                f"Linear(s) would change that use")
    return f"its output feeds {what}, not a Linear"


def _owner(g: _Graph, wn: Any, ctx, op: fx.Node | None = None):
    """The eager module whose weight is the placeholder ``wn``, or a reason."""
    if not isinstance(wn, fx.Node) or wn.op != "placeholder" or wn.name not in g.param_ph:
        return f"a consumer's weight is {g.describe(wn)}, not a parameter"
    t = g.tensor_of.get(wn.name)
    owners = ctx.param_owners.get(id(t), []) if t is not None else []
    mods = [ctx.modules_by_id[o] for o in owners if getattr(ctx.modules_by_id[o], "weight", None) is t]
    if not mods:
        return f"a consumer's weight ({g.describe(wn)}) is not a module's weight"
    path = g.module_path(op) if op is not None else ""
    for mod in mods:  # tied weights: the module that made the call (nn_module_stack)
        if path in ctx.names.get(id(mod), []):
            return mod
    return mods[0]


def _layer_problem(layer: nn.Module, ops: list, g: _Graph, ctx, n: int) -> str | None:
    """Whether the weights of a consumer layer may be rewritten for this norm alone."""
    name = ctx.name_of(layer)
    if weight_reparam(layer) is not None or getattr(layer, "parametrizations", None) is not None:
        return f"'{name}' has a reparametrised weight, not a plain parameter"
    if layer._forward_hooks or layer._forward_pre_hooks or getattr(layer, "_backward_hooks", None):
        return f"'{name}' has hooks registered, its weights may not be what runs"
    fan_in = layer.in_features if isinstance(layer, nn.Linear) else int(layer.weight.shape[0])
    if fan_in != n:
        return f"channel mismatch: {n} vs in_features {fan_in} of '{name}'"
    for pn in ("weight", "bias"):
        p = getattr(layer, pn, None)
        if p is None:
            continue
        if type(p) is not nn.Parameter or not p.is_floating_point():
            return f"'{name}' weights are not plain floating-point parameters"
        owners = ctx.param_owners.get(id(p), [])
        if len(owners) > 1:
            others = [ctx.name_of(ctx.modules_by_id[o]) for o in owners if o != id(layer)]
            return f"'{name}' shares (ties) its parameters with {', '.join(repr(o) for o in others)}"
        ph = g.ph_of.get(id(p))
        if ph is None:
            return f"the {pn} of '{name}' is not a placeholder of the exported program"
        other = [u for u in ph.users if u not in ops and not _is_assert(u)]
        if other:
            u = other[0]
            if g.module_path(u) in ctx.names.get(id(layer), []):
                return (f"'{name}' is also called on another input ({g.describe(u)} reads another "
                        f"value): one folded weight cannot serve both")
            return f"the {pn} of '{name}' is shared (tied) with {g.describe(u)}: changing it would change that use"
    runtime = ctx.runtime_calls
    if runtime is not None and runtime.get(id(layer), 0) != len(ops):
        return (f"'{name}' ran {runtime.get(id(layer), 0)} times on the example inputs but the exported "
                f"graph shows {len(ops)} calls reading the norm")
    return None


def _norm_problem(site, ctx) -> str | None:
    m = site.module
    if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None):
        return "the norm has hooks registered"
    if ctx.model.training:
        return "the model is in training mode (pass eval=True / --eval to fold its eval-mode behaviour)"
    if m.training:
        return "the norm is in training mode (pass eval=True / --eval)"
    for pname in ("weight", "bias"):
        p = getattr(m, pname, None)
        owners = ctx.param_owners.get(id(p), []) if isinstance(p, torch.Tensor) else []
        others = [ctx.name_of(ctx.modules_by_id[o]) for o in owners if o != id(m)]
        if others:
            return (f"its {pname} is shared (tied) with {', '.join(repr(o) for o in others)}: resetting it "
                    f"to the identity would change that module")
    return None


def _prove(site, ctx):
    """A :class:`~normswap.fold.core.Match` or the reason read from the export graph."""
    from .core import Match

    r = _norm_problem(site, ctx)
    if r:
        return r
    m = site.module
    params = _norm_params(m, site.kind)
    if isinstance(params, str):
        return params
    w, b, n, s, t = params
    g = _export(ctx)
    if isinstance(g, str):
        return g
    names = ctx.names.get(id(m), [site.name])
    calls = _custom_calls(g, m, w, n, names) if site.kind == "custom" else _aten_calls(g, m, w, b, n)
    if isinstance(calls, str):
        return calls
    if not calls:
        return "it is not called in the exported graph"
    runtime = ctx.runtime_calls
    if runtime is not None and runtime.get(id(m), 0) != len(calls):
        return (f"it ran {runtime.get(id(m), 0)} times on the example inputs but the exported graph "
                f"shows {len(calls)} calls")
    for p in (w, b):  # the norm's own parameters are read by its calls only
        ph = g.ph_of.get(id(p)) if p is not None else None
        if ph is None:
            continue
        mine = {id(x) for c in calls for x in c.nodes}
        other = [u for u in ph.users if id(u) not in mine and not _is_assert(u)]
        if other:
            return f"its parameters are also read by {g.describe(other[0])}"
    layers: list[nn.Module] = []
    ops: dict[int, list] = {}
    for c in calls:
        readers = list(_readers(c.out))
        if not readers:
            return "its output is unused"
        for u, via in readers:
            got = _consumer(g, u, via, n, ctx)
            if isinstance(got, str):
                return got
            mod, op = got
            if all(x is not mod for x in layers):
                layers.append(mod)
            ops.setdefault(id(mod), []).append(op)
    for layer in layers:
        r = _layer_problem(layer, ops[id(layer)], g, ctx, n)
        if r:
            return r
    return Match([ctx.name_of(x) for x in layers], PATTERN,
                 {"consumers": layers, "graph": "torch.export", "s": s, "t": t})


# --------------------------------------------------------------------------- entry points


def _proof(site, ctx):
    proofs = ctx.cache.setdefault("export_proofs", {})
    key = id(site.module)
    if key not in proofs:
        proofs[key] = _prove(site, ctx)
    return proofs[key]


def export_match(site, ctx):
    """The rule's hook: a Match proven on the export graph; for a norm FX sees whose output
    crosses into untraceable code, the export graph's reason; else None (the FX path decides,
    and :func:`refine` gives its reason)."""
    from .core import Match

    if not wants_export(site, ctx) or ctx.example_inputs is None:
        return None
    p = _proof(site, ctx)
    if isinstance(p, Match):
        return p
    if site.calls and site.kind != "custom" and not p.startswith("torch.export"):
        # an FX call at a graph boundary: the export graph's reason says more than "feeds <leaf>"
        return f"{p} (proven on the torch.export graph of the example inputs)"
    return None


def refine(site, ctx, reason: str) -> str:
    """``norm_problem``'s reason for a site FX cannot prove (untraceable region / custom
    forward): with example inputs, what the export graph showed; without, a hint to pass them."""
    from .core import Match

    if not wants_export(site, ctx):
        return reason
    if ctx.example_inputs is None:
        return f"{reason} ({HINT})"
    p = _proof(site, ctx)
    if isinstance(p, Match):
        return reason
    if p.startswith("torch.export"):
        return f"{reason}; {p}"
    if site.kind == "custom" and not p.startswith("custom norm"):
        p = f"custom norm {type(site.module).__name__}: {p}"
    return f"{p} (proven on the torch.export graph of the example inputs)"


def apply_match(site, ctx, m) -> None:
    """Fold the norm's affine into every consumer (Linear or HF Conv1D) and reset it to identity."""
    from .core import set_params

    s, t = m.data["s"], m.data["t"]
    no_shift = bool((t == 0).all())
    for layer in m.data["consumers"]:
        if isinstance(layer, nn.Linear):
            w2, b2 = arith.fold_affine_before_linear(layer.weight, layer.bias, s, t)
            if no_shift and layer.bias is None:  # an RMSNorm: no bias appears (state dict keys kept)
                with torch.no_grad():
                    layer.weight.copy_(arith.cast_like(w2, layer.weight))
            else:
                set_params(layer, w2, b2)
            continue
        # Conv1D: y = x @ W + b with W (in, out): a Linear with weight W.T
        W = layer.weight
        w2, b2 = arith.fold_affine_before_linear(W.detach().t(), layer.bias, s, t)
        with torch.no_grad():
            W.copy_(arith.cast_like(w2.t(), W))
            if layer.bias is None and no_shift:
                pass
            elif layer.bias is None:
                layer.bias = nn.Parameter(arith.cast_like(b2, W), requires_grad=W.requires_grad)
            else:
                layer.bias.copy_(arith.cast_like(b2, layer.bias))
    mod = site.module
    with torch.no_grad():
        if getattr(mod, "weight", None) is not None:
            mod.weight.fill_(1)
        if isinstance(getattr(mod, "bias", None), torch.Tensor):
            mod.bias.zero_()

