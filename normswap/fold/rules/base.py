"""The fold rule base class (like onnxscript's ``RewriteRuleClassBase``).

A rule is an object: ``NAME`` (its pattern name in the report), ``applies(site, ctx)`` (is
the rule about this kind of site at all), ``match(site, ctx) -> Match | reason`` (called
only where it applies) and ``apply(site, ctx, match)``.  :meth:`FoldRule.check` and
:meth:`FoldRule.try_match` are written once here.  ``REMOVES_NORM``: after ``apply`` the
norm's call acts as the identity (the norm became ``nn.Identity`` or its call was erased),
so later planning rounds look through it.
"""

from __future__ import annotations

from ..core import Ctx, Match, Site

__all__ = ["FoldRule"]


class FoldRule:
    NAME: str = ""
    #: the reason given when the rule is asked about a site it is not about ({kind}: site kind)
    NOT_APPLICABLE: str = "{kind}: not a site of this rule"
    #: the norm's call is the identity once the rule has been applied
    REMOVES_NORM: bool = True
    #: the rule folds the norm into the layer before it
    PRODUCER: bool = False

    def applies(self, site: Site, ctx: Ctx) -> bool:
        """Is the planner to try this rule on the site?"""
        raise NotImplementedError

    def is_about(self, site: Site, ctx: Ctx) -> bool:
        """Can the rule be asked about the site at all (:meth:`check`)?  Default: :meth:`applies`."""
        return self.applies(site, ctx)

    def match(self, site: Site, ctx: Ctx) -> Match | str:
        """A :class:`Match`, or why the rule does not fold the site (only called where it applies)."""
        raise NotImplementedError

    def apply(self, site: Site, ctx: Ctx, m: Match) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- written once

    def try_match(self, site: Site, ctx: Ctx) -> Match | str:
        if not self.is_about(site, ctx):
            return self.NOT_APPLICABLE.format(kind=site.kind)
        return self.match(site, ctx)

    def check(self, site: Site, ctx: Ctx) -> str | None:
        """Why the rule does not fold the site; None: it does."""
        m = self.try_match(site, ctx)
        return None if isinstance(m, Match) else m

    def removed_nodes(self, site: Site, m: Match) -> list:
        """The graph nodes that act as the identity once this match is applied."""
        if not self.REMOVES_NORM:
            return []
        if site.functional is not None:
            return [site.functional.node]
        return [ref.node for ref in site.calls]

    def __repr__(self) -> str:
        return f"<fold rule {self.NAME}>"
