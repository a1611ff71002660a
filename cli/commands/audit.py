"""``normswap audit MODEL``: which norms a model uses, where, foldable or not, and their risks."""

from __future__ import annotations

import click

from normswap_cli.common import (fit_epilog, fits, image_options, model_options, output_options, pass_settings,
                                  print_stacked, run_job)

EPILOG = """\b
Examples:
  normswap audit model.pt --trust
  normswap audit weights.pt --arch samples.digits:digits_resnet --input-shape 1,1,32,32
  normswap audit model.pt2 --json audit.json
  normswap audit scripted.pt --quiet

\b
One row per norm site: module norms, functional calls (F.batch_norm...) and
spectral / weight norm on a producer's weight (named like conv1.weight).
--input-shape runs the model once on random data of that shape to learn input
ranks (e.g. whether a BatchNorm1d sees (N, C) or (N, C, L)) and real call
counts; the model is not changed.  Parts FX cannot trace are still audited and
listed as analysed without a graph.
"""


@click.command("audit", epilog=fit_epilog(EPILOG))
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--input-shape", default=None, metavar="N,C,H,W",
              help="Run the model on random data of this shape to learn input ranks and call counts.")
@click.option("--data", default=None, metavar="DATA",
              help="Run the model on the first samples of DATA (.npz/.npy/.pt/image folder) instead.")
@image_options
@model_options
@output_options
@pass_settings
def command(model_path, input_shape, data, trust, imports, arch, arch_kwargs, opts, preprocess):
    """Audit the normalization layers of MODEL: kind, place, mode, foldability, risks."""

    def job():
        from normswap.audit import audit_file

        return audit_file(model_path, input_shape=input_shape, data=data, arch=arch, arch_kwargs=arch_kwargs,
                          trust=trust, imports=imports, preprocess=preprocess)

    run_job(job, render, opts)


#: the name the lead may wire under
audit_cmd = command


def _fmt_shape(shape: dict) -> str:
    if not shape:
        return ""
    parts = []
    for k, v in shape.items():
        key = {"num_features": "C", "num_channels": "C", "num_groups": "G", "normalized_shape": "shape",
               "weight_shape": "w", "num_classes": "classes", "num_branches": "branches"}.get(k, k)
        parts.append(f"{key}={v}")
    return " ".join(parts)


def _fmt_eps(eps) -> str:
    return "" if eps is None else f"{eps:g}"


def render(report, console) -> None:
    """Rich table (one row per site) and a summary (counts per kind, foldable, warnings)."""
    from rich.table import Table
    from rich.text import Text

    if not report.sites:
        console.print("no normalization layers found", markup=False)
    else:
        from rich import box

        table = Table(title=f"norm sites of {report.model}", show_lines=False, header_style="bold",
                      box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        cols = ("site", "kind", "type", "mode", "shape", "eps", "producer", "fold", "flags")
        rows = []
        for s in report.sites:
            prod = s.producer or {}
            if prod.get("name") or prod.get("op"):
                ptxt = f"{prod.get('op')}:{prod.get('name')}" if prod.get("name") else str(prod.get("op"))
                if s.producer_shared:
                    ptxt += " (shared)"
            else:
                ptxt = "?" if not s.graph else ""
            name = s.name + (" (fn)" if s.functional else "") + (f" x{s.calls}" if s.reused else "")
            fold = Text("yes", style="green") if s.foldable else Text("no", style="dim")
            flags = Text(", ".join(f for f in s.flags if f != "no_graph"), style="yellow")
            if "no_graph" in s.flags:
                flags.append((", " if len(flags) else "") + "no graph", style="dim")
            mode = Text(s.mode or "", style="red" if s.mode == "train" else "")
            rows.append((Text(name), s.kind, Text(s.module_type), mode, _fmt_shape(s.shape),
                         _fmt_eps(s.eps), Text(ptxt), fold, flags))
        # columns that are empty on every row only take width from the others (80-column terminals)
        keep = [i for i, col in enumerate(cols) if col in ("site", "kind", "fold") or any(str(r[i]) for r in rows)]
        for i in keep:
            table.add_column(cols[i], overflow="fold", no_wrap=cols[i] in ("kind", "mode", "fold", "eps"))
        for r in rows:
            table.add_row(*(r[i] for i in keep))
        if fits(console, table):
            console.print(table)
        else:  # a layer name is never cut: one block per site, its name on a line of its own
            print_stacked(console, f"norm sites of {report.model}", [cols[i] for i in keep],
                          [[r[i] for i in keep] for r in rows])
    summ = report.summary()
    kinds = ", ".join(f"{k} {v}" for k, v in summ["kinds"].items()) or "none"
    console.print(f"kinds: {kinds}", markup=False)
    console.print(f"foldable: {summ['foldable']} of {summ['sites']} (planner: {report.fold_planner})",
                  markup=False)
    if summ["untraced"]:
        console.print("analysed without a graph: " + ", ".join(p or "<root>" for p in summ["untraced"]),
                      style="yellow", markup=False)
    blocked = [(s.name, s.reason) for s in report.sites if not s.foldable and s.reason]
    if blocked:
        console.print("not foldable:", style="bold", markup=False)
        for name, why in blocked:
            console.print(f"  {name}: {why}", markup=False)
    warnings = [(s.name, w) for s in report.sites for w in s.warnings]
    if warnings:
        console.print(f"warnings ({len(warnings)}):", style="bold yellow", markup=False)
        for name, w in warnings:
            console.print(f"  {name}: {w}", style="yellow", markup=False)
    for n in report.notes:
        console.print(f"note: {n}", style="dim", markup=False)
