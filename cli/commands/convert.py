"""``normswap convert MODEL --to KIND``."""

from __future__ import annotations

import click

from normswap_cli.common import (fit_epilog, fits, model_options, output_options, pass_settings, print_stacked,
                                 run_job, write_options)


class TargetChoice(click.Choice):
    """``--to`` choices: the keys of ``normswap.convert.TARGETS``, read when first needed so that
    ``normswap --help`` does not import torch."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self):
        from normswap.convert import TARGETS

        return tuple(TARGETS)

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it; the map is the source
        pass


class ConvertCommand(click.Command):
    """Its epilog lists the targets with the descriptions of ``normswap.convert.TARGETS``."""

    def format_epilog(self, ctx, formatter) -> None:
        from normswap.convert import TARGETS

        targets = "; ".join(f"{name} {spec.description}" for name, spec in TARGETS.items())
        self.epilog = fit_epilog(EPILOG.replace("{targets}", targets))
        super().format_epilog(ctx, formatter)


EPILOG = """\b
Examples:
  normswap convert samples/digits/digits_resnet_module.pt --trust --to gn --calib samples/digits/calib.npz
  normswap convert weights.pt --arch samples.digits:digits_resnet --to in --calib calib.npz -o m.in.pt
  normswap convert weights.pt --arch samples.digits:digits_resnet --to gn --calib calib.npz --eval test.npz --report convert.html
  # GroupNorm -> BatchNorm (then `normswap fold` folds it away):
  normswap convert gn_model.pt --trust --to bn --calib calib.npz
  # LayerNorm -> RMSNorm:
  normswap convert vit.pt --trust --to rms --calib tokens.pt

Targets: {targets}.  Default source: every BatchNorm (for --to bn every other
conv norm, for --to rms every LayerNorm).

\b
Each replacement is fitted on the calibration inputs so that it reproduces the
original norm's output (running statistics, then a per-channel least-squares
gamma/beta).  --mode sequential (default) fits every layer on the inputs made by
the already-converted layers before it (2 passes); fast fits all on the
original activations (1 pass).  Without --calib the conversion is uncalibrated.
Writes MODEL.<to>.pt and MODEL.<to>.onnx beside MODEL (unless -o/--onnx) and
checks ONNX parity in onnxruntime (CPU, and CUDA when available).
"""


@click.command("convert", cls=ConvertCommand, epilog=EPILOG)
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--to", "to", required=True, type=TargetChoice(), help="Target norm kind.")
@click.option("--from", "source", default=None, metavar="KIND[,KIND]", help="Norm kind(s) to replace (default: BatchNorm).")
@click.option("--groups", default="auto", show_default=True, metavar="N|auto", help="GroupNorm / BGN group count.")
@click.option("--calib", default=None, metavar="DATA", help="Calibration data (.npz/.npy/.pt/image folder, or 'random').")
@click.option("--eval", "eval_data", default=None, metavar="DATA",
              help="Held-out data (same forms as --calib) to measure fidelity on; without it the "
                   "fidelity numbers are in-sample (on the calibration data).")
@click.option("--calib-samples", type=int, default=None, metavar="N", help="Use at most N calibration samples.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Calibration batch size.")
@click.option("--mode", type=click.Choice(("fast", "sequential", "reconstruct")), default="sequential", show_default=True, help="Calibration mode: fast (closed form on the original activations), sequential (closed form on the converted model's own inputs; never worse than fast on held-back calibration samples), reconstruct (sequential, then block-by-block optimisation of the new norms' parameters).")
@click.option("--time-budget", "time_budget", type=float, default=None, metavar="SECONDS", help="Wall-clock budget of --mode reconstruct (default: about 5.5x the closed-form calibration time).")
@click.option("--recon-steps", "recon_steps", type=int, default=None, metavar="N", help="Optimisation steps per block in --mode reconstruct (default 40, cut to fit the time budget).")
@click.option("--distill-steps", type=int, default=0, show_default=True, metavar="N", help="Distillation steps against the original after calibration.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="Converted model file (default MODEL.<to>.pt).")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False), metavar="FILE.html",
              help="Write a self-contained HTML report with plots.")
@click.option("--onnx", "onnx_path", default=None, type=click.Path(dir_okay=False), help="ONNX file (default MODEL.<to>.onnx, or OUT.onnx beside -o OUT).")
@click.option("--no-onnx", is_flag=True, default=False, help="Do not export to ONNX (implies --no-check).")
@click.option("--no-check", is_flag=True, default=False, help="Skip the onnxruntime parity check.")
@click.option("--input-shape", default=None, metavar="N,C,H,W", help="Input shape for export without --calib (or for --calib random).")
@model_options
@write_options
@output_options
@pass_settings
def command(model_path, to, source, groups, calib, eval_data, calib_samples, batch_size, mode, time_budget,
            recon_steps, distill_steps, output, report_path, onnx_path,
            no_onnx, no_check, input_shape, trust, imports, arch, arch_kwargs, force, opts):
    """Replace the norm layers of MODEL by another kind, calibrated to keep its behaviour."""

    from normswap.convert.pipeline import output_paths

    out_path, onnx_file = output_paths(model_path, to, output, onnx_path)

    def job(outs):
        from normswap.convert.core import recon_options
        from normswap.convert.pipeline import convert_file

        with _Progress(opts.quiet) as progress, recon_options(time_budget_s=time_budget, recon_steps=recon_steps):
            _, report = convert_file(
                model_path, to, calib=calib, source=source, groups=groups, mode=mode, distill_steps=distill_steps,
                batch_size=batch_size, calib_samples=calib_samples, output=output, onnx=onnx_path,
                export_onnx=not no_onnx, check=not (no_check or no_onnx), input_shape=input_shape, force=force,
                progress=progress, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports,
                eval_data=eval_data, outputs=outs)
        if report_path:
            from normswap.html_report import convert_report_html
            from normswap_cli.common import attach_loaded

            attach_loaded(report)  # --non-strict keys in the HTML report too

            outs.staged("--report").write_text(convert_report_html(report.to_dict()), encoding="utf-8")
        return report

    outputs = {"-o": str(out_path), "--onnx": None if no_onnx else str(onnx_file), "--report": report_path}
    run_job(job, render, opts, outputs={k: v for k, v in outputs.items() if v},
            inputs=[("the input model", model_path), ("the --calib data", calib), ("the --eval data", eval_data)],
            force=force)


class _Progress:
    """A rich progress bar for the calibration passes and the distillation loss."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        return self  # the bar starts with the first progress report: an error before it prints alone

    def _start(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from normswap_cli.common import console

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
                            console=console(stderr=True), transient=True)
        self.bar.__enter__()

    def __call__(self, stage: str, step: int, total: int, loss=None) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self._start()
        if stage not in self.tasks:
            label = {"calibrate": "calibrating (passes)", "reconstruct": "reconstructing (steps)",
                     "distill": "distilling"}.get(stage, stage)
            self.tasks[stage] = self.bar.add_task(label, total=total, loss="")
        text = f"loss {max(0.0, loss):.4g}" if loss is not None else ""  # KL / MSE >= 0: no "-0.0000"
        self.bar.update(self.tasks[stage], completed=step, loss=text)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _outputs_rows(table, f) -> None:
    """One row per model output when there are several (max abs / relative error)."""
    if len(f.outputs) <= 1:
        return
    for o in f.outputs:
        table.add_row(f"output {o['name']}", f"max abs error {_num(o['max_abs_error'])}, "
                                             f"rel. error {_num(o['rel_error'])}")


def render(report, console) -> None:
    from rich.table import Table

    from rich import box

    # layer names are never cut (pipes, CI logs at 80 columns): a uniform from/to pair goes in the
    # title instead of two columns, and every cell folds onto more lines rather than ending in "…"
    pairs = {(layer.source_type, layer.target_type) for layer in report.layers}
    uniform = len(pairs) == 1
    kinds = f", {next(iter(pairs))[0]} -> {next(iter(pairs))[1]}" if uniform else ""
    t = Table(title=f"convert -> {report.target} ({report.sites} site{'' if report.sites == 1 else 's'}{kinds}, "
                    f"{'calibrated, ' + report.mode if report.calibrated else 'uncalibrated'})",
              title_justify="left", box=box.SIMPLE_HEAD)
    cols = [("layer", "left")] + ([] if uniform else [("from", "left"), ("to", "left")]) + [
        ("C", "right"), ("groups", "right"), ("err naive", "right"), ("err fitted", "right"), ("method", "left")]
    for col, j in cols:
        t.add_column(col, justify=j, overflow="fold")
    rows = []
    for layer in report.layers:
        row = [layer.name] + ([] if uniform else [layer.source_type, layer.target_type]) + [
            str(layer.channels), "-" if layer.groups is None else str(layer.groups), _num(layer.err_naive),
            _num(layer.err_fitted), layer.method + (f" ({layer.note})" if layer.note else "")]
        t.add_row(*row)
        rows.append(row)
    if fits(console, t) or not rows:
        console.print(t)
    else:  # a layer name is never cut: a block per layer
        from rich.text import Text

        print_stacked(console, t.title.plain if isinstance(t.title, Text) else str(t.title),
                      [c for c, _ in cols], rows)
    f = report.fidelity
    if f is not None:
        s = Table(title="fidelity on the calibration data (in-sample"
                        + ("; held-out below)" if report.fidelity_eval is not None else "; pass --eval DATA for held-out)"),
                  show_header=False, title_justify="left")
        s.add_column("what", style="bold", overflow="fold")
        s.add_column("value", overflow="fold")
        s.add_row("samples", f"{f.samples} ({report.calib_source})")
        fc = report.fidelity_calibrated
        if f.classifier:
            if report.distill_steps and fc is not None:
                s.add_row("top-1 agreement", f"{_pct(fc.top1_agreement)} calibrated -> {_pct(f.top1_agreement)} "
                                             f"after {report.distill_steps} distillation steps")
                s.add_row("KL(original || converted)", f"{_num(fc.kl)} -> {_num(f.kl)}")
            else:
                s.add_row("top-1 agreement", _pct(f.top1_agreement))
                s.add_row("KL(original || converted)", _num(f.kl))
        s.add_row("relative output error", _num(f.rel_output_error))
        if f.accuracy_converted is not None:
            s.add_row("accuracy", f"{_pct(f.accuracy_converted)} (original {_pct(f.accuracy_original)})")
        if report.calib_ratio is not None:
            s.add_row("calibration time", f"{report.calib_seconds:.2f} s = {report.calib_ratio:.1f}x one forward "
                                          f"pass ({report.passes} pass{'es' if report.passes != 1 else ''})")
        _outputs_rows(s, f)
        console.print(s)
    fe = report.fidelity_eval
    if fe is not None:
        h = Table(title="fidelity on held-out data (--eval)", show_header=False, title_justify="left")
        h.add_column("what", style="bold", overflow="fold")
        h.add_column("value", overflow="fold")
        h.add_row("samples", f"{fe.samples} ({report.eval_source})")
        if fe.classifier:
            h.add_row("top-1 agreement", _pct(fe.top1_agreement))
            h.add_row("KL(original || converted)", _num(fe.kl))
        h.add_row("relative output error", _num(fe.rel_output_error))
        if fe.accuracy_converted is not None:
            h.add_row("accuracy", f"{_pct(fe.accuracy_converted)} (original {_pct(fe.accuracy_original)})")
        _outputs_rows(h, fe)
        console.print(h)
    if report.files:
        for k, v in report.files.items():
            console.print(f"wrote {k}: {v}", markup=False)
    if report.parity is not None:
        p = report.parity
        provs = getattr(p, "providers", []) or []
        bits = [f"{getattr(x, 'label', '?')}: {getattr(x, 'status', '?')}" for x in provs]
        console.print(f"ONNX parity: {'ok' if report.passed else 'FAILED'}" + (f" ({', '.join(bits)})" if bits else ""),
                      style="green" if report.passed else "red", markup=False)
    for w in report.warnings:
        console.print(f"warning: {w}", style="yellow", markup=False)
