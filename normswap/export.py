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

Size (issue 19): about 450 lines, a third of them this docstring, the report type and the
training-mode / kind checks; the exporters themselves are :mod:`normswap.export_backends`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from normswap.errors import NormswapError
from normswap.inputs import normalize_inputs
from normswap.save import atomic_save
from normswap.onnx_utils import (
    eval_mode,
    no_cache,
    exception_reason,
    flatten_outputs,
    human_size,
    onnx_io,
    op_histogram,
    quiet_torch_onnx,
    torch_module,
)
from normswap.export_backends import dynamic_spec, export_dynamo, export_torchscript
from normswap.report import Report

DEFAULT_OPSET = 18
TORCHSCRIPT_MAX_OPSET = 20
#: GroupNormalization-21 is imprecise in onnxruntime (E[x^2] - E[x]^2)
GROUPNORM_IMPRECISE_OPSET = 21
#: above this many bytes of weights the file gets an external-data side file
EXTERNAL_DATA_THRESHOLD = 1_900_000_000

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

    def to_dict(self) -> dict:
        d = {"job": self.job, "passed": self.passed, **super().to_dict()}
        if getattr(self, "load", None) is not None:
            d["load"] = self.load
        return d

    @property
    def num_nodes(self) -> int:
        return sum(self.op_histogram.values())

    def summary_text(self) -> str:
        size = human_size(self.file_size)
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


def _kind_as_exported(module) -> str | None:
    """The registry kind of ``module``; for an unsupported subclass, its known base's kind (a
    subclass does at least what its base does: batch statistics, a GroupNormalization node)."""
    from normswap.norms import NORMS, classify, classify_type, known_base

    kind = classify(module)
    if kind is not None and NORMS[kind].stats == "unknown":
        base = known_base(module)
        base_kind = classify_type(base) if base is not None else None
        if base_kind is not None:
            return base_kind
    return kind


def training_norms(model) -> list[str]:
    """Qualified names of modules in training mode whose training forward differs from eval
    in a way the exporters do not reproduce (they emit the eval form).

    Classified norms answer for themselves (``NORMS[kind].batch_stats_in_training``; an
    unsupported subclass asks its known base's kind); a module whose forward the registry does
    not know (unclassified, or a kind with unknown statistics) counts when it holds
    ``running_*`` buffers; and a module whose weight carries spectral norm counts (its power
    iteration runs only in training).
    """
    from normswap.norms import NORMS, weight_reparams

    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        kind = _kind_as_exported(m)
        batch_stats = kind is not None and NORMS[kind].batch_stats_in_training(m)
        if not batch_stats and (kind is None or NORMS[kind].stats == "unknown"):
            batch_stats = any(b.startswith("running_") for b, _ in m.named_buffers(recurse=False))
        if not batch_stats:
            batch_stats = any(r.kind == "spectral" for r in weight_reparams(m))
        if batch_stats:
            found.append(name or type(m).__name__)
    return found


def has_kind(model, kind: str) -> bool:
    """Does ``model`` hold a norm of registry kind ``kind`` (a subclass counts as its base)?"""
    return any(_kind_as_exported(m) == kind for m in model.modules())


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
    staged: bool = False,
) -> ExportReport:
    """Export ``model`` to the ONNX file ``path``; see the module docstring.

    ``staged=True``: ``path`` is a staged file of an :class:`normswap.outputs.OutputSet` (the
    caller commits it): the file is written straight into it."""
    import onnx
    import torch

    t0 = time.perf_counter()
    source_path = getattr(model, "path", None)  # a LoadedModel's file: never overwritten, even with force
    program_in = torch_module(model, keep_program=True)
    is_program = isinstance(program_in, torch.export.ExportedProgram)
    model = program_in.module() if is_program else program_in
    inputs = normalize_inputs(example_inputs, model)
    path = Path(path)
    opset = _check_target(path, source_path, opset, force=force, staged=staged)
    report_warnings: list[str] = []
    in_training, switched = _mode_check(model, is_program, eval, opset, report_warnings)
    cache_notes: list[str] = []
    with no_cache(model, cache_notes), eval_mode(model, eval and not is_program), torch.no_grad():
        flags, out_flags, n_out = _reference(model, inputs, dynamic_batch)
        exporter, fallback_reason, program, ts_bytes = _run_exporters(
            program_in if is_program else model, model, inputs, opset, flags, keep_norms, n_out, out_flags,
            report_warnings)
    external = _write(path, program, ts_bytes, force=force, staged=staged, source_path=source_path)
    proto = onnx.load(str(path), load_external_data=False)
    ins, outs_info = onnx_io(proto)
    file_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    hist = op_histogram(proto)
    is_dynamic = bool(ins) and bool(ins[0]["shape"]) and not isinstance(ins[0]["shape"][0], int)
    _file_warnings(report_warnings, ins, hist, file_opset, dynamic_batch=dynamic_batch, flags=flags,
                   is_dynamic=is_dynamic, is_program=is_program)
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
        warnings=report_warnings + cache_notes,
        switched_to_eval=switched,
        switched_layers=in_training if switched else [],
        seconds=round(time.perf_counter() - t0, 3),
    )


def _check_target(path: Path, source_path, opset, *, force: bool, staged: bool) -> int:
    """Refuse an output that is a folder, in a missing folder, the input model, or exists (without
    force); the opset (default :data:`DEFAULT_OPSET`), validated."""
    import onnx

    if path.is_dir():
        raise NormswapError(f"output path {path} is a directory; give a file name like model.onnx")
    if not path.parent.exists():
        raise NormswapError(f"output folder {path.parent} does not exist")
    if source_path is not None and path.exists() and Path(source_path).exists() and path.resolve() == Path(source_path).resolve():
        raise NormswapError(f"{path}: refusing to overwrite the input model file; choose another output with -o")
    if path.exists() and not force and not staged:
        raise NormswapError(f"{path} exists; pass force=True (--force) to overwrite it")
    if opset is None:
        opset = DEFAULT_OPSET
    max_opset = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not 14 <= opset <= max_opset:
        raise NormswapError(f"opset must be an integer between 14 and {max_opset}, got {opset!r}")
    return opset


def _mode_check(model, is_program: bool, eval: bool, opset: int, report_warnings: list) -> tuple[list, bool]:  # noqa: A002
    """Refuse norms in training mode (unless ``eval``); warn about other train-mode modules and
    GroupNorm at an imprecise opset.  Returns (the train-mode norms, whether eval switches)."""
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
    if not eval and any_training:
        report_warnings.append(
            "some modules are in training mode (e.g. Dropout); they are exported as they are; pass --eval to switch"
        )
    if opset >= GROUPNORM_IMPRECISE_OPSET and has_kind(model, "gn"):
        report_warnings.append(
            f"GroupNorm at opset {opset}: exported as GroupNormalization-21, which onnxruntime computes as "
            "E[x^2]-E[x]^2 and loses precision on inputs with a large mean; use opset 20 or lower "
            f"(default {DEFAULT_OPSET}) for the precise decomposition"
        )
    return in_training, bool(eval and any_training)


def _reference(model, inputs: tuple, dynamic_batch: bool):
    """One run of the model: (dynamic-batch flags of the inputs, of the outputs, output count)."""
    try:
        ref = model(*inputs)
    except Exception as e:  # noqa: BLE001
        raise NormswapError(
            f"the model does not run on the example inputs "
            f"(shapes {[tuple(t.shape) for t in inputs]}): {exception_reason(e, 300)}"
        ) from e
    outs = flatten_outputs(ref)
    if not outs:
        raise NormswapError("the model returns no tensor output; nothing to export")
    batch, flags = dynamic_spec(inputs, dynamic_batch)
    return flags, [o.dim() >= 1 and batch is not None and o.shape[0] == batch for o in outs], len(outs)


def _run_exporters(target, model, inputs, opset, flags, keep_norms, n_out, out_flags, report_warnings: list):
    """The dynamo exporter, else the TorchScript one: (exporter, fallback reason, program, bytes)."""
    try:
        return "dynamo", None, export_dynamo(target, inputs, opset, flags, keep_norms), None
    except Exception as e:  # noqa: BLE001 - any exporter failure triggers the fallback
        fallback_reason = f"dynamo exporter failed: {exception_reason(e)}"
        if opset > TORCHSCRIPT_MAX_OPSET:
            raise NormswapError(
                f"{fallback_reason}; the TorchScript fallback supports opset <= {TORCHSCRIPT_MAX_OPSET}, "
                f"not {opset}"
            ) from e
    warnings.warn(f"normswap.export: {fallback_reason}; falling back to the TorchScript exporter",
                  RuntimeWarning, stacklevel=3)
    try:
        ts_bytes, tracer_warnings = export_torchscript(model, inputs, opset, flags, keep_norms, n_out, out_flags)
    except Exception as e2:  # noqa: BLE001
        raise NormswapError(
            f"export failed with both exporters: {fallback_reason}; "
            f"TorchScript exporter failed: {exception_reason(e2)}"
        ) from e2
    report_warnings.append("fell back to the TorchScript exporter (see fallback_reason)")
    report_warnings.extend(f"TracerWarning: {w}" for w in tracer_warnings)
    return "torchscript", fallback_reason, None, ts_bytes


def _write(path: Path, program, ts_bytes, *, force: bool, staged: bool, source_path) -> list[str]:
    """Write the ONNX file (weights above the threshold in a ``.data`` side file), checked with
    ``onnx.checker``, through the one safe-write path; returns the side files written."""
    import onnx

    external: list[str] = []

    def writer(tmp: Path) -> None:
        if program is not None:
            try:
                weights = sum((v.const_value.nbytes if v.const_value is not None else 0)
                              for v in program.model.graph.initializers.values())
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
                with quiet_torch_onnx():
                    program.save(tmp, external_data=False)
        else:
            tmp.write_bytes(ts_bytes)
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as e:  # noqa: BLE001
            raise NormswapError(f"the exported ONNX model fails onnx.checker: {exception_reason(e, 300)}") from e

    try:
        if staged:
            writer(path)
        else:
            atomic_save(path, writer, force=force, protect=[source_path] if source_path else ())
    except NormswapError:
        for p in external:
            Path(p).unlink(missing_ok=True)
        raise
    except OSError as e:
        for p in external:
            Path(p).unlink(missing_ok=True)
        raise NormswapError(f"cannot write {path}: {e}") from e
    return external


def _file_warnings(report_warnings: list, ins, hist, file_opset: int, *, dynamic_batch, flags, is_dynamic,
                   is_program) -> None:
    """What the written file shows: a batch dimension the exporter specialised, GroupNormalization
    nodes at an imprecise opset."""
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


# --------------------------------------------------------------------------- file-to-file job


def export_file(
    model_path,
    *,
    output,
    opset: int | None = None,
    input_shape=None,
    data=None,
    dynamic_batch: bool = True,
    keep_norms: bool = False,
    eval: bool = False,  # noqa: A002 - public API name
    force: bool = False,
    arch: str | None = None,
    arch_kwargs=None,
    trust: bool = False,
    imports=(),
    outputs=None,
    preprocess=None,
) -> ExportReport:
    """The job behind ``normswap export``: load MODEL, resolve its example inputs
    (``input_shape`` / ``data``, see :func:`normswap.inputs.resolve_inputs`; with neither, the
    inputs a torch.export program was captured with or a shape guessed from the first layer)
    and :func:`export` it to ``output``.  The TorchScript fallback is reported in the
    ExportReport (``fallback_reason``), not warned about.

    ``outputs``: the run's claimed :class:`normswap.outputs.OutputSet` (with ``-o``): the file is
    staged into it and the caller commits it; without it, export_file claims and commits its own.
    MODEL and the ``--calib`` file are never overwritten, even with ``force``.  ``preprocess``: how
    an image folder is read (see :mod:`normswap.preprocess`)."""
    from normswap.inputs import resolve_inputs
    from normswap.io import load_model
    from normswap.outputs import OutputSet
    from normswap.report import add_summary_warning, attach_load

    own = outputs is None
    if own:
        outputs = OutputSet({"-o": output}, inputs=[("the input model", model_path), ("the --data file", data)],
                            force=force)
        outputs.claim()
    try:
        loaded = load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)
        # with data, input_shape says how to read it (an image folder's size, 'random') and is checked against it
        resolved = resolve_inputs(loaded.module, input_shape=input_shape, data=data, limit=8, batch=2,
                                  required=True, data_option="--calib", preprocess=preprocess)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback is shown in the report
            report = export(loaded, outputs.staged("-o"), resolved.example, opset=opset,
                            dynamic_batch=dynamic_batch, keep_norms=keep_norms, eval=eval, force=True, staged=True)
        report.path = str(outputs.final["-o"])
        attach_load(report, loaded)
        module = getattr(loaded, "module", None)
        if hasattr(module, "named_modules") and not hasattr(module, "graph_signature"):
            from normswap.norms import bad_statistics

            bad = bad_statistics(module)
            for name, problem in bad.items():
                report.warnings.append(f"{name}: {problem}; the exported model computes with these statistics")
            if bad:
                add_summary_warning(report, f"broken running statistics (NaN/Inf or negative) in {len(bad)} "
                                            f"modules: {', '.join(list(bad)[:3])}" + (" …" if len(bad) > 3 else ""))
        if own:
            outputs.commit()
        return report
    finally:
        if own:
            outputs.release()


__all__ = ["export", "export_file", "ExportReport", "DEFAULT_OPSET", "training_norms", "has_kind", "onnx_io",
           "normalize_inputs"]
