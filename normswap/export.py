"""Export a PyTorch model to a single, validated ONNX file.

``export(model, path, example_inputs)`` runs the dynamo exporter
(``torch.onnx.export(..., dynamo=True)``) and falls back to the TorchScript
exporter (``dynamo=False``) with a warning when the dynamo exporter fails; the
:class:`ExportReport` says which exporter ran and why.

Choices (see also the module docstring of :mod:`normswap.check`):

* **Default opset 18.** LayerNormalization needs opset >= 17; RMSNorm is
  emitted as primitive ops below opset 23 (RMSNormalization-23); GroupNorm is
  emitted as the precise Reshape -> InstanceNormalization -> Reshape -> Mul/Add
  decomposition at opset <= 20, whereas GroupNormalization-21 is computed in
  onnxruntime as E[x^2] - E[x]^2 and loses precision on inputs with a large
  mean.  18 is the opset the dynamo exporter's op library is written for (no
  version conversion), the TorchScript fallback supports it (max 20), and it is
  the most widely supported of the safe opsets (older onnxruntime, TensorRT).
  Asking for opset >= 21 with GroupNorm present adds a warning.
* **Training-mode norms are refused.** Both exporters silently emit inference
  BatchNormalization (running statistics) for a norm in training mode, so the
  file would not match the model.  ``eval=True`` puts the model in eval mode for
  the export (the original train/eval flags are restored afterwards) and the
  report says so.
* **One self-contained file.** Weights are embedded (no ``.onnx.data`` side
  file) unless the model exceeds the 2 GB protobuf limit.  The file is written
  to a temporary name in the destination folder, validated with
  ``onnx.checker`` and renamed; nothing partial is left on failure.
* **keep_norms.** The dynamo exporter folds Conv/Gemm + BatchNormalization
  unless ``optimize=False``; the TorchScript exporter folds them during
  constant folding.  ``keep_norms=True`` disables both so BatchNormalization
  nodes survive (see ``report.op_histogram``).
* **Dynamic batch.** Dim 0 of every input (and output) whose size equals the
  batch size of the first input is declared dynamic ("batch"):
  ``dynamic_shapes`` for dynamo, ``dynamic_axes`` for TorchScript.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from normswap.errors import NormswapError
from normswap.report import Report

DEFAULT_OPSET = 18
TORCHSCRIPT_MAX_OPSET = 20
#: GroupNormalization-21 is imprecise in onnxruntime (E[x^2] - E[x]^2)
GROUPNORM_IMPRECISE_OPSET = 21
#: above this many bytes of weights the file gets an external-data side file
EXTERNAL_DATA_THRESHOLD = 1_900_000_000

#: norm kinds (``normswap.norms.classify``) whose training-mode forward differs from eval
_BATCH_STAT_KINDS = {"bn", "powernorm", "bgn", "cbn", "sabn", "in"}
_SEED_BATCH_STAT_CLASSES = {
    "PowerNorm2d",
    "BatchGroupNorm2d",
    "ConditionalBatchNorm2d",
    "SandwichBatchNorm2d",
}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class ExportReport(Report):
    """What ``export`` wrote and how."""

    job = "export"

    path: str
    exporter: str  # "dynamo" or "torchscript"
    fallback_reason: str | None
    opset: int
    dynamic_batch: bool
    keep_norms: bool
    op_histogram: dict[str, int]
    file_size: int
    inputs: list[dict]
    outputs: list[dict]
    external_data: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    switched_to_eval: bool = False
    switched_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_nodes(self) -> int:
        return sum(self.op_histogram.values())

    def summary_text(self) -> str:
        size = _human_size(self.file_size)
        text = (
            f"{self.path} ({size}, {self.num_nodes} nodes) via the {self.exporter} exporter, "
            f"opset {self.opset}, {'dynamic' if self.dynamic_batch else 'static'} batch"
        )
        if self.fallback_reason:
            text += " (fallback)"
        if self.warnings:
            text += f", {len(self.warnings)} warning(s)"
        return text


# --------------------------------------------------------------------------- helpers


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _as_module(model: Any, keep_program: bool = False):
    """The nn.Module behind ``model`` (nn.Module, LoadedModel or ExportedProgram).

    With ``keep_program`` a ``torch.export.ExportedProgram`` is returned as is.
    """
    import torch

    try:
        from normswap.io import as_module

        model = as_module(model)
    except ImportError:  # pragma: no cover - lead's module missing
        pass
    if isinstance(model, torch.export.ExportedProgram):
        return model if keep_program else model.module()
    if not isinstance(model, torch.nn.Module):
        raise NormswapError(f"expected a torch.nn.Module to export, got {type(model).__name__}")
    return model


def normalize_inputs(example_inputs: Any, model=None) -> tuple:
    """Turn a tensor / tuple / list / Dataset / ndarray into a tuple of tensors."""
    import numpy as np
    import torch

    if example_inputs is None:
        try:
            from normswap.data import example_inputs as _example_inputs
        except ImportError:  # pragma: no cover - lead's module missing
            raise NormswapError("example inputs are required (pass example_inputs or --input-shape)")
        example_inputs = _example_inputs(model)
    if hasattr(example_inputs, "inputs") and isinstance(getattr(example_inputs, "inputs"), torch.Tensor):
        example_inputs = (example_inputs.inputs,)  # normswap.data.Dataset
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise NormswapError(
            f"example inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}"
        )
    out = []
    for i, t in enumerate(example_inputs):
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(t)
        elif isinstance(t, (int, float, bool)) and not isinstance(t, torch.Tensor):
            t = torch.tensor(t)
        if not isinstance(t, torch.Tensor):
            raise NormswapError(f"example input {i} is a {type(t).__name__}, expected a tensor")
        out.append(t.detach())
    return tuple(out)


def _classify(module) -> str | None:
    try:
        from normswap.norms import classify
    except ImportError:
        return None
    try:
        return classify(module)
    except Exception:  # noqa: BLE001 - classification is best-effort here
        return None


def _is_spectral(module) -> bool:
    try:
        from normswap.norms import weight_reparam

        return weight_reparam(module) == "spectral"
    except Exception:  # noqa: BLE001
        pass
    if hasattr(module, "weight_orig") and hasattr(module, "weight_u"):
        return True
    params = getattr(module, "parametrizations", None)
    if params is not None and "weight" in params:
        return any(type(p).__name__ == "_SpectralNorm" for p in params["weight"])
    return False


def training_norms(model) -> list[str]:
    """Qualified names of norm layers in training mode whose output differs from eval.

    BatchNorm*, InstanceNorm with running stats, seed layers with running stats
    (PowerNorm, BGN, CBN, SaBN), anything else holding ``running_*`` buffers,
    and spectral norm (its power iteration runs only in training).
    """
    import torch

    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        kind = _classify(m)
        batch_stats = False
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            batch_stats = True
        elif isinstance(m, torch.nn.modules.instancenorm._InstanceNorm):
            batch_stats = bool(m.track_running_stats)
        elif kind in _BATCH_STAT_KINDS and kind != "in":
            batch_stats = True
        elif type(m).__name__ in _SEED_BATCH_STAT_CLASSES:
            batch_stats = True
        elif any(b.startswith("running_") for b, _ in m.named_buffers(recurse=False)):
            batch_stats = True
        elif _is_spectral(m):
            batch_stats = True
        if batch_stats:
            found.append(name or type(m).__name__)
    return found


def _has_groupnorm(model) -> bool:
    import torch

    return any(isinstance(m, torch.nn.GroupNorm) or _classify(m) == "gn" for m in model.modules())


@contextlib.contextmanager
def _eval_mode(model, enable: bool):
    """Temporarily put ``model`` in eval mode; restore every module's flag after."""
    if not enable:
        yield
        return
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
    except NotImplementedError:  # modules of a torch.export program: mode fixed at capture
        pass
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _input_names(model, n: int) -> list[str]:
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


def _flatten_outputs(out) -> list:
    import torch
    from torch.utils._pytree import tree_flatten

    leaves, _ = tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _reason(exc: BaseException, limit: int = 400) -> str:
    """One-line description of an exporter failure, including the root cause."""
    parts = []
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(parts) < 3:
        seen.add(id(e))
        msg = _ANSI.sub("", str(e)).strip()
        first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
        parts.append(f"{type(e).__name__}: {first}" if first else type(e).__name__)
        e = e.__cause__ or e.__context__
    # the outer exporter errors carry long "next steps" texts: keep the outer type and the root cause
    text = parts[0] if len(parts) == 1 else f"{parts[0].split(':')[0]} caused by {parts[-1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_torch_onnx():
    """Silence the exporters' progress chatter and INFO/WARNING logging."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _private_atomic_save(path: Path, writer_fn: Callable[[Path], None], force: bool = False) -> None:
    """Fallback for ``normswap.io.atomic_save`` (temp file in the same folder, then rename)."""
    path = Path(path)
    if path.exists() and not force:
        raise NormswapError(f"{path} exists; pass force=True / --force to overwrite")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer_fn(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _atomic_save(path: Path, writer_fn: Callable[[Path], None], force: bool) -> None:
    try:
        from normswap.io import atomic_save
    except ImportError:
        atomic_save = _private_atomic_save
    atomic_save(path, writer_fn, force=force)


def _op_histogram(proto) -> dict[str, int]:
    hist: dict[str, int] = {}

    def visit(graph):
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            hist[key] = hist.get(key, 0) + 1
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(proto.graph)
    for fn in proto.functions:  # local functions (if any) count as their nodes
        for node in fn.node:
            hist[node.op_type] = hist.get(node.op_type, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))


def _value_info(vi) -> dict:
    import onnx

    t = vi.type.tensor_type
    shape = []
    if t.HasField("shape"):
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "unknown"
    return {"name": vi.name, "shape": shape, "dtype": dtype}


def onnx_io(proto) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of an ONNX model as dicts with name, shape, dtype (initializers excluded)."""
    inits = {i.name for i in proto.graph.initializer}
    inputs = [_value_info(v) for v in proto.graph.input if v.name not in inits]
    outputs = [_value_info(v) for v in proto.graph.output]
    return inputs, outputs


# --------------------------------------------------------------------------- exporters


def _dynamic_spec(inputs: tuple, dynamic_batch: bool):
    if not dynamic_batch or inputs[0].dim() == 0:
        return None, None
    batch = inputs[0].shape[0]
    flags = [t.dim() >= 1 and t.shape[0] == batch for t in inputs]
    return batch, flags


def _export_dynamo(model, inputs, opset, flags, keep_norms):
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
    with _quiet_torch_onnx(), warnings.catch_warnings():
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


def _export_torchscript(model, inputs, opset, flags, keep_norms, out_count, out_batch_flags):
    import torch

    names = _input_names(model, len(inputs))
    out_names = [f"output_{i}" if out_count > 1 else "output" for i in range(out_count)]
    dynamic_axes = None
    if flags is not None:
        dynamic_axes = {n: {0: "batch"} for n, f in zip(names, flags) if f}
        dynamic_axes.update({n: {0: "batch"} for n, f in zip(out_names, out_batch_flags) if f})
    buf = io.BytesIO()
    tracer_warnings: list[str] = []
    with _quiet_torch_onnx(), warnings.catch_warnings(record=True) as caught:
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


def export(
    model,
    path,
    example_inputs,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    keep_norms: bool = False,
    eval: bool = False,  # noqa: A002 - public API name
    force: bool = False,
) -> ExportReport:
    """Export ``model`` to the ONNX file ``path``; see the module docstring."""
    import onnx
    import torch

    t0 = time.perf_counter()
    source_path = getattr(model, "path", None)  # a LoadedModel's file: never overwritten, even with force
    program_in = _as_module(model, keep_program=True)
    is_program = isinstance(program_in, torch.export.ExportedProgram)
    model = program_in.module() if is_program else program_in
    inputs = normalize_inputs(example_inputs, model)
    path = Path(path)
    if path.is_dir():
        raise NormswapError(f"output path {path} is a directory; give a file name like model.onnx")
    if not path.parent.exists():
        raise NormswapError(f"output folder {path.parent} does not exist")
    if source_path is not None and path.exists() and Path(source_path).exists() and path.resolve() == Path(source_path).resolve():
        raise NormswapError(f"{path}: refusing to overwrite the input model file; choose another output with -o")
    if path.exists() and not force:
        raise NormswapError(f"{path} exists; pass force=True (--force) to overwrite it")

    if opset is None:
        opset = DEFAULT_OPSET
    max_opset = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not 14 <= opset <= max_opset:
        raise NormswapError(f"opset must be an integer between 14 and {max_opset}, got {opset!r}")

    report_warnings: list[str] = []
    # a torch.export program's train/eval behaviour was fixed when it was captured
    in_training = [] if is_program else training_norms(model)
    if in_training and not eval:
        shown = ", ".join(in_training[:8]) + (f" and {len(in_training) - 8} more" if len(in_training) > 8 else "")
        raise NormswapError(
            f"norm layers in training mode: {shown}; the exporters would silently emit inference-mode "
            "normalization (running statistics), so the ONNX file would not match the model; "
            "call model.eval() first or pass eval=True (--eval)"
        )
    any_training = not is_program and any(m.training for m in model.modules())
    switched = bool(eval and any_training)
    if not eval and any_training:
        report_warnings.append(
            "some modules are in training mode (e.g. Dropout); they are exported as they are; pass --eval to switch"
        )

    if opset >= GROUPNORM_IMPRECISE_OPSET and _has_groupnorm(model):
        report_warnings.append(
            f"GroupNorm at opset {opset}: exported as GroupNormalization-21, which onnxruntime computes as "
            "E[x^2]-E[x]^2 and loses precision on inputs with a large mean; use opset 20 or lower "
            f"(default {DEFAULT_OPSET}) for the precise decomposition"
        )

    with _eval_mode(model, eval and not is_program), torch.no_grad():
        try:
            ref = model(*inputs)
        except Exception as e:  # noqa: BLE001
            raise NormswapError(
                f"the model does not run on the example inputs "
                f"(shapes {[tuple(t.shape) for t in inputs]}): {_reason(e, 300)}"
            ) from e
        outs = _flatten_outputs(ref)
        if not outs:
            raise NormswapError("the model returns no tensor output; nothing to export")
        batch, flags = _dynamic_spec(inputs, dynamic_batch)
        out_flags = [o.dim() >= 1 and batch is not None and o.shape[0] == batch for o in outs]

        exporter = "dynamo"
        fallback_reason = None
        program = None
        ts_bytes = None
        try:
            program = _export_dynamo(program_in if is_program else model, inputs, opset, flags, keep_norms)
        except Exception as e:  # noqa: BLE001 - any exporter failure triggers the fallback
            fallback_reason = f"dynamo exporter failed: {_reason(e)}"
            if opset > TORCHSCRIPT_MAX_OPSET:
                raise NormswapError(
                    f"{fallback_reason}; the TorchScript fallback supports opset <= {TORCHSCRIPT_MAX_OPSET}, "
                    f"not {opset}"
                ) from e
            warnings.warn(
                f"normswap.export: {fallback_reason}; falling back to the TorchScript exporter",
                RuntimeWarning,
                stacklevel=2,
            )
            exporter = "torchscript"
            try:
                ts_bytes, tracer_warnings = _export_torchscript(
                    model, inputs, opset, flags, keep_norms, len(outs), out_flags
                )
            except Exception as e2:  # noqa: BLE001
                raise NormswapError(
                    f"export failed with both exporters: {fallback_reason}; "
                    f"TorchScript exporter failed: {_reason(e2)}"
                ) from e2
            report_warnings.append("fell back to the TorchScript exporter (see fallback_reason)")
            report_warnings.extend(f"TracerWarning: {w}" for w in tracer_warnings)

    external: list[str] = []

    def writer(tmp: Path) -> None:
        if program is not None:
            weights = 0
            try:
                weights = sum(
                    (v.const_value.nbytes if v.const_value is not None else 0)
                    for v in program.model.graph.initializers.values()
                )
            except Exception:  # noqa: BLE001
                weights = 0
            if weights > EXTERNAL_DATA_THRESHOLD:
                import onnx_ir

                data_name = path.name + ".data"
                data_path = path.parent / data_name
                if data_path.exists() and not force:
                    raise NormswapError(f"{data_path} exists; pass force=True (--force) to overwrite it")
                onnx_ir.save(program.model, tmp, external_data=data_name)
                external.append(str(data_path))
            else:
                with _quiet_torch_onnx():
                    program.save(tmp, external_data=False)
        else:
            tmp.write_bytes(ts_bytes)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; the .onnx file is an ordinary output
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as e:  # noqa: BLE001
            raise NormswapError(f"the exported ONNX model fails onnx.checker: {_reason(e, 300)}") from e

    try:
        _atomic_save(path, writer, force=force)
    except NormswapError:
        for p in external:
            Path(p).unlink(missing_ok=True)
        raise
    except OSError as e:
        for p in external:
            Path(p).unlink(missing_ok=True)
        raise NormswapError(f"cannot write {path}: {e}") from e

    proto = onnx.load(str(path), load_external_data=False)
    ins, outs_info = onnx_io(proto)
    file_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    hist = _op_histogram(proto)
    is_dynamic = bool(ins) and bool(ins[0]["shape"]) and not isinstance(ins[0]["shape"][0], int)
    if dynamic_batch and flags is not None and not is_dynamic and is_program:
        report_warnings.append(
            "the torch.export program has a static batch dimension "
            f"(input shape {ins[0]['shape']}); capture it with dynamic_shapes for a dynamic batch"
        )
    elif dynamic_batch and flags is not None and not is_dynamic:
        report_warnings.append(
            "asked for a dynamic batch but the exporter specialised the batch dimension "
            f"(input shape {ins[0]['shape']}); the model only accepts batch size {ins[0]['shape'][0]}"
        )
    if file_opset >= GROUPNORM_IMPRECISE_OPSET and "GroupNormalization" in hist and not any(
        "GroupNorm" in w for w in report_warnings
    ):
        report_warnings.append(
            f"GroupNormalization nodes at opset {file_opset}: onnxruntime computes their variance as "
            "E[x^2]-E[x]^2 (imprecise for inputs with a large mean); use opset <= 20"
        )

    return ExportReport(
        path=str(path),
        exporter=exporter,
        fallback_reason=fallback_reason,
        opset=int(file_opset),
        dynamic_batch=is_dynamic,
        keep_norms=keep_norms,
        op_histogram=hist,
        file_size=path.stat().st_size + sum(Path(p).stat().st_size for p in external),
        inputs=ins,
        outputs=outs_info,
        external_data=external,
        warnings=report_warnings,
        switched_to_eval=switched,
        switched_layers=in_training if switched else [],
        seconds=round(time.perf_counter() - t0, 3),
    )


__all__ = ["export", "ExportReport", "DEFAULT_OPSET", "training_norms", "onnx_io", "normalize_inputs"]
