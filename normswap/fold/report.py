"""FoldDecision (one row of ``plan()``) and FoldReport (the result of ``fold()``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from normswap.report import Report, jsonable

__all__ = ["FoldDecision", "FoldReport"]


@dataclass
class FoldDecision:
    """What ``fold`` will do with one norm site (``reason is None`` == foldable).

    ``norm`` is the module's qualified name (a functional site is ``<region>.<node name>``,
    a spectral norm ``<module>.weight``); ``into`` names the layer(s) that absorb it
    (several joined with ", "); ``pattern`` is the rule's name.
    """

    norm: str
    kind: str
    into: str | None = None
    pattern: str | None = None
    reason: str | None = None
    #: the reason's catalogue code (:mod:`normswap.reasons`); None when foldable
    code: str | None = None

    @property
    def foldable(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        return {"norm": self.norm, "kind": self.kind, "into": self.into, "pattern": self.pattern,
                "reason": self.reason, "code": self.code}


@dataclass
class FoldReport(Report):
    """Result of :func:`normswap.fold`.

    ``folded``: ``{"norm", "kind", "into", "pattern"}`` per folded site; ``skipped``:
    ``{"norm", "kind", "reason"}``; ``baked``: spectral norms baked to W/sigma;
    ``graph_rewritten``: regions (qualified names, "" = the whole model) that became a
    ``torch.fx.GraphModule`` because a functional norm call was removed from their graph.
    ``verification``: max output difference on the example inputs (when given).
    """

    job: ClassVar[str] = "fold"

    folded: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    baked: list[dict] = field(default_factory=list)
    graph_rewritten: list[str] = field(default_factory=list)
    returns_graph_module: bool = False
    switched_to_eval: bool = False
    inplace: bool = False
    notes: list[str] = field(default_factory=list)
    verification: dict | None = None
    #: set by the CLI / callers: where the folded model (and its ONNX export) went
    model: str | None = None
    output: dict | None = None
    export: dict | None = None
    export_passed: bool | None = None

    @property
    def passed(self) -> bool:
        v = self.verification
        ok = v is None or bool(v.get("ok", True))
        return ok and self.export_passed is not False

    def summary(self) -> dict:
        by_pattern: dict[str, int] = {}
        for f in self.folded:
            by_pattern[f["pattern"]] = by_pattern.get(f["pattern"], 0) + 1
        return {
            "sites": len(self.folded) + len(self.skipped),
            "folded": len(self.folded),
            "skipped": len(self.skipped),
            "baked": len(self.baked),
            "by_pattern": by_pattern,
            "switched_to_eval": self.switched_to_eval,
            "returns_graph_module": self.returns_graph_module,
            "graph_rewritten": list(self.graph_rewritten),
            "max_abs_error": (self.verification or {}).get("max_abs_error"),
        }

    def to_dict(self) -> dict:
        return jsonable({
            "job": self.job,
            "model": self.model,
            "folded": self.folded,
            "skipped": self.skipped,
            "baked": self.baked,
            "graph_rewritten": self.graph_rewritten,
            "notes": self.notes,
            "verification": self.verification,
            "output": self.output,
            "export": self.export,
            "summary": self.summary(),
            "passed": self.passed,
        })

    def summary_text(self) -> str:
        s = self.summary()
        text = f"folded {s['folded']} of {s['sites']} norm sites, skipped {s['skipped']}"
        if s["baked"]:
            text += f", baked {s['baked']} spectral norms"
        if self.verification is not None and self.verification.get("max_abs_error") is not None:
            text += f", max |diff| {self.verification['max_abs_error']:.2e}"
        if self.returns_graph_module:
            text += ", returned a GraphModule"
        return text
