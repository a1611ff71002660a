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
    r = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "b.pt"), "--eval-mode"])
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


# --- QA regressions: nothing partial left behind when a later step fails ---------------------


def _fold_args(p, *more):
    return ["fold", str(p), "--arch", "samples.digits:digits_resnet", *more]


def test_cli_fold_onnx_in_missing_folder_writes_nothing(sd_model, tmp_path):
    _, p = sd_model
    out = tmp_path / "out.pt"
    r = CliRunner().invoke(cli, _fold_args(p, "-o", str(out), "--input-shape", "1,1,32,32",
                                           "--onnx", str(tmp_path / "nodir" / "m.onnx")))
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_cli_fold_model_and_onnx_same_path_refused(sd_model, tmp_path):
    _, p = sd_model
    out = tmp_path / "out.pt"
    r = CliRunner().invoke(cli, _fold_args(p, "-o", str(out), "--input-shape", "1,1,32,32", "--onnx", str(out)))
    assert r.exit_code == 2 and "would both be" in r.output
    assert not out.exists()


def test_cli_fold_output_is_input_refused_first(sd_model):
    _, p = sd_model
    before = p.read_bytes()
    r = CliRunner().invoke(cli, _fold_args(p, "-o", str(p)))
    assert r.exit_code == 2 and "is the input model" in r.output
    assert p.read_bytes() == before


def test_cli_fold_failed_export_leaves_no_model(sd_model, tmp_path, monkeypatch):
    import sys

    from normswap.errors import NormswapError
    from normswap.export import export  # noqa: F401 (loads the module)

    def boom(*a, **k):
        raise NormswapError("export failed (simulated)")

    monkeypatch.setattr(sys.modules["normswap.export"], "export", boom)
    _, p = sd_model
    out, onnx = tmp_path / "out.pt", tmp_path / "out.onnx"
    r = CliRunner().invoke(cli, _fold_args(p, "-o", str(out), "--input-shape", "1,1,32,32", "--onnx", str(onnx)))
    assert r.exit_code == 2 and "simulated" in r.output
    assert not out.exists() and not onnx.exists()
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no staged file left
    # with --force over an existing output: the old file stays as it was
    out.write_bytes(b"old")
    r = CliRunner().invoke(cli, _fold_args(p, "-o", str(out), "--input-shape", "1,1,32,32", "--onnx", str(onnx),
                                           "--force"))
    assert r.exit_code == 2 and out.read_bytes() == b"old"


def test_cli_fold_json_has_passed(sd_model, tmp_path):
    _, p = sd_model
    js = tmp_path / "fold.json"
    r = CliRunner().invoke(cli, _fold_args(p, "-o", str(tmp_path / "o.pt"), "--input-shape", "1,1,32,32",
                                           "--json", str(js)))
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["passed"] is True


def test_cli_fold_data_random_needs_input_shape(sd_model, tmp_path):
    _, p = sd_model
    r = CliRunner().invoke(cli, _fold_args(p, "-o", str(tmp_path / "o.pt"), "--data", "random"))
    assert r.exit_code == 2 and "--data random needs --input-shape" in r.output


def test_cli_fold_shows_load_notes(sd_model, tmp_path):
    # QA regression: keys the state-dict load ignored were not reported by fold (convert did)
    m, _ = sd_model
    sd = m.state_dict()
    sd["extra.weight"] = torch.zeros(3)
    p = tmp_path / "extra.pt"
    torch.save(sd, p)
    js = tmp_path / "f.json"
    r = CliRunner().invoke(cli, _fold_args(p, "-o", str(tmp_path / "o.pt")))
    assert r.exit_code == 2 and "extra.weight" in r.output, r.output  # issue 20: strict unless --non-strict
    r = CliRunner().invoke(cli, _fold_args(p, "-o", str(tmp_path / "o.pt"), "--json", str(js), "--non-strict"))
    assert r.exit_code == 0, r.output
    assert any("extra.weight" in n for n in json.loads(js.read_text())["notes"])


class _Noisy(torch.nn.Module):
    """Not a deterministic function of its input: no fold can be verified on it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.randn(1)


def test_fold_that_fails_its_output_check_writes_nothing(tmp_path):
    from normswap.fold.pipeline import fold_file

    torch.save(_Noisy().eval(), tmp_path / "noisy.pt")
    out = tmp_path / "noisy.folded.pt"
    report = fold_file(str(tmp_path / "noisy.pt"), output=str(out), trust=True, input_shape="2,1,8,8")
    assert not report and not out.exists()
    assert any("nothing written" in n for n in report.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noisy.pt"]
