"""normswap.html_report: self-contained HTML for check (with locate) and convert."""

import math
import os
import re
import shutil
import struct
import subprocess
import zlib

import pytest

from normswap.errors import NormswapError
from normswap.html_report import check_report_html, convert_report_html, write_html

LONG = "encoder.stages.3.blocks.11.mixer.depthwise_convolution_with_a_very_long_name.norm"


def _parity_dict():
    return {
        "job": "check", "passed": False, "onnx_path": "/tmp/model.onnx", "atol": 1e-4, "rtol": 1e-3,
        "criterion": "max|onnx - torch| <= atol + rtol * max|torch| per output (NaN/Inf must match)",
        "inputs": [{"name": "x", "onnx_shape": ["batch", 3, 8, 8], "dtype": "float32", "given_shape": [2, 3, 8, 8]}],
        "batch_sizes": [2, 1], "dynamic_batch": True,
        "providers": [
            {"label": "cpu", "provider": "CPUExecutionProvider", "ran": "CPUExecutionProvider", "status": "failed",
             "reason": "output linear at batch size 2: max abs error 0.005 > tolerance 0.0004", "torch_device": "cpu",
             "max_abs": 0.005, "latency_ms": 0.4, "torch_latency_ms": 0.9,
             "batches": [{"batch_size": b, "passed": False, "outputs": [
                 {"name": "linear", "shape": [b, 4], "max_abs": 0.005, "mean_abs": 0.002, "max_rel": 0.04, "cosine": 0.9999,
                  "top1_agreement": 1.0, "tolerance": 0.0004, "passed": False, "reason": "max abs error 0.005 > tolerance 0.0004"}]}
                 for b in (2, 1)]},
            {"label": "cuda", "provider": "CUDAExecutionProvider", "ran": None, "status": "unavailable",
             "reason": "not installed", "torch_device": None, "max_abs": None, "latency_ms": None,
             "torch_latency_ms": None, "batches": []},
        ],
        "notes": ["random inputs (seed 0) shaped like the ONNX inputs"],
    }


def _locate_dict():
    layers = []
    names = ["stem", "layer1.conv", "layer1.act", LONG, "layer2.act", "head"]
    for i, n in enumerate(names):
        own = 0.2 if i == 3 else (0.0 if n.endswith("act") else 3e-7)
        acc = 3e-7 if i < 3 else 0.2 / (i - 2)
        tol = 1e-3
        layers.append({
            "name": n, "type": "Conv2d", "index": i, "onnx_output": f"v{i}", "onnx_nodes": ["Conv"], "shape": [2, 8, 8, 8],
            "max_abs_torch": 1.0, "tolerance": tol, "acc_max_abs": acc, "acc_rel": acc, "acc_passed": acc <= tol,
            "own_max_abs": own, "own_rel": own, "own_passed": own <= tol, "own_reason": None, "fused": [],
            "diverges": own > tol, "inherited": acc > tol and own <= tol,
        })
    return {
        "onnx_path": "/tmp/model.onnx", "passed": False, "status": "diverged", "provider": "cpu",
        "ran": "CPUExecutionProvider", "torch_device": "cpu", "atol": 1e-4, "rtol": 1e-3,
        "criterion": "max|onnx - torch| <= atol + rtol * max|torch| per layer output", "mapping": "name_scopes",
        "first_divergent": layers[3], "first_accumulated": LONG, "layers": layers,
        "unmapped": ["drop (Dropout): no ONNX nodes (identity at eval)"], "unavailable": {"cuda": "not installed"},
        "outputs": [{"name": "linear", "max_abs": 0.005, "rel": 0.01, "tolerance": 0.0004, "passed": False}],
        "notes": [], "summary": "first divergent layer: ...",
    }


def _convert_dict():
    from normswap.convert.repair import RepairResult
    from normswap.convert.report import ConvertReport, Fidelity, LayerFit

    layers = [
        LayerFit(f"features.{i}.bn" if i != 2 else LONG, "bn", "BatchNorm2d", "GroupNorm", 16, groups=g,
                 err_naive=10.0 * (i + 1), err_fitted=0.03 / (i + 1),
                 group_errors={1: 0.03 / (i + 1), 2: 0.04, 4: 0.05, 8: 0.06, 16: 0.08})
        for i, g in enumerate([1, 2, 4, 1])
    ]
    rep = ConvertReport(
        target="gn", sources=["bn"], mode="sequential", groups="auto", calibrated=True, calib_source="digits.npz",
        calib_samples=256, calib_labels=True, passes=2, layers=layers,
        fidelity_calibrated=Fidelity(256, classifier=True, top1_agreement=0.965, kl=0.05, rel_output_error=0.1,
                                     accuracy_original=0.995, accuracy_converted=0.96),
        fidelity=Fidelity(256, classifier=True, top1_agreement=0.99, kl=0.01, rel_output_error=0.05,
                          accuracy_original=0.995, accuracy_converted=0.99, top5_overlap=0.97),
        repair=RepairResult(budget_s=60, steps=40, seconds=58.2, train_samples=220, held_samples=36, micro_batch=8,
                            trained_parameters=151738, feature_points=4, stopped="time budget", kept=True,
                            before={"kl": 0.05, "agreement": 0.94}, after={"kl": 0.01, "agreement": 0.972},
                            curve=[{"seconds": 0.0, "step": 0, "kl": 0.05, "agreement": 0.94},
                                   {"seconds": 30.1, "step": 20, "kl": 0.02, "agreement": 0.961},
                                   {"seconds": 58.2, "step": 40, "kl": 0.01, "agreement": 0.972}]),
        calib_seconds=1.2, forward_seconds=0.4, warnings=["calibrated on 256 samples"],
    )
    return rep.to_dict()


def _assert_self_contained(html):
    assert "<script" not in html.lower()
    assert not re.search(r"\b(src|href)\s*=", html, re.I)
    assert "url(" not in html
    # the only URL is the SVG namespace (an identifier, never fetched)
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {"http://www.w3.org/2000/svg"}


def test_check_report_html_with_locate():
    html = check_report_html(_parity_dict(), _locate_dict())
    _assert_self_contained(html)
    assert html.startswith("<!DOCTYPE html>")
    assert html.count("<svg") == 2  # outputs vs tolerance, per-layer own/accumulated
    assert "First divergent layer" in html
    assert "log scale" in html and "tolerance" in html
    plain = re.sub(r"<wbr>", "", html)
    assert plain.count(LONG) >= 2  # callout and table: the full name, never shortened
    assert "diverges" in html and "inherited" in html
    assert "Dropout" in html and "not installed" in html


def test_check_report_html_reads_locate_from_parity_and_works_alone():
    d = _parity_dict()
    d["locate"] = _locate_dict()
    assert "First divergent layer" in check_report_html(d)
    alone = check_report_html(None, _locate_dict())
    _assert_self_contained(alone)
    assert "First divergent layer" in alone
    plain = check_report_html(_parity_dict())
    assert "First divergent layer" not in plain and plain.count("<svg") == 1


def test_locate_unavailable_and_zero_and_infinite_errors():
    loc = _locate_dict()
    loc["layers"][0]["acc_max_abs"] = "inf"
    loc["layers"][1]["own_max_abs"] = None
    loc["layers"][1]["own_reason"] = "no PyTorch activation for v0"
    html = check_report_html(None, loc)
    assert "∞" in html and "no PyTorch activation for v0" in html
    un = {"status": "unavailable", "unavailable": {"cuda": "fell back to CPUExecutionProvider"}, "layers": []}
    assert "fell back" in check_report_html(None, un)


def test_convert_report_html():
    html = convert_report_html(_convert_dict())
    _assert_self_contained(html)
    assert html.count("<svg") == 3  # naive vs fitted, group counts, repair's held-back agreement vs time
    assert "naive replacement" in html and "fitted replacement" in html
    assert "Group counts chosen" in html
    assert "96.5%" in html and "99.0%" in html  # fidelity after calibration and after repair
    assert "after repair (in-sample)" in html and "top-5 overlap" in html and "accuracy drop" in html
    assert "Held-back top-1 agreement against time" in html and "97.2%" in html
    assert "30.1 s, step 20: agreement 96.1%" in html  # a point's tooltip
    assert re.sub(r"<wbr>", "", html).count(LONG) >= 1
    assert "calibrated on 256 samples" in html


def test_write_html_atomic_and_no_overwrite(tmp_path):
    p = tmp_path / "r.html"
    write_html(p, "<html>1</html>")
    assert p.read_text() == "<html>1</html>"
    with pytest.raises(NormswapError, match="exists"):
        write_html(p, "<html>2</html>")
    assert p.read_text() == "<html>1</html>"
    write_html(p, "<html>2</html>", force=True)
    assert p.read_text() == "<html>2</html>"
    assert sorted(os.listdir(tmp_path)) == ["r.html"]  # no temp file left
    with pytest.raises(NormswapError):
        write_html(tmp_path, "x")
    with pytest.raises(NormswapError):
        write_html(tmp_path / "missing" / "r.html", "x")


# --------------------------------------------------------------------------- real browser


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _png_pixels(path):
    """Decoded RGB(A) scanline bytes of a PNG (no PIL needed); filter bytes are left in."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    return width, height, zlib.decompress(idat)


@pytest.mark.skipif(_browser() is None, reason="no chromium installed")
@pytest.mark.parametrize("kind", ["check", "convert"])
def test_reports_render_in_headless_chromium(tmp_path, kind):
    html = check_report_html(_parity_dict(), _locate_dict()) if kind == "check" else convert_report_html(_convert_dict())
    page = tmp_path / f"{kind}.html"
    write_html(page, html)
    png = tmp_path / f"{kind}.png"
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1000,1400", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert png.exists() and png.stat().st_size > 5000
    w, h, raw = _png_pixels(png)
    assert (w, h) == (1000, 1400)
    # not blank: a blank page decodes to a handful of distinct byte values
    assert len(set(raw[: len(raw) // 2])) > 50


def test_plot_ticks_are_round_numbers_inside_the_range():
    from normswap.html_plots import nice_ticks

    for lo, hi in ((0.0, 20.0), (0.00847, 0.0216), (0.9, 1.0), (0.0, 596.3), (-3.0, 7.5), (0.0, 1e-9)):
        ticks = nice_ticks(lo, hi)
        assert 2 <= len(ticks) <= 12 and all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks), (lo, hi, ticks)
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5, 10)), (lo, hi, step)
    assert nice_ticks(0.0, 20.0) == [0, 5, 10, 15, 20]


def test_convert_report_html_shows_the_affine_fit():
    d = _convert_dict()
    d["mode"] = "fit"
    d["fit"] = {"steps": 42, "trained_parameters": 1234, "kept": True, "before": {"kl": 0.41, "agreement": 0.8},
                "after": {"kl": 0.35, "agreement": 0.83}}
    html = convert_report_html(d)
    _assert_self_contained(html)
    assert "affine fit" in html and "42 steps, 1234 parameters" in html and "0.41 → 0.35" in html
    d["fit"]["kept"] = False
    assert "closed-form fit was kept" in convert_report_html(d)
    del d["fit"]
    assert "affine fit" not in convert_report_html(d)
