"""What the FX view does with a site FX cannot prove: a LayerNorm / RMSNorm / custom norm inside code
FX cannot trace (or at an FX boundary, or with a custom forward), and a BN-like norm inside code
FX cannot trace, are planned on the eager model's export view (:mod:`normswap.views.aten_eager`)
when example inputs are given; their reasons say what that graph showed, or how to get it."""

from __future__ import annotations

from normswap.graph import qualname
from normswap.reasons import Reason, code_of, reason

from .base import NormSite, family

__all__ = ["ExportFallback", "wrap"]


def wrap(code: str, inner, **fields) -> Reason:
    """The catalogue text ``code`` around another reason, keeping that reason's code."""
    return Reason(code_of(inner), reason(code, **fields))


class ExportFallback:
    """The FX view's export-fallback methods (a mixin of :class:`~normswap.views.fx.FxView`)."""

    def wants_export(self, site: NormSite) -> bool:
        """FX cannot prove the site: a LayerNorm / RMSNorm / custom norm inside untraceable code,
        with a custom forward or at an FX boundary; a BN-like norm inside untraceable code."""
        if site.functional is not None or site.module is None:
            return False
        if site.kind in ("ln", "rms", "custom"):
            if site.kind == "custom":
                return True
            if not site.calls:
                return any(r.gm is None for r in self.regions)
            return self._fx_boundary(site)
        return family(site.kind) == "bn_like" and not site.calls and \
            any(rg.gm is None and (rg.path == "" or site.name.startswith(rg.path + ".")) for rg in self.regions)

    def _fx_boundary(self, site: NormSite) -> bool:
        """An FX call of the norm whose output leaves the traced graph into code FX could not
        trace: an untraceable leaf module, or the output of a region other than the model's."""
        for ref in site.calls:
            leaves = set(ref.region.untraceable_leaves)
            for u in self.users_of(ref.node):
                if u.op == "output" and ref.region.path != "":
                    return True
                if u.op == "call_module" and qualname(ref.region, str(u.target)) in leaves:
                    return True
        return False

    def export_view(self):
        """The eager-backed export view of the model on the example inputs (cached), or a reason."""
        if "export_view" not in self.cache:
            from .aten_eager import export_eager

            v = export_eager(self)
            if not isinstance(v, str) and self.applier is not None:
                v.applier = self.applier.for_export()
            self.cache["export_view"] = v
        return self.cache["export_view"]

    def fallback(self, site: NormSite):
        """(export view, its site) for a site FX cannot prove, given example inputs; (None, reason)
        when the export view has no such site; None when the site is FX's to decide."""
        if self.example_inputs is None or not self.wants_export(site):
            return None
        v = self.export_view()
        if isinstance(v, str):
            return None, v
        s2 = v.site_for(site)
        return (v, s2) if not isinstance(s2, str) else (None, s2)

    def fallback_reason(self, site: NormSite, proof) -> Reason | None:
        """The export graph's reason for a site it could not prove: recorded for :meth:`refine`;
        for a norm FX sees whose output crosses into untraceable code, the reason itself."""
        self.cache.setdefault("alt_reasons", {})[site.name] = proof
        if site.calls and site.kind in ("ln", "rms") and code_of(proof) != "export_failed":
            return wrap("export_graph", proof, text=proof)
        return None

    def refine(self, site: NormSite, r: Reason | None) -> Reason | None:
        """A kind / visibility reason of a LayerNorm / RMSNorm / custom site FX cannot prove: with
        example inputs, what the export graph showed; without, a hint to pass them."""
        if r is None or site.kind not in ("ln", "rms", "custom") or not self.wants_export(site):
            return r
        if self.example_inputs is None:
            return wrap("export_hint", r, text=r)
        p = self.cache.get("alt_reasons", {}).get(site.name)
        if p is None:
            return r
        if code_of(p) == "export_failed":
            return wrap("export_graph_also", r, text=r, export=p)
        if site.kind == "custom" and not p.startswith("custom norm"):
            p = f"custom norm {type(site.module).__name__}: {p}"
        return wrap("export_graph", p, text=p)
