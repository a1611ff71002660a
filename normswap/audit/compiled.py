"""What the compiled front ends share: the fold verdicts of a site list, taken from the one
planner on the same graph view that ``fold`` / ``plan`` use, and the records of spectral /
weight norm sites found from parameter names."""

from __future__ import annotations

from normswap.norms import NORMS

from .report import AuditReport, Site

__all__ = ["apply_verdicts", "reparam_site", "finish_compiled"]


def apply_verdicts(sites: list, decisions, note: str | None = None, missing: str | None = None) -> None:
    """Each site's foldable / fold_into / reason from the planner's decisions (by site name)."""
    from normswap.reasons import reason

    by_name = {d.norm: d for d in decisions}
    for s in sites:
        d = by_name.get(s.name)
        if d is None:
            if missing is None:
                continue
            r = reason(missing)
            s.reason, s.reason_code, s.foldable, s.fold_into = str(r), r.code, False, None
            continue
        s.reason = None if d.reason is None else str(d.reason)
        s.reason_code = d.code
        s.foldable = d.reason is None
        s.fold_into = d.into
        if note and not s.module_type.endswith("from parameter names)"):
            s.notes.append(note)


def reparam_site(name: str, kind: str, api: str) -> Site:
    """The audit record of a spectral / weight norm found from parameter names."""
    s = Site(name=name, kind=kind, module_type=f"({api}, from parameter names)")
    s.region = name.rsplit(".", 1)[0] if "." in name else ""
    s.graph = False
    s.running_stats = kind == "spectral"
    s.onnx_ops = list(NORMS[kind].onnx_ops)
    s.notes.append(f"{kind} found from the names of the parameters; the graph recomputes the weight")
    return s


def finish_compiled(rep: AuditReport, sites: list, view, note: str | None = None) -> AuditReport:
    """The verdicts of the planner on ``view`` for the sites of a compiled graph."""
    from normswap.fold.planner import plan_view

    apply_verdicts(sites, [r.decision for r in plan_view(view)], note)
    rep.sites = sites
    rep.regions = [{"path": "", "traced": True, "error": None, "untraceable_leaves": []}]
    rep.fold_planner = "normswap.fold.plan"
    return rep
