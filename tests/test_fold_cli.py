"""``normswap fold`` on the command line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from normswap_cli.main import cli
from samples.digits import digits_resnet
from samples.models import randomize_norm_stats


@pytest.fixture()
def sd_model(tmp_path):
    torch.manual_seed(0)
    m = randomize_norm_stats(digits_resnet()).eval()
    p = tmp_path / "digits_sd.pt"
    torch.save(m.state_dict(), p)
    return m, p


def test_cli_fold_state_dict(sd_model, tmp_path):
    m, p = sd_model
    out = tmp_path / "out.pt"
    js = tmp_path / "fold.json"
    r = CliRunner().invoke(cli, ["fold", str(p), "--arch", "samples.digits:digits_resnet", "-o", str(out),
                                 "--input-shape", "2,1,32,32", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "PASSED | normswap fold | folded 11 of 11" in r.output
    d = json.loads(js.read_text())
    assert d["summary"]["folded"] == 11 and d["skipped"] == [] and d["verification"]["ok"]
    assert {"norm", "into", "pattern"} <= set(d["folded"][0])
    sd = torch.load(out, weights_only=True)
    assert "stem.bn.running_mean" not in sd and "stem.conv.bias" in sd
    # existing output: refused without --force
    r = CliRunner().invoke(cli, ["fold", str(p), "--arch", "samples.digits:digits_resnet", "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.output


def test_cli_fold_pickle_eval_and_onnx_needs_inputs(tmp_path):
    torch.manual_seed(0)
    m = randomize_norm_stats(digits_resnet()).train()
    p = tmp_path / "m.pt"
    torch.save(m, p)
    args = ["fold", str(p), "--trust", "--import", "samples.digits"]
    r = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "a.pt")])
    assert r.exit_code == 0 and "folded 0 of 11" in r.output and "training mode" in r.output
    r = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "b.pt"), "--eval"])
    assert r.exit_code == 0 and "folded 11 of 11" in r.output and "eval" in r.output
    folded = torch.load(tmp_path / "b.pt", weights_only=False)
    assert isinstance(folded.layer1[0].bn1, torch.nn.Identity)
    r = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "c.pt"), "--onnx", str(tmp_path / "c.onnx")])
    assert r.exit_code == 2 and "--input-shape" in r.output


def test_cli_fold_onnx(sd_model, tmp_path):
    pytest.importorskip("normswap.export")
    m, p = sd_model
    r = CliRunner().invoke(cli, ["fold", str(p), "--arch", "samples.digits:digits_resnet", "-o",
                                 str(tmp_path / "o.pt"), "--input-shape", "1,1,32,32", "--onnx",
                                 str(tmp_path / "o.onnx"), "--quiet"])
    assert r.exit_code == 0, r.output
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node}
    assert "BatchNormalization" not in ops
