"""``normswap convert`` on the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from normswap_cli.main import cli
from normswap_cli.common import unwrap_summary

ARCH = "samples.digits:digits_resnet"
DIGITS = Path(__file__).resolve().parent.parent / "samples" / "digits"


@pytest.fixture()
def sd_model(tmp_path):
    from samples.digits import digits_resnet
    from samples.models import randomize_norm_stats

    torch.manual_seed(0)
    m = randomize_norm_stats(digits_resnet()).eval()
    p = tmp_path / "digits_sd.pt"
    torch.save(m.state_dict(), p)
    x = np.random.default_rng(0).normal(size=(24, 1, 32, 32)).astype(np.float32)
    y = np.arange(24) % 10
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x, y=y)
    return m, p, calib


def test_cli_convert_state_dict_json(sd_model, tmp_path):
    m, p, calib = sd_model
    out, js = tmp_path / "out.pt", tmp_path / "convert.json"
    r = CliRunner().invoke(cli, ["convert", str(p), "--arch", ARCH, "--to", "gn", "--calib", str(calib), "-o", str(out),
                                 "--no-onnx", "--json", str(js), "--mode", "fast", "--groups", "4"])
    assert r.exit_code == 0, r.output
    assert "PASSED | normswap convert | 11 bn->gn sites | calibrated (fast, 24 samples)" in unwrap_summary(r.output)
    d = json.loads(js.read_text())
    assert d["sites"] == 11 and d["calibrated"] and d["calib_labels"] and d["files"]["model"] == str(out)
    assert all(layer["groups"] == 4 and layer["err_fitted"] <= layer["err_naive"] for layer in d["layers"])
    assert d["fidelity"]["accuracy_converted"] is not None
    sd = torch.load(out, weights_only=True)
    assert "stem.bn.running_mean" not in sd and sd["stem.bn.weight"].shape == (16,)
    # existing output: refused without --force
    r = CliRunner().invoke(cli, ["convert", str(p), "--arch", ARCH, "--to", "gn", "-o", str(out), "--no-onnx"])
    assert r.exit_code == 2 and "--force" in r.output


def test_cli_convert_errors(sd_model, tmp_path):
    m, p, calib = sd_model
    base = ["convert", str(p), "--arch", ARCH, "--no-onnx", "-o", str(tmp_path / "x.pt")]
    r = CliRunner().invoke(cli, base + ["--to", "rms"])
    assert r.exit_code == 2 and "valid" in r.output
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 3, 32, 32), np.float32))
    r = CliRunner().invoke(cli, base + ["--to", "gn", "--calib", str(bad)])
    assert r.exit_code == 2 and "(N, 1, H, W)" in r.output
    r = CliRunner().invoke(cli, base + ["--to", "gn", "--groups", "x"])
    assert r.exit_code == 2 and "--groups" in r.output


def test_cli_convert_uncalibrated(sd_model, tmp_path):
    m, p, calib = sd_model
    r = CliRunner().invoke(cli, ["convert", str(p), "--arch", ARCH, "--to", "in", "--no-onnx", "-o",
                                 str(tmp_path / "u.pt")])
    assert r.exit_code == 0, r.output
    assert "uncalibrated" in unwrap_summary(r.output)


def _digits_model(tmp_path) -> Path:
    src = DIGITS / "digits_resnet_module.pt"
    if not src.exists() or not (DIGITS / "calib.npz").exists():
        pytest.skip("digits artefacts missing")
    model = tmp_path / "digits_resnet_module.pt"
    shutil.copy(src, model)
    return model


def _convert_digits(tmp_path, *more):
    """``normswap convert`` of the bundled trained digits model (a copy in ``tmp_path``) on its
    calibration images, the JSON report in ``tmp_path / "r.json"``."""
    model = _digits_model(tmp_path)
    js = tmp_path / "r.json"
    r = CliRunner().invoke(cli, ["convert", str(model), "--trust", "--to", "gn", "--calib", str(DIGITS / "calib.npz"),
                                 "--json", str(js), *more])
    return r, js


def test_cli_digits_default_names_no_onnx(tmp_path):
    r, js = _convert_digits(tmp_path, "--no-onnx", "--mode", "fast")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "digits_resnet_module.gn.pt").exists()
    assert not (tmp_path / "digits_resnet_module.gn.onnx").exists()
    flat = " ".join(r.output.split())
    assert "PASSED | normswap convert | 11 bn->gn sites | calibrated (fast, 256 samples)" in flat
    d = json.loads(js.read_text())
    assert d["fidelity"]["top1_agreement"] >= 0.95 and d["fidelity"]["accuracy_converted"] >= 0.95
    loaded = torch.load(tmp_path / "digits_resnet_module.gn.pt", weights_only=False)
    assert isinstance(loaded.stem.bn, torch.nn.GroupNorm)


@pytest.mark.slow
def test_cli_headline_digits(tmp_path):
    """The README's first command on the bundled trained sample: convert, save, export, check (~40 s)."""
    r, js = _convert_digits(tmp_path)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "digits_resnet_module.gn.pt").exists() and (tmp_path / "digits_resnet_module.gn.onnx").exists()
    flat = " ".join(r.output.split())
    assert "PASSED | normswap convert | 11 bn->gn sites | calibrated (sequential, 256 samples)" in flat
    assert "parity ok" in flat
    d = json.loads(js.read_text())
    assert d["parity"]["passed"] and d["fidelity"]["top1_agreement"] >= 0.95
    assert d["files"]["onnx"].endswith("digits_resnet_module.gn.onnx")


# --- QA regressions: nothing partial left behind when a later step fails ---------------------


def test_cli_convert_onnx_in_missing_folder_refused_before_work(sd_model, tmp_path):
    _, p, calib = sd_model
    out = tmp_path / "out.pt"
    r = CliRunner().invoke(cli, ["convert", str(p), "--arch", ARCH, "--to", "gn", "--calib", str(calib), "-o", str(out),
                                 "--onnx", str(tmp_path / "nodir" / "m.onnx")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_cli_convert_failed_export_leaves_no_model(sd_model, tmp_path, monkeypatch):
    import sys

    from normswap.errors import NormswapError
    from normswap.export import export  # noqa: F401 (loads the module)

    def boom(*a, **k):
        raise NormswapError("export failed (simulated)")

    monkeypatch.setattr(sys.modules["normswap.export"], "export", boom)
    _, p, calib = sd_model
    out = tmp_path / "out.pt"
    r = CliRunner().invoke(cli, ["convert", str(p), "--arch", ARCH, "--to", "gn", "--calib", str(calib), "-o", str(out)])
    assert r.exit_code == 2 and "simulated" in r.output
    assert not out.exists() and not out.with_suffix(".onnx").exists()
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []


def test_cli_convert_calib_samples_zero_clear_error(sd_model, tmp_path):
    _, p, calib = sd_model
    r = CliRunner().invoke(cli, ["convert", str(p), "--arch", ARCH, "--to", "gn", "--calib", str(calib),
                                 "--calib-samples", "0", "-o", str(tmp_path / "o.pt"), "--no-onnx"])
    assert r.exit_code == 2 and "--calib-samples" in r.output


def test_cli_convert_calib_random_says_so_in_summary(sd_model, tmp_path):
    # QA regression: the PASSED line read "calibrated (...): top-1 agreement 99.6%" for
    # synthetic data, as if measured on real inputs
    _, p, _ = sd_model
    r = CliRunner().invoke(cli, ["convert", str(p), "--arch", ARCH, "--to", "gn", "--calib", "random",
                                 "--input-shape", "1,1,32,32", "--calib-samples", "16", "-o", str(tmp_path / "o.pt"),
                                 "--no-onnx"])
    assert r.exit_code == 0, r.output
    assert "calibrated on random inputs (" in unwrap_summary(r.output)


def test_cli_convert_eval_held_out(sd_model, tmp_path):
    m, p, calib = sd_model
    held = tmp_path / "held.npz"
    x = np.random.default_rng(1).normal(size=(12, 1, 32, 32)).astype(np.float32)
    np.savez(held, x=x, y=np.arange(12) % 10)
    out, js = tmp_path / "e.pt", tmp_path / "e.json"
    base = ["convert", str(p), "--arch", ARCH, "--to", "gn", "--calib", str(calib), "--no-onnx", "--mode", "fast"]
    r = CliRunner().invoke(cli, base + ["-o", str(out), "--eval", str(held), "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "held-out (12 eval samples)" in r.output
    d = json.loads(js.read_text())
    assert d["fidelity_basis"] == "held-out" and d["fidelity_eval"]["samples"] == 12
    assert d["fidelity_eval"]["data"] == "held-out" and d["fidelity"]["in_sample"] is True
    assert d["fidelity_eval"]["accuracy_original"] is not None
    # without --eval: the summary says in-sample
    r = CliRunner().invoke(cli, base + ["-o", str(tmp_path / "f.pt")])
    assert r.exit_code == 0 and "in-sample" in r.output


def test_cli_convert_refuses_nan_calibration_before_writing(sd_model, tmp_path):
    m, p, calib = sd_model
    x = np.random.default_rng(0).normal(size=(8, 1, 32, 32)).astype(np.float32)
    x[3, 0, 1, 1] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, x=x)
    out = tmp_path / "n.pt"
    r = CliRunner().invoke(cli, ["convert", str(p), "--arch", ARCH, "--to", "gn", "--calib", str(bad), "--no-onnx",
                                 "-o", str(out)])
    assert r.exit_code != 0 and "1 of 8 samples (first: sample 3)" in r.output and not out.exists()


def test_cli_convert_mode_fit_reports_the_affine_fit(tmp_path):
    r, js = _convert_digits(tmp_path, "--no-onnx", "--mode", "fit")
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "calibrated (fit, 256 samples)" in flat and "affine fit" in flat and "held-back KL" in flat
    d = json.loads(js.read_text())
    assert d["mode"] == "fit" and d["fit"]["steps"] == 42 and d["fit"]["held_samples"] == 36
    assert d["fit"]["after"]["kl"] <= d["fit"]["before"]["kl"]
    assert d["fidelity"]["accuracy_converted"] >= 0.95


def test_cli_reweighting_is_on_by_default_and_no_reweight_turns_it_off(tmp_path):
    """The real trained digits network: the state dict written with reweighting rebuilds through
    --arch (the recipe carries the conv biases reweighting created) and computes what convert
    returned; --no-reweight leaves every producer as it was."""
    from normswap.io import load_model
    from samples.digits import load_trained

    model = load_trained("bn")
    p = tmp_path / "digits.pt"
    torch.save(model.state_dict(), p)
    calib = DIGITS / "calib.npz"
    outs = {}
    for flag in ([], ["--no-reweight"]):
        out, js = tmp_path / f"out{len(flag)}.pt", tmp_path / f"r{len(flag)}.json"
        r = CliRunner().invoke(cli, ["convert", str(p), "--arch", ARCH, "--to", "gn", "--calib", str(calib), "-o",
                                     str(out), "--no-onnx", "--json", str(js), "--calib-samples", "64"] + flag)
        assert r.exit_code == 0, r.output
        outs[bool(flag)] = (out, json.loads(js.read_text()))
    on, off = outs[False][1], outs[True][1]
    assert on["reweight"]["sites"] == 11 and off["reweight"] is None
    assert all(", reweighted" in layer["method"] for layer in on["layers"])
    assert not any("reweighted" in layer["method"] for layer in off["layers"])
    x = torch.as_tensor(np.load(DIGITS / "test.npz")["x"][:64])
    rebuilt = {k: load_model(v[0], arch=ARCH).module.eval() for k, v in outs.items()}
    with torch.no_grad():
        assert rebuilt[False].stem.conv.bias is not None and model.stem.conv.bias is None
        assert rebuilt[True].stem.conv.bias is None
        assert torch.equal(rebuilt[True].stem.conv.weight, model.stem.conv.weight)
        ref = model(x).argmax(1)
        assert (rebuilt[False](x).argmax(1) == ref).float().mean() >= 0.98
