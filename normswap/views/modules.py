"""Eager layer modules as views describe them: the exact conv / transposed conv / linear types and
their :class:`~normswap.views.base.Layer` descriptions (shared by the FX view and the export view
of an eager model)."""

from __future__ import annotations

from torch import nn

from normswap.graph import LAYER_TYPES

from .base import Layer

__all__ = ["CONV_TYPES", "CONVT_TYPES", "LINEAR_TYPES", "layer_family", "layer_of"]

CONV_TYPES = tuple(t for t, f in LAYER_TYPES.items() if f == "conv")
CONVT_TYPES = tuple(t for t, f in LAYER_TYPES.items() if f == "convt")
LINEAR_TYPES = tuple(t for t, f in LAYER_TYPES.items() if f == "linear")
_TYPES = {"conv": CONV_TYPES, "convt": CONVT_TYPES, "linear": LINEAR_TYPES}
_ALL_LAYERS = CONV_TYPES + CONVT_TYPES + LINEAR_TYPES



def layer_family(m: nn.Module) -> str | None:
    if isinstance(m, CONVT_TYPES):
        return "convt"
    if isinstance(m, CONV_TYPES):
        return "conv"
    if isinstance(m, LINEAR_TYPES):
        return "linear"
    return None


def layer_of(m: nn.Module, name: str, ranks=None) -> Layer:
    """The :class:`Layer` description of a conv / linear module."""
    fam = layer_family(m)
    if fam == "linear":
        return Layer(name, fam, m.out_features, m.in_features, None, 1, ranks=ranks, handle=m,
                     type_name=type(m).__name__)
    return Layer(name, fam, m.out_channels, m.in_channels, len(m.kernel_size), m.groups, m.padding,
                 m.padding_mode, tuple(m.dilation), tuple(m.kernel_size), ranks=ranks, handle=m,
                 type_name=type(m).__name__)
