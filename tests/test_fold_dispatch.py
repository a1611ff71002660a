"""normswap.fold / plan accept a torch.export program (and a LoadedModel holding one)."""

import io

import pytest
import torch

from normswap.errors import NormswapError
from normswap.fold import fold, plan
from samples.models import ALL_SAMPLES


def test_fold_and_plan_dispatch_on_an_exported_program():
    m, x = ALL_SAMPLES["resnet_style"]()
    ep = torch.export.export(m, x)
    folded, rep = fold(ep)
    assert isinstance(folded, torch.export.ExportedProgram) and rep.passed
    assert {d["norm"] for d in rep.folded} == {d.norm for d in plan(ep) if d.reason is None}
    assert torch.allclose(folded.module()(*x), m(*x), atol=1e-5)
    buf = io.BytesIO()
    torch.export.save(folded, buf)
    buf.seek(0)
    assert torch.allclose(torch.export.load(buf).module()(*x), m(*x), atol=1e-5)


def test_baking_inside_a_program_is_refused():
    m, x = ALL_SAMPLES["resnet_style"]()
    with pytest.raises(NormswapError, match="bake it in the eager model"):
        fold(torch.export.export(m, x), bake_spectral_norm=True)


def test_cli_fold_pt2_round_trip_and_convert_refusal(tmp_path):
    from click.testing import CliRunner

    from normswap_cli.main import cli

    m, x = ALL_SAMPLES["resnet_style"]()
    torch.export.save(torch.export.export(m, x), str(tmp_path / "m.pt2"))
    r = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.pt2"), "--onnx", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    folded = torch.export.load(str(tmp_path / "m.folded.pt2"))
    assert torch.allclose(folded.module()(*x), m(*x), atol=1e-5)
    r = CliRunner().invoke(cli, ["check", str(tmp_path / "m.folded.pt2"), str(tmp_path / "m.onnx"),
                                 "--providers", "cpu"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["fold", str(tmp_path / "m.pt2"), "-o", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and "give a .pt2 file name" in r.output
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "m.pt2"), "--to", "gn"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
