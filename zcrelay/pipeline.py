"""`connect` and `listen`: one socket joined to stdin and stdout, as netcat does (policy layer).

What a pipeline gets:
- stdin → socket and socket → stdout at once, each direction by the cheapest way its fds allow
  (`plan`): a pipe is spliced straight to or from the socket; a regular file goes through one
  pipe of ours with splice, using the file position; anything else (a terminal, a device, an
  fd that refuses splice) is copied through user space, and the reason is recorded;
- at EOF on stdin the socket's write side is shut down and the socket is read until the peer
  closes (netcat's -N as the default); `shutdown=False` leaves the write side open;
  `close_after` bounds how long the connection lives after stdin's EOF;
- `linger` bounds how long a half-closed connection (either direction ended) may go without a
  byte moving the other way: `listen -k` with an open, idle stdin moves on to its next client;
- when stdin is a terminal, the peer closing its side ends the pipeline (nobody will type ^D
  for a transfer that is over);
- failures come out as one exception each (InputFailed, OutputClosed, OutputFailed,
  ConnectionLost), never an errno;
- a lost connection loses no byte already received: what the peer sent before the failure,
  whether in a buffer of ours or still in the socket's receive queue (Linux keeps a reset
  connection's queue readable, then reports the reset), reaches stdout, in order, before
  ConnectionLost is raised.

Inherited stdio keeps its blocking mode: nothing here sets O_NONBLOCK on it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from dataclasses import dataclass

import trio

from zcrelay import direct, syscalls
from zcrelay.errors import (ConnectionLost, InputFailed, OutputClosed, OutputFailed,  # noqa: F401 (re-exported)
                            PeerGone, SpliceRefused, StreamError, ZcrelayError)
from zcrelay.logs import log
from zcrelay.mover import SOURCE
from zcrelay.pipes import Pipe
from zcrelay.ratelimit import RateLimit
from zcrelay.stats import Flow

STDIN = 0
STDOUT = 1


@dataclass(frozen=True)
class PipelineConfig:
    shutdown: bool = True  # shut down the socket's write side at stdin EOF
    close_after: float | None = None  # seconds the connection may live after stdin EOF
    splice: bool = True
    pipe_size: int = 1 << 20  # for regular-file stdio, and to grow inherited stdio pipes
    rate_limit: int | None = None  # bytes per second, per direction
    # Seconds a half-closed connection may go without a byte moving the other way (None: no
    # limit); checked a quarter of it apart, so it ends 1 to 1.25 times this after the last byte.
    linger: float | None = None


@dataclass(frozen=True)
class Plan:
    """How one stdio fd will be moved: "direct" (a pipe, spliced to/from the socket),
    "file" (a regular file, through a pipe of ours), or "copy" (with `reason`)."""

    method: str
    reason: str = ""
    is_tty: bool = False

    def describe(self) -> str:
        return {"direct": "splice (pipe <-> socket)", "file": "splice (file <-> pipe <-> socket)"}.get(
            self.method, f"copy ({self.reason})")


def plan(fd: int, output: bool, splice: bool = True) -> Plan:
    """Decide how to move `fd`. Raises nothing: an fd that cannot even be fstat'ed is copied and
    fails on first use with a proper error."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        return Plan("copy", f"fstat: {os.strerror(exc.errno or errno.EIO)}")
    tty = os.isatty(fd)
    if tty:
        return Plan("copy", "a terminal cannot splice", True)
    if not splice:
        return Plan("copy", "splice disabled")
    if stat.S_ISFIFO(mode):
        return Plan("direct")
    if stat.S_ISREG(mode):
        if output and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            # splice(2) into an O_APPEND file gives EINVAL (shared/SPLICE.md): copy from the start.
            return Plan("copy", "stdout is in append mode (>>), which splice refuses")
        return Plan("file")
    kind = ("a socket" if stat.S_ISSOCK(mode) else "a character device" if stat.S_ISCHR(mode)
            else "not a pipe or a file")
    return Plan("copy", f"{'stdout' if output else 'stdin'} is {kind}")


def grow_pipe(fd: int, size: int) -> int | None:
    """Grow an inherited stdio pipe towards `size` (allowed on a pipe we did not create, and
    worth it: a 64 KiB pipe halves splice throughput, shared/SPLICE.md). Best effort: returns
    the size obtained, None if it could not be changed."""
    try:
        if syscalls.pipe_size(fd) >= size:
            return None
        return syscalls.set_pipe_size(fd, size)
    except OSError:
        return None


async def move(src: int, dst: int, how: Plan, socket_role: str, flow: Flow,
               config: PipelineConfig) -> None:
    """Move src → dst until EOF on src, by `how`; fall back to a copy if splice refuses the fds
    before the first byte (the reason lands in `flow.fallback`)."""
    pacer = RateLimit(config.rate_limit) if config.rate_limit else None
    if how.method == "direct":
        try:
            await direct.splice_direct(src, dst, flow, socket_role, pacer)
            return
        except SpliceRefused as exc:
            flow.fallback = exc.reason
    elif how.method == "file":
        pipe = Pipe.open(config.pipe_size)
        try:
            await direct.splice_via_pipe(src, dst, pipe, flow, pacer)
            return
        except SpliceRefused as exc:
            flow.fallback = exc.reason
        finally:
            pipe.close()  # ours alone, never pooled: it may hold bytes after an error
    else:
        flow.fallback = how.reason
        # A TCP socket handed as stdin (inetd, systemd's Accept=yes) lacks SO_OOBINLINE: a
        # copy would read past each urgent byte, which the kernel skips. Inline from the first
        # read, it stays in its place (nothing for other fds; our own sockets have it already).
        syscalls.set_urgent_inline(src)
    await direct.copy_waiting(src, dst, flow, pacer)


@dataclass
class PipelineEnd:
    """How a pipeline ended: "eof" (both directions done), "peer-closed" (the peer closed while
    stdin was a terminal), "close-after" (the --close-after deadline fired) or "linger" (half
    closed, no byte moved for --linger seconds)."""

    reason: str


class _State:
    def __init__(self, scope: trio.CancelScope, sock: trio.socket.SocketType) -> None:
        self.scope = scope  # both directions
        self.sending = trio.CancelScope()  # the sending direction alone
        self.receiving = True  # until the receiving direction has stopped
        self.sock = sock
        self.error: ZcrelayError | None = None
        self.lost: str | None = None  # why the connection was lost (the first failure's errno)
        self.end: str | None = None

    def fail(self, error: ZcrelayError) -> None:
        """A local failure (stdin, stdout): both directions stop at once."""
        if self.error is None and self.lost is None:
            self.error = error
        self.scope.cancel()

    def lose(self, why: str) -> None:
        """The connection failed: ConnectionLost, whose message is written once both tasks
        have stopped, with each direction's final count (see _lost).

        Only the sending direction is stopped: nothing more can reach the peer. The receiving
        one is not cancelled (that dropped bytes): what the peer sent before the failure may
        still be on its way to stdout, in our pipe or copy buffer, or in the socket's receive
        queue, which Linux keeps readable after a reset (a read then reports the reset, or 0
        once another call took the error). It runs until the socket has nothing left. Shutting
        down the read side bounds that to what the kernel holds now when the failure left the
        connection up (on a reset one it changes nothing); as at any EOF, stdout's reader
        decides how long writing it out takes. Runs once, on the error path: no cost per chunk."""
        if self.error is None and self.lost is None:
            self.lost = why
        self.sending.cancel()
        if self.receiving:
            log.debug("connection lost while sending (%s): writing out what was already received", why)
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # ENOTCONN on a reset connection, which reads as shut down already


async def run_pipeline(sock: trio.socket.SocketType, config: PipelineConfig, up: Flow, down: Flow,
                       stdin_plan: Plan, stdout_plan: Plan, stdin: int = STDIN,
                       stdout: int = STDOUT) -> PipelineEnd:
    """Join `sock` to stdin (→ `up`) and stdout (← `down`) until both directions are done.

    Closes nothing: the caller owns `sock` and the stdio fds. Raises InputFailed, OutputClosed,
    OutputFailed or ConnectionLost.
    """
    fd = sock.fileno()
    with trio.CancelScope() as scope:
        state = _State(scope, sock)

        async def sending() -> None:
            with state.sending:  # lose() stops it
                try:
                    await move(stdin, fd, stdin_plan, "destination", up, config)
                except StreamError as exc:
                    if exc.role == SOURCE:
                        state.fail(InputFailed(f"reading stdin: {os.strerror(exc.errno)}"))
                    else:
                        state.lose(_why(exc.errno, sock))
                    return
                # A splice into a socket that was just reset can return 0, which reads as EOF on
                # stdin: before our FIN, a TCP socket in CLOSE was reset (syscalls.tcp_closed).
                if syscalls.tcp_closed(sock):
                    state.lose(_why(_pending_error(sock), sock))
                    return
                up.end = "eof"
                if config.shutdown:
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError as exc:
                        # ENOTCONN: the connection died before our FIN (a reset just after the
                        # check above), and the receiving side may never hear of it.
                        if exc.errno == errno.ENOTCONN:
                            state.lose(_why(_pending_error(sock), sock))
                            return
                if config.close_after is not None:
                    scope.deadline = min(scope.deadline, trio.current_time() + config.close_after)

        async def receiving() -> None:
            try:
                await move(fd, stdout, stdout_plan, SOURCE, down, config)
            except StreamError as exc:
                state.receiving = False
                if exc.role == SOURCE:
                    state.lose(_why(exc.errno, sock))
                elif isinstance(exc, PeerGone):
                    state.fail(OutputClosed("stdout was closed by its reader"))
                else:
                    state.fail(OutputFailed(f"writing stdout: {os.strerror(exc.errno)}"))
                return
            state.receiving = False
            if state.lost is not None:  # lost while sending: this was what had been received
                return
            if not (up.end and config.shutdown) and syscalls.tcp_closed(sock):  # before our FIN
                state.lose(_why(errno.ECONNRESET, sock))
                return
            down.end = "eof"
            if stdin_plan.is_tty and up.end is None:
                state.end = "peer-closed"
                scope.cancel()

        async def lingering(linger: float) -> None:
            """Once one direction has ended, end the connection when the other moves no byte
            for `linger` seconds. Polls: the movers pay nothing per chunk for it."""
            step = linger / 4
            seen, quiet = -1, 0.0
            while True:
                await trio.sleep(step)
                open_ = [flow for flow in (up, down) if flow.end is None]
                if len(open_) != 1:
                    continue  # both open (the movers' own end comes with both done)
                if open_[0].bytes != seen:
                    seen, quiet = open_[0].bytes, 0.0
                    continue
                quiet += step
                if quiet >= linger:
                    log.debug("half-closed and idle for %gs: closing", linger)
                    state.end = "linger"
                    scope.cancel()
                    return

        async with trio.open_nursery() as watch:
            if config.linger:
                watch.start_soon(lingering, config.linger)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sending)
                nursery.start_soon(receiving)
            watch.cancel_scope.cancel()
    if state.error is not None:
        raise state.error
    if state.lost is not None:
        raise _lost(state.lost, up, down)
    if state.end is None:
        state.end = "eof" if up.end and down.end else "close-after"
    return PipelineEnd(state.end)


def _lost(why: str, up: Flow, down: Flow) -> ConnectionLost:
    """The one message for a connection that failed under a pipeline. When the peer resets,
    both directions usually fail, and which one notices first is a race (and the kernel may
    tell only one of them), so the message never blames a single direction: it says which
    directions were still open and what each had moved, e.g. "connection lost while sending
    and receiving (reset by the peer): sent 4194304 bytes, received 6817792 bytes". A direction
    that had finished says so, as "(all of stdin)" or "(to the peer's EOF)"."""
    open_ = [name for name, flow in (("sending", up), ("receiving", down)) if flow.end is None]
    phase = f" while {' and '.join(open_)}" if open_ else ""
    sent = f"sent {up.bytes} bytes" + (" (all of stdin)" if up.end else "")
    received = f"received {down.bytes} bytes" + (" (to the peer's EOF)" if down.end else "")
    return ConnectionLost(f"connection lost{phase} ({why}): {sent}, {received}")


def _why(err: int, sock: trio.socket.SocketType) -> str:
    if err == errno.EPIPE:
        # Before our own FIN, a send fails with EPIPE only once the connection is gone. Over
        # TCP that is a reset (the peer's, or its answer to our bytes after it closed), whose
        # ECONNRESET went to the other direction or into a partial splice; a Unix socket's
        # peer simply closed.
        return "reset by the peer" if _is_tcp(sock) else "closed by the peer"
    if err == errno.ECONNRESET:
        return "reset by the peer"
    return os.strerror(err).lower()


def _pending_error(sock: trio.socket.SocketType) -> int:
    """The socket's pending error (SO_ERROR, which reading clears), ECONNRESET when none is
    left: a TCP connection that died before our FIN was reset or aborted."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
    except OSError:
        return errno.ECONNRESET


def _is_tcp(sock: trio.socket.SocketType) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)

