"""A norm kind registered in this test file only -- one ``register(NormKind(...))`` call, no edit
of normswap -- is handled by audit, fold, convert and export, on the eager model and on its
TorchScript and torch.export graphs (``notes/ADDING_A_NORM_KIND.md``).

Two kinds: a library's BatchNorm subclass (its forward is BatchNorm's) and an RMSNorm subclass.
Unregistered, both are ``unsupported_subclass`` and refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normswap
from normswap.norms import NORMS, NormKind, bn_eval_affine, register


class LibBatchNorm2d(nn.BatchNorm2d):
    """A library's BatchNorm (e.g. a framework's own class): BatchNorm's forward, its own name."""


class MyRMSNorm(nn.RMSNorm):
    """An RMSNorm subclass (same forward)."""


def _register():
    register(NormKind(
        "lib_bn", (LibBatchNorm2d,), "batch", "N and spatial axes, per channel", None, None, "yes",
        ("BatchNormalization",), "a library's BatchNorm2d", fold_family="bn_like", layout="conv",
        running_stat_names=("running_mean", "running_var"), eval_affine_fn=bn_eval_affine,
        mode_sensitive=True, convert_default=True))
    register(NormKind(
        "my_rms", (MyRMSNorm,), "sample", "the last dim, per sample (no mean)", False, None, "affine_only",
        ("Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"), "an RMSNorm subclass",
        fold_family="affine_only", layout="token"))


@pytest.fixture
def kinds():
    saved = dict(NORMS)
    _register()
    yield
    for k in ("lib_bn", "my_rms"):
        NORMS.pop(k, None)
    NORMS.update(saved)
    register(NORMS["bn"])  # clears the type cache


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = LibBatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.norm = MyRMSNorm(16, eps=1e-6)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.norm(self.emb(x)))


def _models():
    torch.manual_seed(0)
    conv, tok = ConvNet().eval(), TokenNet().eval()
    with torch.no_grad():
        conv.bn.running_mean.uniform_(-1, 1)
        conv.bn.running_var.uniform_(0.5, 2)
        conv.bn.weight.uniform_(0.5, 1.5)
        tok.norm.weight.uniform_(0.5, 1.5)
    return (conv, torch.randn(4, 3, 8, 8)), (tok, torch.randn(4, 5, 6))


def test_unregistered_they_are_refused():
    (conv, x), (tok, t) = _models()
    kinds = {s.name: (s.kind, s.foldable) for s in normswap.audit(conv, (x,)).sites}
    assert kinds["bn"] == ("unsupported_subclass", False)
    kinds = {s.name: (s.kind, s.foldable) for s in normswap.audit(tok, (t,)).sites}
    assert kinds["norm"] == ("unsupported_subclass", False)


def test_audit_and_fold_on_every_front_end(kinds):
    for model, x, name, into in ((*_models()[0], "bn", "conv"), (*_models()[1], "norm", "out")):
        kind = "lib_bn" if name == "bn" else "my_rms"
        site = {s.name: s for s in normswap.audit(model, (x,)).sites}[name]
        assert (site.kind, site.foldable, site.fold_into) == (kind, True, into)
        folded, rep = normswap.fold(copy.deepcopy(model), (x,))
        assert [(f["norm"], f["kind"], f["into"]) for f in rep.folded] == [(name, kind, into)]
        assert rep.verification["ok"]
        ts = torch.jit.trace(model, (x,))
        site = {s.name: s for s in normswap.audit(ts).sites}[name]
        assert (site.kind, site.foldable) == (kind, name == "bn")  # TorchScript: no affine-only fold
        ep = torch.export.export(model, (x,))
        site = {s.name: s for s in normswap.audit(ep).sites}[name]
        assert (site.foldable, site.fold_into) == (True, into)
        _, prep = normswap.fold(ep, (x,))
        assert [f["norm"] for f in prep.folded] == [name] and prep.verification["ok"]


def test_convert_and_export(kinds, tmp_path):
    (conv, x), (tok, t) = _models()
    converted, rep = normswap.convert(conv, to="gn", calib=torch.randn(32, 3, 8, 8), mode="fast")
    assert isinstance(converted.bn, nn.GroupNorm)  # lib_bn is a default source: a BatchNorm kind
    converted, rep = normswap.convert(tok, to="ln", calib=torch.randn(32, 5, 6), source="my_rms", mode="fast")
    assert isinstance(converted.norm, nn.LayerNorm)
    erep = normswap.export(conv, tmp_path / "c.onnx", (x,))
    assert erep.passed
    conv.bn.train()  # the registry says it uses batch statistics in training: export refuses it
    with pytest.raises(normswap.NormswapError, match="training mode: bn"):
        normswap.export(conv, tmp_path / "c2.onnx", (x,))
