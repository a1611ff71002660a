"""Convert one kind of norm layer into another, calibrated so the model keeps its behaviour.

``normswap.convert.convert(model, to="gn", calib=None, ...) -> (converted_model, ConvertReport)``;
see :mod:`normswap.convert.core` for how the calibration works and :mod:`normswap.convert.kinds`
for the targets.
"""

from .core import convert, expected_input_text
from .kinds import TARGETS, ChannelAffine, TargetSpec, register_opacus, valid_pairs_text, valid_targets
from .report import ConvertReport, Fidelity, LayerFit
from .stats import fit_affine, fit_scale

__all__ = ["convert", "ConvertReport", "LayerFit", "Fidelity", "TARGETS", "TargetSpec", "ChannelAffine",
           "valid_targets", "valid_pairs_text", "fit_affine", "fit_scale", "expected_input_text", "register_opacus"]
