"""Self-contained HTML reports for ``normswap check`` and ``normswap convert``.

``check_report_html(parity_dict, locate_result_dict=None)`` and
``convert_report_html(convert_report_dict)`` take the JSON dictionaries of the
reports (``ParityReport.to_dict()``, ``LocateResult.to_dict()``,
``ConvertReport.to_dict()``) and return one HTML document: inline CSS and inline
SVG plots generated here (no scripts, fonts, images or anything else fetched
from the network), so the file can be mailed or attached to a CI run.

Plots: per-layer own / accumulated parity error along depth on a log scale with
the per-layer tolerance (check --locate); per-output error vs tolerance (check);
per-layer reconstruction error naive vs fitted (log scale) and the group counts
chosen (convert).  Exact zeros are drawn on the bottom edge (hollow markers),
infinite/NaN errors on the top edge.  The x-axis of a per-layer plot names the layers
(rotated ticks, up to 60 layers; beyond, every k-th index) and hovering anywhere over a
layer's column shows its full name (an SVG ``<title>``); the tables next to the plots give
the full names too (never shortened; long names wrap).  Every pass/fail badge says PASSED or
FAILED.

``write_html(path, html, force=False)`` writes atomically (through
:class:`normswap.outputs.OutputSet`, the one safe-write path) and refuses to overwrite an existing file
unless ``force``.

Size (issue 19): about 450 lines; the two page builders (``convert_report_html``,
``locate_section_html``, about 90 lines each) write one HTML section after the other, in
document order.  The SVG plots are :mod:`normswap.html_plots`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from normswap.errors import NormswapError
from normswap.html_plots import (ACC_COLOR, FITTED_COLOR, NAIVE_COLOR, OWN_COLOR, TOL_COLOR, _e, _fmt,  # noqa: F401
                                  _name, _num, _pct, bar_plot_svg, line_plot_svg, log_plot_svg)

__all__ = ["check_report_html", "convert_report_html", "write_html", "log_plot_svg", "bar_plot_svg"]


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Helvetica,Arial,sans-serif;margin:24px;color:#1d1d1f;
  background:#fff;font-size:14px;line-height:1.4;max-width:1200px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d5d5d5;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f3f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.ops{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:11px;overflow-wrap:break-word;max-width:16em}
td.small{font-size:11px;font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace}
td.name{overflow-wrap:break-word;word-break:normal;font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px}
table.kv th{width:190px}
tr.bad td{background:#fdecea}tr.inh td{background:#fff8e1}tr.skip td{color:#777}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;font-weight:700;font-size:13px;color:#fff;vertical-align:middle}
.pass{background:#2e7d32}.fail{background:#c62828}.warn{background:#b26a00}.na{background:#757575}
.callout{border-left:5px solid #c62828;background:#fdecea;padding:8px 12px;margin:10px 0}
.callout.ok{border-color:#2e7d32;background:#e8f5e9}.callout.warn{border-color:#b26a00;background:#fff8e1}
.callout .name{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;overflow-wrap:break-word}
.muted{color:#666}.small{font-size:12px}
ul{margin:4px 0 10px 18px;padding:0}li{overflow-wrap:anywhere}
svg{display:block;margin:6px 0 4px;max-width:100%;height:auto}
.legend span{display:inline-block;margin-right:16px}.sw{display:inline-block;width:18px;height:3px;vertical-align:middle;margin-right:5px}
code{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere}
"""


# --------------------------------------------------------------------------- small helpers


def _nonneg(x: Any) -> Any:
    """A KL / squared-error value: a tiny negative is float rounding, shown as 0 (never "-0")."""
    v = _num(x)
    return 0.0 if v is not None and -1e-6 < v < 0 else x


def _plural(n: Any, word: str) -> str:
    """``1 layer``, ``2 layers``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def _status_badge(status: str | None) -> str:
    """A provider's status as a badge: PASSED / FAILED / ERROR / UNAVAILABLE."""
    cls = {"passed": "pass", "failed": "fail", "error": "fail"}.get(status or "", "na")
    return f'<span class="badge {cls}">{_e((status or "n/a").upper())}</span>'


def _badge(ok: bool | None, yes="PASSED", no="FAILED", none="N/A") -> str:
    if ok is None:
        return f'<span class="badge na">{none}</span>'
    return f'<span class="badge {"pass" if ok else "fail"}">{yes if ok else no}</span>'


def _kv(rows: Iterable[tuple[str, Any]], raw: bool = False) -> str:
    out = ['<table class="kv">']
    for k, v in rows:
        if v is None or v == "" or v == [] or v == {}:
            continue
        out.append(f"<tr><th>{_e(k)}</th><td>{v if raw else _e(v)}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _table(headers: Sequence[str], rows: Iterable[Sequence[tuple[str, str]]], row_classes: Sequence[str] | None = None) -> str:
    """rows: cells as (css class, html) pairs."""
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f'<td class="{c}">{h}</td>' if c else f"<td>{h}</td>" for c, h in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _list(items: Iterable[Any]) -> str:
    items = [i for i in items if i]
    if not items:
        return ""
    return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body>\n{body}\n"
        '<p class="muted small">Generated by normswap. Self-contained: no scripts, no network resources.</p>'
        "</body></html>\n"
    )


# --------------------------------------------------------------------------- SVG plots


def _outputs_section(parity: dict) -> str:
    parts = []
    series_vals, tols, labels, tips = [], [], [], []
    for p in parity.get("providers") or []:
        for b in p.get("batches") or []:
            for o in b.get("outputs") or []:
                series_vals.append(o.get("max_abs"))
                tols.append(o.get("tolerance"))
                labels.append(str(len(labels)))
                tips.append(f"{p.get('label')} N={b.get('batch_size')} {o.get('name')}")
    if series_vals:
        parts.append("<h3>Output error vs tolerance</h3>")
        parts.append(
            log_plot_svg(
                [{"name": "max |onnx − torch|", "values": series_vals, "color": ACC_COLOR, "marker": "square", "line": False}],
                len(series_vals), labels=labels, names=tips, tooltips=tips, tolerance=tols, ylabel="max abs error",
                xlabel="output # (see the table below)", height=260,
            )
        )
        rows, classes = [], []
        k = 0
        for p in parity.get("providers") or []:
            for b in p.get("batches") or []:
                for o in b.get("outputs") or []:
                    rows.append([
                        ("num", str(k)), ("", _e(p.get("label"))), ("num", _e(b.get("batch_size"))),
                        ("name", _name(o.get("name"))), ("num", _e(o.get("shape"))),
                        ("num", _fmt(o.get("max_abs"))), ("num", _fmt(o.get("mean_abs"))), ("num", _fmt(o.get("max_rel"))),
                        ("num", _fmt(o.get("cosine"), 6)), ("num", _pct(o.get("top1_agreement"))),
                        ("num", _fmt(o.get("tolerance"))), ("", _badge(o.get("passed"))),
                        ("", _e(o.get("reason") or "")),
                    ])
                    classes.append("" if o.get("passed") else "bad")
                    k += 1
        parts.append(_table(
            ["#", "provider", "batch", "output", "shape", "max abs", "mean abs", "max rel", "cosine", "top-1", "tolerance", "", "reason"],
            rows, classes,
        ))
    return "".join(parts)


def _providers_table(parity: dict) -> str:
    rows, classes = [], []
    for p in parity.get("providers") or []:
        st = p.get("status")
        badge = _status_badge(st)
        rows.append([
            ("", _e(p.get("label"))), ("", badge), ("", _e(p.get("ran") or "—")), ("", _e(p.get("torch_device") or "—")),
            ("num", _fmt(p.get("max_abs"))), ("num", _fmt(p.get("latency_ms"))), ("num", _fmt(p.get("torch_latency_ms"))),
            ("", _e(p.get("reason") or "")),
        ])
        classes.append("bad" if st in ("failed", "error") else ("skip" if st == "unavailable" else ""))
    if not rows:
        return ""
    return _table(["provider", "status", "onnxruntime ran", "torch device", "max abs err", "ORT ms", "torch ms", "reason"], rows, classes)


def locate_section_html(loc: dict) -> str:
    """The per-layer part of a check report (also usable alone)."""
    parts = ["<h2>Per-layer parity (locate)</h2>"]
    status = loc.get("status")
    layers = loc.get("layers") or []
    fd = loc.get("first_divergent")
    if status == "unavailable":
        parts.append('<div class="callout warn">No requested provider could run, so no layer was compared.</div>')
        parts.append(_list(f"{k}: {v}" for k, v in (loc.get("unavailable") or {}).items()))
        return "".join(parts)
    if fd:
        parts.append(
            '<div class="callout"><b>First divergent layer:</b> '
            f'<span class="name">{_name(fd.get("name"))}</span> ({_e(fd.get("type"))}, layer #{_e(fd.get("index"))}'
            + (f', with {_name(", ".join(fd.get("fused") or []))} folded in' if fd.get("fused") else "") + "): "
            f'own error <b>{_fmt(fd.get("own_max_abs"))}</b> (relative {_fmt(fd.get("own_rel"))}) &gt; tolerance '
            f'{_fmt(fd.get("tolerance"))}; accumulated error there {_fmt(fd.get("acc_max_abs"))}. '
            f'ONNX ops: <code>{_e(" ".join(_ops_short(fd.get("onnx_nodes") or [])))}</code>; output value '
            f'<code>{_e(fd.get("onnx_output"))}</code>.</div>'
        )
    elif loc.get("passed"):
        parts.append(f'<div class="callout ok">{_e(loc.get("summary") or "No divergence.")}</div>')
    else:
        parts.append(f'<div class="callout warn">{_e(loc.get("summary") or "")}</div>')
    parts.append(_kv([
        ("provider", f'{loc.get("provider")} ({loc.get("ran")})' if loc.get("provider") else None),
        ("PyTorch device", loc.get("torch_device")),
        ("criterion", loc.get("criterion")),
        ("atol / rtol", f'{_fmt(loc.get("atol"))} / {_fmt(loc.get("rtol"))}'),
        ("mapping", f'{loc.get("mapping")}: {_plural(len(layers), "layer")} mapped, '
                    f'{len(loc.get("unmapped") or [])} not mapped'),
    ]))
    if layers:
        own = [lp.get("own_max_abs") for lp in layers]
        acc = [lp.get("acc_max_abs") for lp in layers]
        hi = fd.get("index") if fd else None
        parts.append(
            log_plot_svg(
                [
                    {"name": "accumulated error (full ORT run vs torch)", "values": acc, "color": ACC_COLOR, "marker": "square"},
                    {"name": "own error (layer alone on torch's input)", "values": own, "color": OWN_COLOR},
                ],
                len(layers),
                names=[str(lp.get("name")) for lp in layers],
                tooltips=[f'#{lp.get("index")} {lp.get("name")} ({lp.get("type")})' for lp in layers],
                tolerance=[lp.get("tolerance") for lp in layers],
                highlight=hi,
                highlight_label=f'#{hi} {fd.get("name")}' if fd else None,
                ylabel="max abs error",
            )
        )
        rows, classes = [], []
        for lp in layers:
            if lp.get("own_passed") is False:
                st, cls = '<span class="badge fail">diverges</span>', "bad"
            elif lp.get("inherited"):
                st, cls = '<span class="badge warn">inherited</span>', "inh"
            elif not lp.get("acc_passed"):
                st, cls = '<span class="badge warn">over tol</span>', "inh"
            else:
                st, cls = '<span class="badge pass">PASSED</span>', ""
            fused = lp.get("fused") or []
            name = _name(lp.get("name")) + (f'<br><span class="muted">+ fused {_name(", ".join(fused))}</span>' if fused else "")
            if lp.get("own_max_abs") is not None:
                own_txt = f'{_fmt(lp.get("own_max_abs"))}<br><span class="muted small">rel {_fmt(lp.get("own_rel"))}</span>'
            else:
                own_txt = f'<span class="muted">—</span><br><span class="muted small" style="white-space:normal">{_e(lp.get("own_reason") or "")}</span>'
            acc_txt = f'{_fmt(lp.get("acc_max_abs"))}<br><span class="muted small">rel {_fmt(lp.get("acc_rel"))}</span>'
            rows.append([
                ("num", _e(lp.get("index"))), ("name", name), ("", _e(lp.get("type"))),
                ("ops", _e(" ".join(_ops_short(lp.get("onnx_nodes") or [])))), ("num", _e(lp.get("shape"))),
                ("num", own_txt), ("num", acc_txt), ("num", _fmt(lp.get("tolerance"))), ("", st),
            ])
            classes.append(cls)
        parts.append(_table(
            ["#", "layer", "type", "ONNX ops", "shape", "own error (max abs)", "accumulated (max abs)", "tolerance", "status"],
            rows, classes,
        ))
    outs = loc.get("outputs") or []
    if outs:
        parts.append("<h3>Model outputs (full run)</h3>")
        parts.append(_table(
            ["output", "max abs", "rel", "tolerance", ""],
            [[("name", _name(o.get("name"))), ("num", _fmt(o.get("max_abs"))), ("num", _fmt(o.get("rel"))),
              ("num", _fmt(o.get("tolerance"))), ("", _badge(o.get("passed")))] for o in outs],
            ["" if o.get("passed") else "bad" for o in outs],
        ))
    if loc.get("unmapped"):
        parts.append("<h3>Layers not mapped</h3>" + _list(loc.get("unmapped")))
    if loc.get("unavailable"):
        parts.append("<h3>Providers not used</h3>" + _list(f"{k}: {v}" for k, v in loc["unavailable"].items()))
    if loc.get("notes"):
        parts.append("<h3>Notes</h3>" + _list(loc.get("notes")))
    return "".join(parts)


def _ops_short(ops: Sequence[str]) -> list[str]:
    """Op types with runs collapsed: Reshape Reshape Mul -> Reshape×2 Mul."""
    out: list[str] = []
    for op in ops:
        if out and out[-1].split("×")[0] == op:
            base, _, k = out[-1].partition("×")
            out[-1] = f"{base}×{int(k or 1) + 1}"
        else:
            out.append(op)
    return out


def check_report_html(parity_dict: dict | None, locate_result_dict: dict | None = None) -> str:
    """HTML for a check report (``ParityReport.to_dict()``), with the locate table if given.

    ``locate_result_dict`` defaults to ``parity_dict["locate"]`` when present.
    """
    parity = parity_dict or {}
    loc = locate_result_dict if locate_result_dict is not None else parity.get("locate")
    name = Path(str(parity.get("onnx_path") or (loc or {}).get("onnx_path") or "model.onnx")).name
    passed = parity.get("passed") if parity else (loc or {}).get("passed")
    body = [f"<h1>normswap check — {_e(name)} {_badge(passed)}</h1>"]
    if parity:
        body.append(_kv([
            ("ONNX file", parity.get("onnx_path")),
            ("criterion", parity.get("criterion")),
            ("atol / rtol", f'{_fmt(parity.get("atol"))} / {_fmt(parity.get("rtol"))}'),
            ("batch sizes", ", ".join(str(b) for b in parity.get("batch_sizes") or []) + (
                " (dynamic batch)" if parity.get("dynamic_batch") else " (static batch)")),
            ("inputs", "; ".join(
                f'{i.get("name")} {i.get("given_shape")} {i.get("dtype")} (ONNX {i.get("onnx_shape")})' for i in parity.get("inputs") or []
            )),
        ]))
        body.append("<h2>Providers</h2>" + _providers_table(parity))
        body.append(_outputs_section(parity))
        if parity.get("notes"):
            body.append("<h2>Notes</h2>" + _list(parity["notes"]))
    if loc:
        body.append(locate_section_html(loc))
    return _page(f"normswap check — {name}", "\n".join(body))


# --------------------------------------------------------------------------- convert


def _fidelity_table(cal: dict | None, fin: dict | None, repaired: bool, held: dict | None = None) -> str:
    cols = [("after calibration (in-sample)", cal)] + (
        [("after repair (in-sample)", fin)] if repaired and fin else [])
    if not repaired and fin and not cal:
        cols = [("final (in-sample)", fin)]
    if held:
        cols.append((f"held-out (--eval, {held.get('samples')} samples)", held))
    cols = [(h, d) for h, d in cols if d]
    if not cols:
        return '<p class="muted">No fidelity numbers (no calibration data).</p>'
    rows = [
        ("samples", "samples", lambda v: _fmt(v)),
        ("top-1 agreement with the original", "top1_agreement", _pct),
        ("top-5 overlap with the original", "top5_overlap", _pct),
        ("mean KL(original ‖ converted)", "kl", lambda v: _fmt(_nonneg(v))),
        ("relative output error", "rel_output_error", _fmt),
        ("accuracy of the original", "accuracy_original", _pct),
        ("accuracy of the converted model", "accuracy_converted", _pct),
        ("accuracy drop (points)", "accuracy_drop", lambda v: "—" if v is None else f"{100 * v:.1f}"),
    ]
    out = ["<table><tr><th></th>" + "".join(f"<th>{_e(h)}</th>" for h, _ in cols) + "</tr>"]
    for label, key, f in rows:
        if all(d.get(key) is None for _, d in cols):
            continue
        out.append(f"<tr><th>{_e(label)}</th>" + "".join(f'<td class="num">{f(d.get(key))}</td>' for _, d in cols) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _fit_text(fit: dict | None) -> str | None:
    """mode="fit": the affine fit's steps and held-back KL in one line."""
    if not fit:
        return None
    b, a = fit.get("before") or {}, fit.get("after") or {}
    txt = f'{fit.get("steps")} steps, {fit.get("trained_parameters")} parameters (the new norms\' scale and shift)'
    if b:
        txt += f'; held-back KL {_fmt(b.get("kl"))} → {_fmt(a.get("kl"))}'
        if not fit.get("kept"):
            txt += " (not better: the closed-form fit was kept)"
    return txt


def _repair_section(rep: dict) -> str:
    """Repair: what ran, and the held-back agreement (or KL) against time."""
    before, after = rep.get("before") or {}, rep.get("after") or {}
    body = ["<h2>Repair</h2>", _kv([
        ("steps", f'{rep.get("steps")} in {_fmt(rep.get("seconds"))} s (budget {_fmt(rep.get("budget_s"))} s; '
                  f'stopped: {rep.get("stopped")})'),
        ("trained on", f'{rep.get("train_samples")} calibration samples ({rep.get("held_samples")} held back), '
                       f'{rep.get("trained_parameters")} parameters, micro-batch {rep.get("micro_batch")}, '
                       f'{rep.get("feature_points")} feature points'),
        ("held-back top-1 agreement", f'{_pct(before.get("agreement"))} → {_pct(after.get("agreement"))}'
         if before.get("agreement") is not None else None),
        ("held-back accuracy", f'{_pct(before.get("accuracy"))} → {_pct(after.get("accuracy"))}'
         if before.get("accuracy") is not None else None),
        ("held-back KL", f'{_fmt(before.get("kl"))} → {_fmt(after.get("kl"))}' if before else None),
        ("result", "the repaired model was returned" if rep.get("kept") else
         "not better on the held-back samples (a lower KL without losing top-1 agreement or accuracy): "
         "the calibrated model was returned unchanged"),
    ])]
    curve = rep.get("curve") or []
    # the agreement while it moves; else the KL (what repair keeps the best of)
    agreements = {c.get("agreement") for c in curve}
    key = "agreement" if curve and None not in agreements and len(agreements) > 1 else "kl"
    pts = [(c.get("seconds"), c.get(key), f'{_fmt(c.get("seconds"))} s, step {c.get("step")}: '
            f'agreement {_pct(c.get("agreement"))}, KL {_fmt(c.get("kl"))}'
            + (f', accuracy {_pct(c.get("accuracy"))}' if c.get("accuracy") is not None else '')) for c in curve]
    if len(pts) > 1:
        body.append(f"<h3>Held-back {'top-1 agreement' if key == 'agreement' else 'KL'} against time</h3>")
        body.append(line_plot_svg(pts, percent=(key == "agreement"), xlabel="seconds of repair",
                                  ylabel="held-back top-1 agreement" if key == "agreement" else "held-back KL"))
    return "".join(body)


def convert_report_html(convert_report_dict: dict) -> str:
    """HTML for a convert report (``ConvertReport.to_dict()``)."""
    from normswap.convert.report import reweight_text

    r = convert_report_dict or {}
    layers = r.get("layers") or []
    srcs = "/".join(r.get("sources") or []) or "?"
    passed = r.get("passed")
    title = f"normswap convert — {srcs} → {r.get('target')}"
    body = [f"<h1>{_e(title)} {_badge(passed if passed is not None else True)}</h1>"]
    calibrated = bool(r.get("calibrated"))
    calib = "no (uncalibrated)" if not r.get("calibrated") else (
        f'yes: {r.get("calib_samples")} samples from {r.get("calib_source")}'
        + (" (with labels)" if r.get("calib_labels") else "")
    )
    timing = None
    if r.get("calib_seconds") is not None:
        timing = f'{_fmt(r.get("calib_seconds"))} s'
        if r.get("calib_ratio") is not None:
            timing += f' ({_fmt(r.get("calib_ratio"))}× one forward pass of {_fmt(r.get("forward_seconds"))} s)'
    body.append(_kv([
        ("sites converted", f'{r.get("sites", len(layers))} ({srcs} → {r.get("target")})'),
        ("mode", r.get("mode") if calibrated else None),  # a calibration mode means nothing without data
        ("groups", r.get("groups") if any(lf.get("groups") is not None for lf in layers) or not layers else None),
        ("calibrated", calib),
        ("passes over the data", r.get("passes") if calibrated else None),
        ("calibration time", timing),
        ("channel reweighting", reweight_text(r.get("reweight"))),
        ("affine fit", _fit_text(r.get("fit"))),
        ("distributed world size", r.get("distributed_world_size") if (r.get("distributed_world_size") or 1) > 1 else None),
    ]))
    fidelity = [r.get("fidelity_calibrated"), r.get("fidelity"), r.get("fidelity_eval")]
    measured = any(_num(lf.get("err_naive")) is not None or _num(lf.get("err_fitted")) is not None for lf in layers)
    rep = r.get("repair") or None
    if any(fidelity):
        body.append("<h2>Fidelity</h2>")
        body.append(_fidelity_table(r.get("fidelity_calibrated"), r.get("fidelity"), bool(rep and rep.get("kept")),
                                    r.get("fidelity_eval")))
    elif not calibrated:
        body.append('<div class="callout warn">Uncalibrated: no calibration data was given (<code>--calib</code>), '
                    "so the replacements keep the original norms' gamma/beta and neither fidelity nor per-layer "
                    "errors were measured. Pass <code>--calib DATA</code> (and <code>--eval DATA</code> for held-out "
                    "numbers) to calibrate and measure.</div>")
    if rep:
        body.append(_repair_section(rep))

    if layers and not measured:
        body.append(f"<h2>Converted layers ({_plural(len(layers), 'layer')})</h2>")
        body.append(_table(
            ["#", "layer", "replacement", "channels", "groups", "method", "note"],
            [[("num", str(i)), ("name", _name(lf.get("name"))),
              ("", _e(f'{lf.get("source_type")} → {lf.get("target_type")}')), ("num", _e(lf.get("channels"))),
              ("num", _e(lf.get("groups") if lf.get("groups") is not None else "—")), ("", _e(lf.get("method"))),
              ("", _e(lf.get("note") or ""))] for i, lf in enumerate(layers)]))
    elif layers:
        body.append("<h2>Per-layer reconstruction error</h2>")
        body.append(
            '<p class="muted small">Relative error ‖y<sub>new</sub> − y<sub>orig</sub>‖ / ‖y<sub>orig</sub>‖ over the calibration data: '
            "naive = a fresh replacement (γ=1, β=0, gcd(32, C) groups); fitted = the calibrated replacement.</p>"
        )
        naive = [lf.get("err_naive") for lf in layers]
        fitted = [lf.get("err_fitted") for lf in layers]
        tips = [f'#{i} {lf.get("name")}' for i, lf in enumerate(layers)]
        names = [str(lf.get("name")) for lf in layers]
        if any(_num(v) is not None for v in naive + fitted):
            body.append(log_plot_svg(
                [
                    {"name": "naive replacement", "values": naive, "color": NAIVE_COLOR, "marker": "square"},
                    {"name": "fitted replacement", "values": fitted, "color": FITTED_COLOR},
                ],
                len(layers), names=names, tooltips=tips, ylabel="relative error",
                xlabel="converted layer (model order)",
            ))
        groups = [lf.get("groups") for lf in layers]
        if any(g is not None for g in groups):
            body.append("<h3>Group counts chosen</h3>")
            body.append(bar_plot_svg(groups, names=names, tooltips=tips, color=ACC_COLOR, ylabel="groups",
                                     xlabel="converted layer (model order)"))
        rows = []
        for i, lf in enumerate(layers):
            en, ef = _num(lf.get("err_naive")), _num(lf.get("err_fitted"))
            gain = "—"
            if en is not None and ef is not None and ef > 0 and math.isfinite(en):
                g = en / ef
                gain = f"{g:,.0f}×" if g >= 100 else f"{g:.3g}×"
            cand = lf.get("group_errors") or {}
            chosen = str(lf.get("groups"))
            cand_txt = ", ".join(
                (f"<b>{_e(k)}: {_fmt(v)}</b>" if str(k) == chosen else f"{_e(k)}: {_fmt(v)}")
                for k, v in sorted(cand.items(), key=lambda kv: _num(kv[0]) or 0)
            )
            rows.append([
                ("num", str(i)), ("name", _name(lf.get("name"))), ("", _e(f'{lf.get("source_type")} → {lf.get("target_type")}')),
                ("num", _e(lf.get("channels"))), ("num", _e(lf.get("groups") if lf.get("groups") is not None else "—")),
                ("", _e(lf.get("method"))), ("num", _fmt(en)), ("num", _fmt(ef)), ("num", gain),
                ("small", cand_txt), ("", _e(lf.get("note") or "")),
            ])
        body.append(_table(
            ["#", "layer", "replacement", "channels", "groups", "method", "err naive", "err fitted", "naive/fitted",
             "candidates (groups: error)", "note"], rows,
        ))
    if r.get("warnings"):
        body.append("<h2>Warnings</h2>" + _list(r["warnings"]))
    files = r.get("files") or {}
    if files:
        body.append("<h2>Files</h2>" + _table(["what", "path"], [[("", _e(k)), ("name", _name(v))] for k, v in files.items()]))
    exp = r.get("export")
    if isinstance(exp, dict) and exp:
        body.append("<h2>Export</h2>" + _kv([
            ("path", exp.get("path")), ("exporter", exp.get("exporter")), ("opset", exp.get("opset")),
            ("dynamic batch", exp.get("dynamic_batch")), ("warnings", "; ".join(exp.get("warnings") or [])),
        ]))
    par = r.get("parity")
    if isinstance(par, dict) and par:
        body.append(f"<h2>ONNX parity {_badge(par.get('passed'))}</h2>" + _providers_table(par) + _outputs_section(par))
        if par.get("locate"):
            body.append(locate_section_html(par["locate"]))
    return _page(title, "\n".join(body))


# --------------------------------------------------------------------------- writing


def write_html(path, html: str, force: bool = False) -> str:
    """Write ``html`` to ``path`` atomically; refuse to overwrite unless ``force``. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise NormswapError(f"report path {path} is a directory; give a file name like report.html")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise NormswapError(f"report folder {folder} does not exist")
    if path.exists() and not force:
        raise NormswapError(f"{path} exists; pass force=True (--force) to overwrite it")
    from normswap.save import atomic_save  # the one safe-write path (normswap.outputs.OutputSet)

    atomic_save(path, lambda tmp: tmp.write_text(html, encoding="utf-8"), force=force)
    return str(path)
