"""``fold_file``: the file-to-file fold job behind ``normswap fold`` (load, fold, save, export)."""

from __future__ import annotations


def _default_output(model_path: str) -> str:
    from pathlib import Path

    p = Path(model_path)
    suffix = p.suffix or ".pt"
    return str(p.with_name(p.stem + ".folded" + suffix))


def check_outputs(model_path, out_path, onnx_path=None, *, force=False) -> None:
    """Refuse, before any work, outputs that would fail later (so nothing partial is written):
    the input itself, the model and ONNX file on the same path, a missing folder, an existing
    file without ``force``."""
    from pathlib import Path

    from normswap.errors import NormswapError

    src = Path(model_path).resolve()
    outs = [("-o", Path(out_path))] + ([("--onnx", Path(onnx_path))] if onnx_path is not None else [])
    for opt, p in outs:
        if p.resolve() == src:
            raise NormswapError(f"{opt} {p} is the input model; choose another name")
    if onnx_path is not None and Path(out_path).resolve() == Path(onnx_path).resolve():
        raise NormswapError(f"the model and the ONNX file would both be {out_path}; use -o FILE.pt and --onnx FILE.onnx")
    for opt, p in outs:
        if p.is_dir():
            raise NormswapError(f"{opt} {p} is a directory, expected a file path")
        if not p.parent.is_dir():
            raise NormswapError(f"{opt} {p}: output folder {p.parent} does not exist")
        if p.exists() and not force:
            raise NormswapError(f"{p} exists; pass --force to overwrite it")


class staged_output:
    """``with staged_output(out) as tmp:`` write the model to ``tmp`` (a hidden file beside
    ``out`` with the same suffix) and do the later steps (ONNX export); only when the block
    succeeds is ``tmp`` renamed to ``out``, otherwise it is removed: a failed export leaves
    no model file behind (and an existing ``out`` untouched)."""

    def __init__(self, out_path, force: bool = False) -> None:
        from pathlib import Path

        self.out = Path(out_path)
        self.force = force
        self.tmp = None

    def __enter__(self):
        import os
        import tempfile
        from pathlib import Path

        from normswap.errors import NormswapError

        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.out.stem}.", suffix=f".staged{self.out.suffix}",
                                        dir=self.out.parent)
        except OSError as e:
            raise NormswapError(f"{self.out}: cannot write in {self.out.parent} ({e.strerror or e})") from None
        os.close(fd)
        os.unlink(name)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        import os

        from normswap.errors import NormswapError

        try:
            if exc_type is None and self.tmp.exists():
                if self.out.exists() and not self.force:
                    raise NormswapError(f"{self.out} exists; pass --force to overwrite it")
                try:
                    os.replace(self.tmp, self.out)
                except OSError as e:
                    raise NormswapError(f"{self.out}: cannot write ({e.strerror or e})") from None
        finally:
            self.tmp.unlink(missing_ok=True)
        return False


def fold_file(model_path, *, output=None, eval=False, bake_spectral_norm=False, input_shape=None, data=None,
              onnx_path=None, force=False, arch=None, arch_kwargs=None, trust=False, imports=()):
    """Load MODEL, fold it, save it (and export it to ONNX); returns the FoldReport."""
    import torch

    from normswap.errors import NormswapError
    from normswap.fold import fold
    from normswap.io import as_module, save_model
    from normswap.io import load_model as load

    out_path = output or _default_output(model_path)
    check_outputs(model_path, out_path, onnx_path or None, force=force)
    loaded = load(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)
    module = as_module(loaded, require_eager=True, job="fold")
    inputs = None
    if data is not None or input_shape is not None:
        from normswap.data import example_inputs, load_data, parse_shape

        shape = parse_shape(input_shape) if input_shape else None
        if isinstance(data, str) and data == "random" and shape is None:
            raise NormswapError("--data random needs --input-shape N,C,H,W to know what to generate")
        ds = load_data(data, limit=8, input_shape=shape) if data is not None else None
        inputs = example_inputs(module, input_shape=shape, data=ds)
    elif onnx_path:
        raise NormswapError("--onnx needs example inputs: pass --input-shape N,C,H,W or --data DATA")
    # (a model rebuilt from a state dict with --arch is already in eval mode: see normswap.io)
    folded, report = fold(module, inputs, eval=eval, bake_spectral_norm=bake_spectral_norm)
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
