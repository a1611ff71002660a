"""``normswap check MODEL OUT.onnx``."""

from __future__ import annotations

import click

from normswap_cli.common import fit_epilog, image_options, input_options, model_options, output_options, pass_settings, run_job, write_options

EPILOG = """\b
Examples:
  normswap check model.pt --trust model.onnx --input-shape 4,3,32,32
  normswap check weights.pt --arch samples.digits:digits_resnet m.onnx --data test.npz --json parity.json
  normswap check model.pt --trust model.onnx --providers cuda --atol 1e-3

\b
Runs the model (eval) and onnxruntime on the same inputs at two batch sizes
(the given one and 1; only the fixed size if the ONNX batch is static).  An
output passes iff max|onnx - torch| <= atol + rtol * max|torch| (defaults
atol 1e-4, rtol 1e-3).  A provider that is not installed or that silently fell
back to CPU is reported "unavailable" and never as passed; it does not fail the
check unless no requested provider ran (e.g. --providers cuda without a GPU).
Exit codes: 0 parity holds, 1 parity fails (or nothing ran), 2 bad input.
"""


@click.command("check", epilog=fit_epilog(EPILOG))
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.argument("onnx_path", metavar="OUT.onnx", type=click.Path(dir_okay=False))
@click.option("--providers", default="cpu,cuda", show_default=True, help="onnxruntime providers to check (cpu, cuda).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default 1e-4).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance, times max|torch output| (default 1e-3).")
@input_options(data_option="--data", data_first=True,
               data_help="Inputs from DATA (.npz/.npy/.pt/folder; first 64 samples).",
               input_shape_help="Random inputs of this shape (with --data: the size to read an image folder at).")
@image_options
@click.option("--repeats", type=int, default=20, show_default=True, help="Timed runs for the median latency.")
@click.option("--locate", is_flag=True, default=False,
              help="Find the first layer whose own ONNX error exceeds the tolerance.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False), metavar="FILE.html",
              help="Write a self-contained HTML report with plots.")
@model_options
@write_options
@output_options
@pass_settings
def command(model_path, onnx_path, providers, atol, rtol, data, input_shape, repeats, locate, report_path, trust,
            imports, arch, arch_kwargs, force, opts, preprocess):
    """Check that OUT.onnx computes what MODEL computes, per onnxruntime provider."""

    def job(outs):
        from normswap.check import check_file

        report = check_file(model_path, onnx_path, providers=providers, atol=atol, rtol=rtol, data=data,
                            input_shape=input_shape, repeats=repeats, locate=locate, arch=arch,
                            arch_kwargs=arch_kwargs, trust=trust, imports=imports,
                            preprocess=preprocess)
        if report_path:
            from normswap.html_report import check_report_html

            outs.staged("--report").write_text(check_report_html(report.to_dict()), encoding="utf-8")
        return report

    run_job(job, render, opts, outputs={"--report": report_path} if report_path else {},
            inputs=[("the input model", model_path), ("the ONNX file this run checks", onnx_path),
                    ("the --data input", data)], force=force)


def _fmt(x, spec=".2e") -> str:
    if x is None:
        return "-"
    return format(x, spec)


_STATUS_STYLE = {"passed": "green", "failed": "red", "error": "red", "unavailable": "yellow"}


def _short(provider: str | None) -> str:
    if not provider:
        return "-"
    return provider.replace("ExecutionProvider", "")


def render(report, console) -> None:
    from rich import box
    from rich.table import Table

    p = Table(title=f"ONNX parity: {report.onnx_path}", title_justify="left", box=box.SIMPLE_HEAD)
    # the PyTorch timing (a first call may include compilation) is noise at 80 columns: JSON and
    # wide terminals only; "torch on" only when it is not the CPU for every provider
    wide = console.width >= 100
    devices = {r.torch_device or "-" for r in report.providers if r.status != "unavailable"}
    show_on = bool(devices - {"cpu"})
    cols = [("provider", "left"), ("ran", "left"), ("status", "left"), ("onnx ms", "right")]
    cols += [("torch ms", "right")] if wide else []
    cols += [("torch on", "left")] if show_on else []
    for col, just in cols:
        p.add_column(col, justify=just, no_wrap=True)
    for r in report.providers:
        style = _STATUS_STYLE.get(r.status)
        row = [r.label, _short(r.ran), f"[{style}]{r.status}[/{style}]" if style else r.status,
               _fmt(r.latency_ms, ".3f")]
        row += [_fmt(r.torch_latency_ms, ".3f")] if wide else []
        row += [r.torch_device or "-"] if show_on else []
        p.add_row(*row)
    console.print(p)
    for r in report.providers:
        if r.reason:
            console.print(f"{r.label} {r.status}: {r.reason}", style=_STATUS_STYLE.get(r.status), markup=False)

    t = Table(
        title=f"per output: ok iff max abs <= tol = atol {report.atol:g} + rtol {report.rtol:g} * max|torch|",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for col in ("ep", "N", "output", "max abs", "max rel", "cosine", "top-1", "tol", "ok"):
        t.add_column(
            col,
            justify="left" if col in ("ep", "output") else "right",
            no_wrap=col != "output",
            min_width=10 if col == "output" else None,
        )
    for r in report.providers:
        for b in r.batches:
            for o in b.outputs:
                t.add_row(
                    r.label,
                    str(b.batch_size),
                    o.name,
                    _fmt(o.max_abs, ".1e"),
                    _fmt(o.max_rel, ".1e"),
                    _fmt(o.cosine, ".6f"),
                    _fmt(o.top1_agreement, ".3f"),
                    _fmt(o.tolerance, ".1e"),
                    "[green]yes[/green]" if o.passed else "[red]NO[/red]",
                )
    if t.row_count:
        console.print(t)
    for r in report.providers:
        for b in r.batches:
            for o in b.outputs:
                if not o.passed and o.reason:
                    console.print(f"{r.label} N={b.batch_size} {o.name}: {o.reason}", style="red", markup=False)
    if getattr(report, "locate", None) is not None:
        from normswap.locate import locate_text

        console.print(locate_text(report.locate.to_dict(), width=80), markup=False, soft_wrap=True)
    for n in report.notes:
        console.print(f"note: {n}", style="yellow" if n in report.warning_notes else "dim", markup=False)
