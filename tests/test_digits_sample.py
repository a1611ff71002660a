"""The committed trained digits sample (samples/digits.py, samples/digits/*)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from samples.digits import (
    ARTEFACT_DIR, DigitsResNet, digits_resnet, digits_resnet_gn, load_split, load_trained,
)

NORM_NAMES = [
    "stem.bn", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.1",
    "layer3.0.bn1", "layer3.0.bn2", "layer3.0.downsample.1", "layer3.1.bn1", "layer3.1.bn2",
]


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 128]).argmax(1) for i in range(0, len(x), 128)])
    return (pred == y).float().mean().item()


@pytest.fixture(scope="module")
def test_split():
    return load_split("test")


def test_artefacts_present_and_small():
    names = ["digits_resnet.pt", "digits_resnet_module.pt", "digits_resnet_gn.pt", "calib.npz",
             "test.npz", "metrics.json"]
    for n in names:
        assert (ARTEFACT_DIR / n).is_file(), n
    total = sum((ARTEFACT_DIR / n).stat().st_size for n in names)
    assert total < 3.5 * 2**20


@pytest.mark.parametrize("name,n", [("calib", 256), ("test", 340)])
def test_split_shapes(name, n):
    x, y = load_split(name)
    assert x.shape == (n, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.isfinite(x).all()
    # stratified: every class present in roughly equal numbers
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= n // 10 - 2


def test_splits_are_deterministic_and_disjoint():
    pytest.importorskip("sklearn")
    from samples.digits import make_splits

    fresh = make_splits()
    for name in ("calib", "test"):
        x, y = load_split(name)
        torch.testing.assert_close(x, fresh[name][0])
        assert torch.equal(y, fresh[name][1])
    assert len(fresh["train"][0]) == 1201
    # no test image appears in calib or train (compare flattened rows)
    test_rows = {tuple(r.tolist()) for r in fresh["test"][0].flatten(1)[:, ::37]}
    for name in ("calib", "train"):
        overlap = sum(tuple(r.tolist()) in test_rows for r in fresh[name][0].flatten(1)[:, ::37])
        # sklearn digits contains a handful of exact duplicate images; allow a few
        assert overlap <= 3, (name, overlap)


def test_architecture():
    m = digits_resnet()
    n_params = sum(p.numel() for p in m.parameters())
    assert 100_000 <= n_params <= 500_000
    norms = [n for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert norms == NORM_NAMES
    assert isinstance(m.stem.conv, nn.Conv2d) and isinstance(m.layer1[0].conv1, nn.Conv2d)
    assert isinstance(m.layer1[0].bn1, nn.BatchNorm2d) and m.layer1[0].downsample is None
    assert isinstance(m.layer2[0].downsample[1], nn.BatchNorm2d)
    assert isinstance(m.fc, nn.Linear) and m.fc.out_features == 10
    assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 10)

    g = digits_resnet_gn()
    assert sum(p.numel() for p in g.parameters()) == n_params
    gnorms = [n for n, mod in g.named_modules() if isinstance(mod, nn.GroupNorm)]
    assert gnorms == NORM_NAMES
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in g.modules())


def test_trained_bn_accuracy(test_split):
    model = load_trained()
    assert isinstance(model, DigitsResNet) and not model.training
    # the stats are real, not the defaults
    assert not torch.allclose(model.stem.bn.running_var, torch.ones_like(model.stem.bn.running_var))
    acc = _accuracy(model, *test_split)
    assert acc >= 0.97, acc
    metrics = json.loads((ARTEFACT_DIR / "metrics.json").read_text())
    assert metrics["bn"]["test_accuracy"] == pytest.approx(acc, abs=1.5 / 340)


def test_trained_gn_accuracy(test_split):
    model = load_trained("gn")
    assert any(isinstance(mod, nn.GroupNorm) for mod in model.modules())
    acc = _accuracy(model, *test_split)
    assert acc >= 0.97, acc
    metrics = json.loads((ARTEFACT_DIR / "metrics.json").read_text())
    assert metrics["gn"]["test_accuracy"] == pytest.approx(acc, abs=1.5 / 340)


def test_pickled_module_matches_state_dict(test_split):
    whole = torch.load(ARTEFACT_DIR / "digits_resnet_module.pt", map_location="cpu", weights_only=False)
    assert type(whole) is DigitsResNet
    assert type(whole).__module__ == "samples.digits"
    whole.eval()
    ref = load_trained()
    x = test_split[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(whole(x), ref(x))


def test_calib_accuracy():
    # calib is from the training distribution; the model must do well on it too
    assert _accuracy(load_trained(), *load_split("calib")) >= 0.95


@pytest.mark.slow
def test_retrain_short(tmp_path):
    from samples.train_digits import main

    assert main(["--arch", "bn", "--epochs", "4", "--out", str(tmp_path), "--quiet"]) == 0
    for n in ("digits_resnet.pt", "digits_resnet_module.pt", "calib.npz", "test.npz", "metrics.json"):
        assert (tmp_path / n).is_file()
    model = load_trained(directory=tmp_path)
    acc = _accuracy(model, *load_split("test", directory=tmp_path))
    assert acc >= 0.9, acc
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bn"]["epochs"] == 4
