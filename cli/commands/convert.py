"""``normswap convert MODEL --to KIND``."""

from __future__ import annotations

import click

from normswap_cli.common import (fit_epilog, fits, image_options, model_options, output_options, pass_settings,
                                  print_stacked, run_job, write_options)


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


def _positive_seconds(ctx, param, value):
    """--time-budget: a positive, finite number of seconds (nan, inf, 0 and negatives are refused)."""
    if value is None:
        return None
    import math

    try:
        v = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of seconds") from None
    if not (math.isfinite(v) and v > 0):
        raise click.BadParameter(f"{value!r}: expected a positive, finite number of seconds")
    return v


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
@image_options
@click.option("--calib-samples", type=int, default=None, metavar="N", help="Use at most N calibration samples.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Calibration batch size.")
@click.option("--mode", type=click.Choice(("fast", "sequential", "fit")), default="sequential", show_default=True,
              help="Calibration: fast (closed form on the original activations, 1 pass), sequential "
                   "(closed form on the converted model's own inputs, 2 passes; never worse than fast on "
                   "held-back calibration samples) or fit (sequential, then only the new norms' scale and "
                   "shift fitted to the original's outputs by gradient descent, about 20 more forward "
                   "passes; kept only when better on held-back samples).")
@click.option("--no-reweight", "no_reweight", is_flag=True, default=False,
              help="Leave the producers of the norms alone (--to gn/ln): by default each one's output "
                   "channels get the scale and shift that make the new norm's statistics follow the "
                   "old one's (an exact rewrite of the original model; the converted model keeps it).")
@click.option("--repair", is_flag=True, default=False,
              help="After calibration, distil the converted model toward the original on the "
                   "calibration data and its mirror images, early-stopped on held-back samples (never "
                   "returned worse than calibration alone there: KL, top-1 agreement, accuracy if "
                   "labelled).")
@click.option("--time-budget", "time_budget", default=None, metavar="SECONDS", callback=_positive_seconds,
              help="Wall-clock budget of --repair in seconds (default 600).")
@click.option("--repair-steps", "repair_steps", type=click.IntRange(min=1), default=None, metavar="N",
              help="Expert: stop --repair after N steps (reproducible runs).")
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
def command(model_path, to, source, groups, calib, eval_data, calib_samples, batch_size, mode, no_reweight, repair,
            time_budget, repair_steps, output, report_path, onnx_path,
            no_onnx, no_check, input_shape, trust, imports, arch, arch_kwargs, force, opts, preprocess):
    """Replace the norm layers of MODEL by another kind, calibrated to keep its behaviour."""

    from normswap.convert.pipeline import output_paths
    from normswap_cli.common import fail

    if not repair and (time_budget is not None or repair_steps is not None):
        given = " and ".join(o for o, v in (("--time-budget", time_budget), ("--repair-steps", repair_steps))
                             if v is not None)
        verb = "apply" if " and " in given else "applies"
        fail(f"{given} only {verb} with --repair (add --repair, or drop {given})")
    if repair and calib is None:
        fail("--repair needs calibration data: add --calib DATA (repair distils toward the original "
             "on it and holds some of it back)")
    out_path, onnx_file = output_paths(model_path, to, output, onnx_path)

    def job(outs):
        from normswap.convert.core import ConvertOptions
        from normswap.convert.pipeline import convert_file

        with _Progress(opts.quiet) as progress:
            _, report = convert_file(
                model_path, to, calib=calib, source=source, groups=groups, mode=mode, repair=repair,
                time_budget_s=time_budget, options=ConvertOptions(repair_steps=repair_steps, reweight=not no_reweight),
                batch_size=batch_size, calib_samples=calib_samples, output=output, onnx=onnx_path,
                export_onnx=not no_onnx, check=not (no_check or no_onnx), input_shape=input_shape, force=force,
                progress=progress, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports,
                eval_data=eval_data, outputs=outs, preprocess=preprocess)
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
    """A rich progress bar for the calibration passes and for repair (time against its budget,
    with the step, the loss and the time left)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        return self  # the bar starts with the first progress report: an error before it prints alone

    def _start(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from normswap_cli.common import console

        out = console(stderr=True)
        if not out.is_terminal:  # a pipe or a CI log: rich draws nothing there but leaves a bare newline
            self.quiet = True
            return
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=20),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                            console=out, transient=True)
        self.bar.__enter__()

    def __call__(self, stage: str, step: int, total, loss=None, eta=None) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self._start()
            if self.bar is None:
                return
        if stage not in self.tasks:
            label = {"calibrate": "calibrating", "reweight": "reweighting", "fit": "fitting",
                     "repair": "repairing"}.get(stage, stage)
            self.tasks[stage] = self.bar.add_task(label, total=total, info="")
        if stage == "repair" and eta is not None:  # total: the time budget (s); eta: what is left of it
            info = f"step {step}" + (f" loss {max(0.0, loss):.3g}" if loss is not None else "") + f" ~{eta:.0f} s left"
            self.bar.update(self.tasks[stage], completed=max(0.0, total - eta), info=info)
            return
        info = f"{step}/{total}" if total else f"{step}"
        self.bar.update(self.tasks[stage], completed=step, info=info + (f" loss {max(0.0, loss):.3g}" if loss is not None else ""))

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


def _repaired(report) -> bool:
    return report.repair is not None and bool(getattr(report.repair, "kept", False))


def _fid_table(title: str, f, source, before=None):
    """Rows of one Fidelity (``before``: the calibrated model's, shown as ``before -> after``)."""
    from rich.table import Table

    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("what", style="bold", overflow="fold")
    t.add_column("value", overflow="fold")

    def pair(fmt, key):
        now = fmt(getattr(f, key))
        return now if before is None else f"{fmt(getattr(before, key))} calibrated -> {now} repaired"

    t.add_row("samples", f"{f.samples} ({source})")
    if f.classifier:
        t.add_row("top-1 agreement", pair(_pct, "top1_agreement"))
        t.add_row("top-5 overlap", pair(_pct, "top5_overlap"))
        t.add_row("KL(original || converted)", pair(_num, "kl"))
    t.add_row("relative output error", pair(_num, "rel_output_error"))
    if f.accuracy_converted is not None:
        d = f.accuracy_drop
        t.add_row("accuracy", f"{_pct(f.accuracy_converted)} converted, {_pct(f.accuracy_original)} original "
                              f"({'drop' if d >= 0 else 'gain'} {abs(100 * d):.1f} points)")
    _outputs_rows(t, f)
    return t


def _repair_table(r):
    from rich.table import Table

    t = Table(title="repair (distillation toward the original; held-back calibration samples)",
              show_header=False, title_justify="left")
    t.add_column("what", style="bold", overflow="fold")
    t.add_column("value", overflow="fold")
    t.add_row("steps", f"{r.steps} in {r.seconds:.0f} s (budget {_num(r.budget_s)} s; stopped: {r.stopped})")
    t.add_row("trained on", f"{r.train_samples} samples, {r.trained_parameters} parameters, "
                            f"micro-batch {r.micro_batch}; {r.held_samples} held back")
    b, a = r.before or {}, r.after or {}
    if b.get("agreement") is not None:
        t.add_row("held-back top-1 agreement", f"{_pct(b.get('agreement'))} -> {_pct(a.get('agreement'))}")
    if b.get("accuracy") is not None:
        t.add_row("held-back accuracy", f"{_pct(b.get('accuracy'))} -> {_pct(a.get('accuracy'))}")
    if b:
        t.add_row("held-back KL", f"{_num(b.get('kl'))} -> {_num(a.get('kl'))}")
    t.add_row("result", "repaired model returned" if r.kept else
              "no step within the time budget: the calibrated model is returned"
              if r.stopped == "time budget" and not r.steps else
              "not better on the held-back samples (a lower KL without losing top-1 agreement "
              "or accuracy): the calibrated model is returned")
    return t


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
        s = _fid_table("fidelity on the calibration data (in-sample"
                       + ("; held-out below)" if report.fidelity_eval is not None else "; pass --eval DATA for held-out)"),
                       f, report.calib_source, report.fidelity_calibrated if _repaired(report) else None)
        if report.calib_ratio is not None:
            s.add_row("calibration time", f"{report.calib_seconds:.2f} s = {report.calib_ratio:.1f}x one forward "
                                          f"pass ({report.passes} pass{'es' if report.passes != 1 else ''})")
        from normswap.convert.report import reweight_text

        rw = reweight_text(report.reweight)
        if rw is not None:
            s.add_row("channel reweighting", rw)
        fit = report.fit
        if fit is not None:
            b, a = fit.before or {}, fit.after or {}
            s.add_row("affine fit", f"{fit.steps} steps, {fit.trained_parameters} parameters; held-back KL "
                                    f"{_num(b.get('kl'))} -> {_num(a.get('kl'))}"
                                    + ("" if fit.kept or not b else " (not better: closed form kept)"))
        console.print(s)
    if report.repair is not None:
        console.print(_repair_table(report.repair))
    fe = report.fidelity_eval
    if fe is not None:
        console.print(_fid_table("fidelity on held-out data (--eval)", fe, report.eval_source))
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
