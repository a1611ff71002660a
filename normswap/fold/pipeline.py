"""``fold_file``: the file-to-file fold job behind ``normswap fold`` (load, fold, save, export)."""

from __future__ import annotations


def _default_output(model_path: str) -> str:
    from pathlib import Path

    p = Path(model_path)
    suffix = p.suffix or ".pt"
    return str(p.with_name(p.stem + ".folded" + suffix))


def fold_file(model_path, *, output=None, eval=False, bake_spectral_norm=False, bake_weight_std=False,
              input_shape=None, data=None,
              onnx_path=None, force=False, arch=None, arch_kwargs=None, trust=False, imports=()):
    """Load MODEL, fold it, save it (and export it to ONNX); returns the FoldReport."""
    import torch

    from normswap.errors import NormswapError
    from normswap.fold import fold
    from normswap.inputs import resolve_inputs
    from normswap.io import as_module, check_outputs, save_model, staged_output
    from normswap.io import load_model as load

    out_path = output or _default_output(model_path)
    check_outputs(model_path, out_path, onnx_path or None, force=force)
    loaded = load(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)
    module = as_module(loaded, require_eager=True, job="fold")
    inputs = resolve_inputs(module, input_shape=input_shape, data=data, limit=8).example
    if inputs is None and onnx_path:
        raise NormswapError("--onnx needs example inputs: pass --input-shape N,C,H,W or --data DATA")
    # (a model rebuilt from a state dict with --arch is already in eval mode: see normswap.io)
    folded, report = fold(module, inputs, eval=eval, bake_spectral_norm=bake_spectral_norm,
                          bake_weight_std=bake_weight_std)
    report.model = str(model_path)
    report.notes[:0] = list(getattr(loaded, "notes", None) or [])  # e.g. keys a state dict load ignored
    changed = bool(report.folded)
    fmt = None
    if isinstance(folded, torch.fx.GraphModule) and loaded.format in ("state_dict", "safetensors"):
        fmt = "pickle"
        report.notes.append("the folded model is a GraphModule: saved as a pickled module (load with --trust)")
    if report.verification is not None and not report.verification.get("ok"):
        # never hand over a model known to compute something else: write nothing, report FAILED
        report.notes.append(f"nothing written: the folded model's outputs differ from the original's on the "
                            f"example inputs (max |diff| {report.verification['max_abs_error']:.3g})")
        return report
    # the model is staged beside OUT and renamed into place only once the ONNX export (if any)
    # succeeded: a failed export leaves neither a model nor an ONNX file behind
    with staged_output(out_path, force=force) as tmp:
        info = save_model(folded, tmp, like=loaded, format=fmt, force=True, architecture_changed=changed)
        if onnx_path:
            from normswap.export import export

            erep = export(folded, onnx_path, inputs, force=force)
    info = dict(info) if isinstance(info, dict) else {}
    info["path"] = str(out_path)
    report.output = info
    for n in info.get("notes", []):
        report.notes.append(n)
    if onnx_path:
        report.export = erep.to_dict()
        report.export_passed = bool(erep)
    return report
