"""What every command shares: the one boundary from exceptions to exit codes, logging to
stderr, and parsers for option values. Only the CLI prints, exits or starts trio.

No typer import at load time (only to refuse an option value): `zcrelay tee FILE...` runs
without typer (zcrelay.cli.teepipe), and this module is on its path."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Callable, Coroutine

from zcrelay.errors import BindError, ConnectError, ZcrelayError
from zcrelay.excgroups import first_error
from zcrelay.exitcodes import ExitCode
from zcrelay.logs import configure, log

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from zcrelay.stats import Totals

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from zcrelay.addresses import Address

PROG = "zcrelay"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_LIMIT = 1 << 62  # no size here means anything near it; offsets stay in off_t


def parse_size(text: str, option: str | None = None, *, exact: bool = False) -> int:
    """'1M' → 1048576. Suffixes K, M, G, T (powers of 1024, 'KiB' and 'KB' read the same).
    `option` names the option in the error (a size parsed in the command's body has no click
    parameter to name it). A fraction of a byte ('1.1M') is rounded down, or with `exact`
    (an offset, a length) refused."""
    import re  # here, not at the top: `zcrelay tee FILE...` starts without it (zcrelay.logs)

    match = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE | re.ASCII)
    reason = "is not a size"
    if match:
        whole, fraction, unit = match.groups()
        fraction = (fraction or "").rstrip("0")
        if len(whole.lstrip("0")) + len(fraction) > 24:  # far past the limit, and int() has its own
            reason = "is too large for a size"
        else:  # in integers: a float rounded offsets past 2**53 and took "0.5" as 0 bytes
            scale = 10 ** len(fraction)
            size, part = divmod((int(whole) * scale + int(fraction or 0)) * _UNITS[unit.upper()], scale)
            if part and exact:
                reason = "is not a whole number of bytes"
            elif size >= _SIZE_LIMIT:
                reason = "is too large for a size"
            else:
                return size
    import typer

    raise typer.BadParameter(f"{text!r} {reason} (examples: 65536, 512K, 1.5M)", param_hint=option)


MIN_PIPE_SIZE = 4096  # one page


def pipe_size_value(text: str) -> int:
    """--pipe-size, for every command that takes one: at least a page (tee and demo took 0)."""
    size = parse_size(text, "--pipe-size")
    if size < MIN_PIPE_SIZE:
        import typer

        raise typer.BadParameter("the pipe size must be at least one page (4K)", param_hint="--pipe-size")
    return size


def size_option(value: str | None) -> int | None:
    return None if value is None else parse_size(value)


def address(text: str, *, listen: bool, option: str | None = None) -> Address:
    """`option` (--target, ADDR...) names the address in the error: `tee -l 0 -t nope` said only
    "Invalid value: 'nope'", not which of its two addresses was wrong."""
    from zcrelay.addresses import AddressError, parse

    try:
        return parse(text, listen=listen)
    except AddressError as exc:
        import typer

        raise typer.BadParameter(str(exc), param_hint=option) from None


def setup_logging(verbose: int, quiet: bool, *, lazy: bool = False) -> None:
    """Logs go to stderr as 'zcrelay: message'; stdout stays clean for data. `lazy`: import
    logging at the first message (zcrelay.logs), for commands that start in pipelines."""
    configure(verbose, quiet, lazy=lazy)


def say(message: str) -> None:
    """One line on stderr, whatever the log level (ready lines, summaries)."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def pipe_console(**options):
    """A rich Console that raises BrokenPipeError when its reader has gone away, for the
    command to map to BROKEN_PIPE (141), instead of rich's own SystemExit(1). rich is imported
    here, by the commands that print tables."""
    from rich.console import Console

    class PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return PipeConsole(**options)


def reader_gone(stream) -> ExitCode:
    """`stream`'s reader went away (EPIPE): point its fd at /dev/null, so what is still
    buffered cannot fail again at exit (Python's note on SIGPIPE), and end with 141 and no
    message, as a program killed by SIGPIPE would."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return ExitCode.BROKEN_PIPE


def _has_no_reader(stream) -> bool:
    """Whether `stream` is a pipe (or socket) whose reader has gone: poll reports POLLERR on
    a pipe's write end with no reader left (pipe(7)), POLLHUP on a socket shut for writing."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def error(message: str, code: ExitCode) -> ExitCode:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


def exit_code_for(exc: BaseException) -> tuple[ExitCode, str]:
    """The one place an exception becomes an exit code and a one-line message."""
    exc = first_error(exc)
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED, "interrupted"
    if isinstance(exc, BindError):
        if exc.errno == errno.EADDRINUSE:
            return ExitCode.ADDRESS_IN_USE, str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM):
            return ExitCode.PERMISSION_DENIED, str(exc)
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
            return ExitCode.NO_RESOURCES, str(exc)
        return ExitCode.ADDRESS_NOT_AVAILABLE, str(exc)
    if isinstance(exc, ConnectError):
        if exc.reason in ("out-of-fds", "out-of-memory"):  # no fd or buffer: not the target's fault
            return ExitCode.NO_RESOURCES, str(exc)
        return ExitCode.CONNECT_FAILED, str(exc)
    if isinstance(exc, ZcrelayError):
        return ExitCode.FAILURE, str(exc)
    if isinstance(exc, OSError):
        # EAGAIN gets here from fork(2) at a process limit (--workers; a non-blocking call's
        # EAGAIN never leaves its layer).
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN):
            return ExitCode.NO_RESOURCES, f"out of resources: {exc.strerror}"
        return ExitCode.FAILURE, f"{exc.strerror or exc}"
    raise exc


_interrupts = 0  # SIGINTs seen by interrupted() since start-up
_stopping = False  # a server was stopped by a signal (serve_until_signal)


def interrupted(signum: int, frame: object) -> None:
    """The CLI's SIGINT handler until a command installs its own: Python's KeyboardInterrupt, and
    a count. Raised inside a callback (a weakref's, while an import takes its module lock),
    Python prints "Exception ignored" and goes on: a Ctrl-C in start-up was lost, and a server
    came up and served. `run` checks the count before the command starts."""
    global _interrupts
    _interrupts += 1
    raise KeyboardInterrupt


def terminated(signum: int, frame: object) -> None:
    """The CLI's SIGTERM and SIGHUP handler where they were left to their default action: the
    same end (death by the signal, status 128 + signum), but first the unix:PATH socket files
    zcrelay bound are removed (a one-shot `listen`, `serve`, `listen -k` on SIGHUP), and a file
    transfer not yet at its last byte is made to end with a reset (send). A SIGTERM
    that comes while a server stops is ignored (see serve_until_signal)."""
    if _stopping and signum == signal.SIGTERM:
        return
    remove_socket_files()
    files = sys.modules.get("zcrelay.files")  # imported only by send and serve
    if files is not None:
        files.abort_in_flight()  # a file cut short: a reset, not a FIN (files.abort_unless_sent)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def remove_socket_files() -> None:
    """Remove the unix:PATH socket files this process bound (zcrelay.net), if any."""
    net = sys.modules.get("zcrelay.net")  # imported only by commands that open sockets
    if net is not None:
        net.remove_bound_socket_files()


def run(main: Callable[[], Coroutine[object, None, ExitCode | None]], *, with_trio: bool = True,
        hosted: bool = False) -> ExitCode:
    """Run `main` under trio (or, `with_trio=False`, with blocking waits and without importing
    trio: see zcrelay.waits); turn any failure into a one-line message and an exit code.

    `hosted`: trio runs as the guest of the reactor's loop (zcrelay.hosting), for commands
    whose bytes the reactor moves (forward). ZCRELAY_LOOP=trio runs them under trio.run
    instead, for tests and comparisons."""
    try:
        if signal.getsignal(signal.SIGINT) is interrupted:
            # Python's own again: trio protects its internals from KeyboardInterrupt only if
            # it finds that one installed (trio._core._ki).
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if _interrupts:  # a Ctrl-C in start-up whose KeyboardInterrupt Python swallowed
            raise KeyboardInterrupt
        if not with_trio:
            from zcrelay.waits import run_blocking

            return run_blocking(main) or ExitCode.OK
        import trio

        if not hosted or os.environ.get("ZCRELAY_LOOP") == "trio":
            return trio.run(main) or ExitCode.OK
        from zcrelay.hosting import Host

        with Host() as host:  # trio as the guest of the reactor's loop (zcrelay.hosting)
            trio.lowlevel.start_guest_run(main, run_sync_soon_threadsafe=host.call_threadsafe,
                                          run_sync_soon_not_threadsafe=host.call_soon,
                                          done_callback=host.done)
            return host.loop().unwrap() or ExitCode.OK
    except BaseException as exc:
        return failed(exc)


def failed(exc: BaseException) -> ExitCode:
    """The CLI boundary: every failure becomes a code and one line (SystemExit passes).

    A BrokenPipeError from writing our own stderr or stdout (`zcrelay demo 2>&1 | true`: the
    listening line met a reader already gone) is BROKEN_PIPE and no message, as for a program
    killed by SIGPIPE; it was exit 1, with an error line that could not be written either."""
    leaf = first_error(exc)
    if isinstance(leaf, (SystemExit, GeneratorExit)):
        raise exc
    if isinstance(leaf, BrokenPipeError):
        gone = [stream for stream in (sys.stderr, sys.stdout) if stream is not None and _has_no_reader(stream)]
        if gone:
            for stream in gone:
                reader_gone(stream)
            return ExitCode.BROKEN_PIPE
    code, message = exit_code_for(exc)
    if code == ExitCode.INTERRUPTED:
        return code
    return error(message, code)


async def serve_until_signal(start: Callable, on_ready: Callable[[object], None], *,
                             stop_fd: int | None = None) -> None:
    """Run the task `start` (which reports readiness with task_status.started(value)), call
    `on_ready(value)`, and cancel it at the first SIGINT or SIGTERM; or, given `stop_fd`
    (a worker's end of zcrelay.cli.workers' stop pipe), once that fd is readable."""
    import trio

    from zcrelay.waits import until_readable

    # The receiver is open before `start` runs, so a signal during start-up is not lost.
    receiver = trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) if stop_fd is None \
        else contextlib.nullcontext()
    global _stopping
    with receiver as signals:
        async with trio.open_nursery() as nursery:
            on_ready(await nursery.start(start))
            if signals is None:
                assert stop_fd is not None  # the receiver is the nullcontext of a stop_fd
                await until_readable(stop_fd)
            else:
                async for _ in signals:
                    break
                # Stopping: a second SIGTERM (timeout(1) sends one to its child and one to the
                # group; a service manager may repeat it) found the default action back once
                # the receiver closed, and killed the process before or during its summary
                # (status 143). The handler the receiver restores, `terminated`, now ignores
                # it, and then SIG_IGN does, which outlives Python's finalization (it puts
                # SIG_DFL back for Python-level handlers). A second SIGINT still ends it at
                # once (130, see zcrelay.cli.main).
                _stopping = True
            nursery.cancel_scope.cancel()
    if _stopping:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def spliced_share(spliced: int, copied: int) -> str:
    """"99.50% spliced", rounded so that it never reads 100.00% when a byte was copied nor
    0.00% when one was spliced (one urgent byte in 256 MiB is ">99.99%"), and "nothing moved"
    rather than a share of nothing."""
    moved = spliced + copied
    if not moved:
        return "nothing moved"
    share = 100 * spliced / moved
    if copied and share > 99.99:
        text = ">99.99"
    elif spliced and share < 0.01:
        text = "<0.01"
    else:
        text = f"{share:.2f}"
    return f"{text}% spliced"


def summary(totals: "Totals") -> str:
    """The line a server prints when it stops (forward, tee --listen, listen --keep-open)."""
    fallbacks = sum(totals.fallbacks.values())
    text = (f"stopped: {totals.connections} connections, up {totals.up} bytes, down {totals.down} "
            f"bytes, {spliced_share(totals.spliced, totals.copied)}, {fallbacks} fallbacks")
    if fallbacks:
        text += " (" + ", ".join(f"{reason}: {n}" for reason, n in totals.fallbacks.items()) + ")"
    return text
