"""One planner: a model audited eager and as TorchScript gets the same verdicts (TorchScript's add
only a note: it folds in the eager model); a saved .pt2 is audited exactly as ``fold`` folds that
program (its PowerNorm is lowered to primitive ops there, so it and the BatchNorm after it do not
fold in the program)."""

from __future__ import annotations

import io

import torch
from torch import nn

from normswap.audit import audit
from normswap.fold import fold
from normswap.views.script import COMPILED_NOTE
from normswap.layers import PowerNorm2d


class _ConvPowerBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pn = PowerNorm2d(4)  # foldable into conv
        self.bn = nn.BatchNorm2d(4)  # after the PowerNorm: into conv too, once the PowerNorm is folded
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(self.relu(self.bn(self.pn(self.conv(x))))))


def _model():
    torch.manual_seed(0)
    m = _ConvPowerBn().eval()
    with torch.no_grad():
        for bn in (m.bn, m.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        m.pn.running_phi.uniform_(0.5, 2)
    return m, torch.randn(2, 3, 8, 8)


def _verdicts(rep):
    return {s.name: (s.kind, s.foldable, s.fold_into, s.reason) for s in rep.sites}


def test_eager_torchscript_and_pt2_audits_agree():
    model, x = _model()
    eager = _verdicts(audit(model))
    assert eager["pn"] == ("powernorm", True, "conv", None)
    assert eager["bn"] == ("bn", True, "conv", None)  # the planner's second round
    assert eager["bn2"] == ("bn", True, "conv2", None)
    ep = torch.export.export(model, (x,))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    rep = audit(torch.jit.trace(model, x))
    assert _verdicts(rep) == eager
    assert all(COMPILED_NOTE in s.notes for s in rep.sites)
    program = torch.export.load(buf)
    rep = _verdicts(audit(program))
    assert rep["bn2"] == ("bn", True, "conv2", None)
    assert rep["pn"][1] is False and "lowered to primitive ops" in rep["pn"][3]
    assert rep["bn"][1] is False
    _, frep = fold(program, (x,))
    assert {f["norm"] for f in frep.folded} == {n for n, v in rep.items() if v[1]}
    assert {f["norm"]: f["reason"] for f in frep.skipped} == {n: v[3] for n, v in rep.items() if not v[1]}


def test_compiled_graph_refuses_what_it_cannot_prove():
    model, x = _model()
    model.bn.train()  # training-mode norm
    rep = {s.name: s for s in audit(torch.jit.trace(model, x, check_trace=False)).sites}
    assert not rep["bn"].foldable and "training mode" in rep["bn"].reason
    lin = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    for compiled in (torch.jit.script(lin),):
        s = {s.name: s for s in audit(compiled).sites}["1"]
        assert not s.foldable and s.reason.startswith("input rank unknown")


def test_report_json_has_job_and_passed():
    model, _ = _model()
    d = audit(model).to_dict()
    assert d["job"] == "audit" and d["passed"] is True
