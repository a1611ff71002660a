"""normswap: normalization-layer surgery on trained PyTorch models.

One function per job::

    import normswap
    m = normswap.load_model("model.pt", arch="samples.digits:digits_resnet")
    normswap.audit(m)                                  # -> AuditReport
    folded, rep = normswap.fold(m.module)              # -> (model, FoldReport)
    gn, rep = normswap.convert(m.module, to="gn", calib="calib.npz")
    normswap.export(gn, "gn.onnx", example_inputs)     # -> ExportReport
    normswap.check(gn, "gn.onnx")                      # -> ParityReport (bool: parity holds)

Attributes are imported lazily so that ``import normswap`` (and ``normswap --help``)
does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "NormswapError": ("normswap.errors", "NormswapError"),
    "Report": ("normswap.report", "Report"),
    "LoadedModel": ("normswap.io", "LoadedModel"),
    "load_model": ("normswap.io", "load_model"),
    "save_model": ("normswap.save", "save_model"),
    "load_data": ("normswap.data", "load_data"),
    "audit": ("normswap.audit", "audit"),
    "fold": ("normswap.fold", "fold"),
    "convert": ("normswap.convert", "convert"),
    "export": ("normswap.export", "export"),
    "check": ("normswap.check", "check"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'normswap' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)


class _Package(types.ModuleType):
    """Keeps ``normswap.fold`` (etc.) the job *function* after ``normswap.fold`` the
    sub-package is imported: the import system would otherwise overwrite the
    attribute with the module.  The modules stay reachable via ``sys.modules`` and
    ``from normswap.fold import plan``."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
