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

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Like click's, but a usage error is one line on stderr (exit 2), as every other bad input."""
        import sys

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `normswap`: show the help text
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "normswap")
            message = " ".join(e.format_message().split())
            click.echo(f"error: {message} (see '{where} --help')", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except (click.Abort, KeyboardInterrupt):  # Ctrl-C / SIGTERM before a job started
            from normswap.outputs import interrupted_by

            sig = interrupted_by()
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(128 + (sig or 2))  # 130 for Ctrl-C, 143 for SIGTERM
        sys.exit(rv if isinstance(rv, int) else 0)

    def format_commands(self, ctx, formatter):
        """The command list with each command's whole first help line (wrapped, never cut with '…')."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            text = cmd.short_help or (cmd.help or "").strip().split("\n\n")[0]
            rows.append((name, " ".join(text.split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"normswap_cli.commands.{name}")
        return module.command


@click.group(
    cls=JobGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 80},
    epilog="Exit codes: 0 ok, 1 a check failed, 2 bad input, 3 internal error.  "
    "Run `normswap COMMAND --help` for examples.",
)
@click.version_option(_version(), "--version", "-V", prog_name="normswap")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON to FILE.")
@click.option("--quiet", "-q", is_flag=True, default=False, help="Print only the final summary line.")
@click.option("--debug", is_flag=True, default=False, help="Show tracebacks for errors.")
@click.option("--force", "global_force", is_flag=True, default=False,
              help="Overwrite existing output files (also for commands without --force).")
@click.pass_context
def cli(ctx, json_path, quiet, debug, global_force):
    """normswap: normalization-layer surgery on trained PyTorch models.

    Audit the norms of a model, fold BatchNorm exactly, convert one norm into
    another with calibrated parameters, export to ONNX and check parity in
    onnxruntime.  Global options may also be given after the command.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(json_path=json_path, quiet=quiet, debug=debug, force=global_force)


def main(argv=None):
    from normswap.outputs import install_signal_handlers

    install_signal_handlers()  # SIGTERM/SIGHUP like Ctrl-C: a killed run removes its staged files
    try:
        return cli.main(args=argv, prog_name="normswap")
    finally:
        _forget_handled_interrupt()


def _forget_handled_interrupt() -> None:
    """Keep the exit status of a run whose KeyboardInterrupt was handled (130 / 143).

    CPython (since 3.8; seen on 3.11) marks a KeyboardInterrupt as *unhandled* when it ends any
    string ``exec``/``eval`` -- which ``namedtuple`` and ``dataclass`` run while a module is
    imported -- even if a caller then catches it; under ``python -m`` the interpreter then kills
    itself with SIGINT at exit instead of returning the exit status we chose. A Ctrl-C that landed
    in such an import (seen once in about 50 interrupted runs) turned exit 130 into a death by
    SIGINT. The mark is cleared at the start of every string evaluation: evaluate one. (A
    KeyboardInterrupt that escapes ``main`` is marked after this, by runpy's caller: it still
    ends the process by SIGINT, as it should.)"""
    exec("None", {})  # noqa: S102 (a constant: clears CPython's unhandled-interrupt mark)


if __name__ == "__main__":  # pragma: no cover
    main()
