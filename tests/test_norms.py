"""The norm registry: exact-type classification, structure/name recognition, reparametrisations."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from normswap import norms
from normswap.norms import (
    KIND_NAMES,
    NORMS,
    classify,
    functional_kind,
    iter_norms,
    iter_weight_reparams,
    known_base,
    norm_eps,
    weight_reparam,
    weight_reparams,
)
from samples.models import BatchNormAct2d, FrozenBatchNorm2d, LayerNorm2d, LlamaRMSNorm


def test_registry_covers_all_kinds():
    expected = {"bn", "frozen_bn", "in", "ln", "gn", "rms", "lrn", "spectral", "weight_norm", "frn",
                "powernorm", "bgn", "cbn", "sabn", "custom", "unsupported_subclass",
                # other libraries' norms recognised by structure, weight standardization (issue 11)
                "bn_act", "gn_act", "ln2d", "frn_act", "evonorm", "weight_std"}
    assert set(NORMS) == expected == set(KIND_NAMES)
    for name, k in NORMS.items():
        assert k.name == name
        assert k.stats in ("batch", "sample", "weight", "none", "unknown")
        assert k.foldable in ("yes", "running_stats", "affine_only", "bake", "partial", "no")
        assert k.onnx_ops
    assert NORMS["bn"].onnx_ops == ("BatchNormalization",)
    assert NORMS["ln"].onnx_ops == ("LayerNormalization",)
    assert NORMS["bn"].foldable == "yes" and NORMS["frn"].foldable == "no"


@pytest.mark.parametrize("module, kind", [
    (nn.BatchNorm1d(4), "bn"),
    (nn.BatchNorm2d(4), "bn"),
    (nn.BatchNorm3d(4), "bn"),
    (nn.SyncBatchNorm(4), "bn"),
    (nn.LazyBatchNorm2d(), "bn"),
    (nn.InstanceNorm1d(4), "in"),
    (nn.InstanceNorm2d(4, affine=True), "in"),
    (nn.InstanceNorm3d(4), "in"),
    (nn.LazyInstanceNorm2d(), "in"),
    (nn.LayerNorm(4), "ln"),
    (nn.GroupNorm(2, 4), "gn"),
    (nn.RMSNorm(4), "rms"),
    (nn.LocalResponseNorm(3), "lrn"),
    (nn.Conv2d(3, 4, 3), None),
    (nn.Linear(3, 4), None),
    (nn.ReLU(), None),
    (nn.Sequential(nn.BatchNorm2d(3)), None),
])
def test_classify_torch_types(module, kind):
    assert classify(module) == kind


def test_lazy_bn_materialises_to_exact_bn():
    m = nn.LazyBatchNorm2d()
    m(torch.randn(2, 3, 4, 4))
    assert type(m) is nn.BatchNorm2d and classify(m) == "bn"


def test_subclasses_are_unsupported_never_their_base():
    class MyBN(nn.BatchNorm2d):
        pass

    # timm's BatchNormAct2d / LayerNorm2d are their own kinds, recognised by structure, never
    # as their base; anything else deriving from a known norm stays unsupported
    assert classify(BatchNormAct2d(4)) == "bn_act"
    assert classify(MyBN(4)) == "unsupported_subclass"
    assert classify(LayerNorm2d(4)) == "ln2d"
    extra = BatchNormAct2d(4)
    extra.gate = nn.Sigmoid()  # more than timm's structure
    assert classify(extra) == "unsupported_subclass"
    assert known_base(BatchNormAct2d(4)) is nn.BatchNorm2d
    assert known_base(LayerNorm2d(4)) is nn.LayerNorm
    assert known_base(nn.BatchNorm2d(4)) is None


def test_frozen_bn_by_structure():
    assert classify(FrozenBatchNorm2d(4)) == "frozen_bn"

    class FrozenBN(nn.Module):  # detectron2-style name, buffers only
        def __init__(self, n):
            super().__init__()
            for b in ("weight", "bias", "running_mean", "running_var"):
                self.register_buffer(b, torch.ones(n))

    assert classify(FrozenBN(3)) == "frozen_bn"

    class FrozenBatchNormWithParam(nn.Module):  # a parameter: not frozen
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))
            for b in ("bias", "running_mean", "running_var"):
                self.register_buffer(b, torch.ones(3))

    assert classify(FrozenBatchNormWithParam()) != "frozen_bn"


class T5LayerNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + self.variance_epsilon))


class PreNorm(nn.Module):  # a wrapper holding a norm: not itself a norm
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fn = nn.Linear(d, d)

    def forward(self, x):
        return self.fn(self.norm(x))


def test_custom_norms_by_name_and_shapes():
    assert classify(LlamaRMSNorm(8)) == "custom"
    assert classify(T5LayerNorm(8)) == "custom"
    assert norm_eps(LlamaRMSNorm(8, eps=1e-5)) == 1e-5
    assert classify(PreNorm(4)) is None
    names = [(n, k) for n, _, k in iter_norms(PreNorm(4))]
    assert names == [("norm", "ln")]


def test_torch_internal_norm_named_classes_are_not_custom():
    conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3))
    assert [k for _, _, k in iter_norms(conv)] == []
    assert classify(conv.parametrizations.weight[0]) is None


def test_seed_layers():
    L = pytest.importorskip("normswap.layers")
    assert classify(L.FilterResponseNorm2d(4)) == "frn"
    assert classify(L.PowerNorm2d(4)) == "powernorm"
    assert classify(L.BatchGroupNorm2d(4, 2)) == "bgn"
    assert classify(L.ConditionalBatchNorm2d(4, num_classes=3)) == "cbn"
    assert classify(L.SandwichBatchNorm2d(4, 2)) == "sabn"
    assert norm_eps(L.FilterResponseNorm2d(4, eps=1e-6)) == pytest.approx(1e-6)
    # the inner BatchNorm of a composite norm is not a separate site
    m = nn.Sequential(nn.Conv2d(3, 4, 3), L.ConditionalBatchNorm2d(4, num_classes=3))
    assert [(n, k) for n, _, k in iter_norms(m)] == [("1", "cbn")]


def test_weight_reparams_both_apis():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy_sn = nn.utils.spectral_norm(nn.Conv2d(3, 4, 3))
        legacy_wn = nn.utils.weight_norm(nn.Linear(3, 4))
    new_sn = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3))
    new_wn = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4))
    assert weight_reparam(legacy_sn) == "spectral"
    assert weight_reparam(new_sn) == "spectral"
    assert weight_reparam(legacy_wn) == "weight_norm"
    assert weight_reparam(new_wn) == "weight_norm"
    assert weight_reparam(nn.Conv2d(3, 4, 3)) is None
    (r,) = weight_reparams(legacy_sn)
    assert (r.param, r.kind, r.api) == ("weight", "spectral", "hook")
    (r,) = weight_reparams(new_sn)
    assert (r.param, r.kind, r.api) == ("weight", "spectral", "parametrization")
    # a parametrized conv is still a Conv2d producer and not a norm
    assert classify(new_sn) is None
    model = nn.Sequential(legacy_sn, nn.ReLU(), new_sn)
    assert [(n, r.kind) for n, _, r in iter_weight_reparams(model)] == [
        ("0.weight", "spectral"), ("2.weight", "spectral")]


def test_functional_kind():
    import torch.nn.functional as F

    assert functional_kind(F.batch_norm) == "bn"
    assert functional_kind(torch.batch_norm) == "bn"
    assert functional_kind(F.layer_norm) == "ln"
    assert functional_kind(F.group_norm) == "gn"
    assert functional_kind(F.instance_norm) == "in"
    assert functional_kind(F.rms_norm) == "rms"
    assert functional_kind(F.relu) is None
    assert functional_kind("not a function") is None
    assert norms.FUNCTIONAL_NORMS
