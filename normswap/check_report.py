"""The parity report of ``normswap check``: per output, per batch, per provider
(:class:`ParityReport`), and the one comparison of an ONNX output with PyTorch's
(:func:`compare_arrays`: ``max|onnx - torch| <= atol + rtol * max|torch|``, NaN/Inf in the same
places)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normswap.report import Report

__all__ = ["OutputParity", "BatchParity", "ProviderResult", "ParityReport", "compare_arrays"]



@dataclass
class OutputParity:
    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float | None
    tolerance: float
    passed: bool
    reason: str | None = None


@dataclass
class BatchParity:
    batch_size: int
    outputs: list[OutputParity]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "passed": self.passed,
            "outputs": [dataclasses.asdict(o) for o in self.outputs],
        }


@dataclass
class ProviderResult:
    label: str
    provider: str
    ran: str | None  # the provider onnxruntime actually used (session.get_providers()[0])
    status: str  # "passed" | "failed" | "unavailable" | "error"
    reason: str | None = None
    torch_device: str | None = None
    batches: list[BatchParity] = field(default_factory=list)
    latency_ms: float | None = None
    torch_latency_ms: float | None = None

    @property
    def max_abs(self) -> float | None:
        vals = [o.max_abs for b in self.batches for o in b.outputs]
        return max(vals) if vals else None

    def to_dict(self) -> dict:
        from normswap.report import jsonable

        return {
            "label": self.label,
            "provider": self.provider,
            "ran": self.ran,
            "status": self.status,
            "reason": self.reason,
            "torch_device": self.torch_device,
            "max_abs": self.max_abs,
            "latency_ms": self.latency_ms,
            "torch_latency_ms": self.torch_latency_ms,
            "batches": [jsonable(b.to_dict()) for b in self.batches],
        }


@dataclass
class ParityReport(Report):
    """ONNX vs PyTorch parity per provider, batch size and output."""

    job = "check"

    onnx_path: str
    atol: float
    rtol: float
    criterion: str
    inputs: list[dict]
    batch_sizes: list[int]
    dynamic_batch: bool
    providers: list[ProviderResult]
    notes: list[str] = field(default_factory=list)
    #: the notes that are warnings (a static ONNX batch, no provider ran): shown highlighted
    warning_notes: list[str] = field(default_factory=list, repr=False)
    #: with ``locate=True``: the per-layer divergence (:class:`normswap.locate.LocateResult`)
    locate: Any = None

    @property
    def passed(self) -> bool:
        ran = [p for p in self.providers if p.status != "unavailable"]
        return bool(ran) and all(p.status == "passed" for p in ran)

    def provider(self, label: str) -> ProviderResult | None:
        return next((p for p in self.providers if p.label == label), None)

    def to_dict(self) -> dict:
        from normswap.report import jsonable

        return {
            "job": self.job,
            "passed": self.passed,
            "onnx_path": self.onnx_path,
            "atol": self.atol,
            "rtol": self.rtol,
            "criterion": self.criterion,
            "inputs": jsonable(self.inputs),
            "batch_sizes": self.batch_sizes,
            "dynamic_batch": self.dynamic_batch,
            "providers": [jsonable(p.to_dict()) for p in self.providers],
            "notes": list(self.notes),
            "load": getattr(self, "load", None),
            "locate": self.locate.to_dict() if self.locate is not None else None,
        }

    def summary_text(self) -> str:
        parts = []
        for p in self.providers:
            if p.status in ("passed", "failed") and p.max_abs is not None:
                parts.append(f"{p.label} {p.status} (max abs err {p.max_abs:.2g})")
            else:
                parts.append(f"{p.label} {p.status}")
        if not any(p.status != "unavailable" for p in self.providers):
            parts.append("no requested provider ran")
        sizes = ", ".join(str(b) for b in self.batch_sizes)
        text = f"{Path(self.onnx_path).name}: " + ", ".join(parts) + f" | batch {sizes}"
        if self.locate is not None:
            first = getattr(self.locate, "first_divergent", None)
            text += (f" | diverges first at {first.name}" if first is not None else " | no layer diverges")
        return text


# --------------------------------------------------------------------------- metrics


def compare_arrays(name: str, ref, got, atol: float, rtol: float) -> OutputParity:
    """Compare one output (numpy arrays): PyTorch ``ref`` vs onnxruntime ``got``."""
    import numpy as np

    ref = np.asarray(ref)
    got = np.asarray(got)
    shape = list(ref.shape)
    if ref.shape != got.shape:
        return OutputParity(
            name, shape, float("inf"), float("inf"), float("inf"), 0.0, None, 0.0, False,
            f"shape mismatch: torch {tuple(ref.shape)} vs onnx {tuple(got.shape)}",
        )
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    fin_r, fin_g = np.isfinite(r), np.isfinite(g)
    reason = None
    nonfinite_ok = bool(np.array_equal(fin_r, fin_g))
    if nonfinite_ok:  # same places; each one the same value (NaN matches NaN, +Inf matches +Inf)
        nr_, ng_ = r[~fin_r], g[~fin_g]
        nonfinite_ok = bool(np.all((nr_ == ng_) | (np.isnan(nr_) & np.isnan(ng_))))
    if not nonfinite_ok:
        reason = "NaN/Inf at different places"
    elif r.size and not fin_r.any():
        # nothing was compared: an all-NaN/Inf output "matching" says nothing about parity
        nonfinite_ok = False
        reason = "no finite values to compare: the PyTorch output is all NaN/Inf"
    mask = fin_r & fin_g
    rf, gf = r[mask], g[mask]
    if rf.size:
        diff = np.abs(rf - gf)
        max_abs = float(diff.max())
        mean_abs = float(diff.mean())
        ref_max = float(np.abs(rf).max())
        big = np.abs(rf) > atol
        max_rel = float((diff[big] / np.abs(rf[big])).max()) if big.any() else 0.0
        nr, ng = float(np.linalg.norm(rf)), float(np.linalg.norm(gf))
        if nr == 0.0 and ng == 0.0:
            cosine = 1.0
        elif nr == 0.0 or ng == 0.0:
            cosine = 0.0
        else:
            cosine = float(np.dot(rf.ravel(), gf.ravel()) / (nr * ng))
    elif r.size:  # no finite element on either side: nothing was measured
        max_abs = mean_abs = max_rel = cosine = float("nan")
        ref_max = 0.0
    else:
        max_abs = mean_abs = max_rel = ref_max = 0.0
        cosine = 1.0
    tol = atol + rtol * ref_max
    top1 = None
    if rf.size and ref.ndim == 2 and ref.shape[1] > 1 and ref.shape[0] > 0 and np.issubdtype(ref.dtype, np.floating):
        top1 = float(np.mean(np.argmax(r, axis=1) == np.argmax(g, axis=1)))
    passed = nonfinite_ok and max_abs <= tol
    if reason is None and not passed:
        reason = f"max abs error {max_abs:.3g} > tolerance {tol:.3g}"
    return OutputParity(name, shape, max_abs, mean_abs, max_rel, cosine, top1, tol, passed, reason)


# --------------------------------------------------------------------------- providers
