"""The fold rule base class (like onnxscript's ``RewriteRuleClassBase``).

A rule is an object: ``NAME`` (its pattern name in the report), ``applies(site, view)`` (is the
planner to try the rule on this site), ``match(site, view) -> Match | Reason`` (called only where
it applies; a :class:`~normswap.reasons.Reason` from the catalogue says why it does not fold).
Rules decide on what a graph view says (:class:`normswap.views.GraphView`), never on one front
end's graph, so the same rule set decides sites of FX, ATen and TorchScript graphs.
:meth:`FoldRule.check`, :meth:`FoldRule.try_match` and :meth:`FoldRule.apply` are written once
here; ``apply`` hands the match to the view's applier (eager modules or an exported program).
``REMOVES_NORM``: after the fold the norm's call acts as the identity, so later planning rounds
look through it.
"""

from __future__ import annotations

from normswap.reasons import Reason, reason
from normswap.views.base import GraphView, Match, NormSite

__all__ = ["FoldRule"]


class FoldRule:
    NAME: str = ""
    #: the reason given when the rule is asked about a site it is not about ({kind}: site kind)
    NOT_APPLICABLE: str = "{kind}: not a site of this rule"
    #: the norm's call is the identity once the rule has been applied
    REMOVES_NORM: bool = True
    #: the rule folds the norm into the layer before it
    PRODUCER: bool = False
    #: view capabilities the rule needs (empty: any view)
    NEEDS: frozenset = frozenset()

    def supported(self, view: GraphView) -> bool:
        return self.NEEDS <= view.CAPABILITIES

    def applies(self, site: NormSite, view: GraphView) -> bool:
        """Is the planner to try this rule on the site?"""
        raise NotImplementedError

    def is_about(self, site: NormSite, view: GraphView) -> bool:
        """Can the rule be asked about the site at all (:meth:`check`)?  Default: :meth:`applies`."""
        return self.applies(site, view)

    def match(self, site: NormSite, view: GraphView) -> Match | Reason:
        """A :class:`Match`, or why the rule does not fold the site (only called where it applies)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- written once

    def try_match(self, site: NormSite, view: GraphView) -> Match | Reason:
        if not self.supported(view) or not self.is_about(site, view):
            return reason("not_applicable", text=self.NOT_APPLICABLE.format(kind=site.kind))
        return self.match(site, view)

    def check(self, site: NormSite, view: GraphView) -> Reason | None:
        """Why the rule does not fold the site; None: it does."""
        m = self.try_match(site, view)
        return None if isinstance(m, Match) else m

    def apply(self, site: NormSite, view: GraphView, m: Match) -> None:
        """Carry the match out with the view's applier (:mod:`normswap.fold.apply_eager` /
        :mod:`normswap.fold.apply_program`)."""
        view.applier.apply(site, m)

    def __repr__(self) -> str:
        return f"<fold rule {self.NAME}>"
