"""`zcrelay connect`, `listen` and `serve`: netcat for pipelines, and a file to every client.

Exit codes: see zcrelay/cli/transfer.py (`send` is zcrelay/cli/send.py).
"""

from __future__ import annotations

import logging
import os
from typing import Awaitable, Callable, Optional, TypeVar

import trio
import typer

from zcrelay import net
from zcrelay.cli.app import LISTEN_FORMS, PROGRESS, TARGET, app
from zcrelay.cli.common import address, error, pipe_size_value, say, serve_until_signal, setup_logging, summary
from zcrelay.cli.progress import Display, show_progress, stdin_size
from zcrelay.cli.transfer import (CLIENT_RATE, CONNECT_TIMEOUT, FILE_PIPE_SIZE, METHOD, NO_SPLICE, PIPE_SIZE, QUIET,
                                  RATE, VERBOSE, method_value, rate_value, run_mapped)
from zcrelay.excgroups import BaseExceptionGroup, single_error
from zcrelay.exitcodes import ExitCode
from zcrelay.files import SendConfig, open_file
from zcrelay.pipeline import STDIN, STDOUT, ConnectionLost, PipelineConfig, grow_pipe, plan, run_pipeline
from zcrelay.serving import FileServer
from zcrelay.stats import Flow, Totals

log = logging.getLogger("zcrelay")


def _stdio_ready() -> ExitCode | None:
    """Before anything opens an fd: a closed stdin reads as empty (its number must not be reused
    by a socket), a closed stdout is an error."""
    try:
        os.fstat(STDIN)
    except OSError:
        os.open(os.devnull, os.O_RDONLY)  # takes fd 0, the lowest free number
    try:
        os.fstat(STDOUT)
    except OSError:
        return error("stdout is closed", ExitCode.OUTPUT_ERROR)
    return None


T = TypeVar("T")


async def _with_display(display: Display, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` beside the progress display. What `work` raises comes out as itself, not
    wrapped in the nursery's exception group, so callers can catch ConnectionLost & co."""
    with display.shown():
        try:
            async with trio.open_nursery() as nursery:
                if display.enabled:
                    nursery.start_soon(display.refresh)
                try:
                    return await work()
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            leaf = single_error(group)
            if leaf is None or leaf is group:
                raise
            raise leaf from leaf.__cause__


def _pipeline_setup(no_splice: bool, pipe_size: str, rate_limit: Optional[str], no_shutdown: bool,
                    close_after: Optional[float], linger: float):
    config = PipelineConfig(shutdown=not no_shutdown, close_after=close_after, splice=not no_splice,
                            pipe_size=pipe_size_value(pipe_size), rate_limit=rate_value(rate_limit),
                            linger=linger or None)
    stdin_plan = plan(STDIN, output=False, splice=config.splice)
    stdout_plan = plan(STDOUT, output=True, splice=config.splice)
    for fd, how in ((STDIN, stdin_plan), (STDOUT, stdout_plan)):
        if how.method == "direct":
            grow_pipe(fd, config.pipe_size)
    log.debug("stdin: %s", stdin_plan.describe())
    log.debug("stdout: %s", stdout_plan.describe())
    return config, stdin_plan, stdout_plan


async def _one_connection(sock, config, stdin_plan, stdout_plan, progress: bool, peer: str,
                          totals: Totals | None = None) -> None:
    # No Nagle: a request written in two pieces waited for the ACK of the first, which the
    # peer delays (40 ms on Linux), at every exchange; forward sets it too (no-op on Unix).
    net.set_nodelay(sock)
    up, down = Flow(), Flow()
    display = Display(progress, [("sent", up, stdin_size(STDIN)), ("received", down, None)])
    started = trio.current_time()
    try:
        end = await _with_display(display, lambda: run_pipeline(sock, config, up, down, stdin_plan, stdout_plan))
    finally:
        elapsed = trio.current_time() - started
        for name, flow in (("sent", up), ("received", down)):
            if flow.fallback:
                log.debug("%s by copy: %s", name, flow.fallback)
        log.debug("peer=%s sent=%d received=%d spliced=%d copied=%d duration=%.3fs", peer, up.bytes,
                  down.bytes, up.spliced + down.spliced, up.copied + down.copied, elapsed)
        if totals is not None:
            totals.add(up, down, "ended")
    log.debug("ended: %s", end.reason)


LINGER = typer.Option(0.0, "--linger", min=0, metavar="SECONDS",
                      help="Close a half-closed connection (one side done) after this many seconds "
                           "without a byte moving the other way (0: no limit).  \\[default: 0]",
                      show_default=False)


@app.command()
def connect(
    target: str = TARGET,
    no_shutdown: bool = typer.Option(False, "--no-shutdown", help="At stdin EOF, leave the socket's write side open (the default shuts it down, like nc -N)."),
    close_after: Optional[float] = typer.Option(None, "--close-after", min=0, metavar="SECONDS", help="Close the connection this many seconds after stdin EOF, even if the peer has not closed.", show_default=False),
    linger: float = LINGER,
    connect_timeout: float = CONNECT_TIMEOUT,
    rate_limit: Optional[str] = RATE,
    progress: Optional[bool] = PROGRESS,
    no_splice: bool = NO_SPLICE,
    pipe_size: str = PIPE_SIZE,
    verbose: int = VERBOSE,
    quiet: bool = QUIET,
) -> ExitCode:
    """Connect to ADDR; stdin goes to the socket and the socket to stdout, spliced."""
    where = address(target, listen=False, option="ADDR")
    setup_logging(verbose, quiet)
    code = _stdio_ready()
    if code is not None:
        return code
    config, stdin_plan, stdout_plan = _pipeline_setup(no_splice, pipe_size, rate_limit, no_shutdown, close_after, linger)

    async def main() -> None:
        sock = await net.connect(where, connect_timeout or None, keep_reset=True)
        with sock:
            await _one_connection(sock, config, stdin_plan, stdout_plan, show_progress(progress, (STDIN, STDOUT)), str(where))

    return run_mapped(main)


@app.command()
def listen(
    where: str = typer.Argument(..., metavar="ADDR", help=f"Where to listen: {LISTEN_FORMS}.", show_default=False),
    keep_open: bool = typer.Option(False, "--keep-open", "-k", help="After a connection ends, accept the next one (until SIGINT/SIGTERM); with an open, idle stdin, a client's close ends its connection only with --linger."),
    no_shutdown: bool = typer.Option(False, "--no-shutdown", help="At stdin EOF, leave the socket's write side open."),
    close_after: Optional[float] = typer.Option(None, "--close-after", min=0, metavar="SECONDS", help="Close the connection this many seconds after stdin EOF.", show_default=False),
    linger: float = LINGER,
    rate_limit: Optional[str] = RATE,
    progress: Optional[bool] = PROGRESS,
    no_splice: bool = NO_SPLICE,
    pipe_size: str = PIPE_SIZE,
    verbose: int = VERBOSE,
    quiet: bool = QUIET,
) -> ExitCode:
    """Accept a connection on ADDR; stdin goes to it and it goes to stdout, spliced.

    Prints "listening on HOST:PORT" on stderr once bound."""
    bind = address(where, listen=True, option="ADDR")
    setup_logging(verbose, quiet)
    code = _stdio_ready()
    if code is not None:
        return code
    config, stdin_plan, stdout_plan = _pipeline_setup(no_splice, pipe_size, rate_limit, no_shutdown, close_after, linger)
    show = show_progress(progress, (STDIN, STDOUT))

    async def accept_one(listener):
        sock, peer = await listener.accept()
        name = net.peer_name(sock, peer)
        log.debug("connection from %s", name)
        return sock, name

    totals = Totals()

    async def main() -> None:
        listener = await net.open_listener(bind, backlog=16)
        if not keep_open:
            with listener:
                say(f"listening on {net.local_name(listener)}")
                sock, name = await accept_one(listener)
            with sock:
                await _one_connection(sock, config, stdin_plan, stdout_plan, show, name)
            return

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            with listener:
                task_status.started(net.local_name(listener))
                while True:
                    sock, name = await accept_one(listener)
                    with sock:
                        try:
                            await _one_connection(sock, config, stdin_plan, stdout_plan, show, name, totals)
                        except ConnectionLost as exc:
                            log.warning("%s: %s", name, exc)

        await serve_until_signal(serve, lambda bound: say(f"listening on {bound}"))
        say(summary(totals))  # a server's summary, as the man page's SIGNALS says

    return run_mapped(main)


@app.command()
def serve(
    file: str = typer.Argument(..., metavar="FILE", help="A regular file to serve.", show_default=False),
    listen_on: str = typer.Option(..., "--listen", "-l", metavar="ADDR", help=f"Where to listen: {LISTEN_FORMS}.", show_default=False),
    method: str = METHOD,
    linger: float = typer.Option(10.0, "--linger", min=0, metavar="SECONDS", help="After the last byte, wait this long for each client to close."),
    idle_timeout: float = typer.Option(0.0, "--idle-timeout", min=0, metavar="SECONDS", help="Reset a client that goes this many seconds without a byte moving (0: never).  \\[default: 0]", show_default=False),
    rate_limit: Optional[str] = CLIENT_RATE,
    pipe_size: str = FILE_PIPE_SIZE,
    verbose: int = VERBOSE,
    quiet: bool = QUIET,
) -> ExitCode:
    """Send FILE to every client that connects to --listen, concurrently, zero-copy.

    FILE is opened for each client, so each gets it as it is then (replaced, grown or
    shrunk). One log line per connection. SIGINT or SIGTERM stop it with exit code 0."""
    method = method_value(method)
    bind = address(listen_on, listen=True, option="--listen")
    config = SendConfig(method=method, pipe_size=pipe_size_value(pipe_size), rate_limit=rate_value(rate_limit),
                        linger=linger, idle_timeout=idle_timeout or None)
    setup_logging(verbose, quiet)
    state: dict = {}

    async def main() -> None:
        os.close(open_file(file)[0])  # a missing or unreadable FILE is an error before listening
        server = FileServer(file, bind, config)
        state["server"] = server
        await serve_until_signal(server.serve, lambda bound: say(f"listening on {bound}"))

    code = run_mapped(main)
    server = state.get("server")
    if code == ExitCode.OK and server is not None:
        # The clients the stop reset mid-file are failures (they got part of the file), named
        # apart as forward's summary names its fallbacks' reasons: "3 failed (2 cut short)".
        cut_short = f" ({server.cut_short} cut short)" if server.cut_short else ""
        say(f"stopped: {server.connections} connections, {server.sent} bytes sent, "
            f"{server.failed} failed{cut_short}")
    return code
