"""``fold_file``: the file-to-file fold job behind ``normswap fold`` (load, fold, save, export)."""

from __future__ import annotations


def _default_output(model_path: str) -> str:
    from pathlib import Path

    p = Path(model_path)
    suffix = p.suffix or ".pt"
    return str(p.with_name(p.stem + ".folded" + suffix))


def fold_file(model_path, *, output=None, eval=False, bake_spectral_norm=False, input_shape=None, data=None,
              onnx_path=None, force=False, arch=None, arch_kwargs=None, trust=False, imports=()):
    """Load MODEL, fold it, save it (and export it to ONNX); returns the FoldReport."""
    from pathlib import Path

    import torch

    from normswap.errors import NormswapError
    from normswap.fold import fold
    from normswap.io import as_module, save_model
    from normswap.io import load_model as load

    out_path = output or _default_output(model_path)
    if Path(out_path).exists() and not force:
        raise NormswapError(f"{out_path} exists; pass --force to overwrite it")
    if onnx_path and Path(onnx_path).exists() and not force:
        raise NormswapError(f"{onnx_path} exists; pass --force to overwrite it")
    if Path(out_path).resolve() == Path(model_path).resolve():
        raise NormswapError("the output file is the input model; choose another -o")
    loaded = load(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)
    module = as_module(loaded, require_eager=True, job="fold")
    inputs = None
    if data is not None or input_shape is not None:
        from normswap.data import example_inputs, load_data, parse_shape

        shape = parse_shape(input_shape) if input_shape else None
        ds = load_data(data, limit=8, input_shape=shape) if data is not None else None
        inputs = example_inputs(module, input_shape=shape, data=ds)
    elif onnx_path:
        raise NormswapError("--onnx needs example inputs: pass --input-shape N,C,H,W or --data DATA")
    # (a model rebuilt from a state dict with --arch is already in eval mode: see normswap.io)
    folded, report = fold(module, inputs, eval=eval, bake_spectral_norm=bake_spectral_norm)
    report.model = str(model_path)
    changed = bool(report.folded)
    fmt = None
    if isinstance(folded, torch.fx.GraphModule) and loaded.format in ("state_dict", "safetensors"):
        fmt = "pickle"
        report.notes.append("the folded model is a GraphModule: saved as a pickled module (load with --trust)")
    info = save_model(folded, out_path, like=loaded, format=fmt, force=force, architecture_changed=changed)
    report.output = info if isinstance(info, dict) else {"path": str(out_path)}
    for n in (info or {}).get("notes", []) if isinstance(info, dict) else []:
        report.notes.append(n)
    if onnx_path:
        from normswap.export import export

        erep = export(folded, onnx_path, inputs, force=force)
        report.export = erep.to_dict()
        report.export_passed = bool(erep)
    return report
