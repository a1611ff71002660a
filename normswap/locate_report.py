"""What ``normswap.locate`` reports: per layer, the accumulated and the own error
(:class:`LayerParity`), the whole result (:class:`LocateResult`) and its CLI text
(:func:`locate_text`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

__all__ = ["LayerParity", "LocateResult", "locate_text"]

# --------------------------------------------------------------------------- result types


@dataclass
class LayerParity:
    """One mapped leaf module."""

    name: str  # module path, e.g. "features.3.conv"
    type: str  # class name, e.g. "Conv2d"
    index: int  # execution order (0-based) among mapped layers
    onnx_output: str  # the ONNX value compared with the module's output
    onnx_nodes: list[str]  # op types of the layer's nodes (in graph order)
    shape: list[int]
    max_abs_torch: float  # max |y| of the PyTorch output
    tolerance: float
    #: full onnxruntime run vs PyTorch: the error accumulated up to this layer
    acc_max_abs: float
    acc_rel: float  # acc_max_abs / max|y|
    acc_passed: bool
    #: the layer's nodes alone on PyTorch's input activation vs PyTorch's output
    own_max_abs: float | None = None
    own_rel: float | None = None
    own_passed: bool | None = None
    own_reason: str | None = None  # why the own error could not be measured
    #: modules with no ONNX nodes of their own that were absorbed into this layer (Conv+BN fold)
    fused: list[str] = field(default_factory=list)

    @property
    def diverges(self) -> bool:
        return self.own_passed is False

    @property
    def inherited(self) -> bool:
        """Accumulated error over the tolerance while the layer itself is fine."""
        return (not self.acc_passed) and self.own_passed is True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["diverges"] = self.diverges
        d["inherited"] = self.inherited
        return _finite(d)


@dataclass
class LocateResult:
    onnx_path: str
    provider: str | None  # label of the provider that ran ("cpu", "cuda"), None if none ran
    ran: str | None  # onnxruntime's provider name (session.get_providers()[0])
    status: str  # "ok" | "diverged" | "unavailable"
    atol: float
    rtol: float
    criterion: str
    torch_device: str | None
    layers: list[LayerParity]
    unmapped: list[str]  # "name (Type): reason"
    unavailable: dict[str, str] = field(default_factory=dict)  # provider label -> reason
    outputs: list[dict] = field(default_factory=list)  # final outputs, ORT vs torch
    mapping: str = "none"  # "name_scopes" | "node_names" | "none"
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergent(self) -> LayerParity | None:
        """First layer (execution order) whose own error exceeds the tolerance."""
        return next((lp for lp in self.layers if lp.own_passed is False), None)

    @property
    def first_accumulated(self) -> LayerParity | None:
        """First layer whose accumulated error exceeds the tolerance."""
        return next((lp for lp in self.layers if not lp.acc_passed), None)

    def __bool__(self) -> bool:
        if self.status == "unavailable":
            return False
        return (
            self.first_divergent is None
            and self.first_accumulated is None
            and all(o.get("passed", True) for o in self.outputs)
        )

    @property
    def passed(self) -> bool:
        return bool(self)

    def layer(self, name: str) -> LayerParity | None:
        return next((lp for lp in self.layers if lp.name == name), None)

    def summary_text(self) -> str:
        if self.status == "unavailable":
            return "locate: no provider ran (" + "; ".join(f"{k}: {v}" for k, v in self.unavailable.items()) + ")"
        fd = self.first_divergent
        n = len(self.layers)
        tail = f" ({n} layer{'' if n == 1 else 's'} mapped, {len(self.unmapped)} not mapped, {self.provider})"
        if fd is not None:
            fused = f", with {', '.join(fd.fused)} folded in" if fd.fused else ""
            return (
                f"first divergent layer: {fd.name} ({fd.type}{fused}) own error {fd.own_max_abs:.3g} "
                f"> tol {fd.tolerance:.3g} (accumulated {fd.acc_max_abs:.3g})" + tail
            )
        fa = self.first_accumulated
        if fa is not None:
            return (
                f"no layer diverges on its own, but the error exceeds the tolerance first at {fa.name} "
                f"({fa.acc_max_abs:.3g} > {fa.tolerance:.3g}): the cause lies in ops outside mapped layers" + tail
            )
        bad = [o for o in self.outputs if not o.get("passed", True)]
        if bad:
            return f"all layers agree but output {bad[0]['name']} differs ({bad[0]['max_abs']:.3g}): ops after the last mapped layer" + tail
        return "no divergence: every mapped layer within tolerance" + tail

    def to_dict(self) -> dict:
        fd, fa = self.first_divergent, self.first_accumulated
        return _finite(
            {
                "onnx_path": self.onnx_path,
                "passed": bool(self),
                "status": self.status,
                "provider": self.provider,
                "ran": self.ran,
                "torch_device": self.torch_device,
                "atol": self.atol,
                "rtol": self.rtol,
                "criterion": self.criterion,
                "mapping": self.mapping,
                "first_divergent": fd.to_dict() if fd else None,
                "first_accumulated": fa.name if fa else None,
                "layers": [lp.to_dict() for lp in self.layers],
                "unmapped": list(self.unmapped),
                "unavailable": dict(self.unavailable),
                "outputs": list(self.outputs),
                "notes": list(self.notes),
                "summary": self.summary_text(),
            }
        )


def _finite(obj):
    """JSON-safe: inf/nan floats become strings ("inf", "nan")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj



# --------------------------------------------------------------------------- CLI text


def locate_text(loc: dict, width: int = 80) -> str:
    """The located layer for the CLI, wrapped at ``width`` columns; names are never cut
    (a name longer than the line stands on a line of its own)."""
    import textwrap

    def wrap(text: str, indent: str = "  ") -> list[str]:
        return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent + "  ",
                             break_long_words=False, break_on_hyphens=False) or [indent]

    if loc.get("status") == "unavailable":
        lines = ["locate: no requested provider ran"]
        for k, v in (loc.get("unavailable") or {}).items():
            lines += wrap(f"{k}: {v}")
        return "\n".join(lines)
    layers = loc.get("layers") or []
    fd = loc.get("first_divergent")
    head = (f"locate ({loc.get('provider')}, {len(layers)} layer{'' if len(layers) == 1 else 's'} mapped, "
            f"{len(loc.get('unmapped') or [])} not mapped):")
    lines = [head]
    if fd:
        lines.append("  first divergent layer:")
        lines += wrap(f"{fd['name']} ({fd['type']}, #{fd['index']})", "    ")
        if fd.get("fused"):
            lines += wrap("with " + ", ".join(fd["fused"]) + " folded in", "    ")
        lines += wrap(
            f"own error {_g(fd.get('own_max_abs'))} > tol {_g(fd.get('tolerance'))} "
            f"(rel {_g(fd.get('own_rel'))}); accumulated {_g(fd.get('acc_max_abs'))}", "    ")
        after = [lp for lp in layers if lp.get("index", -1) > fd.get("index", 0)]
        inh = sum(1 for lp in after if lp.get("inherited"))
        if after:
            lines += wrap(f"{inh} of the {len(after)} later layers only inherit the error", "    ")
    else:
        lines += wrap(loc.get("summary") or "no divergence")
    return "\n".join(lines)


def _g(v) -> str:
    if isinstance(v, (int, float)):
        return f"{v:.3g}"
    return str(v)
