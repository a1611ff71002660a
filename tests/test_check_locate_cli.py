"""normswap check --locate / --report (issue 14) through the CLI, and check(locate=True)."""

import json

import onnx
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from torch import nn

from normswap_cli.main import cli
from normswap_cli.common import unwrap_summary


def _tampered(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    torch.save(m, tmp_path / "m.pt")
    from normswap.export import export

    export(m, tmp_path / "m.onnx", (torch.randn(2, 3, 8, 8),), force=True)
    mo = onnx.load(tmp_path / "m.onnx")
    for init in mo.graph.initializer:
        if init.name.endswith("2.weight"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(mo, tmp_path / "bad.onnx")
    return m


def test_check_locate_names_the_tampered_layer_and_writes_the_html_report(tmp_path):
    _tampered(tmp_path)
    args = ["--json", str(tmp_path / "r.json"), "check", str(tmp_path / "m.pt"), str(tmp_path / "bad.onnx"),
            "--trust", "--input-shape", "2,3,8,8", "--providers", "cpu", "--locate", "--report",
            str(tmp_path / "r.html")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output
    assert "diverges first at 2" in unwrap_summary(res.output)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["locate"]["first_divergent"]["name"] == "2"
    html = (tmp_path / "r.html").read_text()  # a failed check still hands over its reports
    assert "<svg" in html and "http" not in html.replace("http://www.w3.org", "")


def test_check_locate_untampered_reports_no_divergence(tmp_path):
    m = _tampered(tmp_path)
    from normswap.check import check

    rep = check(m, tmp_path / "m.onnx", input_shape=(2, 3, 8, 8), providers=("cpu",), locate=True)
    assert rep and rep.locate is not None and rep.locate.first_divergent is None
    assert "no layer diverges" in rep.summary_line()


def test_check_report_never_overwrites_without_force(tmp_path):
    _tampered(tmp_path)
    (tmp_path / "r.html").write_text("keep")
    res = CliRunner().invoke(cli, ["check", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx"), "--trust",
                                   "--input-shape", "2,3,8,8", "--providers", "cpu", "--report",
                                   str(tmp_path / "r.html")])
    assert res.exit_code == 2 and (tmp_path / "r.html").read_text() == "keep"
