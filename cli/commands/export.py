"""``normswap export MODEL -o OUT.onnx``."""

from __future__ import annotations

import click

from normswap_cli.common import model_options, output_options, pass_settings, run_job, write_options

EPILOG = """\b
Examples:
  normswap export model.pt --trust -o model.onnx --input-shape 1,3,32,32
  normswap export weights.pt --arch samples.digits:digits_resnet -o m.onnx --calib calib.npz
  normswap export model.pt --trust -o m.onnx --input-shape 8,3,32,32 --keep-norms --opset 20

\b
Uses the dynamo exporter and falls back to the TorchScript exporter (with a
warning) when it fails.  Default opset 18: GroupNorm then exports as a precise
decomposition; GroupNormalization-21 (opset >= 21) is imprecise in onnxruntime
for inputs with a large mean.  Norm layers in training mode are refused unless
--eval.  The file is self-contained, validated with onnx.checker and written
atomically; an existing file is kept unless --force.
"""


def _example_inputs(module, input_shape, calib):
    from normswap.data import example_inputs, load_data, parse_shape

    # with --calib, --input-shape says how to read the data (an image folder's size, 'random')
    # and is checked against it
    shape = parse_shape(input_shape) if input_shape else None
    data = load_data(calib, limit=8 if calib != "random" else (shape[0] if shape else None),
                     input_shape=shape) if calib else None
    return example_inputs(module, input_shape=shape, data=data, batch=2)


@click.command("export", epilog=EPILOG)
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18).")
@click.option("--input-shape", default=None, metavar="N,C,H,W", help="Shape of the example input (random data; with --calib, the size to read an image folder at).")
@click.option("--calib", default=None, metavar="DATA", help="Take the example input from DATA (.npz/.npy/.pt/folder).")
@click.option("--static-batch", is_flag=True, default=False, help="Fix the batch dimension instead of making it dynamic.")
@click.option("--keep-norms", is_flag=True, default=False, help="Keep BatchNormalization nodes (do not fold them into Conv/Gemm).")
@click.option("--eval", "eval_", is_flag=True, default=False, help="Switch norms in training mode to eval before exporting.")
@model_options
@write_options
@output_options
@pass_settings
def command(model_path, output, opset, input_shape, calib, static_batch, keep_norms, eval_, trust, imports, arch, arch_kwargs, force, opts):
    """Export MODEL to a single validated ONNX file."""

    def job():
        import warnings

        from normswap.export import export
        from normswap_cli.common import load

        loaded = load(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)
        inputs = _example_inputs(loaded.module, input_shape, calib)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallback is shown in the report
            report = export(
                loaded,
                output,
                inputs,
                opset=opset,
                dynamic_batch=not static_batch,
                keep_norms=keep_norms,
                eval=eval_,
                force=force,
            )
        return report

    run_job(job, render, opts)


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def render(report, console) -> None:
    from rich.table import Table

    from normswap.export import _human_size

    t = Table(title="ONNX export", show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("file", f"{report.path} ({_human_size(report.file_size)})")
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
