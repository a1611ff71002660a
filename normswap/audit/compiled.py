"""What the TorchScript and torch.export front-ends share: class-name lookup, spectral / weight
norm sites found from parameter names, and the fold verdicts of a compiled graph, asked of the
one fold policy (:func:`normswap.fold.policy.compiled_decision`) with the facts the graph shows."""

from __future__ import annotations

import re

from normswap.fold.policy import COMPILED_NOTE, GraphFacts, compiled_decision
from normswap.norms import NORMS

from .report import AuditReport, Site

__all__ = ["class_kinds", "qual_type_kind", "reparam_sites_from_names", "finish_compiled", "describe"]

def _types() -> dict[type, str]:
    """Exact type -> kind over the registry (read each time: kinds may be registered later)."""
    return {t: k for k, nk in NORMS.items() for t in nk.types}


def class_kinds() -> dict[str, str]:
    """class name -> kind for the registry's exact types (for TorchScript original_name)."""
    return {t.__name__: k for t, k in _types().items()}


def qual_type_kind(type_str: str) -> str | None:
    """'torch.nn.modules.batchnorm.BatchNorm2d' -> 'bn'.  Exact qualified names of registry
    types first; otherwise the class is looked up among already-imported modules (never
    imported) and classified by type (a subclass -> 'unsupported_subclass')."""
    import sys

    from normswap.norms import classify_type  # noqa: PLC0415

    for t, k in _types().items():
        if f"{t.__module__}.{t.__qualname__}" == type_str:
            return k
    mod_name, _, cls_name = type_str.rpartition(".")
    mod = sys.modules.get(mod_name)
    cls = getattr(mod, cls_name, None) if mod is not None else None
    if isinstance(cls, type):
        return classify_type(cls)
    return None


def reparam_sites_from_names(names) -> list[Site]:
    """Spectral / weight norm sites of a TorchScript module or torch.export program, found from
    its parameter and buffer names (their graphs recompute the weight with plain ops)."""
    names = list(names)
    have = set(names)
    found: list[Site] = []
    for n in names:
        site = None
        if n.endswith("_orig") and f"{n[:-5]}_u" in have:  # legacy hook: weight_orig / weight_u / weight_v
            site, kind, api = n[:-5], "spectral", "hook"
        elif n.endswith("_g") and f"{n[:-2]}_v" in have:  # legacy hook: weight_g / weight_v
            site, kind, api = n[:-2], "weight_norm", "hook"
        elif ".parametrizations." in n and n.endswith(".original"):
            base = n[: -len(".original")]
            if any(h.startswith(base + ".") and h.endswith("._u") for h in have):
                owner, _, p = base.rpartition(".parametrizations.")
                site, kind, api = f"{owner}.{p}", "spectral", "parametrization"
        elif ".parametrizations." in n and n.endswith(".original0") and n[:-1] + "1" in have:
            owner, _, p = n[: -len(".original0")].rpartition(".parametrizations.")
            site, kind, api = f"{owner}.{p}", "weight_norm", "parametrization"
        if site is None:
            continue
        s = Site(name=site, kind=kind, module_type=f"({api}, from parameter names)")
        s.region = site.rsplit(".", 1)[0] if "." in site else ""
        s.graph = False
        s.running_stats = kind == "spectral"
        s.onnx_ops = list(NORMS[kind].onnx_ops)
        s.notes.append(f"{kind} found from the names of the parameters; the graph recomputes the weight")
        found.append(s)
    return found


def describe(name: str | None, type_name: str | None) -> str:
    """A node described as the eager fold rules describe FX nodes."""
    if name == "output":
        return "the graph output"
    if name is None:
        return "an input of the model"
    return f"'{name}' ({type_name})" if type_name else f"'{name}' (call_function)"


def _dims(type_name: str | None) -> int | None:
    m = re.search(r"([123])d", type_name or "")
    return int(m.group(1)) if m else None


def site_facts(s: Site, extra: dict) -> GraphFacts:
    """The :class:`GraphFacts` of a compiled-graph site (``extra``: what the reader saw besides
    the site record: node descriptions, the model's mode)."""
    p = s.producer or {}
    pname = p.get("name")
    users = extra.get("producer_users") or []
    return GraphFacts(
        name=s.name, kind=s.kind, type_name=s.module_type, functional=s.functional,
        training=s.mode == "train", model_training=extra.get("model_training"),
        running_stats=s.running_stats, nonfinite="nonfinite" in s.flags,
        graph=s.graph and bool(p), calls=s.calls, producer_op=p.get("op"), producer_name=pname,
        producer=extra.get("producer_desc") or (describe(pname, p.get("type")) if p else None),
        producer_users=users if p.get("other_users") else [],
        producer_calls=p.get("producer_calls", 1), producer_dims=_dims(p.get("type")),
        consumers=list(extra.get("consumers") or []), consumer_ops=list(extra.get("consumer_ops") or []),
        input_ranks={len(sh) for sh in s.input_shapes})


def finish_compiled(rep: AuditReport, sites: list, extras: dict | None = None) -> AuditReport:
    """Fold verdicts for the sites of a compiled graph (TorchScript / torch.export)."""
    extras = extras or {}
    for s in sites:
        if s.module_type.endswith("from parameter names)"):
            s.reason, s.foldable, s.fold_into = (
                f"{s.kind} inside a compiled graph: bake it in the eager model (--bake-spectral-norm)"
                if NORMS[s.kind].mode_sensitive else f"{s.kind} inside a compiled graph: not baked", False, None)
            continue
        into, _pattern, reason = compiled_decision(site_facts(s, extras.get(s.name, {})))
        s.reason, s.foldable, s.fold_into = reason, reason is None, into
        s.notes.append(COMPILED_NOTE)
    _later_rounds(sites, extras)
    rep.sites = sites
    rep.regions = [{"path": "", "traced": True, "error": None, "untraceable_leaves": []}]
    return rep


def _later_rounds(sites: list, extras: dict) -> None:
    """What the eager planner's later rounds fold: a norm whose input is another norm that folds
    into a layer (and feeds only this norm) folds into that same layer once the first one is gone
    (``conv -> PowerNorm -> BatchNorm``: both into ``conv``).  Repeated until nothing changes."""
    from dataclasses import replace

    by_name = {s.name: s for s in sites}
    facts = {s.name: site_facts(s, extras.get(s.name, {})) for s in sites
             if not s.module_type.endswith("from parameter names)")}
    changed = True
    while changed:
        changed = False
        for s in sites:
            f = facts.get(s.name)
            if f is None or s.foldable or f.functional or f.producer_name not in by_name:
                continue
            prev = by_name[f.producer_name]
            pf = facts.get(prev.name)
            if not prev.foldable or pf is None or not prev.fold_into or pf.producer_name != prev.fold_into:
                continue  # the input norm must itself fold into the layer before it
            if f.producer_users:
                continue  # the input norm's output also feeds something else
            f2 = replace(f, producer_op=pf.producer_op, producer_name=pf.producer_name, producer=pf.producer,
                         producer_users=[], producer_calls=pf.producer_calls, producer_dims=pf.producer_dims)
            into, _pattern, reason = compiled_decision(f2)
            if reason is None:
                s.reason, s.foldable, s.fold_into = None, True, into
                facts[s.name] = f2
                changed = True
