"""The zcrelay command line. `main` is the console script's entry point."""

from __future__ import annotations

import sys

import typer

from zcrelay.cli import bench as _bench  # noqa: F401  (registers the command)
from zcrelay.cli import demo as _demo  # noqa: F401  (registers the command)
from zcrelay.cli import forward as _forward  # noqa: F401  (registers the command)
from zcrelay.cli import pipeline as _pipeline  # noqa: F401  (connect, listen, send, serve)
from zcrelay.cli import tee as _tee  # noqa: F401  (registers the command)
from zcrelay.cli._click import Abort, ClickException, UsageError
from zcrelay.cli.app import app
from zcrelay.cli.common import PROG
from zcrelay.exitcodes import ExitCode


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a usage error is one line on stderr and exit code 2, never a traceback."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name=PROG, standalone_mode=False)
    except UsageError as exc:
        where = f" {exc.ctx.info_name}" if exc.ctx and exc.ctx.parent else ""
        hint = f" (see '{PROG}{where} --help')"
        print(f"{PROG}{where}: error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(ExitCode.USAGE)
    except Abort:
        sys.exit(ExitCode.INTERRUPTED)
    except ClickException as exc:
        print(f"{PROG}: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(int(result) if isinstance(result, int) else ExitCode.OK)
