"""The audit job: :func:`audit` (any model object -> :class:`AuditReport`, dispatching to the
eager, TorchScript or torch.export front-end) and :func:`audit_file` (the file job behind
``normswap audit``: load, resolve inputs, audit, notes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .eager import audit_eager
from .exported import audit_export
from .report import AuditReport
from .script import audit_script

__all__ = ["audit", "audit_file"]


from .eager import _unwrap  # noqa: E402  (one definition)


def audit(model: Any, example_inputs=None) -> AuditReport:
    """Audit the normalization layers of ``model``.

    ``model``: an ``nn.Module``, a ``torch.jit.ScriptModule``, a ``torch.export``
    ``ExportedProgram`` or a ``normswap.io.LoadedModel``.  ``example_inputs`` (a tensor or a
    tuple of forward arguments, optional) lets the audit learn input ranks and real call
    counts; the model's buffers are restored afterwards.
    """
    import time

    t0 = time.perf_counter()
    original = model
    model = _unwrap(model)
    ep_type = getattr(getattr(torch, "export", None), "ExportedProgram", None)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(model, torch.jit.ScriptModule):
        rep = audit_script(model)
    elif ep_type is not None and isinstance(model, ep_type):
        rep = audit_export(model)
    elif isinstance(model, nn.Module):
        rep = audit_eager(model, example_inputs)
    else:
        from normswap.errors import NormswapError

        raise NormswapError(f"cannot audit a {type(model).__name__}: expected an nn.Module, "
                            "a TorchScript module or an ExportedProgram")
    path = getattr(original, "path", None)
    if path is not None:
        rep.model = str(path)
    fmt = getattr(original, "format", None)
    if fmt:
        rep.notes.insert(0, f"loaded as {fmt}")
    for n in getattr(original, "notes", None) or []:
        rep.notes.append(str(n))
    rep.seconds = time.perf_counter() - t0
    return rep


def audit_file(model_path, *, input_shape=None, data=None, arch=None, arch_kwargs=None, trust=False,
               imports=(), preprocess=None) -> AuditReport:
    """Load MODEL and audit it (the job behind ``normswap audit``).

    ``input_shape`` / ``data`` (resolved by :func:`normswap.inputs.resolve_inputs`) run an eager
    model once to learn input ranks and real call counts; a compiled model (TorchScript,
    ``.pt2``) is audited from its graph and the inputs are ignored (noted).  Inputs that do not
    run through the model are an error, not a silent fallback.  ``preprocess``: how an image
    folder given as ``data`` is read (see :mod:`normswap.preprocess`)."""
    from normswap.errors import NormswapError
    from normswap.inputs import resolve_inputs
    from normswap.io import load_model

    loaded = load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)
    module = loaded.module
    eager = isinstance(module, nn.Module) and not isinstance(module, torch.jit.ScriptModule)
    asked = input_shape is not None or data is not None
    inputs = None
    if asked and eager:
        inputs = resolve_inputs(module, input_shape=input_shape, data=data, required=True,
                                preprocess=preprocess).example
    report = audit(loaded, inputs)
    if asked and inputs is None:
        what = {"torchscript": "a TorchScript", "export": "a torch.export"}.get(loaded.format, "this")
        option = "--input-shape" if input_shape is not None else "--data"
        report.notes.append(f"{option} ignored: {what} model is audited from its graph without running it")
    if inputs is not None:
        failed = [n for n in report.notes if n.startswith("forward on example inputs failed")]
        if failed:
            what = f"--input-shape {input_shape}" if input_shape is not None else f"--data {data}"
            raise NormswapError(f"{what}: the model does not run on inputs of this shape "
                                f"({failed[0].split(': ', 1)[1]})")
    return report
