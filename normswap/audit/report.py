"""Audit report types and risk flags: one :class:`Site` record per norm (every front-end --
eager FX, TorchScript, torch.export -- produces the same record), the :class:`AuditReport`
and the tensor checks behind the NaN/Inf, tiny-variance, eps == 0 and untrained flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from normswap.report import Report, jsonable

__all__ = ["Site", "AuditReport", "FLAG_TEXT", "TINY_VAR_RATIO", "check_tensors", "tensor_ok", "to_float"]

#: a running variance this many times smaller than the median channel's is flagged
TINY_VAR_RATIO = 1e-3

#: risk flag codes and what they mean
FLAG_TEXT = {
    "nonfinite": "NaN/Inf in statistics or parameters",
    "tiny_var": "running variance tiny relative to the other channels (a fold amplifies it)",
    "eps_zero": "eps == 0 (division by sqrt(var) alone; NaN/Inf risk, esp. in fp16)",
    "untrained_stats": "running statistics look untrained",
    "train_mode": "in training mode (ONNX exporters silently export inference BatchNorm)",
    "no_running_stats": "track_running_stats=False: uses batch statistics at eval",
    "no_graph": "analysed without a graph (producer/consumers unknown)",
}

@dataclass
class Site:
    """One norm site."""

    name: str
    kind: str
    module_type: str
    functional: bool = False
    region: str | None = None  # region path ("" = root) in which it was found
    graph: bool = True  # analysed with a graph (producer/consumers known)
    shape: dict = field(default_factory=dict)
    affine: bool | None = None
    running_stats: bool | None = None
    eps: float | None = None
    mode: str | None = None  # "train" / "eval" / None when not applicable
    producer: dict | None = None  # {'name', 'op', 'type', 'other_users', ...}
    producer_shared: bool = False  # the producer's output has other users (or producer reused)
    calls: int = 1  # number of call sites (graph) or calls per forward (example inputs)
    reused: bool = False
    consumers: list = field(default_factory=list)
    input_shapes: list = field(default_factory=list)
    foldable: bool = False
    reason: str | None = None
    #: the reason's catalogue code (normswap.reasons); None when foldable
    reason_code: str | None = None
    fold_into: str | None = None
    onnx_ops: list = field(default_factory=list)
    flags: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: jsonable(v) for k, v in self.__dict__.items()}

    def flag(self, code: str, text: str) -> None:
        if code not in self.flags:
            self.flags.append(code)
        self.warnings.append(text)


@dataclass
class AuditReport(Report):
    """The audit of one model."""

    model: str
    source: str = "eager"  # eager / torchscript / export
    sites: list = field(default_factory=list)
    regions: list = field(default_factory=list)  # [{'path', 'traced', 'error'}]
    notes: list = field(default_factory=list)
    fold_planner: str = "internal"
    seconds: float = 0.0

    job = "audit"

    # ---------------------------------------------------------------- derived
    @property
    def passed(self) -> bool:  # an audit always passes
        return True

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def by_name(self) -> dict:
        return {s.name: s for s in self.sites}

    @property
    def untraced(self) -> list[str]:
        """Paths of the parts analysed without a graph."""
        return [r["path"] for r in self.regions if not r["traced"]]

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for s in self.sites:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        flags: dict[str, int] = {}
        for s in self.sites:
            for f in s.flags:
                flags[f] = flags.get(f, 0) + 1
        return {
            "sites": len(self.sites),
            "kinds": kinds,
            "foldable": sum(1 for s in self.sites if s.foldable),
            "warnings": sum(len(s.warnings) for s in self.sites),
            "flags": flags,
            "functional": sum(1 for s in self.sites if s.functional),
            "untraced": self.untraced,
        }

    def to_dict(self) -> dict:
        return jsonable({
            "job": self.job,
            "passed": self.passed,
            "model": self.model,
            "source": self.source,
            "sites": [s.to_dict() for s in self.sites],
            "regions": self.regions,
            "notes": self.notes,
            "fold_planner": self.fold_planner,
            "seconds": round(self.seconds, 4),
            "summary": self.summary(),
        })

    def summary_text(self) -> str:
        s = self.summary()
        kinds = ", ".join(f"{k} {v}" for k, v in s["kinds"].items())
        n = s["sites"]
        text = f"{n} norm site{'s' if n != 1 else ''}"
        if kinds:
            text += f" ({kinds})"
        text += f", {s['foldable']} foldable, {s['warnings']} warning{'s' if s['warnings'] != 1 else ''}"
        if s["untraced"]:
            text += f", {len(s['untraced'])} part{'s' if len(s['untraced']) != 1 else ''} without graph"
        return text


# --------------------------------------------------------------------------- helpers


def to_float(x) -> float | None:
    try:
        return float(x)
    except Exception:
        return None


def tensor_ok(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedTensorMixin) \
        and t.numel() > 0


def check_tensors(site: Site, stats: dict, params: dict, eps: float | None, kind: str) -> None:
    """Add NaN/Inf, tiny-variance, eps==0 and untrained-statistics flags."""
    bad = []
    for n, t in list(stats.items()) + list(params.items()):
        if not tensor_ok(t) or not (t.is_floating_point() or t.is_complex()):
            continue
        t = t.detach()
        nn_ = int(torch.isnan(t).sum())
        ni = int(torch.isinf(t).sum())
        if nn_ or ni:
            parts = []
            if nn_:
                parts.append(f"{nn_} NaN")
            if ni:
                parts.append(f"{ni} Inf")
            bad.append(f"{n} has {' and '.join(parts)} of {t.numel()}")
    if bad:
        site.flag("nonfinite", "; ".join(bad))
    if eps is not None and eps == 0.0:
        site.flag("eps_zero", "eps == 0: the normalisation divides by sqrt(var) alone")
    var = stats.get("running_var", stats.get("running_phi"))
    if tensor_ok(var) and var.is_floating_point() and var.numel() > 1:
        v = var.detach().double().flatten()
        finite = torch.isfinite(v)
        if int(finite.sum()) > 1:
            vf = v.clone()
            vf[~finite] = float("inf")
            imin = int(vf.argmin())
            vmin = float(vf[imin])
            med = float(v[finite].median())
            e = eps or 0.0
            if med > 0 and vmin < TINY_VAR_RATIO * med:
                scale = math.inf if vmin + e <= 0 else 1.0 / math.sqrt(vmin + e)
                factor = math.inf if vmin + e <= 0 else math.sqrt((med + e) / (vmin + e))
                name = "running_var" if "running_var" in stats else "running_phi"
                site.flag(
                    "tiny_var",
                    f"{name}[{imin}] = {vmin:.3g} vs median {med:.3g}: a fold scales that "
                    f"channel by 1/sqrt(var+eps) = {scale:.4g}, {factor:.4g}x the median channel"
                    + (" (eps unknown, taken as 0)" if eps is None else ""),
                )
    mean = stats.get("running_mean")
    nbt = stats.get("num_batches_tracked")
    untrained = []
    if tensor_ok(mean) and tensor_ok(var) and "running_var" in stats:
        if bool((mean == 0).all()) and bool((var == 1).all()):
            untrained.append("running_mean all 0 and running_var all 1")
    elif "running_phi" in stats and tensor_ok(var) and bool((var == 1).all()):
        untrained.append("running_phi all 1")
    if tensor_ok(nbt) and nbt.numel() == 1 and int(nbt) == 0:
        untrained.append("num_batches_tracked == 0")
    if untrained:
        site.flag("untrained_stats", "untrained statistics: " + ", ".join(untrained))
