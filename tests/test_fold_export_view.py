"""A model FX cannot trace at the top level is planned on its export view: with example inputs, its
BatchNorms are proven on the ATen graph of ``torch.export.export`` and folded into the eager
modules (before issue 19: 0 of 2, "inside untraceable region '<model>'")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import normswap


class ShapeBranch(nn.Module):
    """``if x.shape[-1] > 4`` on a Proxy: FX cannot trace the forward; torch.export specialises it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = x * 2.0
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


def _model():
    torch.manual_seed(0)
    m = ShapeBranch().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m, torch.randn(2, 3, 8, 8)


def test_top_level_untraceable_model_folds_on_its_export_view():
    m, x = _model()
    from normswap.graph import trace_regions

    assert trace_regions(m)[0].gm is None  # FX cannot trace the forward
    folded, rep = normswap.fold(m, (x,))
    assert {f["norm"]: f["into"] for f in rep.folded} == {"bn1": "conv1", "bn2": "conv2"}
    assert rep.verification["ok"]
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    with torch.no_grad():
        assert torch.allclose(folded(x), m(x), atol=1e-5)
    assert any("torch.export" in n for n in rep.notes)
    audit = {s.name: (s.foldable, s.fold_into) for s in normswap.audit(m, (x,)).sites}
    assert audit == {"bn1": (True, "conv1"), "bn2": (True, "conv2")}


def test_without_example_inputs_it_stays_refused():
    m, _ = _model()
    _, rep = normswap.fold(m)
    assert rep.folded == []
    assert all(s["code"] == "untraceable_region" for s in rep.skipped)
