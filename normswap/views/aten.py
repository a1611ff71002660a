"""The ATen view of a ``torch.export`` program (a ``.pt2``): its norm sites and their neighbours
as the fold rules ask for them.

Sites: every norm op the op table knows (:mod:`normswap.norm_ops`: ``batch_norm`` and its
overloads, ``layer_norm``, ``rms_norm``, ``group_norm``, ``instance_norm``, ...), named from
``nn_module_stack`` (a module's qualified name; ``<module>.<node>`` for a functional call), one
site per module with all its calls; and norm modules lowered to primitive ops (frozen BN, PowerNorm,
custom RMSNorms, ...), found from ``nn_module_stack`` and refused.  Producers: ``conv1d/2d/3d``,
``convolution`` (incl. ``transposed=True``), ``conv_transpose*``, ``linear``, ``addmm`` / ``mm``
on a transposed weight.  Layers are the program's weight placeholders; the program applier
(:mod:`normswap.fold.apply_program`) rewrites them.  :mod:`normswap.views.aten_eager` is the same
view of a program exported from an eager model, whose folds go to the eager modules.

(About 400 lines: the ATen view answers every question of the protocol for a program.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from normswap import arith
from normswap.norms import NORMS
from normswap.reasons import Reason, reason

from .aten_graph import (CONV, CONVT, TRANSPOSE_VIEWS, ProgramState, get_arg, is_assert, is_dead,
                         is_identity, module_of, rank, schema, short_op)
from .aten_sites import lowered_sites, op_sites, qual_type_kind
from .base import GraphView, Layer, Match, NormSite, batched_ranks

__all__ = ["AtenView", "ProgLayer", "qual_type_kind"]


@dataclass
class ProgLayer:
    """A layer of a program: its op nodes and parameter placeholders."""

    nodes: list  # the conv / linear / addmm / mm nodes (one per call)
    op: str  # "conv" | "convt" | "linear" | "addmm" | "mm"
    weight: fx.Node
    bias: fx.Node | None
    views: list = field(default_factory=list)  # addmm / mm: the transposing views of the weight


class AtenView(GraphView):
    FRONT_END = "export"
    CAPABILITIES = frozenset({"aten"})
    FUNCTIONAL_AS_MODULE = True

    def __init__(self, ep, *, model=None, prefix: str = "", eval_requested: bool = False):
        self.ep = ep
        self.graph = ep.graph
        self.prefix = prefix
        self.state = ProgramState(ep, model, prefix)
        self.eval_requested = eval_requested
        #: id(out node of a folded norm) -> the norm's input (it acts as the identity)
        self.passthrough: dict[int, Any] = {}
        #: id(folded norm node) -> the node carrying its output (None: unused)
        self.removed_out: dict[int, Any] = {}
        self._sites: list[NormSite] | None = None

    # ------------------------------------------------------------------ descriptions
    def describe(self, node: Any) -> str:
        if not isinstance(node, fx.Node):
            return repr(node)
        if node.op == "output":
            return "the graph output"
        if node.op == "placeholder":
            key = self.state.target.get(node.name)
            return f"'{key}' (a parameter/buffer)" if key else f"the program input '{node.name}'"
        name, _ = module_of(node, self.prefix)
        op = short_op(node)
        return f"'{name}' ({op})" if name else f"{op} '{node.name}'"

    def input_of(self, node: Any) -> Any:
        """The node, or -- when it is the output of a norm folded in an earlier round -- that
        norm's input (a folded norm acts as the identity)."""
        while isinstance(node, fx.Node) and id(node) in self.passthrough:
            node = self.passthrough[id(node)]
        return node

    def users_of(self, node: fx.Node) -> list:
        """The node's users, looking through folded norms; asserts and unread results left out."""
        out: list = []
        for u in node.users:
            if is_assert(u) or is_dead(u):
                continue
            if id(u) in self.removed_out:
                o = self.removed_out[id(u)]
                more = self.users_of(o) if o is not None else []
                out.extend(x for x in more if x not in out)
            elif u not in out:
                out.append(u)
        return out

    # ------------------------------------------------------------------ sites
    def sites(self) -> list[NormSite]:
        if self._sites is None:
            self._sites = op_sites(self)
            self._sites += lowered_sites(self, {s.name for s in self._sites})
            from .script import reparam_sites_from_names

            known = {s.name for s in self._sites}
            for name, kind, api in reparam_sites_from_names(list(self.state.target.values())):
                if name not in known:
                    self._sites.append(NormSite(name, kind, None, [], facts={"reparam": api, "lowered": True}))
        return self._sites

    # ------------------------------------------------------------------ the norm
    @staticmethod
    def op_kind(site: NormSite) -> str:
        return site.facts.get("op_kind", site.kind)

    def kind_problem(self, site: NormSite) -> Reason | None:
        if site.facts.get("reparam"):
            what = ("bake it in the eager model (--bake-spectral-norm)" if NORMS[site.kind].mode_sensitive
                    else "not baked")
            return reason("compiled_reparam", kind=site.kind, what=what)
        if site.facts.get("lowered"):
            r = super().kind_problem(site)
            return r or reason("lowered", kind=site.kind, what="its ops are not a single norm op (fold the "
                                                               "eager model)")
        if self.op_kind(site) not in ("bn", "ln", "rms"):
            roles = site.calls[0]["roles"] if site.calls else {}
            stats = None if "training" not in roles else (roles.get("running_mean") is not None
                                                         and roles.get("training") is False)
            r = NORMS[site.kind].fold_refusal(None, type_name=site.type_name or site.kind, running_stats=stats)
            return r or reason("program_op_kind", kind=site.kind)
        return None

    def uses_problem(self, site: NormSite) -> Reason | None:
        for c in site.calls:
            r = c["roles"]
            bn = self.op_kind(site) == "bn"
            roles = ("running_mean", "running_var", "weight", "bias") if bn else ("weight", "bias")
            for role in roles:
                v = r.get(role)
                if v is None:
                    continue
                if not self.state.is_state(v):
                    return reason("role_not_state", role=role, what=self.describe(v))
                if self.state.tensor(v) is None:
                    return reason("role_missing", role=role)
            if bn and not isinstance(r.get("eps"), (int, float)):
                return reason("program_eps")
        return None

    def mode_problem(self, site: NormSite) -> Reason | None:
        if self.op_kind(site) != "bn":
            return None
        for c in site.calls:
            r = c["roles"]
            tr = r.get("training", False)
            if tr is True and r.get("running_mean") is not None:
                hint = ("eval=True cannot change an exported program's mode: export the model after model.eval()"
                        if self.eval_requested else "export the model after model.eval()")
                return reason("program_training", hint=hint)
            if not isinstance(tr, bool):
                return reason("training_computed")
        return None

    def eval_affine(self, site: NormSite):
        if site.facts.get("lowered") or self.op_kind(site) != "bn":
            return self.kind_problem(site) or reason("no_eval_affine", kind=site.kind)
        r = site.calls[0]["roles"]
        if r.get("running_mean") is None or r.get("running_var") is None:
            return reason("no_running_stats")
        t = self.state.tensor
        w = t(r["weight"]) if r.get("weight") is not None else None
        b = t(r["bias"]) if r.get("bias") is not None else None
        rm, rv = t(r["running_mean"]), t(r["running_var"])
        s, sh = arith.bn_affine(rm, rv, w, b, float(r["eps"]))
        if not arith.is_finite(rm, rv, w, b, s, sh):
            return reason("nonfinite_stats")
        return s, sh

    def channels(self, site: NormSite) -> int:
        return int(self.eval_affine(site)[0].numel())

    def unseen_problem(self, site: NormSite) -> Reason | None:
        for c in site.calls:
            if isinstance(c["out"], tuple):
                return reason(c["out"][0], **c["out"][1])
        return None

    def nonfinite_affine(self, site: NormSite) -> bool:
        r = site.calls[0]["roles"] if site.calls else {}
        return not arith.is_finite(*[self.state.tensor(r.get(k)) for k in ("weight", "bias")])

    def norm_affine(self, site: NormSite):
        if self.op_kind(site) not in ("ln", "rms") or site.facts.get("lowered"):
            return reason("lowered", kind=site.kind, what="only a LayerNorm / RMSNorm affine is folded "
                                                          "(fold the eager model)")
        c = site.calls[0]
        w, b = c["roles"].get("weight"), c["roles"].get("bias")
        if w is None and b is None:
            return reason("no_affine")
        shape = get_arg(c["node"], "normalized_shape")
        shape = tuple(shape) if isinstance(shape, (list, tuple)) else None
        if shape is None or len(shape) != 1:
            return reason("multi_dim_shape", shape=shape)
        n = int(shape[0])
        sv = arith.f64(self.state.tensor(w)) if w is not None else torch.ones(n, dtype=torch.float64)
        tv = arith.f64(self.state.tensor(b)) if b is not None else torch.zeros(n, dtype=torch.float64)
        if bool((sv == 1).all()) and bool((tv == 0).all()):
            return reason("identity_affine")
        return sv.reshape(-1), tv.reshape(-1)

    def ranks(self, site: NormSite) -> set | None:
        rk = {rank(self.input_of(c["roles"].get("input"))) for c in site.calls}
        return None if None in rk or not rk else rk

    def batched_ranks(self, site: NormSite) -> set | None:
        return None if site.functional is not None else batched_ranks(site.type_name)

    def describe_input(self, site: NormSite) -> str:
        return self.describe(self.input_of(site.calls[0]["roles"].get("input"))) if site.calls else "unknown"

    # ------------------------------------------------------------------ the producer
    def _producer_op(self, node: Any):
        """(ProgLayer for one call, family) of the op producing ``node``, or a reason."""
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        n = schema(node)
        name = module_of(node, self.prefix)[0] or node.name
        views: list = []
        if n in CONV or n in CONVT:
            transposed = n in CONVT or bool(get_arg(node, "transposed", False))
            w, b, op = get_arg(node, "weight"), get_arg(node, "bias"), "convt" if transposed else "conv"
        elif n == "aten::linear":
            w, b, op = get_arg(node, "weight"), get_arg(node, "bias"), "linear"
        elif n in ("aten::addmm", "aten::mm"):
            if n == "aten::addmm" and (get_arg(node, "beta", 1) != 1 or get_arg(node, "alpha", 1) != 1):
                return reason("addmm_scaled", layer=name)
            b = get_arg(node, "self") if n == "aten::addmm" else None
            mat2 = get_arg(node, "mat2")
            if not (isinstance(mat2, fx.Node) and schema(mat2) in TRANSPOSE_VIEWS and rank(mat2) == 2):
                return reason("weight_not_transposed", input=self.describe(node))
            views, w, op = [mat2], mat2.args[0], n.split("::")[1]
        else:
            return None
        if not self.state.is_param(w):
            what = self.describe(w) if isinstance(w, fx.Node) and w.op != "placeholder" else "not a parameter"
            return reason("layer_weight_not_param", param="weight", layer=name, what=what)
        if b is not None and not self.state.is_param(b):
            return reason("layer_weight_not_param", param="bias", layer=name, what=self.describe(b))
        return ProgLayer([node], op, w, b, views)

    def first_input_family(self, site: NormSite) -> str | None:
        if not site.calls:
            return None
        p = self._producer_op(self.input_of(site.calls[0]["roles"].get("input")))
        if isinstance(p, ProgLayer):
            return {"addmm": "linear", "mm": "linear"}.get(p.op, p.op)
        return "linear" if isinstance(p, str) else None  # a linear-like op that cannot be folded

    def producer(self, site: NormSite, families: tuple, what: str, extra_args_ok: bool = False):
        prod: ProgLayer | None = None
        for c in site.calls:
            x = self.input_of(c["roles"].get("input"))
            p = self._producer_op(x)
            if isinstance(p, str):
                return p
            fam = {"addmm": "linear", "mm": "linear"}.get(p.op, p.op) if p is not None else None
            if fam not in families:
                return reason("input_not_layer", input=self.describe(x), what=self.PRODUCER_WHAT)
            if prod is None:
                prod = p
            elif p.weight is not prod.weight or p.bias is not prod.bias or p.op != prod.op:
                return reason("different_producers", a=self._lname(prod), b=self._lname(p))
            else:
                prod.nodes.append(p.nodes[0])
                prod.views.extend(p.views)
        r = self._sole_user(site, prod)
        return r if r else self.prog_layer(prod)

    def _lname(self, p: ProgLayer) -> str:
        return module_of(p.nodes[0], self.prefix)[0] or p.nodes[0].name

    def _output_feeds_only(self, site: NormSite, prod: ProgLayer) -> Reason | None:
        """The layer's output (every call of it) feeds only this norm."""
        norm_nodes = {id(c["node"]) for c in site.calls}
        for node in prod.nodes:
            users = self.users_of(node)
            if len(users) != 1 or id(users[0]) not in norm_nodes:
                return reason("producer_users", layer=self._lname(prod),
                              users=f" ({', '.join(self.describe(u) for u in users)})")
        return None

    def _sole_user(self, site: NormSite, prod: ProgLayer) -> Reason | None:
        """The layer's output feeds only this norm, and its weight / bias only these calls."""
        r = self._output_feeds_only(site, prod)
        if r is not None:
            return r
        name = self._lname(prod)
        own = {id(n) for n in prod.nodes} | {id(v) for v in prod.views}
        for ph in (prod.weight, prod.bias):
            if ph is None:
                continue
            for u in ph.users:
                if id(u) in own or is_assert(u):
                    continue
                if module_of(u, self.prefix)[0] == name:
                    return reason("producer_call_sites", layer=name, detail=f" (one call feeds {self._feeds(u)})")
                if ph is prod.bias:
                    return reason("layer_bias_shared", layer=name, user=self.describe(u))
                return reason("layer_weight_shared", param="weight", layer=name, user=self.describe(u))
        return None

    def _feeds(self, node: fx.Node) -> str:
        for u in node.users:
            if schema(u) in TRANSPOSE_VIEWS:
                node = next(iter(u.users), node)
        us = list(node.users)
        return ", ".join(self.describe(u) for u in us) if us else "nothing"

    def prog_layer(self, p: ProgLayer) -> Layer | Reason:
        name = self._lname(p)
        w = self.state.tensor(p.weight)
        if w is None:
            return reason("layer_weight_not_state", layer=name)
        node = p.nodes[0]
        ranks = {rank(n) for n in p.nodes}
        ranks = None if None in ranks else ranks
        if p.op in ("conv", "convt"):
            groups = int(get_arg(node, "groups", 1))
            out = int(w.shape[1]) * groups if p.op == "convt" else int(w.shape[0])
            inc = int(w.shape[0]) if p.op == "convt" else int(w.shape[1]) * groups
            k = w.dim() - 2
            pad = get_arg(node, "padding", 0)
            pad = pad if isinstance(pad, str) else tuple(int(x) for x in (pad if isinstance(pad, (list, tuple)) else [pad] * k))
            dil = get_arg(node, "dilation", 1)
            dil = tuple(int(x) for x in (dil if isinstance(dil, (list, tuple)) else [dil] * k))
            return Layer(name, p.op, out, inc, k, groups, pad, "zeros", dil, tuple(w.shape[2:]), ranks, p, short_op(node))
        return Layer(name, "linear", int(w.shape[0]), int(w.shape[1]), None, 1, ranks=ranks, handle=p,
                     type_name=short_op(node))

    # ------------------------------------------------------------------ consumers
    def readers(self, node: fx.Node):
        """(user, the node it reads) for the value of ``node``, through identity ops."""
        for u in self.users_of(node):
            if is_identity(u):
                yield from self.readers(u)
            else:
                yield u, node

    def consumers(self, site: NormSite, families: tuple, what: str):
        layers: list[Layer] = []
        for c in site.calls:
            out = c["out"]
            readers = list(self.readers(out)) if isinstance(out, fx.Node) else []
            if not readers:
                return reason("output_unused")
            for u, via in readers:
                got = self._consumer(u, via, families, what)
                if isinstance(got, str):
                    return got
                same = next((x for x in layers if x.handle.weight is got.handle.weight), None)
                if same is None:
                    layers.append(got)
                else:
                    same.handle.nodes.extend(got.handle.nodes)
        for layer in layers:
            r = self._consumer_uses(layer)
            if r:
                return r
        return layers

    def _consumer(self, u: fx.Node, via: fx.Node, families: tuple, what: str):
        n = schema(u)
        fam = "linear" if n == "aten::linear" else ("conv" if n in CONV and not get_arg(u, "transposed", False)
                                                    else ("convt" if n in CONV or n in CONVT else None))
        if fam is None or fam not in families:
            if n in ("aten::add", "aten::sub", "aten::add_", "aten::sub_"):
                return reason("feeds_residual", user=self.describe(u))
            return reason("feeds_other", user=self.describe(u), what=what)
        if get_arg(u, "input") is not via or get_arg(u, "weight") is via or get_arg(u, "bias") is via:
            return reason("feeds_non_input", user=self.describe(u))
        p = ProgLayer([u], fam, get_arg(u, "weight"), get_arg(u, "bias"))
        name = self._lname(p)
        if not self.state.is_param(p.weight):
            return reason("layer_weight_not_param", param="weight", layer=name, what=self.describe(p.weight))
        if p.bias is not None and not self.state.is_param(p.bias):
            return reason("layer_weight_not_param", param="bias", layer=name, what=self.describe(p.bias))
        return self.prog_layer(p)

    def _consumer_uses(self, layer: Layer) -> Reason | None:
        p = layer.handle
        own = {id(n) for n in p.nodes}
        for pn, ph in (("weight", p.weight), ("bias", p.bias)):
            if ph is None:
                continue
            other = [u for u in ph.users if id(u) not in own and not is_assert(u)]
            if other:
                return reason("layer_weight_shared", param=pn, layer=layer.name,
                              user=", ".join(self.describe(x) for x in other))
        return None

    # ------------------------------------------------------------------ rounds
    def mark_removed(self, site: NormSite, match: Match, removes_norm: bool) -> None:
        if not removes_norm:
            return
        for c in site.calls:
            out = c["out"] if isinstance(c["out"], fx.Node) else None
            self.removed_out[id(c["node"])] = out
            if out is not None:
                self.passthrough[id(out)] = c["roles"].get("input")
