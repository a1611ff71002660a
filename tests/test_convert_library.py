"""Issue 18 item 7: convert on the structures of the real-library zoo (benchmarks/zoo.py) that
failed, rebuilt faithfully in samples/ (the real classes: tests/test_real_libraries.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.convert import convert
from normswap.convert.fidelity import first_tensor
from normswap.errors import NormswapError
from samples.hf_like import BackboneOutput, ResNetLikeBackbone


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
