"""Optional: the real torchvision / timm / transformers classes that samples/ rebuilds.

Skipped when the libraries are absent (they need a multi-GB torch build, so they are
not part of CI); run them where they are installed to confirm the rebuilds match."""

import pytest
import torch

from normswap.norms import classify


def test_torchvision_frozen_bn_and_layernorm2d():
    ops = pytest.importorskip("torchvision.ops.misc")
    assert classify(ops.FrozenBatchNorm2d(8)) == "frozen_bn"
    convnext = pytest.importorskip("torchvision.models.convnext")
    assert classify(convnext.LayerNorm2d(8)) == "ln2d"


def test_timm_batchnormact_is_not_plain_bn():
    norm_act = pytest.importorskip("timm.layers.norm_act")
    assert classify(norm_act.BatchNormAct2d(8)) == "bn_act"


def test_hf_llama_rmsnorm_is_custom():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    assert classify(llama.LlamaRMSNorm(16)) == "custom"


def test_rebuilds_match_the_same_verdicts():
    from samples.models import BatchNormAct2d, FrozenBatchNorm2d, LayerNorm2d, LlamaRMSNorm

    assert classify(FrozenBatchNorm2d(8)) == "frozen_bn"
    assert classify(BatchNormAct2d(8)) == "bn_act"
    assert classify(LayerNorm2d(8)) == "ln2d"
    assert classify(LlamaRMSNorm(16)) == "custom"
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(LayerNorm2d(8)(x), torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2), atol=1e-6)


def test_timm_structures_are_recognised_like_their_rebuilds():
    layers = pytest.importorskip("timm.layers")
    from normswap.library_norms import is_same_padding_conv
    from normswap.norms import is_weight_std_conv

    assert classify(layers.GroupNormAct(8, num_groups=4)) == "gn_act"
    assert classify(layers.FilterResponseNormAct2d(8)) == "frn_act"
    assert classify(layers.FilterResponseNormTlu2d(8)) == "frn_act"
    assert classify(layers.EvoNorm2dB0(8)) == "evonorm"
    assert classify(layers.EvoNorm2dS0(8)) == "evonorm"
    assert classify(layers.LayerNorm2d(8)) == "ln2d"
    assert is_weight_std_conv(layers.StdConv2d(3, 8, 3)) and is_weight_std_conv(layers.ScaledStdConv2d(3, 8, 3))
    assert is_same_padding_conv(layers.Conv2dSame(3, 8, 3))


def test_timm_batchnormact_folds_exactly():
    norm_act = pytest.importorskip("timm.layers.norm_act")
    from torch import nn

    from normswap.fold import fold

    m = nn.Sequential(nn.Conv2d(3, 8, 3), norm_act.BatchNormAct2d(8, act_layer=nn.SiLU)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    folded, rep = fold(m, (x,))
    assert len(rep.folded) == 1 and torch.allclose(folded(x), m(x), atol=1e-5)


def test_hf_convnext_layernorm_channels_first():
    cn = pytest.importorskip("transformers.models.convnext.modeling_convnext")
    assert classify(cn.ConvNextLayerNorm(8, data_format="channels_first")) == "ln2d"


def test_hf_backbone_output_converts_like_its_rebuild():
    # issue 18 item 7: HF backbones (ResNetBackbone, RTDetrResNetBackbone, HGNetV2Backbone) return
    # BackboneOutput(feature_maps=(...)); samples.hf_like.ResNetLikeBackbone rebuilds it
    transformers = pytest.importorskip("transformers")
    from torch import nn

    from normswap.convert import convert
    from samples.hf_like import BackboneOutput, ResNetLikeBackbone

    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1],
                                    layer_type="basic", out_features=["stage1", "stage2", "stage3"])
    real = transformers.AutoBackbone.from_config(cfg).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rebuilt = ResNetLikeBackbone()
    for m in (real, rebuilt):
        out = m(x[:2])
        assert list(out.keys()) == ["feature_maps"] and isinstance(out.feature_maps, tuple)
        assert [t.shape[1] for t in out.feature_maps] == [8, 16, 32]
    assert type(real(x[:2])).__name__ == BackboneOutput.__name__
    assert ([type(m).__name__ for m in real.modules() if isinstance(m, nn.BatchNorm2d)].count("BatchNorm2d")
            == sum(isinstance(m, nn.BatchNorm2d) for m in rebuilt.modules()))
    conv, rep = convert(real, "gn", calib=x, mode="fast", batch_size=4)
    assert rep.fidelity.samples == 8 and rep.fidelity.output == "feature_maps.0"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())


def test_timm_fx_feature_extractor_folds_in_eval_mode_like_its_rebuild():
    # issue 18: deepcopy of torchvision's DualGraphModule comes back in training mode with the train
    # graph; samples.timm_like.feature_graph_net rebuilds it (DualGraphModule, FeatureGraphNet)
    timm = pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    import copy

    from torch import nn

    from normswap.fold import fold

    real = timm.create_model("mobilenetv3_small_100", features_only=True, feature_cls="fx").eval()
    assert type(real).__name__ == "FeatureGraphNet"
    assert type(real.graph_module).__mro__[1].__name__ == "DualGraphModule"
    assert sum(m.training for m in copy.deepcopy(real).modules()) > 0  # the library behaviour
    with torch.no_grad():
        for m in real.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = real(x)
    folded, rep = fold(real, (x,))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in real.modules())
    assert len(rep.folded) == n_bn == 34 and rep.verification["ok"]
    with torch.no_grad():
        out = folded(x)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(out, ref))


def test_hf_weight_standardized_conv_like_its_rebuild():
    bit = pytest.importorskip("transformers.models.bit.modeling_bit")
    from normswap.norms import is_weight_std_conv
    from samples.hf_like import WeightStandardizedConv2d

    static, dynamic = bit.WeightStandardizedConv2d(3, 8, 3), bit.WeightStandardizedConv2d(3, 8, 3, stride=2)
    assert static.pad is None and type(dynamic.pad).__name__ == "DynamicPad2d"
    assert is_weight_std_conv(static) and is_weight_std_conv(dynamic)
    x = torch.randn(2, 3, 15, 15)
    for real, rebuilt in ((static, WeightStandardizedConv2d(3, 8, 3)), (dynamic, WeightStandardizedConv2d(3, 8, 3, stride=2))):
        rebuilt.load_state_dict(real.state_dict())
        rebuilt.eps = real.eps
        assert (rebuilt.pad is None) == (real.pad is None)
        assert torch.allclose(real(x), rebuilt(x), atol=1e-6)
