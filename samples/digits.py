"""The trained sample model: a small BatchNorm ResNet on scikit-learn's digits.

Architecture (``DigitsResNet``, defaults ``widths=(16, 32, 64)``, ``blocks=(1, 1, 2)``), input
``(N, 1, 32, 32)``, 10 classes, 151,738 parameters (BN variant)::

    stem        conv 3x3 1->16 -> bn -> relu                    (32x32)
    layer1[0]   BasicBlock 16->16, stride 1, identity shortcut    (32x32)
    layer2[0]   BasicBlock 16->32, stride 2, 1x1 conv-BN shortcut (16x16)
    layer3[0]   BasicBlock 32->64, stride 2, 1x1 conv-BN shortcut (8x8)
    layer3[1]   BasicBlock 64->64, stride 1, identity shortcut    (8x8)
    pool (global average) -> flatten -> fc (64 -> 10)

A BasicBlock is ``conv1 -> bn1 -> relu1 -> conv2 -> bn2 (+ shortcut) -> relu2``; the projection
shortcut is ``downsample = Sequential(conv 1x1 (stride 2), bn)`` (torchvision naming). All convs
feeding a norm have ``bias=False``. Norm modules (qualified names)::

    stem.bn, layer1.0.bn1, layer1.0.bn2, layer2.0.bn1, layer2.0.bn2, layer2.0.downsample.1,
    layer3.0.bn1, layer3.0.bn2, layer3.0.downsample.1, layer3.1.bn1, layer3.1.bn2

``digits_resnet_gn()`` is the same network with ``nn.GroupNorm(8, C)`` in place of every
``nn.BatchNorm2d`` (same module names, so state-dict keys differ only by the BN buffers).

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, values 0..16), scaled to [0, 1] by /16,
upsampled to 32x32 with ``F.interpolate(mode='bilinear', align_corners=False)``, then normalised
with the fixed constants ``DIGITS_MEAN = 0.3053`` / ``DIGITS_STD = 0.3760`` (the pixel mean/std of
the whole scaled 8x8 dataset; bilinear interpolation commutes with this affine map; after
upsampling the per-pixel std is ~0.86 because interpolation smooths). Splits are
stratified and deterministic (see ``make_splits``): train 1201 / calib 256 / test 340, pairwise
disjoint; calib is a held-out part of the training pool (same distribution), never used to train.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ARTEFACT_DIR",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "SPLIT_SEED",
    "SPLIT_SIZES",
    "BasicBlock",
    "DigitsResNet",
    "digits_resnet",
    "digits_resnet_gn",
    "load_split",
    "load_trained",
    "make_splits",
    "preprocess",
]

ARTEFACT_DIR = Path(__file__).resolve().parent / "digits"

DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760
SPLIT_SEED = 0
SPLIT_SIZES = {"train": 1201, "calib": 256, "test": 340}
GN_GROUPS = 8


def _norm_factory(norm: str, gn_groups: int) -> Callable[[int], nn.Module]:
    if norm == "bn":
        return lambda c: nn.BatchNorm2d(c)
    if norm == "gn":
        return lambda c: nn.GroupNorm(gn_groups, c)
    raise ValueError(f"norm must be 'bn' or 'gn', got {norm!r}")


class BasicBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm + (identity | 1x1 conv-norm) shortcut, then relu."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(out_ch)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                norm_layer(out_ch),
            )
        else:
            self.downsample = None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class DigitsResNet(nn.Module):
    """Small ResNet for (N, 1, 32, 32) digit images; see the module docstring."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (1, 1, 2),
                 norm: str = "bn", gn_groups: int = GN_GROUPS) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError("widths and blocks must be non-empty and of equal length")
        norm_layer = _norm_factory(norm, gn_groups)
        self.norm = norm
        self.stem = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)),
            ("bn", norm_layer(widths[0])),
            ("relu", nn.ReLU()),
        ]))
        in_ch = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks), start=1):
            stride = 1 if i == 1 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_ch, w, stride if j == 0 else 1, norm_layer))
                in_ch = w
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.flatten(self.pool(x)))


def digits_resnet(**kwargs) -> DigitsResNet:
    """The BatchNorm architecture of the trained sample (random init)."""
    kwargs.setdefault("norm", "bn")
    return DigitsResNet(**kwargs)


def digits_resnet_gn(**kwargs) -> DigitsResNet:
    """Same architecture with GroupNorm(8, C) in place of every BatchNorm2d."""
    kwargs.setdefault("norm", "gn")
    return DigitsResNet(**kwargs)


# ----------------------------------------------------------------------------------------- data

def preprocess(images: Tensor) -> Tensor:
    """Raw digits pixels (values 0..16), shape (N, 64) or (N, 8, 8) -> (N, 1, 32, 32) float32."""
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return ((x - DIGITS_MEAN) / DIGITS_STD).contiguous()


def make_splits() -> dict[str, tuple[Tensor, Tensor]]:
    """Deterministic stratified split of sklearn's bundled digits: train 1201 / calib 256 / test 340."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    pool, test = train_test_split(idx, test_size=SPLIT_SIZES["test"], stratify=d.target,
                                  random_state=SPLIT_SEED)
    train, calib = train_test_split(pool, test_size=SPLIT_SIZES["calib"], stratify=d.target[pool],
                                    random_state=SPLIT_SEED)
    out = {}
    for name, ids in (("train", train), ("calib", calib), ("test", test)):
        ids = np.sort(ids)
        out[name] = (preprocess(d.data[ids]), torch.as_tensor(d.target[ids], dtype=torch.int64))
    return out


def load_split(name: str, directory: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """(x float32 (N,1,32,32), y int64 (N,)) of split 'calib', 'test' or 'train'.

    Reads ``{directory}/{name}.npz`` (default ``samples/digits/``); 'train' (not committed, to keep
    the artefacts small) is regenerated deterministically from scikit-learn when no file exists.
    """
    import numpy as np

    if name not in SPLIT_SIZES:
        raise ValueError(f"unknown split {name!r}; expected one of {sorted(SPLIT_SIZES)}")
    path = Path(directory or ARTEFACT_DIR) / f"{name}.npz"
    if path.exists():
        with np.load(path) as z:
            return torch.from_numpy(z["x"].astype(np.float32)), torch.from_numpy(z["y"].astype(np.int64))
    if name == "train":
        return make_splits()["train"]
    raise FileNotFoundError(f"{path} not found; run `python samples/train_digits.py`")


def load_trained(arch: str = "bn", directory: str | Path | None = None) -> DigitsResNet:
    """The committed trained model (``digits_resnet.pt`` or, for arch='gn', ``digits_resnet_gn.pt``),
    in eval mode."""
    if arch not in ("bn", "gn"):
        raise ValueError(f"arch must be 'bn' or 'gn', got {arch!r}")
    fname = "digits_resnet.pt" if arch == "bn" else "digits_resnet_gn.pt"
    model = digits_resnet() if arch == "bn" else digits_resnet_gn()
    state = torch.load(Path(directory or ARTEFACT_DIR) / fname, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
