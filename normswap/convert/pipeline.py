"""The end-to-end `normswap convert MODEL --to KIND` job: load, convert, save, export, check.

Kept apart from :func:`normswap.convert.convert` (pure model surgery) so that the library call
never writes files.  The CLI command is a thin wrapper around :func:`convert_file`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

from ..errors import NormswapError

__all__ = ["convert_file", "default_output_paths", "output_paths", "parse_groups"]

#: calibration samples drawn for ``--calib random`` without ``--calib-samples``
RANDOM_CALIB_SAMPLES = 256


def parse_groups(groups):
    """``--groups`` text: ``"auto"`` or a positive integer (anything else is a NormswapError)."""
    if str(groups).lower() == "auto":
        return "auto"
    try:
        return int(groups)
    except (TypeError, ValueError):
        raise NormswapError(f"--groups must be a positive integer or auto, got {groups!r}") from None


def _resolve(module, calib, calib_samples, input_shape, *, required: bool, preprocess=None):
    """``--calib`` / ``--calib-samples`` / ``--input-shape`` through the one input resolver.

    ``--calib random`` draws ``--calib-samples`` (default 256) samples of the ``--input-shape``
    sample shape (else the shape guessed from the model's first layer)."""
    from ..data import guess_input_shape, parse_shape
    from ..inputs import resolve_inputs

    if isinstance(calib, str) and calib == "random":
        base = parse_shape(input_shape) if input_shape is not None else guess_input_shape(module)
        if base is None:
            raise NormswapError("--calib random needs --input-shape N,C,H,W")
        shape = (calib_samples or RANDOM_CALIB_SAMPLES,) + tuple(base[1:])
        return resolve_inputs(module, input_shape=shape, data="random", batch=2, required=required,
                              data_option="--calib")
    # --calib-samples is applied by convert() (evenly spread over the data, not the first N)
    return resolve_inputs(module, input_shape=input_shape, data=calib, limit=None, batch=2,
                          required=required, data_option="--calib", preprocess=preprocess)


def _same_path(a, b) -> bool:
    """Do ``a`` and ``b`` (paths, or anything else) name the same existing file or folder?"""
    import os

    if not isinstance(a, (str, Path)) or not isinstance(b, (str, Path)):
        return False
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _check_repair_samples(data, calib_samples, options) -> None:
    """--repair holds back 1/7 of the calibration samples to make sure the repaired model is not
    worse; with too few samples to hold any back nothing would guard it, so the run is refused
    (in a single process: under torch.distributed each rank holds back its own)."""
    from .calibrate import HOLDBACK_MIN_SAMPLES
    from .fidelity import dist_info

    if data is None or dist_info()[1] > 1 or not getattr(options, "holdback", True):
        return
    n = len(data) if calib_samples is None else min(len(data), int(calib_samples))
    if n < HOLDBACK_MIN_SAMPLES:
        raise NormswapError(f"--repair needs at least {HOLDBACK_MIN_SAMPLES} calibration samples (it holds back "
                            f"1/7 of them to make sure the repaired model is not worse); got {n}: give more "
                            "--calib data or drop --repair")


def default_output_paths(model_path: str | Path, to: str) -> tuple[Path, Path]:
    """``model.pt --to gn`` -> (``model.gn.pt``, ``model.gn.onnx``) beside the input."""
    p = Path(model_path)
    suffix = p.suffix or ".pt"
    return p.with_name(f"{p.stem}.{to}{suffix}"), p.with_name(f"{p.stem}.{to}.onnx")


def convert_file(model_path: str | Path, to: str = "gn", *, calib=None, source=None, groups="auto",
                 mode: str = "sequential", repair: bool = False, time_budget_s: float | None = None,
                 options=None, batch_size: int = 64,
                 calib_samples: int | None = None, output: str | Path | None = None,
                 onnx: str | Path | None = None, export_onnx: bool = True, check: bool = True,
                 input_shape=None, force: bool = False, progress: Callable | None = None,
                 arch=None, arch_kwargs=None, trust: bool = False, imports=(), providers=("cpu", "cuda"),
                 eval_data=None, outputs=None, preprocess=None):
    """Convert the model file ``model_path``; returns ``(converted_model, ConvertReport)``.

    Writes the converted model (default ``<stem>.<to><suffix>`` beside the input, in the input's
    format) and, unless ``export_onnx=False``, the ONNX file (default ``<stem>.<to>.onnx`` beside
    the input, or the ``-o`` file with the suffix ``.onnx``), then
    checks ONNX parity in onnxruntime (CPU, and CUDA when available) unless ``check=False``.
    ``eval_data`` (``--eval``): held-out data on which fidelity is measured (else the report's
    fidelity is in-sample, on the calibration data).  ``repair`` / ``time_budget_s`` / ``options``:
    as in :func:`normswap.convert.convert`.  Bad data (NaN/Inf inputs, integer inputs to a float
    model, fractional float labels, unreadable images) is refused before anything is written.
    ``outputs``: the run's claimed :class:`normswap.outputs.OutputSet` (the CLI's, with ``-o`` and
    ``--onnx``): files are staged into it and the caller commits the set; without it convert_file
    claims, stages and commits its own (only when the job passed).  ``preprocess``: how image
    folders given as ``calib`` / ``eval_data`` are read (see :mod:`normswap.preprocess`).
    """
    from ..outputs import OutputSet

    groups = parse_groups(groups)
    out_path, onnx_path = output_paths(model_path, to, output, onnx)
    own = outputs is None
    if own:  # the library call claims its own set (the CLI passes the run's, with --json)
        outputs = OutputSet({"-o": out_path, "--onnx": onnx_path if export_onnx else None},
                            inputs=[("the input model", model_path), ("the --calib data", calib),
                                    ("the --eval data", eval_data)], force=force).claim()
    try:
        return _convert_file(outputs, model_path, to, calib=calib, source=source, groups=groups, mode=mode,
                             repair=repair, time_budget_s=time_budget_s, options=options,
                             batch_size=batch_size, calib_samples=calib_samples,
                             export_onnx=export_onnx, check=check, input_shape=input_shape, progress=progress,
                             arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports,
                             providers=providers, eval_data=eval_data, commit=own, preprocess=preprocess)
    finally:
        if own:
            outputs.release()


def output_paths(model_path, to: str, output=None, onnx=None) -> tuple[Path, Path]:
    """The ``-o`` / ``--onnx`` paths of a convert run (defaults beside the input, or the ONNX
    file beside ``-o``)."""
    out_default, onnx_default = default_output_paths(model_path, to)
    out_path = Path(output) if output is not None else out_default
    if onnx is not None:
        return out_path, Path(onnx)
    if output is not None:  # beside the converted model: out/m.pt -> out/m.onnx
        return out_path, out_path.with_suffix(".onnx")
    return out_path, onnx_default


def _convert_file(outputs, model_path, to, *, calib, source, groups, mode, repair, time_budget_s, options,
                  batch_size, calib_samples, export_onnx, check, input_shape, progress, arch, arch_kwargs, trust,
                  imports, providers, eval_data, commit, preprocess=None):
    from ..io import as_module, load_model
    from ..save import save_model
    from .core import convert

    loaded = load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)
    module = as_module(loaded, require_eager=True, job="convert")
    out_path = outputs.final["-o"]
    onnx_path = outputs.final.get("--onnx")
    if calib_samples is not None and calib_samples < 1:
        raise NormswapError(f"--calib-samples must be a positive number of samples, got {calib_samples}")
    if isinstance(eval_data, str) and eval_data == "random":
        raise NormswapError("--eval needs real held-out data, not 'random'")
    if _same_path(calib, eval_data):
        raise NormswapError(f"--eval {eval_data} is the --calib data: held-out numbers need data the "
                            "calibration has not seen (drop --eval for the in-sample numbers)")
    # the data is loaded (an image folder: opened, streamed later) once, here; convert() checks it
    resolved = _resolve(module, calib, calib_samples, input_shape, required=export_onnx, preprocess=preprocess)
    data, ex = resolved.data, resolved.example
    if repair:
        _check_repair_samples(data, calib_samples, options)
    evald = None
    if eval_data is not None:
        evald = _resolve(module, eval_data, None, input_shape, required=False, preprocess=preprocess).data

    converted, report = convert(module, to, data, source=source, groups=groups, mode=mode, repair=repair,
                                time_budget_s=time_budget_s, options=options, batch_size=batch_size,
                                calib_samples=calib_samples, progress=progress, eval_data=evald)
    report.warnings[:0] = [n for n in resolved.notes if n not in report.warnings]
    report.warnings.extend(getattr(loaded, "notes", []) or [])

    # every file is staged; the set is committed only when the export and the parity check ran
    # (a failed job leaves no outputs; an existing OUT stays as it was)
    saved = save_model(converted, outputs.staged("-o"), like=loaded, force=True, architecture_changed=True,
                       staged=True)
    report.files["model"] = str(out_path)
    if isinstance(saved, dict):
        report.warnings.extend(saved.get("notes", []))
    if export_onnx:
        from ..export import export
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rep_export = export(converted, outputs.staged("--onnx"), ex, eval=True, force=True, staged=True)
        rep_export.path = str(onnx_path)
        report.export = rep_export
        report.files["onnx"] = str(onnx_path)
        if check:
            from ..check import MAX_SAMPLES
            from ..check import check as check_parity

            if data is not None:
                inputs = data.head(MAX_SAMPLES).inputs
            else:
                inputs = ex[0] if len(ex) == 1 else ex
            try:
                report.parity = check_parity(converted, outputs.staged("--onnx"), inputs, providers=providers)
            except NormswapError as e:
                raise NormswapError(f"the parity check could not run, nothing was written: {e}") from None
            report.parity.onnx_path = str(onnx_path)
    if commit and report:
        outputs.commit()
    return converted, report
