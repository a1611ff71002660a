"""Fold rules as objects (like onnxscript's rewrite rule classes), one module per pattern.

Each rule is an instance of a :class:`~normswap.fold.rules.base.FoldRule` subclass: ``NAME``,
``applies(site, ctx)`` (is the planner to try it on this site), ``match(site, ctx) -> Match |
str`` and ``apply(site, ctx, match)``; ``check(site, ctx) -> str | None`` (why it does not
fold; None = it does) is written once in the base class.  The three producer rules are one
class (:class:`~normswap.fold.rules._producer.ProducerRule`) parameterised by the layer types,
the pattern name and their extra check.  ``RULES`` is the rule set, in the order the rules are
tried: folding into the layer before a norm is preferred to folding into the layer after it.
"""

from . import (bn_next, composite_bn, conv_bn, convtranspose_bn, functional_bn, linear_bn, norm_affine_linear,
               traced_conv_bn)
from ._producer import ProducerRule
from .base import FoldRule

RULES: list[FoldRule] = [conv_bn.rule, convtranspose_bn.rule, linear_bn.rule, traced_conv_bn.rule, bn_next.rule,
                         norm_affine_linear.rule, composite_bn.rule, functional_bn.rule]

__all__ = ["RULES", "FoldRule", "ProducerRule", "conv_bn", "convtranspose_bn", "linear_bn", "bn_next",
           "norm_affine_linear", "composite_bn", "functional_bn", "traced_conv_bn"]
