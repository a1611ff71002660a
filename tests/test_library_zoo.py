"""Issue 18 item 7: the structures of the real-library zoo (benchmarks/zoo.py) on which convert
or fold failed, rebuilt faithfully in samples/ (the real classes: tests/test_real_libraries.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.convert import convert
from normswap.convert.fidelity import first_tensor
from normswap.errors import NormswapError
from normswap.fold import fold
from normswap.fold.api import deepcopy_model
from samples.hf_like import BackboneOutput, ResNetLikeBackbone
from samples.timm_like import feature_graph_net


def _x(n, *shape, seed=0):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


# ============================================================ HF backbones: BackboneOutput(feature_maps=(...))

def test_first_tensor_looks_into_a_dict_output_whose_values_are_tuples():
    a, b = torch.ones(2, 3), torch.zeros(2, 4)
    assert first_tensor(BackboneOutput(feature_maps=(a, b))) is a
    assert first_tensor({"maps": [a, b], "extra": None}) is a
    assert first_tensor({"x": None, "nested": {"deeper": (b,)}}) is b
    with pytest.raises(NormswapError, match="cannot find a tensor"):
        first_tensor({"x": None, "y": (None, "text")})


@pytest.mark.parametrize("mode", ["fast", "sequential"])
def test_convert_an_hf_backbone_whose_output_holds_a_tuple_of_feature_maps(mode):
    # HF ResNetBackbone / RTDetrResNetBackbone / HGNetV2Backbone: before the fix every mode failed with
    # "cannot find a tensor in the model output of type BackboneOutput"
    m = ResNetLikeBackbone()
    n_bn = sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    x = _x(16, 3, 32, 32)
    conv, rep = convert(m, "gn", calib=x, mode=mode, batch_size=8)
    assert len(rep.layers) == n_bn == 9
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in conv.modules())
    assert sum(isinstance(mod, nn.GroupNorm) for mod in conv.modules()) == n_bn
    with torch.no_grad():
        y, ref = conv(x[:4]), m(x[:4])
    assert isinstance(y, BackboneOutput) and len(y.feature_maps) == 3
    assert all(torch.isfinite(t).all() for t in y.feature_maps)
    # fidelity is measured on the first feature map, and reported for every output
    fid = rep.fidelity
    assert fid.samples == 16 and fid.rel_output_error is not None and fid.rel_output_error < 1.0
    assert {o["name"] for o in fid.outputs} == {"feature_maps.0", "feature_maps.1", "feature_maps.2"}
    rel = float((y.feature_maps[0] - ref.feature_maps[0]).norm() / ref.feature_maps[0].norm())
    assert rel < 1.0


# ============================================================ timm features_only (FX): torchvision's DualGraphModule

def test_a_deep_copy_keeps_every_module_in_eval_mode_and_the_eval_graph():
    net, (x,) = feature_graph_net()
    import copy

    assert sum(m.training for m in copy.deepcopy(net).modules()) > 0  # what torch's deepcopy gives
    c = deepcopy_model(net)
    assert not any(m.training for m in c.modules())
    assert c.graph_module.graph is c.graph_module.eval_graph
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(c(x), net(x)))


def test_fold_a_feature_graph_net_in_eval_mode_exactly():
    # before the fix: fold's working copy was in training mode, so nothing was folded ("the norm is
    # in training mode") and the returned model computed batch statistics (max |diff| ~ 8 on the
    # real timm mobilenetv3_small_100 features_only=True, feature_cls="fx")
    net, (x,) = feature_graph_net()
    with torch.no_grad():
        ref = net(x)
    folded, rep = fold(net, (x,))
    assert len(rep.folded) == 6 and not rep.skipped
    assert rep.verification["ok"]
    # every module kept its eval mode (the folded norms' nn.Identity stand-ins carry no mode)
    assert not any(m.training for m in folded.modules() if type(m) is not nn.Identity)
    assert folded.graph_module.graph is folded.graph_module.eval_graph
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        out = folded(x)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(out, ref))
    assert not any(m.training for m in net.modules())  # the input is untouched


def test_convert_a_feature_graph_net():
    net, (x,) = feature_graph_net()
    conv, rep = convert(net, "gn", calib=_x(16, 3, 16, 16), mode="fast", batch_size=8)
    assert len(rep.layers) == 6
    assert not any(m.training for m in conv.modules())
    with torch.no_grad():
        assert all(torch.isfinite(t).all() for t in conv(x))


# ============================================================ HF BiT: WeightStandardizedConv2d (+ DynamicPad2d)

def test_hf_weight_standardized_conv_is_a_weight_site_not_a_functional_batchnorm():
    # before: FX traced into it and reported each F.batch_norm on its weight as a BatchNorm site
    # that could not be folded (17 "BatchNorm-like" sites in HF BiT, none of them a BatchNorm)
    from normswap.audit import audit
    from normswap.fold import plan
    from samples.hf_like import bit_like_stem

    m, x = bit_like_stem()
    kinds = {s.name: s.kind for s in audit(m, x).sites}
    assert kinds == {"0.weight": "weight_std", "2.weight": "weight_std", "3": "gn"}
    assert {d.norm: d.kind for d in plan(m, example_inputs=x)} == kinds


def test_bake_hf_weight_standardized_conv_exactly_but_not_its_dynamic_padding():
    from samples.hf_like import DynamicPad2d, bit_like_stem

    m, x = bit_like_stem()
    assert m[0].pad is None and isinstance(m[2].pad, DynamicPad2d)
    folded, rep = fold(m, x, bake_weight_std=True)
    assert [b["norm"] for b in rep.baked] == ["0.weight"]
    assert type(folded[0]) is nn.Conv2d  # the static-padding one became a plain Conv2d
    skipped = {s["norm"]: s["reason"] for s in rep.skipped}
    assert "'same' padding depends on the input size" in skipped["2.weight"]
    assert type(folded[2]).__name__ == "WeightStandardizedConv2d"
    assert rep.verification["ok"]
    for shape in ((2, 3, 15, 15), (1, 3, 16, 12)):  # other input sizes too
        xi = _x(*shape, seed=3)
        with torch.no_grad():
            assert torch.allclose(folded(xi), m(xi), atol=1e-5, rtol=1e-5)


# ============================================================ the zoo script itself (no library needed)

def test_zoo_machinery_on_a_sample_model_without_the_libraries():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_zoo", Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["_zoo"] = zoo  # its dataclasses look their module up
    try:
        spec.loader.exec_module(zoo)
    finally:
        sys.modules.pop("_zoo", None)
    from samples.models import resnet_style

    entry = zoo.Entry("sample_resnet", "samples", lambda: resnet_style()[0], size=16)
    row = zoo.run_entry(entry, do_export=False, calib="random")
    assert row.bn_like == row.folded > 0 and row.fold_ok is True
    assert row.fold64_err is not None and row.fold64_err < 1e-9
    assert row.convert == "ok" and row.convert_layers == row.bn_like
    text = zoo.table([row, zoo.Row("x", "timm", status="skipped: timm not installed")])
    assert "sample_resnet" in text and "skipped: timm not installed" in text
    assert max(len(line) for line in text.splitlines()) <= 80
