"""Issue 12 regressions, in-process: outputs never overwrite inputs or each other (``--json``
included), exit 2 writes an error JSON, honest load reports, broken statistics, sizes and
recipes checked before allocating, help that fits 80 columns."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from normswap_cli.common import unwrap_summary
from normswap_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
ARCH = "samples.digits:digits_resnet"


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


def small():
    return Small().eval()


@pytest.fixture()
def files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    torch.manual_seed(0)
    m = small()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32))
    return tmp_path


SMALL = "test_hostile_cli:small"


def _hidden(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


# ----------------------------------------------------------------------- item 1: inputs protected


@pytest.mark.parametrize("cmd", ["fold", "export"])
def test_an_output_naming_the_data_file_is_refused_even_with_force(files, cmd):
    calib = files / "calib.npz"
    before = _digest(calib)
    data_opt = "--calib" if cmd == "convert" else "--data"
    out_opt = "--onnx" if cmd == "fold" else "-o"
    extra = ["-o", files / "f.pt"] if cmd == "fold" else []
    r = invoke(cmd, files / "m.pt", "--arch", SMALL, data_opt, calib, out_opt, calib, "--force", *extra)
    assert r.exit_code == 2, r.output
    assert "is the " in r.output and "never overwritten" in r.output
    assert _digest(calib) == before
    assert not (files / "f.pt").exists() and _hidden(files) == []


def test_fold_output_naming_the_model_is_refused_even_with_force(files):
    before = _digest(files / "m.pt")
    r = invoke("fold", files / "m.pt", "--arch", SMALL, "-o", files / "m.pt", "--force")
    assert r.exit_code == 2 and "input model" in r.output
    assert _digest(files / "m.pt") == before


# ----------------------------------------------------------------------- item 2: --json is an output


def test_json_naming_the_fold_output_is_refused_and_nothing_is_written(files):
    out = files / "m.folded.pt"
    r = invoke("fold", files / "m.pt", "--arch", SMALL, "--json", out)
    assert r.exit_code == 2, r.output
    assert "-o" in r.output and "--json" in r.output
    assert not out.exists() and _hidden(files) == []


@pytest.mark.parametrize("cmd", ["fold", "export", "check"])
def test_json_over_an_existing_file_needs_force(files, cmd):
    js = files / "old.json"
    js.write_text("keep me")
    if cmd == "check":
        assert invoke("export", files / "m.pt", "--arch", SMALL, "-o", files / "m.onnx",
                      "--input-shape", "2,1,8,8").exit_code == 0
        args = ["check", files / "m.pt", "--arch", SMALL, files / "m.onnx", "--providers", "cpu", "--repeats", "0"]
    elif cmd == "export":
        args = ["export", files / "m.pt", "--arch", SMALL, "-o", files / "e.onnx", "--input-shape", "2,1,8,8"]
    else:
        args = ["fold", files / "m.pt", "--arch", SMALL, "-o", files / "f.pt"]
    r = invoke(*args, "--json", js)
    assert r.exit_code == 2 and "--force" in r.output, r.output
    assert js.read_text() == "keep me"
    assert not (files / "e.onnx").exists() and not (files / "f.pt").exists()
    r = invoke(*args, "--json", js, "--force")
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    assert d["job"] == cmd and d["passed"] is True


@pytest.mark.parametrize("target", ["m.pt", "calib.npz", "m.onnx"])
def test_check_json_never_overwrites_its_inputs(files, target):
    assert invoke("export", files / "m.pt", "--arch", SMALL, "-o", files / "m.onnx", "--input-shape", "2,1,8,8").exit_code == 0
    before = _digest(files / target)
    r = invoke("check", files / "m.pt", "--arch", SMALL, files / "m.onnx", "--data", files / "calib.npz",
               "--providers", "cpu", "--repeats", "0", "--json", files / target, "--force")
    assert r.exit_code == 2 and "never overwritten" in r.output, r.output
    assert _digest(files / target) == before


def test_exit_2_with_json_writes_an_error_report(files):
    js = files / "err.json"
    r = invoke("fold", files / "missing.pt", "--arch", SMALL, "-o", files / "f.pt", "--json", js)
    assert r.exit_code == 2
    d = json.loads(js.read_text())
    assert d == {"job": "fold", "passed": False, "error": d["error"]} and "no such file" in d["error"]
    js2 = files / "err2.json"
    r = invoke("export", files / "m.pt", "--arch", SMALL, "-o", files / "e.onnx", "--input-shape", "0,1",
               "--json", js2)
    assert r.exit_code == 2 and json.loads(js2.read_text())["passed"] is False
    assert not (files / "e.onnx").exists()


def test_error_report_never_lands_on_a_json_path_the_error_is_about(files):
    js = files / "old.json"
    js.write_text("keep")
    r = invoke("fold", files / "m.pt", "--arch", SMALL, "-o", files / "f.pt", "--json", js)
    assert r.exit_code == 2 and js.read_text() == "keep"


def test_every_json_report_has_job_and_passed(files):
    for cmd, args in (("fold", ["-o", files / "f.pt"]), ("export", ["-o", files / "e.onnx", "--input-shape", "2,1,8,8"])):
        js = files / f"{cmd}.json"
        r = invoke(cmd, files / "m.pt", "--arch", SMALL, *args, "--json", js)
        assert r.exit_code == 0, r.output
        d = json.loads(js.read_text())
        assert d["job"] == cmd and d["passed"] is True and "load" in d


# ----------------------------------------------------------------------- item 6: honest load reports


def test_export_and_check_report_ignored_keys_on_the_summary_line(tmp_path):
    """BatchNorm weights loaded with the GroupNorm factory: 33 buffers are dropped."""
    from samples.digits import digits_resnet

    torch.save(digits_resnet().eval().state_dict(), tmp_path / "bn.pt")
    gn = "samples.digits:digits_resnet_gn"
    js = tmp_path / "e.json"
    r = invoke("export", tmp_path / "bn.pt", "--arch", gn, "-o", tmp_path / "m.onnx", "--input-shape", "1,1,32,32")
    assert r.exit_code == 2 and "--non-strict" in r.output, r.output  # issue 20: an error unless --non-strict
    r = invoke("export", tmp_path / "bn.pt", "--arch", gn, "-o", tmp_path / "m.onnx", "--input-shape", "1,1,32,32",
               "--json", js, "--non-strict")
    assert r.exit_code == 0, r.output
    last = unwrap_summary(r.output)
    assert "warning:" in last and "ignored" in last, last
    d = json.loads(js.read_text())
    assert len(d["load"]["unexpected_keys"]) == 33
    js = tmp_path / "c.json"
    r = invoke("check", tmp_path / "bn.pt", "--arch", gn, tmp_path / "m.onnx", "--providers", "cpu",
               "--repeats", "0", "--json", js, "--non-strict")
    last = unwrap_summary(r.output)
    assert "warning:" in last and "ignored" in last, last
    assert "unexpected keys" in r.output
    assert len(json.loads(js.read_text())["load"]["unexpected_keys"]) == 33


def test_missing_keys_are_a_summary_warning(files):
    sd = torch.load(files / "m.pt", weights_only=True)
    del sd["conv.weight"]
    torch.save(sd, files / "part.pt")
    for args in (["fold", "-o", files / "f.pt"], ["export", "-o", files / "e.onnx", "--input-shape", "2,1,8,8"]):
        r = invoke(args[0], files / "part.pt", "--arch", SMALL, *args[1:])
        assert r.exit_code == 2 and "missing from the file" in r.output, r.output
        r = invoke(args[0], files / "part.pt", "--arch", SMALL, *args[1:], "--non-strict")
        assert r.exit_code == 0, r.output
        last = unwrap_summary(r.output)
        assert "missing" in last and "initial values" in last, last


# ----------------------------------------------------------------------- item 7: broken statistics


def _broken(files, value):
    sd = torch.load(files / "m.pt", weights_only=True)
    sd["bn.running_var"][1] = value
    torch.save(sd, files / "bad.pt")
    return files / "bad.pt"


@pytest.mark.parametrize("value", [float("nan"), -1e-6, -3.0])
def test_fold_refuses_broken_statistics(files, value):
    bad = _broken(files, value)
    js = files / "f.json"
    r = invoke("fold", bad, "--arch", SMALL, "-o", files / "f.pt", "--json", js)
    d = json.loads(js.read_text())
    assert d["summary"]["folded"] == 0 and d["skipped"][0]["norm"] == "bn", d
    assert "running_var" in d["skipped"][0]["reason"]
    assert "warning:" in unwrap_summary(r.output)


@pytest.mark.parametrize("value", [float("nan"), -1e-6])
def test_export_warns_about_broken_statistics_on_the_summary_line(files, value):
    bad = _broken(files, value)
    r = invoke("export", bad, "--arch", SMALL, "-o", files / "e.onnx", "--input-shape", "2,1,8,8")
    assert r.exit_code == 0, r.output
    last = unwrap_summary(r.output)
    assert "warning: broken running statistics" in last, last


class AllNaN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) * float("nan")


def all_nan():
    return AllNaN().eval()


def test_fold_verification_with_no_finite_values_is_failed(files):
    torch.save(all_nan().state_dict(), files / "nan.pt")
    js = files / "f.json"
    r = invoke("fold", files / "nan.pt", "--arch", "test_hostile_cli:all_nan", "--input-shape", "2,1,4,4",
               "-o", files / "f.pt", "--json", js)
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output and "max |diff| 0" not in r.output
    assert not (files / "f.pt").exists()
    assert json.loads(js.read_text())["passed"] is False


# ----------------------------------------------------------------------- item 8: sizes, recipes


HUGE = "1000000,3,1000,1000"


@pytest.mark.parametrize("args", [
    ["audit", "{m}", "--arch", SMALL, "--input-shape", HUGE],
    ["fold", "{m}", "--arch", SMALL, "--input-shape", HUGE, "-o", "{d}/f.pt"],
    ["export", "{m}", "--arch", SMALL, "--input-shape", HUGE, "-o", "{d}/e.onnx"],
    ["check", "{m}", "--arch", SMALL, "{d}/any.onnx", "--input-shape", HUGE],
    ["convert", "{m}", "--arch", SMALL, "--to", "gn", "--calib", "random", "--input-shape", HUGE, "-o", "{d}/c.pt"],
])
def test_huge_input_shape_is_exit_2_with_the_size(files, args):
    (files / "any.onnx").write_bytes(b"")
    r = invoke(*[a.format(m=files / "m.pt", d=files) for a in args])
    assert r.exit_code == 2, r.output
    assert "GiB" in r.output and "internal error" not in r.output


def test_check_random_inputs_shaped_after_a_huge_onnx_input_are_refused(files):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 100000, 100000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 100000, 100000])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g), files / "huge.onnx")
    r = invoke("check", files / "m.pt", "--arch", SMALL, files / "huge.onnx", "--providers", "cpu")
    assert r.exit_code == 2 and "GiB" in r.output, r.output


@pytest.mark.parametrize("spec, pattern", [
    ({"name": "bn", "type": "GroupNorm", "args": {"num_groups": 0, "num_channels": 4, "eps": 1e-5, "affine": True}},
     "num_groups"),
    ({"name": "bn", "type": "GroupNorm", "args": {"num_groups": 3, "num_channels": 4, "eps": 1e-5, "affine": True}},
     "does not divide"),
    ({"name": "bn", "type": "Linear", "args": {"in_features": 10 ** 6, "out_features": 10 ** 6, "bias": True}},
     "GiB"),
    ({"name": "conv", "add_param": "bias", "shape": [10 ** 12]}, "GiB"),
])
def test_crafted_recipes_are_exit_2(files, spec, pattern):
    from normswap.recipe import RECIPE_KEY, dumps

    sd = torch.load(files / "m.pt", weights_only=True)
    sd[RECIPE_KEY] = dumps([spec])
    torch.save(sd, files / "crafted.pt")
    for cmd in (["audit"], ["fold", "-o", files / "f.pt"], ["export", "-o", files / "e.onnx", "--input-shape", "1,1,8,8"]):
        r = invoke(cmd[0], files / "crafted.pt", "--arch", SMALL, *cmd[1:])
        assert r.exit_code == 2, r.output
        assert pattern in r.output and "internal error" not in r.output


# ----------------------------------------------------------------------- item 11: what a person reads


def test_help_fits_80_columns_and_descriptions_are_not_cut():
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(ROOT))
    for args in ([], ["fold"], ["export"], ["check"], ["audit"], ["convert"]):
        out = subprocess.run([sys.executable, "-m", "normswap_cli.main", *args, "--help"], capture_output=True,
                             text=True, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        long = [ln for ln in out.stdout.splitlines() if len(ln) > 80]
        assert not long, "\n".join(long)  # issue 20: the audit and convert epilogues too
        if not args:
            assert "…" not in out.stdout and "..." not in out.stdout.split("Commands:")[1]


def test_a_python_warning_of_the_job_becomes_a_note(tmp_path):
    """(``--calib random`` warned with a raw ``UserWarning`` and its source path.)  A real
    process, because pytest itself would capture the warning."""
    code = """
import warnings, click
from dataclasses import dataclass, field
from normswap.report import Report
from normswap_cli import common

@dataclass
class R(Report):
    job = "demo"
    notes: list = field(default_factory=list)

@click.command("demo")
@common.output_options
@common.pass_settings
def demo(opts):
    def job():
        warnings.warn("calibrating on random inputs: noise, not real activations")
        return R()
    common.run_job(job, lambda r, c: [c.print("note: " + n) for n in r.notes], opts)

demo.main([], standalone_mode=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "UserWarning" not in text and "warnings.warn" not in text, text
    assert "note: calibrating on random inputs" in text, text


def test_an_unwritable_output_folder_is_reported_before_the_job(files, monkeypatch):
    import normswap.outputs as outputs

    ran = []
    real_access = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode, **k: False if mode & os.W_OK else real_access(p, mode))
    import importlib

    pipeline = importlib.import_module("normswap.fold.pipeline")

    real = pipeline.fold_file
    monkeypatch.setattr(pipeline, "fold_file", lambda *a, **k: ran.append(1) or real(*a, **k))
    r = invoke("fold", files / "m.pt", "--arch", SMALL, "-o", files / "f.pt")
    assert r.exit_code == 2 and "not writable" in r.output and not ran


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_exit_2_before_the_job(files):
    ro = files / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = invoke("export", files / "m.pt", "--arch", SMALL, "-o", ro / "e.onnx", "--input-shape", "2,1,8,8")
        assert r.exit_code == 2 and "not writable" in r.output
    finally:
        ro.chmod(0o755)


def test_global_force_lets_a_command_without_force_replace_its_json(files):
    js = files / "a.json"
    js.write_text("old")
    r = invoke("audit", files / "m.pt", "--arch", SMALL, "--json", js)
    assert r.exit_code == 2 and js.read_text() == "old"
    r = invoke("--force", "audit", files / "m.pt", "--arch", SMALL, "--json", js)
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["job"] == "audit"
