"""Graph views: what each front end tells the fold planner about its norm sites.

One protocol (:class:`~normswap.views.base.GraphView`: sites, producer, consumers, layer problems,
the norm's affine, mode and visibility) and its implementations -- :mod:`.fx` (the FX regions of
an eager model), :mod:`.aten` (a ``torch.export`` program), :mod:`.aten_eager` (the export of an
eager model, for the sites FX cannot prove), :mod:`.script` (a TorchScript module).  The rules and
the planner (:mod:`normswap.fold`) decide on these descriptions only.
"""

from .base import FAMILIES, GraphView, Layer, Match, NormSite, family

__all__ = ["GraphView", "Layer", "NormSite", "Match", "family", "FAMILIES"]
