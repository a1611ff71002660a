"""torch.fx regions: norms as leaves, untraceable parts analysed separately, never raising."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normswap.graph import (
    Region,
    consumer_info,
    find_module_nodes,
    functional_nodes,
    norm_nodes,
    producer_info,
    qualname,
    region_of,
    trace_regions,
)
from samples import models as S


def _norm_names(regions):
    return sorted(name for name, _, _ in norm_nodes(regions))


def test_resnet_single_region_norms_are_leaves():
    model, _ = S.resnet_style()
    regions = trace_regions(model)
    assert len(regions) == 1
    (r,) = regions
    assert isinstance(r, Region) and r.path == "" and r.gm is not None and r.error is None
    names = _norm_names(regions)
    assert len(names) == 9 and "layers.0.0.downsample.1" in names
    # the GraphModule shares submodule objects with the model
    assert r.gm.get_submodule("bn1") is model.bn1
    assert qualname(r, "bn1") == "bn1"
    (ref,) = find_module_nodes(regions, "layers.1.0.bn2")
    p = producer_info(ref)
    assert p["name"] == "layers.1.0.conv2" and p["op"] == "conv" and p["other_users"] is False


def test_custom_and_composite_norms_are_single_nodes():
    model, _ = S.llama_block()
    regions = trace_regions(model)
    assert _norm_names(regions) == ["block.norm1", "block.norm2", "norm"]
    model, _ = S.cond_generator()
    regions = trace_regions(model)
    assert _norm_names(regions) == ["cbn1", "cbn2"]  # inner .bn not visible


def test_untraceable_block_becomes_its_own_region():
    model, _ = S.untraceable()
    regions = trace_regions(model)
    by_path = {r.path: r for r in regions}
    assert set(by_path) == {"", "block"}
    assert by_path[""].gm is not None and by_path[""].untraceable_leaves == ["block"]
    assert by_path["block"].gm is None and "control flow" in by_path["block"].error
    assert _norm_names(regions) == ["head_bn", "stem.1"]
    assert region_of(regions, "block.bn").path == "block"
    assert region_of(regions, "head_bn").path == ""


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.mean() > 100:  # data dependent
            x = x * 2
        return self.bn(self.conv(x))


class _Mid(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(self.pre(x))


class _BadRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.mid = _Mid()
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        x = self.a(x)
        for _ in range(int(x.shape[0])):  # data-dependent loop count on a proxy
            pass
        return self.ln(self.mid(x).mean((2, 3)))


def test_nested_untraceable_and_untraceable_root_never_raise():
    model = _Mid()
    regions = trace_regions(model)
    by_path = {r.path: r for r in regions}
    assert by_path[""].gm is not None and by_path[""].untraceable_leaves == ["inner"]
    assert by_path["inner"].gm is None
    assert _norm_names(regions) == ["pre.1"]

    model = _BadRoot()
    model(torch.randn(2, 3, 4, 4))
    regions = trace_regions(model)
    by_path = {r.path: r for r in regions}
    assert by_path[""].gm is None and by_path[""].error
    # children are regions of their own (recursively); leaf norms are not
    assert by_path["a"].gm is not None
    assert by_path["mid"].gm is not None and by_path["mid.inner"].gm is None
    assert _norm_names(regions) == ["a.1", "mid.pre.1"]


def test_functional_nodes_and_consumers():
    model, _ = S.functional_norms()
    regions = trace_regions(model)
    found = {name: kind for name, _, kind in functional_nodes(regions)}
    assert found == {"batch_norm": "bn", "group_norm": "gn", "instance_norm": "in",
                     "layer_norm": "ln", "rms_norm": "rms"}
    ref = next(ref for name, ref, _ in functional_nodes(regions) if name == "batch_norm")
    assert producer_info(ref)["name"] == "conv"
    assert [c["type"] for c in consumer_info(ref)] == ["relu"]


def test_shared_producer_and_reused_module():
    model, _ = S.shared_producer()
    regions = trace_regions(model)
    (ref,) = find_module_nodes(regions, "bn_a")
    assert producer_info(ref)["other_users"] is True
    model, _ = S.shared_pair()
    regions = trace_regions(model)
    refs = find_module_nodes(regions, "bn")
    assert len(refs) == 2
    assert producer_info(refs[0])["producer_calls"] == 2


def test_model_that_is_a_norm():
    regions = trace_regions(nn.BatchNorm2d(3))
    assert len(regions) == 1 and regions[0].gm is None


def test_functional_under_untraceable_part_is_not_lost_elsewhere():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _Inner()

        def forward(self, x):
            return F.layer_norm(self.inner(x), (4, 2, 2))

    regions = trace_regions(M())
    assert [n for n, _, _ in functional_nodes(regions)] == ["layer_norm"]


def test_optional_none_arguments_are_traced_as_none():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.bn_mask = nn.BatchNorm2d(4)

        def forward(self, x, mask=None):
            y = self.conv(x)
            if mask is not None:
                y = self.bn_mask(y * mask) / len(mask)  # len() of a proxy fails
            return self.bn(y)

    regions = trace_regions(M())
    assert len(regions) == 1 and regions[0].gm is not None
    assert _norm_names(regions) == ["bn"]
    with pytest.raises(AssertionError):  # specialised: FX asserts mask is None
        regions[0].gm(torch.randn(1, 3, 2, 2), torch.ones(1))


def test_one_producer_table_for_every_reader():
    from normswap.graph import PRODUCER_OPS, producer_op

    assert producer_op("Conv2d") == producer_op("aten::conv2d") == producer_op("conv2d.default") == "conv"
    assert producer_op("torch.nn.modules.linear.Linear") == producer_op("addmm") == "linear"
    assert producer_op("ConvTranspose1d") == "conv_transpose"
    assert producer_op("relu") == "other" and producer_op(None, "input") == "input"
    assert "Conv3d" in PRODUCER_OPS
