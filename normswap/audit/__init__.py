"""``normswap audit``: which normalization layers a model uses, where, in which mode,
whether each can be folded, and what risks it carries.

:func:`audit` accepts an ``nn.Module``, a TorchScript module, a ``torch.export``
``ExportedProgram`` or a ``normswap.io.LoadedModel`` and returns an :class:`AuditReport`
(one :class:`Site` per norm: module norms, functional norm calls, and spectral / weight
norm reparametrisations of a producer's weight).  Auditing never changes the model and
never fails because part of the model cannot be traced.

The package: :mod:`.report` (report types, risk flags), :mod:`.eager` (FX front-end),
:mod:`.compiled` (what the compiled front-ends share, their fold verdicts), :mod:`.script`
(TorchScript), :mod:`.exported` (torch.export), :mod:`.job` (:func:`audit`, :func:`audit_file`).
"""

from .job import audit, audit_file
from .report import FLAG_TEXT, TINY_VAR_RATIO, AuditReport, Site

__all__ = ["Site", "AuditReport", "audit", "audit_file", "FLAG_TEXT", "TINY_VAR_RATIO"]
