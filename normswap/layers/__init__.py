"""Seed normalization layers that torch lacks.

Each layer has BatchNorm-like train/eval behaviour where it has running statistics, an
``extra_repr``, and a forward pass built from ONNX-exportable ops without Python control
flow on tensor values.
"""

from .affine import ChannelAffine  # noqa: F401  (convert's --to affine module; not a norm)
from .bgn import BatchGroupNorm2d
from .conditional import ConditionalBatchNorm2d, SandwichBatchNorm2d
from .frn import FilterResponseNorm2d
from .postops import PostOps  # noqa: F401  (fold's remainder of a norm with post ops; not a norm)
from .powernorm import PowerNorm2d

__all__ = [
    "BatchGroupNorm2d",
    "ConditionalBatchNorm2d",
    "FilterResponseNorm2d",
    "PowerNorm2d",
    "SandwichBatchNorm2d",
]
