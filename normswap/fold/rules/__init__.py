"""Fold rules as objects (like onnxscript's rewrite rule classes), one module per pattern.

Each rule is an instance of a :class:`~normswap.fold.rules.base.FoldRule` subclass: ``NAME``,
``applies(site, view)`` (is the planner to try it on this site), ``match(site, view) -> Match |
Reason``; ``check(site, view)`` and ``apply(site, view, match)`` are written once in the base
class.  Rules decide on what a graph view (:mod:`normswap.views`) says, so one rule set decides
the sites of every front end; the three rules marked ``NEEDS = {"fx"}`` read FX nodes a
compiled graph has no counterpart of (a traced subclassed conv, a functional call in an FX
graph, the inner BatchNorm of a conditional norm).  ``RULES`` is the rule set, in the order the
rules are tried: folding into the layer before a norm is preferred to folding into the layer
after it.
"""

from . import (bn_next, composite_bn, conv_bn, convtranspose_bn, functional_bn, linear_bn, norm_affine_linear,
               traced_conv_bn)
from ._producer import ProducerRule
from .base import FoldRule

RULES: list[FoldRule] = [conv_bn.rule, convtranspose_bn.rule, linear_bn.rule, traced_conv_bn.rule, bn_next.rule,
                         norm_affine_linear.rule, composite_bn.rule, functional_bn.rule]

__all__ = ["RULES", "FoldRule", "ProducerRule", "conv_bn", "convtranspose_bn", "linear_bn", "bn_next",
           "norm_affine_linear", "composite_bn", "functional_bn", "traced_conv_bn"]
