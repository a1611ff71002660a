"""The pure fold arithmetic (normswap.fold.arith), against direct evaluation in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normswap.fold import arith


def _bn(c, g):
    mean = torch.randn(c, generator=g, dtype=torch.float64) * 5
    var = torch.rand(c, generator=g, dtype=torch.float64) + 1e-3
    w = torch.randn(c, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    return mean, var, w, b


def test_bn_affine_matches_batch_norm():
    g = torch.Generator().manual_seed(0)
    mean, var, w, b = _bn(5, g)
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=g)
    s, t = arith.bn_affine(mean, var, w, b, 1e-5)
    ref = F.batch_norm(x, mean, var, w, b, training=False, eps=1e-5)
    assert torch.allclose(x * s[:, None] + t[:, None], ref, atol=1e-12)
    # no affine: ones / zeros
    s2, t2 = arith.bn_affine(mean, var, None, None, 1e-5)
    assert torch.allclose(s2, 1 / torch.sqrt(var + 1e-5))


def test_arith_is_float64_and_cast_back():
    conv = nn.Conv2d(2, 3, 1).half()
    s = torch.full((3,), 1000.0)
    t = torch.zeros(3)
    w, b = arith.fold_affine_after_conv(conv.weight, conv.bias, s, t)
    assert w.dtype == torch.float64
    assert arith.cast_like(w, conv.weight).dtype == torch.float16


def test_convtranspose_groups_layout_vs_torch_fusion():
    """Our transpose fold is exact for groups > 1, where fuse_conv_bn_weights(transpose=True) is not."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    g = torch.Generator().manual_seed(1)
    mean, var, w, b = _bn(6, g)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    ref = F.batch_norm(ct(x), mean, var, w, b, training=False, eps=1e-5)
    s, t = arith.bn_affine(mean, var, w, b, 1e-5)
    w2, b2 = arith.fold_affine_after_conv_transpose(ct.weight, ct.bias, s, t, ct.groups)
    ours = F.conv_transpose2d(x, w2, b2, groups=2)
    assert torch.allclose(ours, ref, atol=1e-10)
    # torch's helper scales dim 1 (size out/groups = 3) by the 6-vector: it fails or is wrong
    try:
        tw, tb = fuse_conv_bn_weights(ct.weight, ct.bias, mean, var, 1e-5, w, b, transpose=True)
        theirs = F.conv_transpose2d(x, tw, tb, groups=2)
        assert not torch.allclose(theirs, ref, atol=1e-6)
    except RuntimeError:
        pass


def test_fold_affine_before_conv_groups():
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, groups=2).double()
    s = torch.randn(4, dtype=torch.float64)
    t = torch.randn(4, dtype=torch.float64)
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    ref = conv(x * s[:, None] + t[:, None])
    w2, b2 = arith.fold_affine_before_conv(conv.weight, conv.bias, s, t, 2)
    assert torch.allclose(F.conv1d(x, w2, b2, groups=2), ref, atol=1e-10)


def test_fold_affine_linear_both_sides_and_scalar():
    torch.manual_seed(0)
    lin = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    s, t = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w, b = arith.fold_affine_after_linear(lin.weight, lin.bias, s, t)
    assert torch.allclose(F.linear(x, w, b), lin(x) * s + t)
    s, t = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    w, b = arith.fold_affine_before_linear(lin.weight, None, s, t)
    assert torch.allclose(F.linear(x, w, b), F.linear(x * s + t, lin.weight))
    # a one-channel affine broadcasts
    w, b = arith.fold_affine_after_linear(lin.weight, lin.bias, torch.tensor([2.0]), torch.tensor([1.0]))
    assert torch.allclose(F.linear(x, w, b), lin(x) * 2 + 1)


def test_bgn_and_powernorm_affine():
    phi = torch.tensor([4.0, 9.0])
    s, t = arith.powernorm_affine(phi, torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0]), 0.0)
    assert torch.allclose(s, torch.tensor([0.5, 2 / 3], dtype=torch.float64))
    assert torch.allclose(t, torch.tensor([0.5, 0.0], dtype=torch.float64))
    s, t = arith.bgn_affine(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]), None, None, 0.0, 4)
    assert torch.allclose(s, torch.tensor([1, 1, 0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(t, torch.tensor([-1, -1, -1, -1], dtype=torch.float64))


def test_is_finite():
    assert arith.is_finite(torch.ones(2), None)
    assert not arith.is_finite(torch.tensor([1.0, float("nan")]))
