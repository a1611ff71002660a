"""Fold normalization layers into neighbouring linear layers, exactly.

``fold(model, example_inputs=None, *, eval=False, bake_spectral_norm=False, inplace=False)
-> (folded_model, FoldReport)`` and ``plan(model, regions=None) -> list[FoldDecision]``, for an
eager model, a ``torch.export`` program or (``plan`` only) a TorchScript module.  The pieces:
the graph views (:mod:`normswap.views`), the rule set (:mod:`.rules`), the planner
(:mod:`.planner`), the appliers (:mod:`.apply_eager`, :mod:`.apply_program`), the verification
(:mod:`.verify`); the arithmetic is :mod:`normswap.arith` (float64, cast back).
"""

from .api import fold, fold_program, plan
from .report import FoldDecision, FoldReport

__all__ = ["fold", "plan", "fold_program", "FoldDecision", "FoldReport"]
