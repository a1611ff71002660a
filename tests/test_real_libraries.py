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
    assert classify(convnext.LayerNorm2d(8)) == "unsupported_subclass"


def test_timm_batchnormact_is_not_plain_bn():
    norm_act = pytest.importorskip("timm.layers.norm_act")
    assert classify(norm_act.BatchNormAct2d(8)) == "unsupported_subclass"


def test_hf_llama_rmsnorm_is_custom():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    assert classify(llama.LlamaRMSNorm(16)) == "custom"


def test_rebuilds_match_the_same_verdicts():
    from samples.models import BatchNormAct2d, FrozenBatchNorm2d, LayerNorm2d, LlamaRMSNorm

    assert classify(FrozenBatchNorm2d(8)) == "frozen_bn"
    assert classify(BatchNormAct2d(8)) == "unsupported_subclass"
    assert classify(LayerNorm2d(8)) == "unsupported_subclass"
    assert classify(LlamaRMSNorm(16)) == "custom"
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(LayerNorm2d(8)(x), torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2), atol=1e-6)
