"""`zcrelay send FILE ADDR`: a file (or a span of it) to a socket, zero-copy, without trio.

Exit codes: see zcrelay/cli/transfer.py.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import typer

from zcrelay.cli.app import PROGRESS, TARGET, app
from zcrelay.cli.common import address, parse_size, pipe_size_value, setup_logging
from zcrelay.cli.progress import Display, show_progress
from zcrelay.cli.transfer import (CONNECT_TIMEOUT, FILE_PIPE_SIZE, METHOD, QUIET, RATE, VERBOSE,
                                  method_value, rate_value, run_mapped)
from zcrelay.exitcodes import ExitCode
from zcrelay.files import SendConfig, open_file, send as send_file, shown, span
from zcrelay.stats import Flow

log = logging.getLogger("zcrelay")


@app.command()
def send(
    file: str = typer.Argument(..., metavar="FILE", help="A regular file to send.", show_default=False),
    target: str = TARGET,
    method: str = METHOD,
    offset: str = typer.Option("0", "--offset", metavar="BYTES", help="Start at this byte of FILE (K, M, G suffixes)."),
    length: Optional[str] = typer.Option(None, "--length", metavar="BYTES", help="Send this many bytes.  \\[default: to the end]", show_default=False),
    linger: float = typer.Option(10.0, "--linger", min=0, metavar="SECONDS", help="After the last byte, wait this long for the peer to close (0: do not wait)."),
    idle_timeout: float = typer.Option(0.0, "--idle-timeout", min=0, metavar="SECONDS", help="Give up, resetting the receiver, after this many seconds without a byte moving (0: never).  \\[default: 0]", show_default=False),
    connect_timeout: float = CONNECT_TIMEOUT,
    rate_limit: Optional[str] = RATE,
    progress: Optional[bool] = PROGRESS,
    pipe_size: str = FILE_PIPE_SIZE,
    verbose: int = VERBOSE,
    quiet: bool = QUIET,
) -> ExitCode:
    """Send FILE (or a span of it) to ADDR, zero-copy. Exits 10 if FILE shrinks meanwhile, 1 if
    the connection is lost or (--idle-timeout) no byte moves for that long."""
    method = method_value(method)
    where = address(target, listen=False, option="ADDR")
    start = parse_size(offset, "--offset", exact=True)
    count = parse_size(length, "--length", exact=True) if length is not None else None
    config = SendConfig(method=method, pipe_size=pipe_size_value(pipe_size), rate_limit=rate_value(rate_limit),
                        linger=linger, idle_timeout=idle_timeout or None)
    setup_logging(verbose, quiet)
    flow = Flow()

    async def main() -> None:
        fd, size = open_file(file)
        try:
            first, total = span(size, start, count)
            # A file that reports size 0 (procfs) is sent to its EOF: no total to show.
            label = shown(os.path.basename(file))  # a name with a newline or an escape: quoted
            display = Display(show_progress(progress), [(label, flow, total if size else None)])
            started = time.monotonic()
            with display.ticking():
                await send_file(fd, size, where, first, total, flow, config, connect_timeout or None)
            elapsed = time.monotonic() - started
            log.debug("sent %d bytes by %s in %.3fs (%.1f MB/s)", flow.bytes, method, elapsed,
                      flow.bytes / elapsed / 1e6 if elapsed > 0 else 0.0)
            if flow.fallback:
                log.debug("copied through user space: %s", flow.fallback)
        finally:
            os.close(fd)

    # One stream, nothing else to schedule: no trio (zcrelay.waits), which saves its import,
    # most of the CPU of sending a gigabyte.
    return run_mapped(main, with_trio=False)
