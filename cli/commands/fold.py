"""``normswap fold MODEL -o OUT``: fold BatchNorm (and norm affines) into neighbouring layers."""

from __future__ import annotations

import click

from normswap_cli.common import (fit_epilog, fits, image_options, input_options, model_options, output_options,
                                  pass_settings, print_stacked, run_job, write_options)

EPILOG = """\b
Examples:
  normswap fold samples/digits/digits_resnet_module.pt --trust -o digits.folded.pt
  normswap fold weights.pt --arch samples.digits:digits_resnet --input-shape 1,1,32,32 -o w.folded.pt
  normswap fold model.pt --trust --eval-mode --bake-spectral-norm -o m.folded.pt --json fold.json
  normswap fold model.pt --trust --input-shape 1,3,224,224 -o m.folded.pt --onnx m.folded.onnx

\b
Folds exactly, in float64 arithmetic cast back to the weights' dtype:
Conv/ConvTranspose/Linear followed by BatchNorm (frozen BN, InstanceNorm with
running stats, PowerNorm, Batch Group Norm alike); BatchNorm into the following
Linear / unpadded conv; the affine of LayerNorm/RMSNorm/GroupNorm into the
following Linear layers; functional F.batch_norm on buffers (the model then
becomes a torch.fx GraphModule, reported); --bake-spectral-norm bakes W/sigma.
Every other site is skipped with its reason, never folded approximately.
--input-shape / --data give example inputs: input ranks (Linear -> BatchNorm1d,
Conv1d -> BatchNorm1d and functional batch_norm need them), call counts (layers
also reachable from code FX cannot trace need them) and a check that the folded
model's outputs match.  A model in training mode folds nothing unless
--eval-mode.  Output keeps MODEL's format (default MODEL.folded.<ext>); folded
norms become nn.Identity.
"""


@click.command("fold", epilog=fit_epilog(EPILOG))
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Folded model file (default MODEL.folded.<ext>, same format as MODEL).")
@click.option("--eval-mode", "eval_", is_flag=True, default=False,
              help="Switch the model to eval mode first (fold its eval-mode behaviour).")
@click.option("--bake-spectral-norm", is_flag=True, default=False,
              help="Replace spectral-norm weights by their eval-time value W/sigma.")
@click.option("--bake-weight-std", is_flag=True, default=False,
              help="Replace weight-standardised convs (timm StdConv2d) by plain Conv2d.")
@input_options(data_option="--data",
               input_shape_help="Example input shape (random data): input ranks and an output check.",
               data_help="Example inputs from data (.npz/.npy/.pt/image folder); the first batch is used.")
@image_options
@click.option("--onnx", "onnx_path", default=None, type=click.Path(dir_okay=False),
              help="Also export the folded model to this ONNX file (needs --input-shape or --data).")
@model_options
@write_options
@output_options
@pass_settings
def command(model_path, output, eval_, bake_spectral_norm, bake_weight_std, input_shape, data, onnx_path, trust,
            imports, arch, arch_kwargs, force, opts, preprocess):
    """Fold the normalization layers of MODEL into neighbouring layers, exactly."""

    from normswap.fold.pipeline import default_output, fold_file

    out_path = output or default_output(model_path)

    def job(outs):
        return fold_file(model_path, output=out_path, eval=eval_, bake_spectral_norm=bake_spectral_norm,
                         bake_weight_std=bake_weight_std, input_shape=input_shape, data=data, onnx_path=onnx_path,
                         force=force, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports, outputs=outs,
                         preprocess=preprocess)

    run_job(job, render, opts, outputs={"-o": out_path, "--onnx": onnx_path},
            inputs=[("the input model", model_path), ("the --data input", data)], force=force)


#: the name the lead may wire under
fold_cmd = command


def render(report, console) -> None:
    """Folded sites (norm -> into, pattern), skipped sites with reasons, notes."""
    from rich.table import Table

    if report.folded:
        t = Table(title="folded", header_style="bold")
        for col in ("norm", "kind", "into", "pattern"):
            t.add_column(col, overflow="fold")
        rows = [[f["norm"], f["kind"], f["into"] or "", f["pattern"]] for f in report.folded]
        for r in rows:
            t.add_row(*r)
        if fits(console, t):
            console.print(t)
        else:  # layer names are never cut: a block per site
            print_stacked(console, "folded", ["norm", "kind", "into", "pattern"], rows)
    if report.skipped:
        t = Table(title="skipped", header_style="bold")
        t.add_column("norm", overflow="fold")
        t.add_column("kind", no_wrap=True)
        t.add_column("reason", overflow="fold")
        for s in report.skipped:
            t.add_row(s["norm"], s["kind"], s["reason"], style="dim")
        widest = max((len(s["norm"]) for s in report.skipped), default=0)
        if widest <= max(20, console.width // 3):
            console.print(t)
        else:  # layer names are never cut: a block per site (the reason wraps at spaces)
            console.print("skipped", style="italic", markup=False)
            for s in report.skipped:
                console.print(s["norm"], style="bold", overflow="ignore", crop=False, soft_wrap=True, markup=False)
                console.print(f"    {s['kind']}: {s['reason']}", style="dim", markup=False)
    if not report.folded and not report.skipped:
        console.print("no normalization layers found", markup=False)
    for n in report.notes:
        console.print(f"note: {n}", style="yellow", markup=False)
    v = report.verification
    if v is not None:
        style = "green" if v.get("ok") else "bold red"
        console.print(f"outputs on the example inputs: max |diff| {v['max_abs_error']:.3g} "
                      f"(max |y| {v['max_abs_output']:.3g})", style=style, markup=False)
    if report.output:
        console.print(f"folded model written to {report.output.get('path')}", markup=False)
    if report.export:
        console.print(f"ONNX written to {report.export.get('path')}", markup=False)
