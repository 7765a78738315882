"""What `connect`, `listen`, `send` and `serve` share: options and the exit codes of their
errors (the progress display is zcrelay.cli.progress). No trio import here: `send` runs
without trio (zcrelay.waits).

Exit codes beyond the shared ones (zcrelay/exitcodes.py):
- stdin or the file unreadable, missing, a directory: INPUT_ERROR (8)
- writing stdout failed, or stdout is closed at start: OUTPUT_ERROR (9)
- stdout's reader went away (`| head -c 100`): BROKEN_PIPE (141, as a program killed by
  SIGPIPE reports), with no message
- the file shrank during `send`: FILE_CHANGED (10)
- the connection was reset or closed by the peer mid-transfer, or (send, serve) it was reset
  after the last byte instead of closed, or (send --idle-timeout) no byte moved for that long:
  FAILURE (1), the code of a lost peer. Not CONNECT_FAILED (6): that one says the target was
  never reached and nothing was sent, so a retry is safe; here bytes may have arrived.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Optional

import typer

from zcrelay.cli.common import error, parse_size, run
from zcrelay.direct import FileShrank
from zcrelay.errors import ConnectionLost, InputFailed, OutputClosed, OutputFailed
from zcrelay.excgroups import first_error
from zcrelay.exitcodes import ExitCode
from zcrelay.files import METHODS, BadRange

log = logging.getLogger("zcrelay")

_CODES: list[tuple[type, ExitCode]] = [
    (OutputClosed, ExitCode.BROKEN_PIPE),
    (InputFailed, ExitCode.INPUT_ERROR),
    (OutputFailed, ExitCode.OUTPUT_ERROR),
    (FileShrank, ExitCode.FILE_CHANGED),
    (BadRange, ExitCode.USAGE),
    (ConnectionLost, ExitCode.FAILURE),
]

# Options connect, listen, send and serve share.
VERBOSE = typer.Option(0, "--verbose", "-v", count=True, help="More detail on stderr (the method each direction uses, a summary).")
QUIET = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr (and a listener's listening line and summary).")
RATE = typer.Option(None, "--rate-limit", metavar="BYTES/S", help="Cap throughput per direction, e.g. 10M (splice is kept: each call is bounded).", show_default=False)
NO_SPLICE = typer.Option(False, "--no-splice", help="Copy through user space instead of splicing (for comparison).")
PIPE_SIZE = typer.Option("1M", "--pipe-size", metavar="SIZE", help="Pipe buffer for file transfers; inherited stdio pipes are grown to it.")
FILE_PIPE_SIZE = typer.Option("1M", "--pipe-size", metavar="SIZE", help="The pipe a file is spliced through (K/M suffixes).")
CLIENT_RATE = typer.Option(None, "--rate-limit", metavar="BYTES/S", help="Cap each client's throughput, e.g. 10M (splice is kept: each call is bounded).", show_default=False)
CONNECT_TIMEOUT = typer.Option(10.0, "--connect-timeout", min=0, metavar="SECONDS", help="Seconds to reach the peer, name lookup included (0: none).")
METHOD = typer.Option("splice", "--method", metavar="splice|sendfile", help="splice: file -> pipe -> socket; sendfile: sendfile(2).")


def run_mapped(main: Callable[[], Awaitable[ExitCode | None]], *, with_trio: bool = True) -> ExitCode:
    """common.run, plus the exit codes of the transfer errors above."""

    async def mapped() -> ExitCode | None:
        try:
            return await main()
        except BaseException as exc:
            leaf = first_error(exc)
            for kind, code in _CODES:
                if isinstance(leaf, kind):
                    if code == ExitCode.BROKEN_PIPE:
                        log.debug("%s", leaf)
                        return code
                    return error(str(leaf), code)
            raise

    return run(mapped, with_trio=with_trio)


def method_value(method: str) -> str:
    if method not in METHODS:
        raise typer.BadParameter(f"{method!r} is not one of {', '.join(METHODS)}", param_hint="--method")
    return method


def rate_value(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    rate = parse_size(text, "--rate-limit")
    if rate <= 0:
        raise typer.BadParameter(f"{text!r} is less than one byte per second", param_hint="--rate-limit")
    return rate


