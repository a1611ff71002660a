"""Shared CLI plumbing: option decorators, model loading, error handling, output.

Exit codes: 0 success, 1 the job ran but a check failed (``bool(report)`` is
False), 2 user error (``NormswapError``: one line on stderr), 3 internal
error (one line; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from typing import Any, Callable

import click
from normswap_cli.render import (  # noqa: F401
    fit_epilog,
    fits,
    print_stacked,
    unwrap_summary,
    wrap_summary,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


# --------------------------------------------------------------------------- options


def output_options(f: Callable) -> Callable:
    """--json FILE, --quiet, --debug on a command (they may also be given before the command)."""
    f = click.option("--debug", is_flag=True, default=None, help="Show tracebacks for errors.")(f)
    f = click.option("--quiet", "-q", is_flag=True, default=None, help="Print only the final summary line.")(f)
    f = click.option(
        "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON to FILE."
    )(f)
    return f


def _remember_non_strict(ctx, param, value):  # noqa: ARG001
    if value:
        ctx.meta["normswap.non_strict"] = True
    return value


def model_options(f: Callable) -> Callable:
    """Options that say how to load MODEL safely.  ``--non-strict`` is not passed to the command
    function: :func:`run_job` applies it to every model the job loads."""
    f = click.option(
        "--non-strict", is_flag=True, default=False, expose_value=False, callback=_remember_non_strict,
        help="Load a state dict whose keys do not match --arch exactly (missing tensors keep the "
             "factory's initial values, unexpected ones are ignored; both are listed in the report).",
    )(f)
    f = click.option(
        "--arch-kwargs", default=None, metavar="JSON", help="Keyword arguments for the --arch factory, as a JSON object."
    )(f)
    f = click.option(
        "--arch", default=None, metavar="PKG.MODULE:FACTORY", help="Factory that builds the model for a state dict / safetensors file."
    )(f)
    f = click.option(
        "--import", "imports", multiple=True, metavar="MODULE", help="Import MODULE first (repeatable), e.g. the package that defines the model's classes."
    )(f)
    f = click.option(
        "--trust", is_flag=True, default=False, help="Allow unpickling a whole pickled model. Unpickling runs arbitrary code: only for files you trust."
    )(f)
    return f


INPUT_SHAPE_HELP = "Shape of the example input (random data; with --data, the size to read an image folder at)."
DATA_HELP = "Take the example input from DATA (.npz/.npy/.pt/folder)."


def input_options(*, data_option: str = "--data", input_shape_help: str = INPUT_SHAPE_HELP,
                  data_help: str = DATA_HELP, data_first: bool = False) -> Callable[[Callable], Callable]:
    """``--input-shape N,C,H,W`` and ``--calib DATA`` (or ``--data DATA``): the options every
    command resolves through :func:`normswap.inputs.resolve_inputs`.  Each command keeps its own
    help texts (and the order its --help lists them in)."""

    def decorate(f: Callable) -> Callable:
        shape = click.option("--input-shape", default=None, metavar="N,C,H,W", help=input_shape_help)
        data = click.option(data_option, default=None, metavar="DATA", help=data_help)
        first, second = (data, shape) if data_first else (shape, data)
        return first(second(f))

    return decorate


PREPROCESS_HELP = ("How image folders are read: imagenet (resize 256, crop 224, ImageNet mean/std), "
                   "inception (same geometry at 299, [-1,1]), tf-lite (crop S/(S+32), bicubic, "
                   "(p-127)/128), none ([0,1], plain resize). Default: the model's pretrained_cfg, "
                   "else none with a warning.")


def image_options(f: Callable) -> Callable:
    """The one option group for reading image folders (``--preprocess``, ``--image-size``,
    ``--resize``, ``--crop-pct``, ``--interpolation``, ``--mean``, ``--std``,
    ``--skip-bad-images``), the same in every
    command that takes data.  The values are validated before the job starts and reach the
    command as one ``preprocess`` argument (a :class:`normswap.preprocess.Preprocess`)."""
    from normswap.preprocess import INTERPOLATIONS, PRESETS

    @functools.wraps(f)
    def wrapper(*args, preprocess_name=None, image_size=None, resize=None, crop_pct=None, interpolation=None,
                skip_bad_images=False, mean=None, std=None, **kwargs):
        from normswap.errors import NormswapError
        from normswap.preprocess import Preprocess

        try:
            spec = Preprocess.from_options(preprocess_name, image_size, resize, crop_pct, interpolation,
                                           skip_bad_images, mean, std)
        except NormswapError as e:
            fail(str(e))
        given = {"--preprocess": preprocess_name, "--image-size": image_size, "--resize": resize,
                 "--crop-pct": crop_pct, "--interpolation": interpolation, "--mean": mean, "--std": std,
                 "--skip-bad-images": skip_bad_images or None}
        data = {o: kwargs.get(k) for o, k in (("--calib", "calib"), ("--eval", "eval_data"), ("--data", "data"))
                if kwargs.get(k) not in (None, "")}
        used = [o for o, v in given.items() if v is not None]
        # (a path that does not exist is left to the job: its "no such file or folder" is the better error)
        if used and all(v == "random" or os.path.exists(v) for v in data.values()) \
                and not any(os.path.isdir(v) for v in data.values()):
            # an option that would change nothing: say so rather than ignore it (as --time-budget without --repair)
            where = " / ".join(f"{o} {v}" for o, v in data.items()) or "no data option"
            fail(f"{used[0]} reads image folders, and this run has none ({where}); drop it or pass a folder")
        return f(*args, preprocess=spec, **kwargs)

    opts = [
        click.option("--preprocess", "preprocess_name", type=click.Choice(PRESETS), default=None,
                     help=PREPROCESS_HELP),
        click.option("--image-size", default=None, metavar="S|H,W",
                     help="Image size fed to the model (default: the preset's, or --input-shape's H,W)."),
        click.option("--resize", type=int, default=None, metavar="N",
                     help="Resize the shorter side to N before the centre crop."),
        click.option("--crop-pct", type=float, default=None, metavar="F",
                     help="Centre crop fraction (resize to S/F, then crop S; tf-lite: crop F of the "
                          "shorter side)."),
        click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=None,
                     help="Resize filter (default: the preset's)."),
        click.option("--mean", default=None, metavar="M|R,G,B",
                     help="Subtract this mean (pixels in [0, 1]) instead of the preset's."),
        click.option("--std", default=None, metavar="S|R,G,B",
                     help="Divide by this std (pixels in [0, 1]) instead of the preset's."),
        click.option("--skip-bad-images", is_flag=True, default=False,
                     help="Skip (and count) images that cannot be decoded instead of failing."),
    ]
    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


def write_options(f: Callable) -> Callable:
    f = click.option("--force", is_flag=True, default=False, help="Overwrite existing output files.")(f)
    return f


# --------------------------------------------------------------------------- context


class Settings:
    """Resolved output settings (command-level options override group-level ones)."""

    def __init__(self, json_path=None, quiet=False, debug=False):
        self.json_path = json_path
        self.quiet = bool(quiet)
        self.debug = bool(debug)


def settings(json_path=None, quiet=None, debug=None) -> Settings:
    ctx = click.get_current_context(silent=True)
    root = (ctx.find_root().obj if ctx else None) or {}
    return Settings(
        json_path if json_path is not None else root.get("json_path"),
        quiet if quiet is not None else root.get("quiet", False),
        debug if debug is not None else root.get("debug", False),
    )


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def load(model_path: str, *, arch=None, arch_kwargs=None, trust=False, imports=()):
    """Load MODEL with the shared options (errors surface as NormswapError)."""
    from normswap.io import load_model

    return load_model(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust, imports=imports)


def fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


#: how a command's file parameters are used: (inputs, outputs) by parameter name; a command may
#: also pass ``inputs=`` / ``outputs=`` to :func:`run_job` (e.g. outputs with computed defaults)
_INPUT_PARAMS = {"model_path": "the input model", "model": "the input model", "calib": "the --calib data",
                 "data": "the --data input"}
_OUTPUT_PARAMS = {"output": "-o", "onnx_path": "--onnx", "report_path": "--report"}
#: commands whose ``onnx_path`` is an input (the file being checked), not an output
_ONNX_IS_INPUT = frozenset({"check"})


def _params() -> tuple[str, dict]:
    ctx = click.get_current_context(silent=True)
    name, params = "job", {}
    while ctx is not None:
        if ctx.parent is not None and name == "job":
            name = ctx.info_name or ctx.command.name or "job"
        for k, v in ctx.params.items():
            params.setdefault(k, v)
        ctx = ctx.parent
    return name, params


def run_inputs_outputs(command: str, params: dict) -> tuple[list, dict]:
    """The run's input files ((label, path) pairs) and outputs ({option: path}) from its parameters."""
    inputs, outputs = [], {}
    for k, v in params.items():
        if not isinstance(v, str) or not v:
            continue
        if k in _INPUT_PARAMS:
            inputs.append((_INPUT_PARAMS[k], v))
        elif k == "onnx_path" and command in _ONNX_IS_INPUT:
            inputs.append(("the ONNX file this run checks", v))
        elif k in _OUTPUT_PARAMS:
            outputs[_OUTPUT_PARAMS[k]] = v
    return inputs, outputs


def _accepts_outputs(job) -> bool:
    import inspect

    try:
        return len(inspect.signature(job).parameters) >= 1
    except (TypeError, ValueError):
        return False


def _warnings_as_notes(caught, report) -> None:
    """Python warnings raised by the job become plain notes (no source path, no class name)."""
    seen = []
    for w in caught:
        if not issubclass(w.category, UserWarning) or issubclass(w.category, DeprecationWarning):
            continue
        msg = " ".join(str(w.message).split())
        if msg and msg not in seen:
            seen.append(msg)
    if not seen:
        return
    target = getattr(report, "notes", None)
    if not isinstance(target, list):
        target = getattr(report, "warnings", None)
    for msg in seen:
        if isinstance(target, list):
            if msg not in target:
                target.append(msg)
        else:
            click.echo(f"note: {msg}", err=True)


def _write_error_json(job_name: str, json_path, message: str, inputs, others: dict, force: bool) -> None:
    """On exit 2/3 with --json: write ``{"job", "passed": false, "error"}`` under the same rules as
    every output (never over an input, another output or, without --force, an existing file);
    silently nothing when that is not possible (the error may be about the JSON path itself)."""
    import json
    from pathlib import Path

    from normswap.errors import NormswapError
    from normswap.outputs import OutputSet

    if not json_path:
        return
    protect = list(inputs) + [("another output of this run", p) for p in others.values()]
    outs = OutputSet({"--json": json_path}, inputs=protect, force=force)
    try:
        outs.claim()
        Path(outs.staged("--json")).write_text(
            json.dumps({"job": job_name, "passed": False, "error": message}, indent=2) + "\n")
        outs.commit()
    except (NormswapError, OSError):
        pass
    finally:
        outs.release()


def run_job(
    job: Callable[..., Any],
    render: Callable[[Any, Any], None] | None,
    opts: Settings,
    *,
    notes: Callable[[], list[str]] | None = None,
    inputs: list | None = None,
    outputs: dict | None = None,
    force: bool | None = None,
) -> None:
    """Run ``job()`` (which returns a Report), render it, write JSON, print the summary, exit.

    Every output of the run (``-o``, ``--onnx``, ``--json``, ``--report``; taken from the
    command's parameters unless ``outputs`` is given) is claimed as a whole before the job runs
    (:class:`normswap.outputs.OutputSet`), with every input (MODEL, ``--calib``/``--data``, the
    ONNX file being checked) protected even with ``--force``.  A job that takes one argument
    gets the OutputSet and writes its files to ``outs.staged(option)``; the staged files and the
    JSON report are committed together after the job, and only when the report passed (a
    failed job's files are dropped, its JSON report is written).

    ``NormswapError`` → one line on stderr, exit 2 (with --json: ``{"job", "passed": false,
    "error"}``).  Any other exception → one line naming it, exit 3 (``--debug`` shows the
    traceback instead).  Ctrl-C / SIGTERM → the staged files and claims are removed, exit 128 + the signal (130, 143).
    """
    from normswap.errors import NormswapError
    from normswap.io import load_options
    from normswap.outputs import OutputSet, ignore_signals, interrupted_by

    command, params = _params()
    ctx = click.get_current_context(silent=True)
    strict = not (ctx is not None and ctx.meta.get("normswap.non_strict", False))
    derived_inputs, derived_outputs = run_inputs_outputs(command, params)
    inputs = derived_inputs if inputs is None else list(inputs)
    outputs = dict(derived_outputs if outputs is None else outputs)
    if force is None:
        force = bool(params.get("force", False)) or bool(params.get("global_force", False))
    else:
        force = bool(force) or bool(params.get("global_force", False))
    all_outputs = dict(outputs)
    if opts.json_path:
        all_outputs["--json"] = opts.json_path
    outs = OutputSet(all_outputs, inputs=inputs, force=force)

    def user_error(e: Exception, code: int, message: str | None = None) -> None:
        outs.release()
        message = message or str(e)
        if opts.json_path and getattr(e, "option", None) != "--json":
            _write_error_json(command, opts.json_path, " ".join(message.split()), inputs, outputs, force)
        fail(message, code)

    try:
        try:
            _check_inputs(inputs)  # a FIFO / device would block the job forever: refused unopened
            outs.claim()  # before the (possibly long) job, not after it
            _say_output_notes(outs)
            with warnings.catch_warnings(record=True) as caught, load_options(strict=strict) as loads:
                warnings.simplefilter("always", UserWarning)
                report = job(outs) if _accepts_outputs(job) else job()
            _warnings_as_notes(caught, report)
            _attach_loads(report, loads["loaded"], outs)
        except NormswapError as e:
            if opts.debug:
                raise
            user_error(e, EXIT_USAGE)
        except click.exceptions.Exit:
            raise
        except Exception as e:  # a bug or an unforeseen input: still one line unless --debug
            if interrupted_by() is not None:  # a signal surfaced as another exception (e.g. in an import)
                raise KeyboardInterrupt from None
            if opts.debug:
                raise
            if isinstance(e, OSError) and e.errno in _USER_ERRNOS and e.filename is not None:
                from normswap.outputs import show_path

                user_error(e, EXIT_USAGE, f"{show_path(e.filename)}: {e.strerror or e}")
            user_error(e, EXIT_INTERNAL,
                       f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        out = console()
        # a failed job hands over no files, only its reports (--json, --report HTML)
        dropped = [o for o in outs.written() if o not in ("--json", "--report")] if not report else []
        if dropped:  # a failed job hands over no files: only its report
            outs.discard(*dropped)
            msg = "nothing written for " + ", ".join(f"{o} {outs.final[o]}" for o in dropped) + ": the job failed"
            if hasattr(report, "notes") and isinstance(report.notes, list):
                report.notes.append(msg)
        if opts.json_path:
            try:
                from normswap.report import json_bytes

                outs.staged("--json").write_bytes(json_bytes(report))
            except OSError as e:
                user_error(e, EXIT_USAGE, f"--json {opts.json_path}: cannot write ({e.strerror or e})")
        try:
            outs.commit()  # the set together, before anything says it was written
        except NormswapError as e:
            user_error(e, EXIT_USAGE)
        if not opts.quiet and render is not None:
            try:
                render(report, out)
            except Exception as e:  # a rendering bug must not hide the result behind a traceback
                if opts.debug:
                    raise
                click.echo(f"warning: could not render the report ({type(e).__name__}: {e}); "
                           "rerun with --debug for the traceback", err=True)
        if opts.json_path and not opts.quiet:
            out.print(f"report written to {opts.json_path}", markup=False)
        line = report.summary_line()
        style = "bold green" if report else "bold red"
        for part in wrap_summary(line, max(40, out.width)):  # readable at 80 columns, in a pipe too
            out.print(part, style=style, markup=False, soft_wrap=True)
        sys.exit(EXIT_OK if report else EXIT_FAILED)
    except KeyboardInterrupt:
        ignore_signals()  # tidy up and exit: a second Ctrl-C / SIGTERM does not cut this short
        outs.release()
        sig = interrupted_by()
        what = "interrupted" + (f" by {_signal_name(sig)}" if sig else "")
        if outs.committed:
            click.echo(f"{what} after the outputs were written: "
                       + ", ".join(str(p) for p in outs.committed), err=True)
        else:
            click.echo(f"{what}: nothing was written", err=True)
        sys.exit(128 + (sig or 2))  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
    finally:
        outs.release()


def _user_errnos() -> frozenset:
    import errno

    names = ("ENAMETOOLONG", "ELOOP", "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EISDIR", "ENOTDIR", "EFBIG")
    return frozenset(getattr(errno, n) for n in names if hasattr(errno, n))


#: OS errors about the user's paths or disk (exit 2, one line), not normswap bugs
_USER_ERRNOS = _user_errnos()


def _signal_name(sig: int) -> str:
    import signal

    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _check_inputs(inputs) -> None:
    """Every input path of the run (MODEL, --calib/--data/--eval, the ONNX file being checked)
    must be a regular file or a folder: checked with stat, before anything opens it."""
    from normswap.inputs import check_input_path

    for item in inputs or ():
        label, path = item if isinstance(item, tuple) else ("an input", item)
        folder_ok = "model" not in label and "ONNX" not in label
        check_input_path(path, label, folder_ok=folder_ok)


def _say_output_notes(outs) -> None:
    """What cleaning the output folders did (notes) and left alone (warnings), on stderr, in lines
    that fit the terminal (80 columns in a pipe; a file name is never broken)."""
    import textwrap

    width = max(40, console(stderr=True).width)
    for kind, items in (("note", outs.notes), ("warning", outs.warnings)):
        for text in items:
            click.echo("\n".join(textwrap.wrap(f"{kind}: {text}", width, subsequent_indent="  ",
                                               break_long_words=False, break_on_hyphens=False)), err=True)


def attach_loaded(report) -> None:
    """Put the load facts of the model the job loaded (format, missing / unexpected keys) into
    ``report`` now, e.g. before an HTML report is made from it inside the job."""
    from normswap.io import loaded_models
    from normswap.report import attach_load

    loaded = loaded_models()
    if loaded and getattr(report, "load", None) is None:
        with contextlib.suppress(Exception):
            attach_load(report, loaded[0])


def _attach_loads(report, loaded: list, outs) -> None:
    """The load facts (format, missing / unexpected keys) in every report, also of jobs that do
    not attach them themselves; warnings about output folders on the summary line."""
    from normswap.report import add_summary_warning, attach_load

    if loaded and getattr(report, "load", None) is None:
        with contextlib.suppress(Exception):
            attach_load(report, loaded[0])
    if outs.warnings:
        n = len(outs.warnings)
        add_summary_warning(report, f"{n} file(s) in the output folder left alone (see the warning above)")


def _check_json_path(json_path) -> None:
    """--json FILE must be writable and none of the command's files (kept for callers; run_job
    now claims --json with the run's other outputs, see :class:`normswap.outputs.OutputSet`)."""
    from normswap.outputs import OutputSet

    command, params = _params()
    inputs, outputs = run_inputs_outputs(command, params)
    outputs["--json"] = json_path
    OutputSet(outputs, inputs=inputs, force=True).validate()


def print_notes(notes: list[str], out=None) -> None:
    if not notes:
        return
    out = out or console(stderr=True)
    for n in notes:
        out.print(f"note: {n}", style="yellow", markup=False)


def pass_settings(f: Callable) -> Callable:
    """Turn the --json/--quiet/--debug values into a Settings object passed as ``opts``."""

    @functools.wraps(f)
    def wrapper(*args, json_path=None, quiet=None, debug=None, **kwargs):
        return f(*args, opts=settings(json_path, quiet, debug), **kwargs)

    return wrapper
