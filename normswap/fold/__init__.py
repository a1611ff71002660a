"""Fold normalization layers into neighbouring linear layers, exactly.

``fold(model, example_inputs=None, *, eval=False, bake_spectral_norm=False, inplace=False)
-> (folded_model, FoldReport)`` and ``plan(model, regions=None) -> list[FoldDecision]``.
The arithmetic (float64, cast back) is in :mod:`normswap.fold.arith`; one rule per pattern
in :mod:`normswap.fold.rules`.
"""

from .api import fold, plan
from .report import FoldDecision, FoldReport

__all__ = ["fold", "plan", "FoldDecision", "FoldReport"]
