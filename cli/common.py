"""Shared CLI plumbing: option decorators, model loading, error handling, output.

Exit codes: 0 success, 1 the job ran but a check failed (``bool(report)`` is
False), 2 user error (``NormswapError``: one line on stderr), 3 internal
error (one line; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

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


def model_options(f: Callable) -> Callable:
    """Options that say how to load MODEL safely."""
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


INPUT_SHAPE_HELP = "Shape of the example input (random data; with --calib, the size to read an image folder at)."
DATA_HELP = "Take the example input from DATA (.npz/.npy/.pt/folder)."


def input_options(*, data_option: str = "--calib", input_shape_help: str = INPUT_SHAPE_HELP,
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


def run_job(
    job: Callable[[], Any],
    render: Callable[[Any, Any], None] | None,
    opts: Settings,
    *,
    notes: Callable[[], list[str]] | None = None,
) -> None:
    """Run ``job()`` (which returns a Report), render it, write JSON, print the summary, exit.

    ``NormswapError`` → one line on stderr, exit 2.  Any other exception → one
    line naming it, exit 3 (``--debug`` shows the traceback instead).
    """
    from normswap.errors import NormswapError

    if opts.json_path:  # fail before the (possibly long) job, not after it
        try:
            _check_json_path(opts.json_path)
        except NormswapError as e:
            if opts.debug:
                raise
            fail(str(e), EXIT_USAGE)
    try:
        report = job()
    except NormswapError as e:
        if opts.debug:
            raise
        fail(str(e), EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit:
        raise
    except Exception as e:  # a bug or an unforeseen input: still one line unless --debug
        if opts.debug:
            raise
        fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", EXIT_INTERNAL)
    out = console()
    if not opts.quiet and render is not None:
        try:
            render(report, out)
        except Exception as e:  # a rendering bug must not hide the result behind a traceback
            if opts.debug:
                raise
            click.echo(f"warning: could not render the report ({type(e).__name__}: {e}); "
                       "rerun with --debug for the traceback", err=True)
    if opts.json_path:
        try:
            report.to_json(opts.json_path)
        except NormswapError as e:
            fail(str(e), EXIT_USAGE)
        if not opts.quiet:
            out.print(f"report written to {opts.json_path}")
    line = report.summary_line()
    style = "bold green" if report else "bold red"
    out.print(line, style=style, markup=False, soft_wrap=True)  # one line, whatever the terminal width
    sys.exit(EXIT_OK if report else EXIT_FAILED)


#: the command parameters that name files (inputs or outputs) --json must never write over
_FILE_PARAMS = frozenset({"model_path", "onnx_path", "calib", "data", "output", "onnx", "model"})


def _check_json_path(json_path) -> None:
    """--json FILE must be writable (an existing folder) and none of the command's files."""
    import contextlib
    import os
    from pathlib import Path

    from normswap.errors import NormswapError

    path = Path(json_path)
    if path.is_dir():
        raise NormswapError(f"--json {path}: is a directory, expected a file path")
    # never write the report over the command's own input (the model, the ONNX file, the data) or output
    ctx = click.get_current_context(silent=True)
    target = path.resolve()
    while ctx is not None:
        for name, value in ctx.params.items():
            if name not in _FILE_PARAMS or not isinstance(value, (str, os.PathLike)) or not str(value):
                continue
            with contextlib.suppress(OSError, ValueError):
                if Path(value).resolve() == target:
                    what = {"model_path": "the MODEL file", "model": "the MODEL file", "onnx_path": "the ONNX file",
                            "onnx": "the ONNX file", "calib": "the --calib data", "data": "the --data file",
                            "output": "the -o output"}[name]
                    raise NormswapError(f"--json {path}: is also {what} of this command; choose another file")
        ctx = ctx.parent
    if not path.parent.is_dir():
        raise NormswapError(f"--json {path}: output folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise NormswapError(f"--json {path}: output folder {path.parent} is not writable")


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
