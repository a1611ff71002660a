"""The two ONNX exporters behind ``normswap export``: torch's dynamo exporter (default; ``optimize``
off when the norms are kept as nodes) and the TorchScript exporter (the fallback), with the
dynamic-batch specification each one takes."""

from __future__ import annotations

import inspect
import io
import warnings

from normswap.onnx_utils import quiet_torch_onnx

__all__ = ["input_names", "dynamic_spec", "export_dynamo", "export_torchscript"]


def input_names(model, n: int) -> list[str]:
    try:
        params = [
            p
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        names = [p.name for p in params[:n]]
    except (TypeError, ValueError):
        names = []
    names = names + [f"input_{i}" for i in range(len(names), n)]
    if len(set(names)) != len(names):
        names = [f"input_{i}" for i in range(n)]
    return names


# --------------------------------------------------------------------------- exporters


def dynamic_spec(inputs: tuple, dynamic_batch: bool):
    if not dynamic_batch or inputs[0].dim() == 0:
        return None, None
    batch = inputs[0].shape[0]
    flags = [t.dim() >= 1 and t.shape[0] == batch for t in inputs]
    return batch, flags


def export_dynamo(model, inputs, opset, flags, keep_norms):
    import torch

    dynamic_shapes = None
    if flags is not None and not isinstance(model, torch.export.ExportedProgram):
        specs = [{0: "batch"} if f else {} for f in flags]
        dynamic_shapes = tuple(specs)
        try:  # forward(self, x, *args): torch.export wants the *args shapes as one nested tuple
            params = list(inspect.signature(model.forward).parameters.values())
            fixed = 0
            for p in params:
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                    fixed += 1
                elif p.kind == p.VAR_POSITIONAL:
                    if len(specs) > fixed:
                        dynamic_shapes = tuple(specs[:fixed]) + (tuple(specs[fixed:]),)
                    break
        except (TypeError, ValueError):
            pass
    with quiet_torch_onnx(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            inputs,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            optimize=not keep_norms,
            external_data=False,
            verbose=False,
            report=False,
        )
    if program is None:  # pragma: no cover - defensive
        raise RuntimeError("torch.onnx.export returned no program")
    return program


def export_torchscript(model, inputs, opset, flags, keep_norms, out_count, out_batch_flags):
    import torch

    names = input_names(model, len(inputs))
    out_names = [f"output_{i}" if out_count > 1 else "output" for i in range(out_count)]
    dynamic_axes = None
    if flags is not None:
        dynamic_axes = {n: {0: "batch"} for n, f in zip(names, flags) if f}
        dynamic_axes.update({n: {0: "batch"} for n, f in zip(out_names, out_batch_flags) if f})
    buf = io.BytesIO()
    tracer_warnings: list[str] = []
    with quiet_torch_onnx(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            inputs,
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=out_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=not keep_norms,
        )
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            msg = " ".join(str(w.message).split())
            if msg not in tracer_warnings:
                tracer_warnings.append(msg)
    return buf.getvalue(), tracer_warnings[:5]


# --------------------------------------------------------------------------- main entry point
