"""Issue 18 regressions (convert --calib/--eval/--repair with image folders), each with real
files and real processes: a model whose forward raises on the --eval data or in repair's
forward with gradients is a one-line exit-2 error (not exit 3); --eval naming the --calib data
is refused (its numbers would be in-sample, reported as held-out); --time-budget /
--repair-steps without --repair, --repair without --calib and --repair with too few samples
to hold any back are refused; skipped images are warned about once; the HTML repair curve never
shows an agreement above 100 %; finite activations whose squares overflow float32 no longer
give NaN fits with a note that blames the original model; a repair whose budget ends before
its first step says so; the notes about a killed run's leftovers fit 80 columns."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "samples" / "digits" / "digits_resnet.pt"
CALIB = ROOT / "samples" / "digits" / "calib.npz"
ARCH = "samples.digits:digits_resnet"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="80", OMP_NUM_THREADS="1")


def md5(p: Path) -> str:
    if p.is_dir():
        h = hashlib.md5()
        for f in sorted(p.rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()
    return hashlib.md5(p.read_bytes()).hexdigest()


def convert(*args, cwd: Path, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``normswap convert ARGS`` as a real process."""
    return subprocess.run([sys.executable, "-m", "normswap_cli.main", "convert", *map(str, args)], cwd=str(cwd),
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr + p.stdout and "internal error" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def outputs_left(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _digits(n: int, scale_sample: int | None = None, scale: float = 1.0):
    d = np.load(CALIB)
    x, y = d["x"][:n].copy(), d["y"][:n].copy()
    if scale_sample is not None:
        x[scale_sample] *= scale
    return x, y


PICKY = '''
import torch
from torch import nn
from samples.digits import digits_resnet


class Picky(nn.Module):
    """A forward that raises on some user data (a batch holding a bright sample)."""

    def __init__(self):
        super().__init__()
        self.net = digits_resnet()

    def forward(self, x):
        if x.shape[0] > 1 and float(x.amax()) > 5.0:
            raise ValueError("a sample is too bright for this model")
        return self.net(x)


class GradPicky(Picky):
    """A forward that raises with gradients on (e.g. a training forward that wants targets)."""

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("this forward with gradients needs targets")
        return self.net(x)


def picky():
    return Picky()


def grad_picky():
    return GradPicky()
'''


@pytest.fixture()
def picky(tmp_path):
    """A factory module on the path, the state dict of the trained digits model inside it, and
    calibration data with one bright sample (--eval)."""
    (tmp_path / "pickymod.py").write_text(textwrap.dedent(PICKY))
    sys.path.insert(0, str(tmp_path))
    try:
        import pickymod

        m = pickymod.picky()
        m.net.load_state_dict(torch.load(MODEL))
        torch.save(m.state_dict(), tmp_path / "picky.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pickymod", None)
    x, y = _digits(64, scale_sample=10, scale=100.0)
    np.savez(tmp_path / "bright.npz", x=x, y=y)
    x, y = _digits(40)
    np.savez(tmp_path / "calib40.npz", x=x, y=y)
    (tmp_path / "out").mkdir()
    env = dict(ENV, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    return tmp_path, env


# ----------------------------------------------------------------- a forward that raises


def test_forward_raising_on_eval_data_is_one_line_exit_2(picky):
    tmp, env = picky
    before = md5(tmp / "bright.npz")
    p = convert(tmp / "picky.pt", "--arch", "pickymod:picky", "--to", "gn", "--calib", tmp / "calib40.npz",
                "--eval", tmp / "bright.npz", "-o", tmp / "out" / "m.pt", "--no-onnx", cwd=tmp, env=env)
    one_line_error(p, "ValueError", "held-out batch", "too bright")
    assert outputs_left(tmp / "out") == [] and md5(tmp / "bright.npz") == before


def test_forward_raising_in_repair_is_one_line_exit_2(picky):
    tmp, env = picky
    p = convert(tmp / "picky.pt", "--arch", "pickymod:grad_picky", "--to", "gn", "--calib", tmp / "calib40.npz",
                "--repair", "--repair-steps", "2", "-o", tmp / "out" / "m.pt", "--json", tmp / "out" / "r.json",
                "--no-onnx", cwd=tmp, env=env)
    one_line_error(p, "RuntimeError", "repair batch", "needs targets")
    assert outputs_left(tmp / "out") == ["r.json"]  # only the error report
    assert json.loads((tmp / "out" / "r.json").read_text())["passed"] is False


# ----------------------------------------------------------------- option combinations


@pytest.mark.parametrize("extra, needle", [
    (["--time-budget", "5"], "--time-budget only applies with --repair"),
    (["--repair-steps", "3"], "--repair-steps only applies with --repair"),
    (["--time-budget", "5", "--repair-steps", "3"], "--time-budget and --repair-steps"),
])
def test_repair_options_without_repair_are_refused(tmp_path, extra, needle):
    p = convert(MODEL, "--arch", ARCH, "--to", "gn", "--calib", CALIB, "-o", tmp_path / "m.pt", *extra,
                cwd=tmp_path)
    one_line_error(p, needle)
    assert outputs_left(tmp_path) == []


def test_repair_without_calib_is_refused(tmp_path):
    p = convert(MODEL, "--arch", ARCH, "--to", "gn", "--repair", "--time-budget", "2", "-o", tmp_path / "m.pt",
                "--input-shape", "2,1,32,32", cwd=tmp_path)
    one_line_error(p, "--repair needs calibration data")
    assert outputs_left(tmp_path) == []


def test_repair_with_too_few_samples_to_hold_back_is_refused(tmp_path):
    x, y = _digits(5)
    np.savez(tmp_path / "five.npz", x=x, y=y)
    (tmp_path / "out").mkdir()
    p = convert(MODEL, "--arch", ARCH, "--to", "gn", "--calib", tmp_path / "five.npz", "--repair",
                "--time-budget", "3", "-o", tmp_path / "out" / "m.pt", cwd=tmp_path)
    one_line_error(p, "--repair needs at least 14 calibration samples", "got 5")
    # --calib-samples counts too
    p = convert(MODEL, "--arch", ARCH, "--to", "gn", "--calib", CALIB, "--calib-samples", "13", "--repair",
                "--repair-steps", "1", "-o", tmp_path / "out" / "m.pt", cwd=tmp_path)
    one_line_error(p, "got 13")
    assert outputs_left(tmp_path / "out") == []


def test_eval_that_is_the_calib_data_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    link = tmp_path / "same.npz"
    link.symlink_to(CALIB)
    for ev in (CALIB, link):
        p = convert(MODEL, "--arch", ARCH, "--to", "gn", "--calib", CALIB, "--eval", ev,
                    "-o", tmp_path / "out" / "m.pt", cwd=tmp_path)
        one_line_error(p, "is the --calib data")
    assert outputs_left(tmp_path / "out") == []


# ----------------------------------------------------------------- image folders


def test_skipped_images_are_warned_about_once(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    x, y = _digits(16)
    px = np.clip((x[:, 0] * 0.376 + 0.3053) * 255, 0, 255).astype(np.uint8)
    for i in range(16):
        Image.fromarray(px[i], "L").save(folder / f"{int(y[i]):04d}_{i}.png")
    (folder / "0001_empty.png").write_bytes(b"")
    (folder / "0002_text.jpg").write_text("not an image\n")
    before = md5(folder)
    (tmp_path / "out").mkdir()
    p = convert(MODEL, "--arch", ARCH, "--to", "gn", "--calib", folder, "--preprocess", "none", "--image-size", "32",
                "--skip-bad-images", "-o", tmp_path / "out" / "m.pt", "--json", tmp_path / "out" / "r.json",
                "--no-onnx", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    warnings = json.loads((tmp_path / "out" / "r.json").read_text())["warnings"]
    about = [w for w in warnings if "unreadable image" in w]
    assert len(about) == 1 and "skipped 2" in about[0], warnings
    assert p.stdout.count("unreadable image") == 1, p.stdout
    assert md5(folder) == before


# ----------------------------------------------------------------- report, numerics, budget


def test_html_repair_curve_never_above_100_percent():
    from normswap.html_plots import line_plot_svg
    from normswap.html_report import _repair_section

    svg = line_plot_svg([(0.0, 1.0, "a"), (9.9, 1.0, "b")], percent=True)
    assert "110%" not in svg and "150%" not in svg and "100%" in svg
    # a flat agreement says nothing: the held-back KL (what repair keeps the best of) is drawn
    html = _repair_section({"steps": 121, "seconds": 9.9, "budget_s": 10, "kept": True,
                            "before": {"kl": 0.02, "agreement": 1.0}, "after": {"kl": 0.01, "agreement": 1.0},
                            "curve": [{"seconds": 1.0, "step": 0, "kl": 0.02, "agreement": 1.0},
                                      {"seconds": 9.9, "step": 121, "kl": 0.01, "agreement": 1.0}]})
    assert "Held-back KL against time" in html and "110%" not in html


def test_float32_overflowing_activations_are_fitted_in_float64():
    from normswap.convert.stats import ConvSiteStats

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    x[1] *= 1e19  # finite, but its squares overflow float32
    y = 2.0 * x + 1.0
    st = ConvSiteStats(3, [1, 3], 1e-5)
    st.update(x, y)
    for t in st.sum_tensors():
        assert torch.isfinite(t).all()
    s, t, _ = st.fit_x()
    assert torch.allclose(s, torch.full_like(s, 2.0), rtol=1e-6)


def test_repair_whose_budget_ends_before_a_step_says_so():
    from torch import nn

    from normswap.convert import convert as run_convert

    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    _, rep = run_convert(model, "gn", torch.randn(28, 1, 8, 8), repair=True, time_budget_s=1e-9)
    assert rep.repair.steps == 0 and not rep.repair.kept
    assert any("ran out before its first step" in w for w in rep.warnings), rep.warnings
    assert not any("did not improve" in w for w in rep.warnings)


# ----------------------------------------------------------------- a killed run's leftovers


def _wide_lines(text: str, width: int = 80) -> list[str]:
    """Lines wider than ``width`` that are not a single unbroken word (a path, a layer name)."""
    return [ln for ln in text.splitlines() if len(ln) > width and len(ln.strip().split()) > 1]


def test_notes_about_a_killed_runs_claims_fit_80_columns(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("m.pt", "m.onnx", "report.json"):  # what a SIGKILLed run leaves: unlocked claims
        (out / f".{name}.normswap-claim").write_text("999999 1 0123456789abcdef\n")
    p = convert(MODEL, "--arch", ARCH, "--to", "gn", "--calib", CALIB, "--calib-samples", "16", "-o", out / "m.pt",
                "--json", out / "report.json", "--no-check", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "a claim no running normswap run holds" in " ".join(p.stderr.split())
    assert _wide_lines(p.stderr) == [] and _wide_lines(p.stdout) == [], p.stderr
    assert sorted(os.listdir(out)) == ["m.onnx", "m.pt", "report.json"]


@pytest.mark.slow
def test_sigkill_during_repair_leaves_only_hidden_files_and_the_next_run_succeeds(tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    out.mkdir()
    args = [sys.executable, "-m", "normswap_cli.main", "convert", str(MODEL), "--arch", ARCH, "--to", "gn",
            "--calib", str(CALIB), "--repair", "--time-budget", "30", "-o", str(out / "m.pt"),
            "--json", str(out / "r.json"), "--report", str(out / "r.html")]
    before = md5(CALIB), md5(MODEL)
    proc = subprocess.Popen(args, cwd=str(tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while (not any(n.endswith(".normswap-claim") for n in os.listdir(out)) and proc.poll() is None
           and time.time() - t0 < 120):
        time.sleep(0.05)  # claimed: the run has started its work
    assert proc.poll() is None, proc.communicate()
    time.sleep(5)  # calibrating or repairing (the 30 s budget keeps it from committing this early)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    left = os.listdir(out)
    assert left and all(n.startswith(".") and "normswap" in n for n in left), left
    p = subprocess.run(args[:-8] + ["--repair-steps", "2", "-o", str(out / "m.pt"), "--json", str(out / "r.json"),
                                    "--report", str(out / "r.html")], cwd=str(tmp_path), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out)) == ["m.onnx", "m.pt", "r.html", "r.json"]
    assert _wide_lines(p.stderr) == [] and _wide_lines(p.stdout) == [], p.stderr + p.stdout
    assert (md5(CALIB), md5(MODEL)) == before
