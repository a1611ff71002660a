"""``normswap`` command group.  Each job lives in ``cli/commands/<job>.py`` and
defines a click command named ``command`` plus ``render(report, console)``."""

from __future__ import annotations

import importlib

import click

COMMANDS = ("audit", "fold", "convert", "export", "check")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("normswap")
    except Exception:
        from normswap import __version__

        return __version__


class JobGroup(click.Group):
    """Loads command modules on demand, keeping ``normswap --help`` free of torch."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"normswap_cli.commands.{name}")
        return module.command


@click.group(
    cls=JobGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Exit codes: 0 ok, 1 a check failed, 2 bad input, 3 internal error.  "
    "Run `normswap COMMAND --help` for examples.",
)
@click.version_option(_version(), "--version", "-V", prog_name="normswap")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON to FILE.")
@click.option("--quiet", "-q", is_flag=True, default=False, help="Print only the final summary line.")
@click.option("--debug", is_flag=True, default=False, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx, json_path, quiet, debug):
    """normswap: normalization-layer surgery on trained PyTorch models.

    Audit the norms of a model, fold BatchNorm exactly, convert one norm into
    another with calibrated parameters, export to ONNX and check parity in
    onnxruntime.  Global options may also be given after the command.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(json_path=json_path, quiet=quiet, debug=debug)


def main(argv=None):
    return cli.main(args=argv, prog_name="normswap")


if __name__ == "__main__":  # pragma: no cover
    main()
