"""Issue 9: export/check as library jobs (options -> one call -> render), export asks the
registry, check and cli/ import no private names of other modules."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from normswap import layers as L
from normswap.check import ParityReport, check_file
from normswap.errors import NormswapError
from normswap.export import ExportReport, export, export_file, has_kind, training_norms
from normswap_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
FAST = {"providers": ("cpu",), "repeats": 1, "warmup": 0}


class Net(nn.Module):
    def __init__(self, norm: nn.Module, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = norm
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def _x(n=3):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- registry use


def test_training_norms_asks_the_registry():
    from samples.models import BatchNormAct2d, FrozenBatchNorm2d

    assert training_norms(Net(L.PowerNorm2d(8)).train()) == ["norm"]
    assert training_norms(Net(L.BatchGroupNorm2d(8, 2)).train()) == ["norm"]
    # an unsupported subclass counts as its known base (BatchNorm: batch statistics), even
    # without running statistics of its own
    assert training_norms(Net(BatchNormAct2d(8)).train()) == ["norm"]
    assert training_norms(Net(BatchNormAct2d(8, track_running_stats=False)).train()) == ["norm"]
    assert training_norms(Net(nn.BatchNorm2d(8, track_running_stats=False)).train()) == ["norm"]
    # frozen BatchNorm: fixed statistics, the same forward in training and eval
    assert training_norms(Net(FrozenBatchNorm2d(8)).train()) == []
    assert training_norms(Net(L.FilterResponseNorm2d(8)).train()) == []

    class RunningThing(nn.Module):  # unknown to the registry but holding running statistics
        def __init__(self):
            super().__init__()
            self.register_buffer("running_scale", torch.ones(8))

        def forward(self, x):
            return x * self.running_scale.view(1, -1, 1, 1)

    assert training_norms(Net(RunningThing()).train()) == ["norm"]
    assert training_norms(Net(nn.BatchNorm2d(8)).eval()) == []


def test_has_kind_via_registry():
    assert has_kind(Net(nn.GroupNorm(2, 8)), "gn")
    assert not has_kind(Net(nn.BatchNorm2d(8)), "gn")

    class MyGN(nn.GroupNorm):
        pass

    assert has_kind(Net(MyGN(2, 8)), "gn")  # a subclass still exports GroupNormalization at opset 21


# --------------------------------------------------------------------------- library jobs


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = Net(nn.BatchNorm2d(8)).eval()
    path = tmp_path / "m.pt"
    torch.save(model, path)
    return model, path


def test_export_file_and_json_keys(saved, tmp_path):
    _, mpath = saved
    out = tmp_path / "m.onnx"
    rep = export_file(str(mpath), output=str(out), input_shape="2,3,8,8", trust=True)
    assert isinstance(rep, ExportReport) and rep and out.exists()
    assert rep.inputs[0]["shape"][1:] == [3, 8, 8] and rep.dynamic_batch
    d = rep.to_dict()
    assert d["job"] == "export" and d["passed"] is True and d["path"] == str(out)
    with pytest.raises(NormswapError, match="exists"):
        export_file(str(mpath), output=str(out), input_shape="2,3,8,8", trust=True)
    with pytest.raises(NormswapError, match="--calib random needs --input-shape"):
        export_file(str(mpath), output=str(tmp_path / "r.onnx"), data="random", trust=True)


def test_export_file_from_data(saved, tmp_path):
    _, mpath = saved
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32))
    rep = export_file(str(mpath), output=str(tmp_path / "m.onnx"), data=str(data), dynamic_batch=False, trust=True)
    assert rep.inputs[0]["shape"] == [2, 3, 8, 8]  # the first 2 samples


def test_check_file(saved, tmp_path):
    model, mpath = saved
    onnx_path = tmp_path / "m.onnx"
    export(model, onnx_path, _x())
    rep = check_file(str(mpath), str(onnx_path), input_shape="3,3,8,8", trust=True, **FAST)
    assert isinstance(rep, ParityReport) and rep and rep.batch_sizes == [3, 1] and not rep.warning_notes
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((70, 3, 8, 8)).astype(np.float32))
    rep = check_file(str(mpath), str(onnx_path), data=str(data), trust=True, **FAST)
    assert rep and rep.batch_sizes == [64, 1]  # MAX_SAMPLES
    rep = check_file(str(mpath), str(onnx_path), data="random", input_shape="5,3,8,8", trust=True, **FAST)
    assert rep and rep.batch_sizes == [5, 1]
    with pytest.raises(NormswapError, match="--repeats"):
        check_file(str(mpath), str(onnx_path), repeats=-1, trust=True)
    # a static ONNX batch is a warning note (the renderer highlights it; JSON notes unchanged)
    static = tmp_path / "s.onnx"
    export(model, static, _x(), dynamic_batch=False)
    rep = check_file(str(mpath), str(static), trust=True, **FAST)
    assert rep and len(rep.warning_notes) == 1 and "static" in rep.warning_notes[0]
    assert rep.warning_notes[0] in rep.to_dict()["notes"] and "warning_notes" not in rep.to_dict()


def test_cli_export_json_has_job_and_passed(saved, tmp_path):
    _, mpath = saved
    js = tmp_path / "e.json"
    res = CliRunner().invoke(cli, ["export", str(mpath), "--trust", "-o", str(tmp_path / "m.onnx"),
                                   "--input-shape", "2,3,8,8", "--json", str(js)])
    assert res.exit_code == 0, res.output
    d = json.loads(js.read_text())
    assert d["job"] == "export" and d["passed"] is True


def test_cli_input_option_help_texts_unchanged():
    runner = CliRunner()
    text = " ".join(runner.invoke(cli, ["export", "--help"]).output.split())
    assert "Shape of the example input (random data; with --data, the size to read an image folder at)." in text
    assert "Take the example input from DATA (.npz/.npy/.pt/folder)." in text
    text = " ".join(runner.invoke(cli, ["check", "--help"]).output.split())
    assert "Inputs from DATA (.npz/.npy/.pt/folder; first 64 samples)." in text
    assert "Random inputs of this shape (with --data: the size to read an image folder at)." in text
    assert text.index("--data") < text.index("--input-shape")
    text = " ".join(runner.invoke(cli, ["fold", "--help"]).output.split())
    assert "Example input shape (random data): input ranks and an output check." in text
    assert "--data DATA" in text


# --------------------------------------------------------------------------- no private imports


def _private_imports(path: Path) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normswap"):
            bad += [f"{path.name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")
                    and not a.name.startswith("__")]
    return bad


@pytest.mark.parametrize("rel", ["normswap/check.py", "normswap/export.py", "cli/main.py", "cli/common.py",
                                 "cli/commands/export.py", "cli/commands/check.py", "cli/commands/fold.py"])
def test_no_private_imports(rel):
    assert _private_imports(ROOT / rel) == []


def test_export_keeps_no_kind_sets():
    src = (ROOT / "normswap/export.py").read_text()
    for leftover in ("_BATCH_STAT_KINDS", "_SEED_BATCH_STAT_CLASSES", "PowerNorm2d", "_private_atomic_save",
                     "ImportError"):
        assert leftover not in src
