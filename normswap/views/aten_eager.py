"""The export view of an *eager* model: the sites FX cannot prove (inside code FX cannot trace, a
custom norm's forward, an FX call whose output leaves the traced graph), planned on the ATen
graph of ``torch.export.export(model, example_inputs, strict=False)`` by the same rules, and
folded into the eager modules (:mod:`normswap.fold.apply_eager`).

Hugging Face models (``**kwargs`` forwards, control flow on shapes, dataclass outputs) and models
whose top-level forward FX cannot trace land here.  What the ATen graph must show, beyond what the
rules check: every placeholder maps back to an eager tensor (``graph_signature``), each norm /
layer module ran on the example inputs exactly as often as the graph calls it, its parameters
are read by those calls only, and a custom norm's ops are exactly an RMSNorm
(``weight * cast(cast(x) * rsqrt(mean(cast(x)^2, -1, keepdim) + eps))``; Gemma's ``(1 + w)`` and
anything else stay refused).
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import torch
from torch import fx, nn

from normswap import arith
from normswap.graph import short_error
from normswap.norm_ops import bind, op_signature
from normswap.norms import NORMS, weight_reparam
from normswap.reasons import Reason, reason

from .aten import AtenView, ProgLayer
from .aten_graph import VIEWS, bn_output, get_arg, is_assert, is_dead, is_identity, module_of, rms_call, schema, val
from .base import Layer, NormSite
from .modules import layer_family, layer_of

__all__ = ["EagerAtenView", "export_eager", "is_conv1d"]


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


@contextlib.contextmanager
def _quiet_export():
    """torch.export prints (and logs) the graph it could not finish: a failed attempt here is an
    ordinary outcome (its reason is reported), so its stderr and those loggers are quiet meanwhile."""
    names = ("torch._dynamo", "torch.export", "torch.fx.experimental.symbolic_shapes", "torch._export")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def export_eager(fx_view):
    """The :class:`EagerAtenView` of ``fx_view``'s model on its example inputs, or a reason."""
    with _quiet_export():
        return _export_eager(fx_view)


def _export_eager(fx_view):
    model, ex = fx_view.model, tuple(fx_view.example_inputs)
    try:
        return EagerAtenView(torch.export.export(model, ex, strict=False), fx_view, "")
    except Exception as e:  # noqa: BLE001
        r = reason("export_failed", error=short_error(e, 240))
        if "pytree" in str(e) or "not a known type" in str(e):
            try:
                return EagerAtenView(torch.export.export(_Flat(model), ex, strict=False), fx_view, "model.")
            except Exception as e2:  # noqa: BLE001
                r = reason("export_failed", error=short_error(e2, 240))
        return r


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None))


class EagerAtenView(AtenView):
    """The ATen view of an eager model's export; its layers and norms are the eager modules."""

    FRONT_END = "eager"
    FUNCTIONAL_AS_MODULE = False
    PRODUCER_WHAT = "Conv/ConvTranspose/Linear"

    def __init__(self, ep, fx_view, prefix: str):
        super().__init__(ep, model=fx_view.model, prefix=prefix)
        self.fx = fx_view
        self.applier = None
        self._by_module: dict[str, list] | None = None

    # ------------------------------------------------------------------ descriptions
    def describe(self, node: Any) -> str:
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return f"the input '{node.name}'"
        return super().describe(node)

    def nodes_of(self, paths) -> list:
        if self._by_module is None:
            self._by_module = {}
            for n in self.graph.nodes:
                if n.op == "call_function":
                    self._by_module.setdefault(module_of(n, self.prefix)[0], []).append(n)
        out: list = []
        for p in paths:
            out.extend(self._by_module.get(p, []))
        return out

    # ------------------------------------------------------------------ the site of an FX site
    def site_for(self, site: NormSite) -> NormSite | Reason:
        """This view's site for the FX view's ``site`` (the same module), or why it has none."""
        m, kind = site.module, site.kind
        new = NormSite(site.name, kind, m, [], type_name=site.type_name)
        if kind == "custom":
            calls = self._custom_calls(m, self.fx.names.get(id(m), [site.name]))
        elif kind in ("ln", "rms"):
            calls = self._op_calls(m, ("weight", "bias"), ("ln", "rms"))
        else:
            calls = self._op_calls(m, ("running_mean", "running_var", "weight", "bias"), ("bn",))
        if isinstance(calls, str):
            return calls
        if not calls:
            return reason("not_in_export")
        new.calls = calls
        return new

    def _op_calls(self, m: nn.Module, roles: tuple, kinds: tuple):
        """The calls of a norm module's own op (reading its own parameters / buffers), or a reason."""
        tensors = {r: getattr(m, r, None) for r in roles}
        own = {id(self.state.ph_of.get(id(t))) for t in tensors.values()
               if isinstance(t, torch.Tensor) and id(t) in self.state.ph_of}
        if not own:
            return reason("not_placeholder", what="weight")
        calls = []
        for node in self.graph.nodes:
            sig = op_signature(node.target) if node.op == "call_function" else None
            if sig is None or sig.kind not in kinds:
                continue
            got = bind(sig, node.args, node.kwargs)
            if not any(id(got.get(r)) in own for r in roles if isinstance(got.get(r), fx.Node)):
                continue
            for r, t in tensors.items():
                ph = self.state.ph_of.get(id(t)) if isinstance(t, torch.Tensor) else None
                if got.get(r) is not ph:
                    return reason("export_own_param", role=r, node=self.describe(node))
            if "ln" in kinds or "rms" in kinds:
                n = int(tuple(m.normalized_shape)[0]) if len(tuple(m.normalized_shape)) == 1 else None
                shape = get_arg(node, "normalized_shape")
                if not isinstance(shape, (list, tuple)) or [int(x) for x in shape] != [n]:
                    return reason("export_shape", shape=shape, n=n)
            out = bn_output(node)
            if out is None or isinstance(out, tuple):
                return reason("normalised_unused") if out is None else reason(out[0], **out[1])
            calls.append({"node": node, "roles": got, "out": out, "nodes": [node, *node.users]})
        return calls

    def _custom_calls(self, m: nn.Module, names: list):
        w = getattr(m, "weight", None)
        wph = self.state.ph_of.get(id(w)) if isinstance(w, torch.Tensor) else None
        if wph is None:
            return reason("not_placeholder", what="weight")
        n = int(w.numel())
        nodes = self.nodes_of([x for x in names if x])
        group = {id(x) for x in nodes}
        outs = [x for x in nodes if not is_assert(x) and schema(x) not in ("aten::to", "aten::_to_copy")
                and any(id(u) not in group for u in x.users)]
        if not outs:
            return reason("not_in_export")
        calls, covered = [], set()
        tname = type(m).__name__
        for out in outs:
            used = rms_call(out, wph, n, group, self.describe)
            if isinstance(used, str):
                return reason("custom_not_rms", type=tname, why=used)
            covered.update(id(x) for x in used)
            calls.append({"node": out, "roles": {"input": None, "weight": wph}, "out": out, "nodes": used})
        rest = [x for x in nodes if id(x) not in covered and not is_assert(x) and not is_identity(x)
                and not is_dead(x)]
        if rest:
            return reason("custom_more", type=tname, nodes=", ".join(self.describe(x) for x in rest[:3]))
        return calls

    # ------------------------------------------------------------------ the norm (an eager module)
    def kind_problem(self, site: NormSite) -> Reason | None:
        if site.kind == "custom":
            return None  # its forward was proven by site_for
        return NORMS[site.kind].fold_refusal(site.module)

    def hooks(self, site: NormSite) -> bool:
        return _hooked(site.module)

    def mode_problem(self, site: NormSite) -> Reason | None:
        return self.fx.mode_problem(site)

    def uses_problem(self, site: NormSite) -> Reason | None:
        m = site.module
        runtime = self.fx.runtime_calls
        if runtime is not None and runtime.get(id(m), 0) != len(site.calls):
            return reason("export_runtime_calls", actual=runtime.get(id(m), 0), calls=len(site.calls))
        mine = {id(x) for c in site.calls for x in c["nodes"]}
        for p in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            ph = self.state.ph_of.get(id(p))
            other = [u for u in (ph.users if ph is not None else []) if id(u) not in mine and not is_assert(u)]
            if other:
                return reason("export_params_read", node=self.describe(other[0]))
        return None

    def eval_affine(self, site: NormSite):
        return self.fx.eval_affine(site)

    def channels(self, site: NormSite) -> int:
        return self.fx.channels(site)

    def unseen_problem(self, site: NormSite) -> Reason | None:
        return None

    def nonfinite_affine(self, site: NormSite) -> bool:
        return any(isinstance(p, torch.Tensor) and not arith.is_finite(p)
                   for p in (getattr(site.module, "weight", None), getattr(site.module, "bias", None)))

    def norm_affine(self, site: NormSite):
        m = site.module
        if site.kind != "custom":
            return self.fx.norm_affine(site)
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 1:
            return reason("custom_not_rms", type=type(m).__name__, why="no 1-D weight")
        extra = [k for k, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
                 if k != "weight"]
        if extra:
            return reason("custom_not_rms", type=type(m).__name__, why=f"it holds {', '.join(extra)} besides its weight")
        s = arith.f64(w.detach()).reshape(-1)
        if bool((s == 1).all()):
            return reason("identity_affine")
        return s, torch.zeros_like(s)

    def affine_last_dim(self, site: NormSite) -> bool:
        return True

    def tied_problem(self, site: NormSite) -> Reason | None:
        return self.fx.tied_problem(site)

    def ranks(self, site: NormSite) -> set | None:
        return self.fx.ranks(site) if self.fx.ranks_by_id is not None else super().ranks(site)

    def batched_ranks(self, site: NormSite) -> set | None:
        return self.fx.batched_ranks(site)

    # ------------------------------------------------------------------ layers are eager modules
    def _owner(self, wn: Any, op: fx.Node | None = None):
        """The eager module whose weight is the placeholder ``wn``, or a reason."""
        if not self.state.is_param(wn):
            return reason("consumer_weight", what=self.describe(wn))
        t = self.state.tensor(wn)
        owners = self.fx.param_owners.get(id(t), []) if t is not None else []
        mods = [self.fx.modules_by_id[o] for o in owners if getattr(self.fx.modules_by_id[o], "weight", None) is t]
        if not mods:
            return reason("consumer_weight_owner", what=self.describe(wn))
        path = module_of(op, self.prefix)[0] if op is not None else ""
        for mod in mods:  # tied weights: the module that made the call (nn_module_stack)
            if path in self.fx.names.get(id(mod), []):
                return mod
        return mods[0]

    def _eager_layer(self, mod: nn.Module, p: ProgLayer) -> Layer:
        ranks = {len(val(n).shape) if val(n) is not None else None for n in p.nodes}
        layer = layer_of(mod, self.fx.name_of(mod), None if None in ranks else ranks) if layer_family(mod) else \
            Layer(self.fx.name_of(mod), "linear", int(mod.weight.shape[1]), int(mod.weight.shape[0]), handle=mod,
                  type_name=type(mod).__name__)
        layer.handle = mod
        layer.facts = {"ops": p.nodes}
        return layer

    def prog_layer(self, p: ProgLayer) -> Layer | Reason:
        mod = self._owner(p.weight, p.nodes[0])
        if isinstance(mod, str):
            return mod
        return self._eager_layer(mod, p)

    def _consumer(self, u: fx.Node, via: fx.Node, families: tuple, what: str):
        n = schema(u)
        if n == "aten::linear":
            if get_arg(u, "input") is not via or get_arg(u, "weight") is via or get_arg(u, "bias") is via:
                return reason("feeds_non_input", user=self.describe(u))
            wn, bn = get_arg(u, "weight"), get_arg(u, "bias")
            mod = self._owner(wn, u)
            if isinstance(mod, str):
                return mod
            if type(mod) is not nn.Linear:
                return reason("feeds_other", user=f"'{self.fx.name_of(mod)}' ({type(mod).__name__})", what="Linear")
            if (self.state.tensor(bn) if isinstance(bn, fx.Node) else None) is not mod.bias:
                return reason("layer_other_bias", layer=self.fx.name_of(mod))
            return self._eager_layer(mod, ProgLayer([u], "linear", wn, bn))
        if n in VIEWS:
            return self._conv1d_consumer(u, via)
        if n in ("aten::add", "aten::sub", "aten::add_", "aten::sub_"):
            return reason("feeds_residual", user=self.describe(u))
        return reason("feeds_other", user=self.describe(u), what="Linear")

    def _conv1d_consumer(self, u: fx.Node, via: fx.Node):
        vi, vo = val(via), val(u)
        users = [x for x in u.users if not is_assert(x)]
        n = int(vi.shape[-1]) if vi is not None and vi.dim() else None
        if vi is None or vo is None or vo.dim() != 2 or int(vo.shape[-1]) != n or len(users) != 1:
            return reason("feeds_other", user=self.describe(u), what="Linear")
        mm = users[0]
        if schema(mm) == "aten::addmm":
            if get_arg(mm, "mat1") is not u or get_arg(mm, "beta", 1) != 1 or get_arg(mm, "alpha", 1) != 1:
                return reason("feeds_other", user=self.describe(mm), what="Linear")
            wn, bn = get_arg(mm, "mat2"), get_arg(mm, "self")
        elif schema(mm) == "aten::mm" and get_arg(mm, "self") is u:
            wn, bn = get_arg(mm, "mat2"), None
        else:
            return reason("feeds_other", user=self.describe(mm), what="Linear")
        mod = self._owner(wn, mm)
        if isinstance(mod, str):
            return mod
        if not is_conv1d(mod):
            return reason("feeds_other", user=f"'{self.fx.name_of(mod)}' ({type(mod).__name__})",
                          what="Linear / Conv1D")
        if (self.state.tensor(bn) if isinstance(bn, fx.Node) else None) is not mod.bias:
            return reason("layer_other_bias", layer=self.fx.name_of(mod))
        return self._eager_layer(mod, ProgLayer([mm], "linear", wn, bn))

    def consumers(self, site: NormSite, families: tuple, what: str):
        layers: list[Layer] = []
        for c in site.calls:
            readers = list(self.readers(c["out"]))
            if not readers:
                return reason("output_unused")
            for u, via in readers:
                got = self._consumer(u, via, families, what)
                if isinstance(got, str):
                    return got
                same = next((x for x in layers if x.handle is got.handle), None)
                if same is None:
                    layers.append(got)
                else:
                    same.facts["ops"].extend(got.facts["ops"])
        return layers

    def layer_problem(self, layer: Layer, families: tuple) -> Reason | None:
        m, name = layer.handle, layer.name
        if layer_family(m) is not None and type(m) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                          nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear):
            return reason("layer_subclass", layer=name, type=type(m).__name__)
        if weight_reparam(m) is not None or getattr(m, "parametrizations", None) is not None:
            return reason("layer_reparam_short", layer=name)
        if _hooked(m):
            return reason("layer_hooks", layer=name)
        ops = layer.facts["ops"]
        for pn in ("weight", "bias"):
            p = getattr(m, pn, None)
            if p is None:
                continue
            if type(p) is not nn.Parameter or not p.is_floating_point():
                return reason("layer_not_plain", layer=name)
            owners = self.fx.param_owners.get(id(p), [])
            if len(owners) > 1:
                others = [self.fx.name_of(self.fx.modules_by_id[o]) for o in owners if o != id(m)]
                return reason("layer_tied", layer=name, others=", ".join(repr(o) for o in others))
            ph = self.state.ph_of.get(id(p))
            if ph is None:
                return reason("layer_not_placeholder", param=pn, layer=name)
            other = [u for u in ph.users if u not in ops and not is_assert(u)
                     and not (schema(u) in ("aten::t", "aten::permute", "aten::transpose")
                              and all(x in ops for x in u.users))]
            if other:
                u = other[0]
                if module_of(u, self.prefix)[0] in self.fx.names.get(id(m), []):
                    return reason("layer_other_input", layer=name, user=self.describe(u))
                return reason("layer_weight_shared", param=pn, layer=name, user=self.describe(u))
        runtime = self.fx.runtime_calls
        if runtime is not None and runtime.get(id(m), 0) != len(ops):
            return reason("layer_runtime_calls", layer=name, actual=runtime.get(id(m), 0), calls=len(ops))
        return None

    def _sole_user(self, site: NormSite, prod: ProgLayer) -> Reason | None:
        return self._output_feeds_only(site, prod)  # the weight's other uses: layer_problem
