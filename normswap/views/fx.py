"""The FX view of an eager model: its traced regions (:func:`normswap.graph.trace_regions`) indexed
once -- every module's call sites, every module's names (aliases), which modules own each
parameter, the tensors read directly by ``get_attr`` and (with example inputs) each module's
input ranks and real call counts.

A site is a norm module (all its call sites over all traced regions) or one functional norm call.
Layers are ``nn.Conv*`` / ``nn.ConvTranspose*`` / ``nn.Linear`` modules (exact types; timm's
'same'-padding convs when a probe proves them).  Norms folded in an earlier planning round act
as the identity (:meth:`FxView.input_of`, :meth:`FxView.users_of` look through them).  Sites FX
cannot prove (inside untraceable code, custom forwards) are planned on the eager-backed export
view instead (:meth:`FxView.fallback`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from normswap import arith
from normswap.graph import NodeRef, Region, functional_nodes, region_of
from normswap.norms import NORMS, iter_norms, post_op_children
from normswap.reasons import Reason, reason

from .base import GraphView, Layer, Match, NormSite, batched_ranks
from .fx_export import ExportFallback, wrap  # noqa: F401
from .fx_index import attr_uses, describe_node, hooked, module_problem, node_module, single_input
from .modules import _TYPES, CONV_TYPES, CONVT_TYPES, LINEAR_TYPES, layer_family, layer_of

__all__ = ["FxView", "build_view", "node_module", "describe_node", "CONV_TYPES", "CONVT_TYPES", "LINEAR_TYPES",
           "layer_of"]

def _types(families) -> tuple:
    return tuple(t for f in families for t in _TYPES[f])


@dataclass
class FxView(ExportFallback, GraphView):
    """The FX view of an eager model (built by :func:`build_view`)."""

    model: nn.Module
    regions: list[Region]
    #: id(module) -> its call sites over all traced regions
    calls: dict[int, list[NodeRef]]
    #: id(module) -> every name it has in the model (aliases)
    names: dict[int, list[str]]
    #: id(parameter) -> ids of the modules holding it
    param_owners: dict[int, list[int]]
    #: id(module) -> input ranks seen on the example inputs (None: no example inputs)
    ranks_by_id: dict[int, set[int]] | None
    allow_training: bool = False
    modules_by_id: dict[int, nn.Module] = field(default_factory=dict)
    #: id(tensor) -> qualified name, tensors read directly by a ``get_attr`` node
    attr_uses: dict[int, str] = field(default_factory=dict)
    #: paths of the regions whose forward could not be traced
    untraced_parents: set[str] = field(default_factory=set)
    #: id(module) -> how often it ran on the example inputs (None: no example inputs)
    runtime_calls: dict[int, int] | None = None
    affine_cache: dict[int, Any] = field(default_factory=dict)
    #: id(region) -> region whose graph was rewritten (a functional call removed)
    rewritten: dict[int, Region] = field(default_factory=dict)
    #: ids of the graph nodes of norms already folded away (they act as the identity)
    removed: set[int] = field(default_factory=set)
    example_inputs: tuple | None = None
    cache: dict = field(default_factory=dict)

    FRONT_END = "eager"
    CAPABILITIES = frozenset({"fx"})

    # ------------------------------------------------------------------ lookups
    def name_of(self, m: nn.Module) -> str:
        n = self.names.get(id(m))
        return n[0] if n else f"<{type(m).__name__}>"

    def calls_of(self, m: nn.Module) -> list[NodeRef]:
        return self.calls.get(id(m), [])

    def ranks_of(self, m: nn.Module) -> set[int] | None:
        if self.ranks_by_id is None:
            return None
        return self.ranks_by_id.get(id(m)) or None

    def input_of(self, node: fx.Node, extra_ok: bool = False) -> fx.Node | None:
        """The node's single input, looking through folded norms."""
        a = single_input(node, extra_ok)
        while a is not None and id(a) in self.removed:
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

    # ------------------------------------------------------------------ sites
    def sites(self) -> list[NormSite]:
        out = [NormSite(name, kind, mod, list(self.calls_of(mod)), type_name=type(mod).__name__)
               for name, mod, kind in iter_norms(self.model)]
        for name, ref, kind in functional_nodes(self.regions):
            out.append(NormSite(name, kind, None, [], functional=ref))
        return out

    def kind_problem(self, site: NormSite) -> Reason | None:
        k = NORMS.get(site.kind)
        return self.refine(site, reason("kind_not_foldable", kind=site.kind) if k is None else
                           k.fold_refusal(site.module))

    def hooks(self, site: NormSite) -> bool:
        return hooked(site.module)

    def uses_problem(self, site: NormSite) -> Reason | None:
        return self.direct_use_problem(site.module, "the norm", site.calls) if site.calls else None

    def mode_problem(self, site: NormSite) -> Reason | None:
        if self.allow_training:
            return None
        if self.model.training:
            return reason("model_training", hint="pass eval=True / --eval-mode")
        if site.module is not None and site.module.training:
            return reason("norm_training", hint="pass eval=True / --eval-mode")
        return None

    def eval_affine(self, site: NormSite):
        m = site.module
        if id(m) not in self.affine_cache:
            self.affine_cache[id(m)] = NORMS[site.kind].eval_affine(m)
        return self.affine_cache[id(m)]

    def norm_affine(self, site: NormSite):
        """(s, t) float64 of an affine-only norm's gamma/beta, or a reason."""
        m, k = site.module, NORMS[site.kind]
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if k.has_affine(m) is False or (w is None and b is None):
            return reason("no_affine")
        if k.layout == "token":
            shape = tuple(m.normalized_shape)
            if len(shape) != 1:
                return reason("multi_dim_shape", shape=shape)
            n = shape[0]
        else:  # per channel on dim 1: GroupNorm's num_channels, LayerNorm2d's normalized_shape (C,)
            n = getattr(m, "num_channels", None) or tuple(m.normalized_shape)[0]
        s = w.detach().double() if w is not None else torch.ones(n, dtype=torch.float64)
        t = b.detach().double() if b is not None else torch.zeros(n, dtype=torch.float64)
        if bool((s == 1).all()) and bool((t == 0).all()):
            return reason("identity_affine")
        return s.reshape(-1), t.reshape(-1)

    def affine_last_dim(self, site: NormSite) -> bool:
        return NORMS[site.kind].layout == "token"

    def nonfinite_affine(self, site: NormSite) -> bool:
        return nonfinite_affine(site)

    def channels(self, site: NormSite) -> int:
        c = getattr(site.module, "num_features", None)
        return c if c is not None else int(self.eval_affine(site)[0].numel())

    def unseen_problem(self, site: NormSite) -> Reason | None:
        return self.refine(site, self._unseen(site))

    def _unseen(self, site: NormSite) -> Reason | None:
        if site.calls:
            return None
        bad = [rg for rg in self.regions
               if rg.gm is None and (rg.path == "" or site.name.startswith(rg.path + "."))]
        if bad:
            rg = max(bad, key=lambda x: len(x.path))
            return reason("untraceable_region", region=rg.path or "<model>", error=f" ({rg.error})")
        reg = region_of(self.regions, site.name)
        if reg is not None and reg.gm is None:
            return reason("untraceable_region", region=reg.path, error="")
        return reason("not_called")

    def ranks(self, site: NormSite) -> set | None:
        return self.ranks_of(site.module) if site.module is not None else None

    def batched_ranks(self, site: NormSite) -> set | None:
        norm = site.module
        if norm is None:
            return None
        if isinstance(norm, nn.BatchNorm1d):
            return {2, 3}
        if isinstance(norm, nn.InstanceNorm1d):
            return {3}
        return batched_ranks(type(norm).__name__)

    def describe_input(self, site: NormSite) -> str:
        for ref in site.calls:
            if ref.node.args:
                return describe_node(ref.region, self.input_of(ref.node, True) or ref.node.args[0])
        return "unknown"

    def post_ops_problem(self, site: NormSite) -> Reason | None:
        kept = post_op_children(site.module, site.kind) if site.module is not None else []
        if kept:
            return reason("post_ops", what=", ".join(f"{n} ({type(m).__name__})" for n, m in kept))
        return None

    def tied_problem(self, site: NormSite) -> Reason | None:
        for pname in ("weight", "bias"):  # reset to the identity: no one else may hold them
            p = getattr(site.module, pname, None)
            owners = self.param_owners.get(id(p), []) if isinstance(p, torch.Tensor) else []
            others = [self.name_of(self.modules_by_id[o]) for o in owners if o != id(site.module)]
            if others:
                return reason("norm_tied", param=pname, others=", ".join(repr(o) for o in others))
        return None

    # ------------------------------------------------------------------ uses
    def direct_use_problem(self, m: nn.Module, what: str, calls=None) -> Reason | None:
        """Why the calls/tensors of ``m`` seen in the traced graphs may not be all of its uses."""
        uses = self.attr_uses
        for k, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is not None and id(t) in uses:
                return reason("direct_use", what=what, name=self.name_of(m), attr=k, use=uses[id(t)])
        runtime = self.runtime_calls
        if runtime is not None:
            refs = self.calls_of(m) if calls is None else calls
            expected = sum(runtime.get(id(ref.region.module), 0) for ref in refs)
            actual = runtime.get(id(m), 0)
            if actual > expected:
                return reason("untraced_calls", what=what, name=self.name_of(m), actual=actual, expected=expected)
            return None
        for name in self.names.get(id(m), []):
            if not name:
                continue
            for path in sorted(self.untraced_parents, key=len, reverse=True):
                if path == "" or name.startswith(path + "."):
                    return reason("untraced_reach", what=what, name=self.name_of(m), alias=name,
                                  region=path or "<model>")
        return None

    # ------------------------------------------------------------------ neighbours
    def layer(self, m: nn.Module) -> Layer:
        return layer_of(m, self.name_of(m), self.ranks_of(m))

    def first_input_family(self, site: NormSite) -> str | None:
        for ref in site.calls:
            if ref.node.args:
                m = node_module(ref.region, self.input_of(ref.node, True) or ref.node.args[0])
                return layer_family(m) if m is not None else None
        return None

    def producer(self, site: NormSite, families: tuple, what: str, extra_args_ok: bool = False):
        types = _types(families)
        prod: nn.Module | None = None
        for ref in site.calls:
            inp = self.input_of(ref.node, extra_args_ok)
            if inp is None:
                return reason("extra_args")
            pm = node_module(ref.region, inp) if inp.op == "call_module" else None
            if not isinstance(pm, types):  # exact type checked by layer_problem (precise reason)
                return reason("input_not_layer", input=describe_node(ref.region, inp), what=what)
            if prod is None:
                prod = pm
            elif pm is not prod:
                return reason("different_producers", a=self.name_of(prod), b=self.name_of(pm))
        assert prod is not None
        pname = self.name_of(prod)
        own_inputs = {id(self.input_of(r.node, extra_args_ok)) for r in site.calls}
        for pref in self.calls_of(prod):
            users = self.users_of(pref.node)
            if len(users) != 1:
                if id(pref.node) in own_inputs:
                    return reason("producer_users", layer=pname,
                                  users=f" ({', '.join(describe_node(pref.region, u) for u in users)})")
                return reason("producer_call_sites", layer=pname,
                              detail=f" (one call's output has {len(users)} users)")
            u = users[0]
            if node_module(pref.region, u) is not site.module or self.input_of(u, extra_args_ok) is not pref.node:
                return reason("producer_call_sites", layer=pname,
                              detail=f" (one call feeds {describe_node(pref.region, u)})")
        return self.layer(prod)

    def consumers(self, site: NormSite, families: tuple, what: str):
        types = _types(families)
        consumers: list[nn.Module] = []
        norm_nodes = {id(r.node) for r in site.calls}
        for ref in site.calls:
            users = self.users_of(ref.node)
            if not users:
                return reason("output_unused")
            for u in users:
                um = node_module(ref.region, u)
                if um is None or not isinstance(um, types):
                    return reason("feeds_other", user=describe_node(ref.region, u), what=what)
                if self.input_of(u) is not ref.node:
                    return reason("feeds_non_input", user=describe_node(ref.region, u))
                if all(c is not um for c in consumers):
                    consumers.append(um)
        for c in consumers:
            for cref in self.calls_of(c):
                inp = self.input_of(cref.node)
                if inp is None or id(inp) not in norm_nodes:
                    return reason("consumer_call_sites", layer=self.name_of(c),
                                  input=describe_node(cref.region, inp))
        return [self.layer(c) for c in consumers]

    def layer_problem(self, layer: Layer, families: tuple) -> Reason | None:
        return module_problem(self, layer.handle, _types(families))

    # ------------------------------------------------------------------ rounds
    def mark_removed(self, site: NormSite, match: Match, removes_norm: bool) -> None:
        if not removes_norm:
            return
        if site.functional is not None:
            self.removed.add(id(site.functional.node))
        else:
            self.removed.update(id(ref.node) for ref in site.calls)

def build_view(model: nn.Module, regions: list[Region], ranks=None, allow_training=False,
               example_inputs=None) -> FxView:
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
    return FxView(model, regions, calls, names, param_owners, ranks, allow_training,
                  modules_by_id={id(m): m for m in model.modules()}, attr_uses=attr_uses(regions),
                  untraced_parents={r.path for r in regions if r.gm is None},
                  runtime_calls=getattr(ranks, "calls", None), example_inputs=example_inputs)


def nonfinite_affine(site: NormSite) -> bool:
    m = site.module
    return any(isinstance(p, torch.Tensor) and not arith.is_finite(p)
               for p in (getattr(m, "weight", None), getattr(m, "bias", None)))


__all__ += ["module_problem", "nonfinite_affine", "layer_family"]
