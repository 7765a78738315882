"""The zcrelay command line. `main` is the console script's entry point."""

from __future__ import annotations

import importlib
import signal
import sys

from zcrelay.cli.common import PROG, interrupted, remove_socket_files, terminated
from zcrelay.exitcodes import ExitCode

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    import typer

# Command → the module that registers it, in the order --help lists them. Only the invoked
# command's module is imported: each pulls in its own policy modules (trio, rich, ...), and
# importing them all cost more start-up CPU than a 1 GiB splice (issues #3, #4).
COMMANDS = {
    "bench": "bench", "demo": "demo", "forward": "forward",
    "connect": "pipeline", "listen": "pipeline", "send": "send", "serve": "pipeline",
    "tee": "tee",
}


def load(names: set[str] | None = None) -> "typer.Typer":
    """Register the commands called `names` (every command when None) on the app; return it."""
    from zcrelay.cli.app import app

    for module in dict.fromkeys(COMMANDS.values()):
        if names is None or any(COMMANDS[n] == module for n in names):
            importlib.import_module(f"zcrelay.cli.{module}")
    # Help, man page and completions list commands in COMMANDS' order, whatever module
    # registered them first.
    order = {name: i for i, name in enumerate(COMMANDS)}
    # A command without a callback (typer refuses it when it builds the click command) sorts last.
    app.registered_commands.sort(key=lambda info: order.get(
        info.name or (info.callback.__name__ if info.callback is not None else ""), len(order)))
    return app


def _invoked(argv: list[str]) -> set[str] | None:
    """The commands to load for argv: the one it names, none for --version, else None (help or
    a typo: load them all). The root takes no option with a value, so the first word that is
    not an option is the command."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    if first in COMMANDS:
        return {first}
    return set() if first is None and "--version" in argv else None


def _refuse_nan(command) -> None:
    """Every float option refuses 'nan', which click's min=0 lets through (nan < 0 is false):
    a NaN timeout turned each connection into an internal error, or into no timeout at all."""
    import math

    from zcrelay.cli._click import FloatParamType

    for cmd in [command, *getattr(command, "commands", {}).values()]:
        for param in cmd.params:
            kind = param.type
            if not isinstance(kind, FloatParamType) or getattr(kind, "refuses_nan", False):
                continue

            def convert(value, param, ctx, convert=kind.convert, kind=kind):
                number = convert(value, param, ctx)
                if isinstance(number, float) and math.isnan(number):
                    kind.fail(f"{value!r} is not a number", param, ctx)
                return number

            # Patched on click's instance, which the stubs do not foresee; refuses_nan is our marker.
            kind.convert, kind.refuses_nan = convert, True  # type: ignore[method-assign, attr-defined]


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a usage error is one line on stderr and exit code 2, never a traceback.
    `zcrelay tee [-a] FILE...` runs without importing typer (see zcrelay.cli.teepipe)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:  # not one ignored on purpose (nohup)
            signal.signal(signum, terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup &)
        signal.signal(signal.SIGINT, interrupted)  # counts a Ctrl-C that Python might swallow
        sys.unraisablehook = _unraisable
    try:
        _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before a command set its own handling: start-up imports take 50-150 ms,
        # and a SIGINT there printed a KeyboardInterrupt traceback.
        sys.exit(ExitCode.INTERRUPTED)
    finally:
        remove_socket_files()


def _unraisable(unraisable) -> None:
    """A KeyboardInterrupt that Python swallowed in a callback (see common.interrupted) is
    counted, and acted on once the command starts: not an "Exception ignored" traceback."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)




def _main(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    from zcrelay.cli import teepipe

    teepipe.keep_stderr()
    plain = teepipe.plain_tee(args)
    if plain is not None:
        sys.exit(teepipe.main(*plain))
    import typer

    from zcrelay.cli._click import Abort, ClickException, UsageError

    command = typer.main.get_command(load(_invoked(args)))
    _refuse_nan(command)
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
