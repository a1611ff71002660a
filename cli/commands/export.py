"""``normswap export MODEL -o OUT.onnx``."""

from __future__ import annotations

import click

from normswap_cli.common import fit_epilog, image_options, input_options, model_options, output_options, pass_settings, run_job, write_options

EPILOG = """\b
Examples:
  normswap export model.pt --trust -o model.onnx --input-shape 1,3,32,32
  normswap export weights.pt --arch samples.digits:digits_resnet -o m.onnx --data calib.npz
  normswap export model.pt --trust -o m.onnx --input-shape 8,3,32,32 --keep-norms --opset 20

\b
Uses the dynamo exporter and falls back to the TorchScript exporter (with a
warning) when it fails.  Default opset 18: GroupNorm then exports as a precise
decomposition; GroupNormalization-21 (opset >= 21) is imprecise in onnxruntime
for inputs with a large mean.  Norm layers in training mode are refused unless
--eval-mode.  The file is self-contained, validated with onnx.checker and written
atomically; an existing file is kept unless --force.
"""


@click.command("export", epilog=fit_epilog(EPILOG))
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18).")
@input_options(data_option="--data")
@image_options
@click.option("--static-batch", is_flag=True, default=False, help="Fix the batch dimension instead of making it dynamic.")
@click.option("--keep-norms", is_flag=True, default=False, help="Keep BatchNormalization nodes (do not fold them into Conv/Gemm).")
@click.option("--eval-mode", "eval_", is_flag=True, default=False, help="Switch norms in training mode to eval before exporting.")
@model_options
@write_options
@output_options
@pass_settings
def command(model_path, output, opset, input_shape, data, static_batch, keep_norms, eval_, trust, imports, arch, arch_kwargs, force, opts,
            preprocess):
    """Export MODEL to a single validated ONNX file."""

    def job(outs):
        from normswap.export import export_file

        return export_file(model_path, output=output, opset=opset, input_shape=input_shape, data=data,
                           dynamic_batch=not static_batch, keep_norms=keep_norms, eval=eval_, force=force,
                           arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports, outputs=outs,
                           preprocess=preprocess)

    run_job(job, render, opts, outputs={"-o": output},
            inputs=[("the input model", model_path), ("the --data input", data)], force=force)


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def render(report, console) -> None:
    from rich.table import Table

    from normswap.onnx_utils import human_size

    t = Table(title="ONNX export", show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("file", f"{report.path} ({human_size(report.file_size)})")
    exporter = report.exporter
    if report.fallback_reason:
        exporter += f"  [yellow](fallback: {report.fallback_reason})[/yellow]"
    t.add_row("exporter", exporter)
    t.add_row("opset", str(report.opset))
    t.add_row("batch", "dynamic" if report.dynamic_batch else "static")
    t.add_row("norms", "BatchNorm kept (--keep-norms)" if report.keep_norms else "folded where possible")
    if report.switched_to_eval:
        t.add_row("eval", "switched to eval for the export: " + ", ".join(report.switched_layers[:6]))
    for i in report.inputs:
        t.add_row("input", f"{i['name']} {_shape(i['shape'])} {i['dtype']}")
    for o in report.outputs:
        t.add_row("output", f"{o['name']} {_shape(o['shape'])} {o['dtype']}")
    if report.external_data:
        t.add_row("external data", ", ".join(report.external_data))
    console.print(t)

    h = Table(title=f"ONNX ops ({sum(report.op_histogram.values())} nodes)", title_justify="left")
    h.add_column("op")
    h.add_column("count", justify="right")
    for op, n in report.op_histogram.items():
        style = "bold" if "Normalization" in op else None
        h.add_row(op, str(n), style=style)
    console.print(h)
    for w in report.warnings:
        console.print(f"warning: {w}", style="yellow", markup=False)
