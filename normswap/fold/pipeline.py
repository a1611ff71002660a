"""``fold_file``: the file-to-file fold job behind ``normswap fold`` (load, fold, save, export).

Outputs (``-o``, ``--onnx``) go through one :class:`normswap.outputs.OutputSet`: claimed as a
whole before any work (MODEL and ``--data`` protected even with ``--force``), staged, and
committed together only when the fold, its verification and the export all succeeded.
"""

from __future__ import annotations


def default_output(model_path: str) -> str:
    from pathlib import Path

    p = Path(model_path)
    suffix = p.suffix or ".pt"
    return str(p.with_name(p.stem + ".folded" + suffix))


_default_output = default_output  # the old private name


def bad_statistics(model) -> dict[str, str]:
    """:func:`normswap.norms.bad_statistics` (kept importable here; torch is imported lazily)."""
    from normswap.norms import bad_statistics as _bad

    return _bad(model)


def _name_broken_statistics(module, report) -> None:
    """Norms with NaN/Inf or negative running statistics are never folded (the registry's eval
    affine refuses them): their reason says so, and they are named on the summary line."""
    from normswap.reasons import reason
    from normswap.report import add_summary_warning

    bad = bad_statistics(module)
    for s in report.skipped:
        if s["norm"] in bad:
            r = reason("broken_stats", problem=bad[s["norm"]])
            s["reason"], s["code"] = str(r), r.code
    if bad:
        add_summary_warning(report, f"broken running statistics (NaN/Inf or negative) in {len(bad)} "
                                    f"modules, not folded: {', '.join(list(bad)[:3])}"
                                    + (" …" if len(bad) > 3 else ""))


def fold_file(model_path, *, output=None, eval=False, bake_spectral_norm=False, bake_weight_std=False,
              input_shape=None, data=None,
              onnx_path=None, force=False, arch=None, arch_kwargs=None, trust=False, imports=(), outputs=None,
              preprocess=None):
    """Load MODEL, fold it, save it (and export it to ONNX); returns the FoldReport.

    ``outputs``: the run's :class:`normswap.outputs.OutputSet` (the CLI's, already claimed, with
    ``-o`` and ``--onnx``); the files are staged into it and the caller commits them.  Without
    it, ``fold_file`` claims, stages and commits its own set.  ``preprocess``: how an image
    folder given as ``data`` is read (see :mod:`normswap.preprocess`).
    """
    import torch

    from normswap.errors import NormswapError
    from normswap.fold import fold
    from normswap.inputs import resolve_inputs
    from normswap.io import as_module
    from normswap.save import save_model
    from normswap.io import load_model as load
    from normswap.outputs import OutputSet
    from normswap.report import attach_load

    out_path = output or default_output(model_path)
    own = outputs is None
    if own:
        outputs = OutputSet({"-o": out_path, "--onnx": onnx_path or None},
                            inputs=[("the input model", model_path), ("the --data file", data)], force=force)
        outputs.claim()
    elif "-o" not in outputs.final:
        raise NormswapError("internal: fold_file got an OutputSet without -o")
    try:
        loaded = load(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)
        if loaded.format == "export":  # a torch.export program: folded in its own graph
            report = _fold_program_file(loaded, outputs, input_shape=input_shape, data=data, onnx_path=onnx_path,
                                        eval=eval, bake=bake_spectral_norm or bake_weight_std,
                                        preprocess=preprocess)
            if own and report:
                outputs.commit()
            return report
        module = as_module(loaded, require_eager=True, job="fold")
        inputs = resolve_inputs(module, input_shape=input_shape, data=data, limit=8, preprocess=preprocess).example
        if inputs is None and onnx_path:
            raise NormswapError("--onnx needs example inputs: pass --input-shape N,C,H,W or --data DATA")
        # (a model rebuilt from a state dict with --arch is already in eval mode: see normswap.io)
        folded, report = fold(module, inputs, eval=eval, bake_spectral_norm=bake_spectral_norm,
                              bake_weight_std=bake_weight_std)
        _name_broken_statistics(module, report)
        report.model = str(model_path)
        report.notes[:0] = list(getattr(loaded, "notes", None) or [])  # e.g. keys a state dict load ignored
        attach_load(report, loaded)
        changed = bool(report.folded)
        fmt = None
        if isinstance(folded, torch.fx.GraphModule) and loaded.format in ("state_dict", "safetensors"):
            fmt = "pickle"
            report.notes.append("the folded model is a GraphModule: saved as a pickled module (load with --trust)")
        if report.verification is not None and not report.verification.get("ok"):
            # never hand over a model known to compute something else: write nothing, report FAILED
            err = report.verification["max_abs_error"]
            report.notes.append(f"nothing written: the folded model's outputs differ from the original's on the "
                                f"example inputs (max |diff| {err:.3g})" if err == err else
                                "nothing written: the folded model could not be verified on the example inputs")
            return report
        info = save_model(folded, outputs.staged("-o"), like=loaded, format=fmt, force=True,
                          architecture_changed=changed, staged=True)
        if onnx_path:
            from normswap.export import export

            erep = export(folded, outputs.staged("--onnx"), inputs, force=True, staged=True)
            erep.path = str(outputs.final["--onnx"])
        info = dict(info) if isinstance(info, dict) else {}
        info["path"] = str(outputs.final["-o"])
        report.output = info
        for n in info.get("notes", []):
            report.notes.append(n)
        if onnx_path:
            report.export = erep.to_dict()
            report.export_passed = bool(erep)
        if own and report:
            outputs.commit()
        return report
    finally:
        if own:
            outputs.release()


def _fold_program_file(loaded, outputs, *, input_shape, data, onnx_path, eval, bake, preprocess=None):
    """fold_file for a ``.pt2``: :func:`normswap.fold.program.fold_program`, saved with
    ``torch.export.save`` (and exported from the folded program with ``--onnx``)."""
    import torch

    from normswap.errors import NormswapError
    from normswap.fold.api import fold_program
    from normswap.inputs import resolve_inputs
    from normswap.report import attach_load

    out = outputs.final["-o"]
    if out.suffix != ".pt2":
        raise NormswapError(f"-o {out}: a folded torch.export program is saved with torch.export.save; "
                            f"give a .pt2 file name")
    if bake:
        raise NormswapError("--bake-spectral-norm / --bake-weight-std inside an exported program is not "
                            "supported: bake in the eager model, then export")
    ep = loaded.module
    inputs = resolve_inputs(ep, input_shape=input_shape, data=data, limit=8, preprocess=preprocess).example
    folded, report = fold_program(ep, inputs, eval=eval)
    report.model = str(loaded.path)
    report.notes[:0] = list(getattr(loaded, "notes", None) or [])
    attach_load(report, loaded)
    if inputs is None and report.verification is None:
        report.notes.append("the program has no stored example inputs: pass --input-shape or --data to verify "
                            "the folded program")
    if report.verification is not None and not report.verification.get("ok"):
        report.notes.append("nothing written: the folded program's outputs differ from the original's")
        return report
    try:
        torch.export.save(folded, str(outputs.staged("-o")))
    except Exception as e:  # noqa: BLE001
        raise NormswapError(f"-o {out}: torch.export.save failed ({type(e).__name__}: {e})") from None
    report.output = {"path": str(out), "format": "export"}
    if onnx_path:
        from normswap.export import export

        ex = inputs
        if ex is None:
            args, kwargs = getattr(ep, "example_inputs", None) or ((), {})
            ex = tuple(args) if args and not kwargs else None
        if ex is None:
            raise NormswapError("--onnx needs example inputs: pass --input-shape N,C,H,W or --data DATA")
        erep = export(folded, outputs.staged("--onnx"), ex, force=True, staged=True)
        erep.path = str(outputs.final["--onnx"])
        report.export = erep.to_dict()
        report.export_passed = bool(erep)
    return report
