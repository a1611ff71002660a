"""ConvertReport: what `normswap convert` did and how faithful the converted model is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..report import Report, jsonable

__all__ = ["LayerFit", "Fidelity", "ConvertReport"]


@dataclass
class LayerFit:
    """One converted norm site."""

    name: str
    source_kind: str
    source_type: str
    target_type: str
    channels: int
    groups: int | None = None
    #: "fitted" (least squares on calibration data), "exact" (closed form, e.g. eval BN -> affine),
    #: "copied" (no data: source gamma/beta copied), "fresh" (no data and no affine to copy)
    method: str = "fitted"
    calibrated: bool = True
    #: relative reconstruction error ||y_new - y_orig|| / ||y_orig|| over the calibration data.
    #: err_naive: the naive fresh replacement (gamma=1, beta=0, default statistics, Opacus' group
    #: count gcd(32, C)) on the original model's activations.  err_fitted: the fitted replacement on
    #: the inputs it was fitted on (fast: the original activations; sequential: the converted
    #: model's own inputs, against the original model's activation at that layer).  For frn the
    #: fitted error ignores the TLU (whose tau only clips below the original's minimum: an upper
    #: bound).
    err_naive: float | None = None
    err_fitted: float | None = None
    #: auto groups: candidate group count -> relative error
    group_errors: dict | None = None
    note: str | None = None


@dataclass
class Fidelity:
    """How the converted model's outputs compare with the original's on some inputs: the
    calibration inputs (``data="calibration"``, ``in_sample=True``: the fit has seen them, so the
    numbers are optimistic) or held-out inputs (``data="held-out"``, from ``eval_data`` /
    ``--eval``)."""

    samples: int = 0
    #: "calibration" (in-sample) or "held-out"
    data: str = "calibration"
    in_sample: bool = True
    classifier: bool = False
    top1_agreement: float | None = None  # classifiers
    kl: float | None = None  # mean KL(original || converted), classifiers
    top5_overlap: float | None = None  # mean |top-5 of converted ∩ top-5 of original| / 5, classifiers
    rel_output_error: float | None = None  # ||out_new - out_orig|| / ||out_orig||
    accuracy_original: float | None = None  # when the calibration data has labels
    accuracy_converted: float | None = None
    #: the output the agreement / KL / rel_output_error are measured on (first logits-like)
    output: str | None = None
    #: every output of the model: {"name", "shape" (per sample), "max_abs_error", "rel_error",
    #: "nonfinite"} (errors are converted - original)
    outputs: list = field(default_factory=list)

    @property
    def accuracy_drop(self) -> float | None:
        """Original accuracy minus converted accuracy (points as a fraction; None without labels)."""
        if self.accuracy_original is None or self.accuracy_converted is None:
            return None
        return self.accuracy_original - self.accuracy_converted

    def to_dict(self) -> dict:
        import dataclasses

        d = {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["accuracy_drop"] = self.accuracy_drop
        return d

    @property
    def worst_output(self) -> dict | None:
        """The output with the largest relative error (None without outputs)."""
        finite = [o for o in self.outputs if o.get("rel_error") is not None]
        return max(finite, key=lambda o: o["rel_error"]) if finite else None


@dataclass
class ConvertReport(Report):
    job = "convert"

    target: str = "gn"
    sources: list = field(default_factory=list)
    mode: str = "sequential"
    groups: Any = "auto"
    calibrated: bool = False
    calib_source: str | None = None
    calib_samples: int = 0
    calib_labels: bool = False
    passes: int = 0
    layers: list = field(default_factory=list)
    #: what the calibration data was (source, samples, layout, preprocessing, skipped images)
    calib_data: dict | None = None
    #: sequential mode: the held-back scores of the fast and the sequential fit and the pick
    calibration_choice: dict | None = None
    #: channel reweighting before calibration (normswap.convert.reweight.ReweightResult.to_dict())
    reweight: dict | None = None
    #: fidelity after calibration (before repair), on the calibration data: in-sample
    fidelity_calibrated: Fidelity | None = None
    #: final fidelity on the calibration data (after repair when it was kept): in-sample
    fidelity: Fidelity | None = None
    #: final fidelity on held-out data (``eval_data`` / ``--eval``); None without it
    fidelity_eval: Fidelity | None = None
    eval_source: str | None = None
    #: :class:`normswap.convert.repair.RepairResult` when repair ran
    repair: Any = None
    #: :class:`normswap.convert.repair.RepairResult` of mode="fit"'s affine fit
    fit: Any = None
    calib_seconds: float | None = None
    #: seconds of one plain forward pass over the calibration set (the converted model)
    forward_seconds: float | None = None
    distributed_world_size: int = 1
    warnings: list = field(default_factory=list)
    #: filled by the CLI pipeline
    files: dict = field(default_factory=dict)
    parity: Any = None
    export: Any = None

    # ------------------------------------------------------------------ derived
    @property
    def sites(self) -> int:
        return len(self.layers)

    @property
    def calib_ratio(self) -> float | None:
        if self.calib_seconds is None or not self.forward_seconds:
            return None
        return self.calib_seconds / self.forward_seconds

    @property
    def fidelity_basis(self) -> str | None:
        if self.fidelity_eval is not None:
            return "held-out"
        return "in-sample" if self.fidelity is not None else None

    @property
    def passed(self) -> bool:
        if self.parity is None:
            return True
        ok = getattr(self.parity, "passed", None)
        if ok is None and isinstance(self.parity, dict):
            ok = self.parity.get("passed", True)
        return bool(True if ok is None else ok)

    def to_dict(self) -> dict:
        d = {
            "job": self.job,
            "target": self.target,
            "sources": list(self.sources),
            "sites": self.sites,
            "mode": self.mode,
            "groups": self.groups,
            "calibrated": self.calibrated,
            "calib_source": self.calib_source,
            "calib_samples": self.calib_samples,
            "calib_labels": self.calib_labels,
            "passes": self.passes,
            "calib_data": jsonable(self.calib_data),
            "calibration_choice": jsonable(self.calibration_choice),
            "reweight": jsonable(self.reweight),
            "layers": [jsonable(x) for x in self.layers],
            "fidelity_calibrated": jsonable(self.fidelity_calibrated),
            "fidelity": jsonable(self.fidelity),
            "fidelity_eval": jsonable(self.fidelity_eval),
            "eval_source": self.eval_source,
            #: which fidelity the headline numbers are: "held-out" or "in-sample"
            "fidelity_basis": self.fidelity_basis,
            "repair": jsonable(self.repair),
            "fit": jsonable(self.fit),
            "calib_seconds": self.calib_seconds,
            "forward_seconds": self.forward_seconds,
            "calib_ratio": self.calib_ratio,
            "distributed_world_size": self.distributed_world_size,
            "warnings": list(self.warnings),
            "files": jsonable(self.files),
            "export": _report_dict(self.export),
            "parity": _report_dict(self.parity),
            "passed": self.passed,
        }
        return d

    def summary_text(self) -> str:
        kinds = "/".join(self.sources) or "?"
        parts = [f"{self.sites} {kinds}->{self.target} site{'s' if self.sites != 1 else ''}"]
        if not self.calibrated:
            parts.append("uncalibrated (no calibration data)")
            if self.fidelity_eval is not None:
                parts.append(_fid_text(self.fidelity_eval) + f" held-out ({self.fidelity_eval.samples} eval samples)")
        else:
            f = self.fidelity
            on = " on random inputs" if self.calib_source == "random" else ""
            txt = f"calibrated{on} ({self.mode}, {self.calib_samples} samples"
            r = self.repair
            if r is not None:
                txt += (f", repaired {r.steps} steps in {r.seconds:.0f} s" if r.kept
                        else ", repair not kept")
            txt += ")"
            heldout = self.fidelity_eval is not None
            if heldout:
                f = self.fidelity_eval
            if f is not None:
                txt += ": " + _fid_text(f)
                txt += (f" held-out ({f.samples} eval samples)" if heldout
                        else " in-sample (on the calibration data; pass --eval for held-out numbers)")
            parts.append(txt)
        if self.files:
            parts.append("wrote " + ", ".join(str(v) for v in self.files.values()))
        if self.parity is not None:
            parts.append("parity " + ("ok" if self.passed else "FAILED"))
        return " | ".join(parts)


def reweight_text(rw: dict | None) -> str | None:
    """One line on channel reweighting (``report.reweight`` as a dict), or None when it did not run."""
    if not rw:
        return None
    n, skipped = int(rw.get("sites") or 0), rw.get("skipped") or []
    txt = f"{n} producer{'' if n == 1 else 's'} rescaled"
    if n:
        b, a = float(rw.get("error_before") or 0.0), float(rw.get("error_after") or 0.0)
        txt += f" (mean layer error on the original activations {b:.3g} -> {a:.3g})"
    if skipped:
        txt += f"; {len(skipped)} norm{'' if len(skipped) == 1 else 's'} left as they were (reasons per layer)"
    return txt + f"; {float(rw.get('seconds') or 0.0):.1f} s"


def _fid_text(f: Fidelity) -> str:
    txt = ""
    if f.classifier and f.top1_agreement is not None:
        txt = f"top-1 agreement {100 * f.top1_agreement:.1f}%"
    elif f.rel_output_error is not None:
        txt = f"rel. output error {f.rel_output_error:.3g}"
    if f.accuracy_converted is not None and f.accuracy_original is not None:
        d = f.accuracy_drop
        txt += (f", accuracy {100 * f.accuracy_converted:.1f}% (original {100 * f.accuracy_original:.1f}%, "
                f"{'drop' if d >= 0 else 'gain'} {abs(100 * d):.1f} pt)")
    w = f.worst_output
    if len(f.outputs) > 1 and w is not None:
        txt += f", worst output {w['name']} rel. error {w['rel_error']:.3g}"
    return txt


def _report_dict(obj):
    if obj is None:
        return None
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        try:
            return jsonable(to_dict())
        except Exception:
            pass
    return jsonable(obj)
