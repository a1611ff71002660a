"""The one planner: every site of any graph view decided by the one rule set, in rounds.

:func:`decide` asks the rules of :data:`normswap.fold.rules.RULES` that apply to a site, in
order; the first whose ``match`` succeeds folds it, otherwise the site is skipped with one reason
composed from the rules' reasons (:func:`skip_reason`).  A folded norm's call then acts as the
identity, which can make a neighbour foldable (``conv -> bn -> bn``): :func:`plan_view` decides
the sites still skipped again, without re-reading the graph, while the previous round folded
something (applying each round's matches first when asked to).

A site the FX view cannot prove (inside code FX cannot trace, a custom norm's forward, an FX
call whose output leaves the traced graph) is decided on the model's export view when example
inputs are given (:meth:`normswap.views.fx.FxView.fallback`): the same rules, on the ATen graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from normswap.norms import is_composite
from normswap.reasons import Reason, code_of, join, reason
from normswap.views.base import GraphView, Match, NormSite, family

from .report import FoldDecision
from .rules import RULES
from .rules.checks import norm_problem

__all__ = ["decide", "skip_reason", "plan_view", "Row"]


@dataclass
class Row:
    """One site's decision: the site, the decision, the rule that folds it and its match."""

    site: NormSite
    decision: FoldDecision
    rule: Any = None
    match: Match | None = None
    #: the view the match was found on (the site's own, or its export fallback)
    view: GraphView | None = None


def _kind(site: NormSite) -> str:
    return f"functional_{site.kind}" if site.functional is not None else site.kind


def decide(site: NormSite, view: GraphView) -> Row:
    """The rule set's decision on one site of one view (its export fallback first, where the
    view has one for the site)."""
    alt = view.fallback(site) if hasattr(view, "fallback") else None
    if alt is not None:
        alt_view, alt_site = alt
        if alt_view is None:  # no such site on the export graph (or no export graph): its reason
            proof = alt_site
        else:
            row = _decide(alt_site, alt_view)
            if row.match is not None:
                row.match.data["graph"] = "torch.export"
                return Row(site, FoldDecision(site.name, _kind(site), row.decision.into, row.decision.pattern),
                           row.rule, row.match, alt_view)
            proof = row.decision.reason
        boundary = view.fallback_reason(site, proof)
        if boundary is not None:
            return Row(site, FoldDecision(site.name, _kind(site), reason=boundary, code=code_of(boundary)), view=view)
    return _decide(site, view)


def _decide(site: NormSite, view: GraphView) -> Row:
    rules = [r for r in RULES if r.supported(view) and r.applies(site, view)]
    reasons: list[Reason] = []
    for rule in rules:
        m = rule.match(site, view)
        if isinstance(m, Match):
            return Row(site, FoldDecision(site.name, _kind(site), ", ".join(m.into), m.pattern), rule, m, view)
        if m not in reasons:
            reasons.append(m)
    r = skip_reason(site, view, rules, reasons)
    return Row(site, FoldDecision(site.name, _kind(site), reason=r, code=code_of(r)), view=view)


def skip_reason(site: NormSite, view: GraphView, rules: list, reasons: list) -> Reason:
    """One reason for a site no rule folds, from the rules' reasons."""
    if not rules:
        if site.functional is not None and site.kind != "bn":
            return reason("functional_kind", kind=site.kind)
        if site.functional is not None and not view.FUNCTIONAL_AS_MODULE:
            return view.functional_problem(site)
        r = norm_problem(site, view)
        if r:
            return r
        if site.functional is not None:
            return reason("input_not_layer", input=view.describe_input(site), what=view.PRODUCER_WHAT)
        return reason("no_rule", kind=site.kind)
    if site.functional is not None:
        return reasons[0]
    if is_composite(site.kind):
        return Reason(code_of(reasons[0]), reason("composite_inner", inner=reasons[0]))
    common = norm_problem(site, view)
    if common:
        return common
    if family(site.kind) == "bn_like" and not any(r.PRODUCER for r in rules):
        return Reason(code_of(reasons[-1]), reason("nothing_before", input=view.describe_input(site),
                                                   after=reasons[-1]))
    if len(reasons) > 1:
        return join(reasons[0], "; ".join(reasons[1:]))
    return reasons[0]


def plan_view(view: GraphView, sites: list[NormSite] | None = None, *, apply: bool = False) -> list[Row]:
    """Decide every site of ``view``; while a round folded something, apply its matches (when
    ``apply``), mark their norms as the identity and decide the sites still skipped again."""
    rows = [decide(site, view) for site in (view.sites() if sites is None else sites)]
    pending = list(range(len(rows)))
    while True:
        folded = [i for i in pending if rows[i].rule is not None]
        if not folded:
            break
        for i in folded:
            row = rows[i]
            if apply:
                row.rule.apply(row.site, row.view, row.match)
            removes = row.rule.REMOVES_NORM and not row.match.data.get("keeps_node")
            view.mark_removed(row.site, row.match, removes)
            if row.view is not view:
                row.view.mark_removed(row.site, row.match, removes)
        pending = [i for i in pending if rows[i].rule is None]
        for i in pending:
            rows[i] = decide(rows[i].site, view)
    return rows
