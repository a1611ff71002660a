"""Fold rules, one per module (like onnxscript's rewriter rules).

Each rule module has ``NAME``, ``applies(site, ctx) -> bool`` (is the rule about this kind
of site at all), ``check(site, ctx) -> str | None`` (why it does not apply; None = it
applies), ``match(site, ctx) -> Match | str`` and ``apply(site, ctx, match=None)``.
``RULES`` is the order they are tried in: folding into the layer before a norm is
preferred to folding into the layer after it.
"""

from . import bn_next, composite_bn, conv_bn, convtranspose_bn, functional_bn, linear_bn, norm_affine_linear

RULES = [conv_bn, convtranspose_bn, linear_bn, bn_next, norm_affine_linear, composite_bn, functional_bn]

__all__ = ["RULES", "conv_bn", "convtranspose_bn", "linear_bn", "bn_next", "norm_affine_linear",
           "composite_bn", "functional_bn"]
