"""`zcrelay tee FILE...` in pipeline mode, and its start-up path without typer.

Why: `zcrelay tee` sits inside shell pipelines, where its start-up is part of every run. Importing
typer took 55-70 ms of a 100-130 ms start-up here, as long as splicing a gigabyte through the tee
(benchmarks/TEE.md). The command line of the common case, `zcrelay tee [-a] FILE...`, holds no
option that needs a parser: `plain_tee` recognises exactly that shape and `main` then runs the tee
with this module's defaults, which are also the typer command's (zcrelay.cli.tee takes them from
here; tests/test_cli_startup.py checks that typer parses every such command line to the same
values). Any other word (another option, `--`, `-`, `--help`) or a shell-completion request goes
through typer as before.

Nothing here imports typer, trio or rich.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from zcrelay.cli.common import error, run, setup_logging
from zcrelay.cli.progress import Display, show_progress, stdin_size
from zcrelay.exitcodes import ExitCode
from zcrelay.stats import Flow

PIPE_SIZE = "1M"  # --pipe-size's default
PIPE_SIZE_BYTES = 1 << 20  # parse_size(PIPE_SIZE), without importing re at start-up
APPEND_FLAGS = ("--append", "-a")


def keep_stderr() -> None:
    """If fd 2 is closed (`2>&-`), put /dev/null there and give Python a sys.stderr for it.

    Why: Python leaves sys.stderr None, and then `print(..., file=sys.stderr)` writes to stdout
    (the data) and `sys.stderr.isatty()` raised, so every pipeline command failed without moving
    a byte; and the first file or socket opened took fd 2 and got the error messages. Messages
    are lost instead, as with GNU tee and nc. zcrelay.cli.main calls it before it opens
    anything."""
    try:
        os.fstat(2)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 2:  # fd 0 or 1 is closed too: leave it closed, the commands check them
            os.dup2(fd, 2)
            os.close(fd)
        else:
            os.set_inheritable(2, True)  # children (forward --workers) get it as their stderr
    if sys.stderr is None:
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)


def plain_tee(args: Sequence[str]) -> tuple[list[str], bool] | None:
    """(FILEs, append) if `args` (the command line after the program name) is `tee` followed
    only by FILE operands and -a/--append; None for anything else, which typer parses."""
    if not args or args[0] != "tee" or any(name.startswith("_ZCRELAY_COMPLETE") for name in os.environ):
        return None
    files, append = [], False
    for word in args[1:]:
        if word in APPEND_FLAGS:
            append = True
        elif word.startswith("-"):
            return None
        else:
            files.append(word)
    return files, append


def main(files: Sequence[str], append: bool) -> ExitCode:
    """`zcrelay tee [-a] FILE...` with every other option at its default."""
    setup_logging(0, False, lazy=True)  # logging is imported only if something is logged
    return run_pipeline_tee(files, append, None, PIPE_SIZE_BYTES, None)


def _closed_stdio() -> ExitCode | None:
    """A closed stdin or stdout is refused before any FILE is opened: the first FILE would
    take its number, and the tee would then read its own output or report "standard output:
    Invalid argument" about a file (`zcrelay tee o1 >&-`); a closed stdin was a traceback."""
    for fd, name, code in ((0, "standard input", ExitCode.INPUT_ERROR),
                           (1, "standard output", ExitCode.OUTPUT_ERROR)):
        try:
            os.fstat(fd)
        except OSError:
            return error(f"{name} is closed", code)
    return None


def run_pipeline_tee(files: Sequence[str], append: bool, output_error: str | None, pipe_size: int,
                     progress: bool | None) -> ExitCode:
    """Copy stdin to stdout and to each FILE; `output_error` is a valid mode or None (the
    default). Logging is set up by the caller."""
    from zcrelay.tee import DEFAULT, BrokenPipeExit, InputError, OutputErrorExit, TeeConfig, needs_trio, run_tee

    closed = _closed_stdio()
    if closed is not None:
        return closed
    config = TeeConfig(files=tuple(files), append=append, output_error=output_error or DEFAULT,
                       pipe_size=pipe_size)
    broken_pipe = False

    async def tee_main() -> ExitCode:
        nonlocal broken_pipe
        try:
            outcome = await run_tee(config, flow=flow)
        except BrokenPipeExit:
            broken_pipe = True
            return ExitCode.OUTPUT_ERROR
        except OutputErrorExit as exc:
            return error(str(exc), ExitCode.OUTPUT_ERROR)
        except InputError as exc:
            return error(str(exc), ExitCode.INPUT_ERROR)
        for note in outcome.notes:
            from zcrelay.cli.common import log

            log.debug("%s", note)
        return ExitCode.OUTPUT_ERROR if outcome.failed else ExitCode.OK

    # With a pipe on stdin the tee is one loop with nothing to schedule: it runs without trio
    # (zcrelay.waits), which saves trio's import, most of a short run's CPU.
    flow = Flow()
    display = Display(show_progress(progress, (0, 1)), [("tee", flow, stdin_size(0))])
    with display.ticking():
        code = run(tee_main, with_trio=needs_trio(0))
    if broken_pipe:
        # As GNU tee without --output-error: die of SIGPIPE, so `set -o pipefail` sees 141.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
    return code
