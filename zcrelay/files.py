"""`send` and `serve`: a regular file to sockets, zero-copy (policy layer).

The file is opened once; every transfer reads it at explicit offsets (splice's offset_src or
sendfile's offset), so concurrent clients share the fd without sharing a file position, and
the file position of the fd is never touched. A file that shrinks mid-transfer is noticed by
the mover (a 0 return before the expected end: no SIGBUS, unlike mmap) and ends that transfer
with direct.FileShrank; bytes past the file's end are never sent. A file that reports size 0
(procfs) is sent to its EOF instead: its size says nothing. Nor does sysfs's, a page for every
attribute: a file that ends before its size while fstat still reports that size did not shrink
(truncate(2) lowers the size first), and is sent to its EOF.

A transfer that fails or is stopped before its last byte ends with a TCP reset, not a FIN
(`abort_unless_sent`): a receiver that saw a clean end of stream took a truncated file for
the whole one. A unix socket has no reset (SO_LINGER does nothing on AF_UNIX; the kernel only
gives the peer ECONNRESET when the closing side leaves bytes *it* received unread): a unix
receiver cut short sees an ordinary end of stream, and the error says it could not be told.

With `idle_timeout`, a transfer during which no byte moves for that long (a receiver that
stopped reading) is cut short with IdleTimeout (`_Idle`), in whatever thread it runs; the rate
limit's own sleeps do not count.

After the last byte the socket's write side is shut down and whatever the peer still sends is
read and dropped until it closes (bounded by `linger`): closing with unread bytes would send a
reset, which can destroy data still queued for the peer.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import stat
import threading
import time
from contextlib import contextmanager, nullcontext
from collections.abc import Iterator
from dataclasses import dataclass

from zcrelay import direct, net, syscalls, waits
from zcrelay.addresses import Address
from zcrelay.direct import Pacer
from zcrelay.errors import NO_RESOURCES, ConnectionLost, InputFailed, StreamError, ZcrelayError
from zcrelay.logs import library_logger
from zcrelay.mover import SOURCE
from zcrelay.pipes import Pipe
from zcrelay.ratelimit import RateLimit
from zcrelay.stats import Flow
from zcrelay.syscalls import SPLICE_REFUSED

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    import trio

log = library_logger()  # "zcrelay", with its NullHandler (zcrelay.logs)

METHODS = ("splice", "sendfile")


class BadRange(ZcrelayError):
    """--offset/--length do not fit the file."""


class IdleTimeout(ConnectionLost):
    """No byte moved for SendConfig.idle_timeout seconds before the last one was sent: the
    receiver stopped reading, and the transfer was cut short (the receiver is reset, where a
    reset exists). A ConnectionLost: the CLI's exit status for a peer that stopped reading."""


@dataclass(frozen=True)
class SendConfig:
    method: str = "splice"
    pipe_size: int = 1 << 20
    rate_limit: int | None = None
    linger: float | None = 10.0  # seconds to wait for the peer's close after the last byte
    nodelay: bool = False
    # Seconds a transfer may go without a byte moving before its last byte (IdleTimeout); the
    # linger after it is bounded by `linger` alone.
    idle_timeout: float | None = None


def open_file(path: str) -> tuple[int, int]:
    """Open a regular file for sending; return (fd, size). Raises InputFailed with a message
    naming the path: missing, unreadable, a directory, not a regular file; and the OSError
    itself when the process is out of fds or memory.

    The path is checked before it is opened, and opened with O_NONBLOCK (cleared once the fd
    is known to be a regular file) in case it was replaced in between: a plain open of a FIFO
    blocks until a writer comes, so `send FIFO` hung before the check could refuse it, and
    opening a device can act on it (a tape rewinds). O_NOCTTY: nor may a terminal become ours."""
    try:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode) and not stat.S_ISREG(st.st_mode):
            raise InputFailed(f"{shown(path)}: not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except IsADirectoryError:
        raise InputFailed(f"{shown(path)}: is a directory") from None
    except OSError as exc:
        if exc.errno in NO_RESOURCES:
            raise  # out of fds or memory: the process's state, not the file's (exit code 7)
        raise InputFailed(f"cannot open {shown(path)}: {os.strerror(exc.errno or errno.EIO)}") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise InputFailed(f"{shown(path)}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputFailed(f"{shown(path)}: not a regular file")
    os.set_blocking(fd, True)
    return fd, st.st_size


def shown(path: str) -> str:
    """`path` for a message: as it is when printable, else quoted with escapes ('a\\nb',
    '\\xff'), so that an error stays one line and a name cannot drive the terminal."""
    return path if path.isprintable() else repr(os.fsencode(path))[1:]


def span(size: int, offset: int, length: int | None) -> tuple[int, int | None]:
    """(offset, length) checked against the file's size; length None means to the end. A
    file that reports size 0 is sent whole, to its EOF (length None: see transfer); a span of
    it cannot be checked, so a non-zero --offset or --length is refused."""
    if size == 0 and (offset > 0 or length):
        raise BadRange("the file reports size 0 (empty, or a procfs file whose size is unknown): "
                       "--offset and --length need a known size")
    if offset > size:
        raise BadRange(f"--offset {offset} is past the end of the file ({size} bytes)")
    if length is None:
        return offset, (size - offset) if size else None
    if offset + length > size:
        raise BadRange(f"--offset {offset} --length {length} goes past the end of the file "
                       f"({size} bytes)")
    return offset, length


async def transfer(fd: int, sock: net.AnySocket, offset: int, length: int | None, flow: Flow,
                   config: SendConfig) -> None:
    """Send bytes [offset, offset + length) of `fd` to `sock` (length None: to EOF), then
    half-close and wait for the peer to close (at most config.linger seconds). Raises
    FileShrank, InputFailed or ConnectionLost. Closes nothing.

    A file that reports size 0 is sent with length None (span and `serve` give it so):
    procfs files report 0 and have content, and sending 0 bytes of /proc/self/status with exit
    status 0 was a silent lie. An empty file ends at once all the same."""
    pacer: Pacer | None = RateLimit(config.rate_limit) if config.rate_limit else None
    idle = _Idle(config.idle_timeout, flow, length, pacer) if config.idle_timeout else None
    pacer = idle if idle is not None and pacer is not None else pacer
    # Nothing else runs in this process: let the kernel wait inside each send, as socat's
    # write(2) does, instead of EAGAIN, poll and retry (fewer syscalls and wake-ups). Not with
    # an idle timeout: a blocking send returns (and counts its bytes) only when done, so a
    # slow receiver looked idle for as long as one call took. Nor would SO_SNDTIMEO make a
    # blocking send the idle clock: it bounds the time one sendmsg waits in all, and splice
    # goes on through the partial sends; a receiver that stopped reading was seen 3 to 4
    # timeouts late (6.18, splice and sendfile), then the mover polled for ever on the EAGAIN.
    blocking = waits.blocking() and idle is None  # `sock` is then a stdlib socket (net.connect)
    if blocking:
        assert isinstance(sock, socket.socket)  # net.connect's without trio
        sock.setblocking(True)
    try:
        with idle.watching(sock) if idle is not None else nullcontext():
            if length is None:
                await _send_to_eof(fd, sock.fileno(), offset, flow, config, pacer)
            else:
                try:
                    await _send_span(fd, sock.fileno(), offset, length, flow, config, pacer)
                except direct.FileShrank as exc:
                    if os.fstat(fd).st_size <= exc.reached:
                        raise
                    # Not shrunk: its size said more than it holds (sysfs: a page). Its EOF is its end.
    except StreamError as exc:
        if exc.role == SOURCE:
            raise InputFailed(f"reading the file: {os.strerror(exc.errno)}") from None
        total = "" if length is None else f" of {length}"
        # flow.bytes is what the kernel took, not what the receiver read: what was in flight
        # at a reset is lost. Read as "received", it made `--offset N` resume past a hole.
        raise ConnectionLost(f"connection lost ({_why(exc.errno, sock)}): sent {flow.bytes}{total} "
                             f"bytes, of which the receiver may have read fewer") from None
    finally:
        if blocking:
            assert isinstance(sock, socket.socket)
            sock.setblocking(False)  # the linger below waits with a deadline
    flow.end = "eof"
    # Every byte is with the kernel now. A reset from here on, instead of the peer's FIN, means
    # the peer closed before it read them all (Linux resets a connection that receives bytes
    # after its close, or is closed with bytes unread): they were lost, and `send` said 0.
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:  # ENOTCONN: the reset came first; SO_ERROR still holds it
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or exc.errno or errno.EIO
        raise _lost_after_the_last_byte(flow, err) from None
    try:
        # Not bounded by the idle timeout: the linger is how a reset after the last byte (a
        # receiver that did not read it all) is told from a clean end, and --linger says how
        # long that is worth waiting for.
        with waits.move_on_after(config.linger if config.linger is not None else math.inf):
            await direct.drain_discard(sock.fileno())
    except StreamError as exc:
        raise _lost_after_the_last_byte(flow, exc.errno) from None


@contextmanager
def abort_unless_sent(sock: net.AnySocket, flow: Flow) -> Iterator[None]:
    """Inside the owner's `with sock:`: if the block raises (a failure, a cancellation, a
    Ctrl-C) before transfer has handed over the last byte, make the close a reset (net.abort).
    A FIN there told the receiver the stream was complete: `zcrelay listen > out`, nc or a
    client of serve got a truncated file and exit status 0. After the last byte (the linger)
    the FIN has been sent already and the close stays a close. A signal that kills the process
    by its default action (SIGTERM on send, SIGHUP) raises nothing here: the CLI's handler asks
    abort_in_flight first."""
    _in_flight[sock] = flow
    try:
        yield
    except BaseException as exc:
        if flow.end != "eof":
            net.abort(sock)
            if sock.family == socket.AF_UNIX and isinstance(exc, _UNTOLD):
                # No reset on AF_UNIX: the receiver, still there, takes our close for the end.
                exc.args = (f"{exc}; {UNIX_UNTOLD}",)
        raise
    finally:
        del _in_flight[sock]


UNIX_UNTOLD = ("the receiver is on a unix socket, which cannot be reset: it sees an ordinary end "
               "of stream")
# The failures of ours that leave a receiver that is still there (a reset or a peer that went
# away needs no telling): their message says so on a unix socket.
_UNTOLD = (direct.FileShrank, InputFailed, IdleTimeout)


_in_flight: dict[net.AnySocket, Flow] = {}  # sockets inside abort_unless_sent, and their flows


def abort_in_flight() -> None:
    """Make the close of every transfer not yet at its last byte a reset: the process is about
    to die of a signal (zcrelay.cli.common.terminated), and the kernel's close would send a FIN,
    which told the receiver a truncated file was whole."""
    for sock, flow in list(_in_flight.items()):
        if flow.end != "eof":
            net.abort(sock)


# The name of _Idle's watchdog thread (without trio), one per transfer with an idle timeout.
IDLE_WATCHDOG = "zcrelay idle timeout"


class _Idle:
    """SendConfig.idle_timeout while a span is sent: IdleTimeout once no byte has moved for
    `seconds`. It also stands in for the rate limit's pacer (same `chunk` and `spent`), so that
    the pacer's sleeps, which are ours and not the receiver's, stop the clock.

    In a trio run (serve) a cancel scope whose deadline each chunk pushes back, as the relay's
    idle timeout. Without trio (send: zcrelay.waits) nothing can push back the deadline of a
    wait already begun, so a watchdog thread keeps the time (`_watchdog`): once no byte has
    moved for `seconds`, it cuts the connection off (net.cut_off: a TCP reset), which ends
    whatever wait the transfer is in, a poll or a send, with an error that watching() turns
    into IdleTimeout. No signal: it works in any thread, where SIGALRM, the clock before,
    worked in the main thread only (Python runs signal handlers there). As with SIGALRM, a read
    of the file that hangs that long counts as idle too: no byte moved (`send` reads regular
    files only, never a pipe that may wait for a writer)."""

    def __init__(self, seconds: float, flow: Flow, length: int | None,
                 pacer: Pacer | None) -> None:
        self.seconds = seconds
        self.flow = flow
        self.length = length
        self.pacer = pacer
        self.chunk = pacer.chunk if pacer is not None else 0
        # When a byte last moved, by time.monotonic: the watchdog reads it from its own thread
        # (one float, written whole under the GIL).
        self.last = time.monotonic()
        self.pausing = False  # in the pacer's sleep
        self._scope: trio.CancelScope | None = None  # trio's cancel scope (trio mode)

    def moved(self, _n: int) -> None:
        self.last = time.monotonic()
        if self._scope is not None:
            self._scope.deadline = waits.current_time() + self.seconds

    def expired(self) -> IdleTimeout:
        total = "" if self.length is None else f" of {self.length}"
        return IdleTimeout(f"no byte moved for {self.seconds:g}s (idle timeout): sent {self.flow.bytes}"
                           f"{total} bytes, of which the receiver may have read fewer")

    async def spent(self, n: int) -> None:
        """The pacer's wait, outside the idle clock."""
        assert self.pacer is not None
        self.pausing = True
        if self._scope is not None:
            self._scope.deadline = math.inf
        try:
            await self.pacer.spent(n)
        finally:
            self.pausing = False
            self.moved(0)

    @contextmanager
    def watching(self, sock: net.AnySocket) -> Iterator[None]:
        previous = self.flow.on_bytes

        def on_bytes(n: int) -> None:
            self.moved(n)
            if previous is not None:
                previous(n)

        self.flow.on_bytes = on_bytes
        self.moved(0)
        try:
            if waits.blocking():
                assert isinstance(sock, socket.socket)  # net.connect's without trio
                with self._watchdog(sock):
                    yield
            else:
                import trio

                with trio.CancelScope(deadline=waits.current_time() + self.seconds) as scope:
                    self._scope = scope
                    yield
                if scope.cancelled_caught:
                    raise self.expired()
        finally:
            self._scope = None
            self.flow.on_bytes = previous

    @contextmanager
    def _watchdog(self, sock: socket.socket) -> Iterator[None]:
        """The idle clock without trio: a thread that looks every quarter of `seconds` whether
        bytes moved, and once none has for `seconds` (the pacer's sleeps apart), cuts `sock`
        off and says so in `fired`. The transfer, in this thread, then fails (a reset, EPIPE),
        or finishes if the last byte was already with the kernel: either way IdleTimeout,
        since the receiver was reset. It cuts `sock` off only holding `lock` and before `done`
        is set, and is joined before this block ends: the owner may close `sock` then.

        A byte moved when a call of ours returned one (moved), or when the peer took one from
        the kernel's send queue (syscalls.send_queue fell). The second matters: a non-blocking socket
        polls writable only once about half its send buffer is free, so a receiver reading
        steadily, but slower than half a buffer per timeout, looked idle to our calls alone
        (4 MB of loopback buffer at 1.6 MB/s: a 0.3 s timeout cut it off). Under trio, serve's
        own sweep does the same (FileServer._notice_taken)."""
        lock = threading.Lock()
        done = threading.Event()
        fired = False

        def watch() -> None:
            nonlocal fired
            seen, _ = syscalls.look_at_queue(sock, self.flow.bytes, None)
            taken = time.monotonic()  # when the peer last took bytes (at most `step` late)
            step = max(self.seconds / 4, 0.001)
            while not done.wait(step):
                now = time.monotonic()
                seen, took = syscalls.look_at_queue(sock, self.flow.bytes, seen)
                if took:
                    taken = now
                    continue
                if self.pausing or max(self.last, taken) + self.seconds > now:
                    continue
                with lock:
                    if not done.is_set():
                        fired = True
                        net.cut_off(sock)
                return

        def stop() -> None:
            with lock:
                done.set()
            watchdog.join()

        watchdog = threading.Thread(target=watch, name=IDLE_WATCHDOG, daemon=True)
        watchdog.start()
        try:
            yield
        except StreamError:
            stop()
            if fired:
                raise self.expired() from None
            raise
        finally:
            stop()
        if fired:
            raise self.expired()


def _why(err: int, sock: net.AnySocket) -> str:
    """Why a send failed, in words. EPIPE before our FIN means the connection is gone: over TCP
    a reset (the peer's, or its answer to our bytes after it closed) whose ECONNRESET an earlier
    call took; a unix socket's peer simply closed (as zcrelay.pipeline._why says it)."""
    if err == errno.EPIPE:
        return "reset by the peer" if sock.family != socket.AF_UNIX else "closed by the peer"
    if err == errno.ECONNRESET:
        return "reset by the peer"
    return os.strerror(err).lower()


def _lost_after_the_last_byte(flow: Flow, err: int) -> ConnectionLost:
    return ConnectionLost(f"connection lost after the last of {flow.bytes} bytes, before the peer "
                          f"closed (it may not have read them all): {os.strerror(err).lower()}")


async def _send_span(fd: int, sock: int, offset: int, length: int, flow: Flow, config: SendConfig,
                     pacer: Pacer | None) -> None:
    """Send bytes [offset, offset + length) zero-copy where the file allows it. Some files
    refuse splice and sendfile (EINVAL) before the first byte, sized or not (/proc/PID's files,
    /proc/config.gz): then the span is read at explicit offsets (serve's clients share the fd)
    and written through user space, a fallback that flow.fallback names."""
    try:
        await _send_zero_copy(fd, sock, offset, length, flow, config, pacer)
        return
    except StreamError as exc:
        if exc.role != SOURCE or flow.bytes or exc.errno not in SPLICE_REFUSED:
            raise
        flow.fallback = f"{config.method} refused the file ({errno.errorcode.get(exc.errno, exc.errno)})"
    await direct.copy_file_waiting(fd, offset, length, sock, flow, pacer)


async def _send_zero_copy(fd: int, sock: int, offset: int, length: int, flow: Flow, config: SendConfig,
                          pacer: Pacer | None) -> None:
    if config.method == "sendfile":
        await direct.send_file_sendfile(fd, sock, offset, length, flow, pacer)
        return
    pipe = Pipe.open(min(config.pipe_size, max(length, 4096)))
    try:
        await direct.send_file_splice(fd, sock, offset, length, pipe, flow, pacer)
    finally:
        pipe.close()  # ours alone, never pooled: it may hold bytes after an error


# A length no file reaches: the movers take a span and end at EOF with FileShrank.
_TO_EOF = 1 << 62


async def _send_to_eof(fd: int, sock: int, offset: int, flow: Flow, config: SendConfig,
                       pacer: Pacer | None) -> None:
    """Send from `offset` to EOF (a file whose size says nothing: procfs's 0)."""
    try:
        await _send_span(fd, sock, offset, _TO_EOF, flow, config, pacer)
    except direct.FileShrank:
        return  # EOF: the end of a file of unknown size


async def send(path_fd: int, size: int, address: Address, offset: int, length: int | None,
               flow: Flow, config: SendConfig, connect_timeout: float | None) -> int:
    """Connect to `address` and send the span (to EOF for a file that reports size 0); return
    the bytes sent."""
    offset, length = span(size, offset, length)
    sock = await net.connect(address, connect_timeout)
    with sock, abort_unless_sent(sock, flow):
        if config.nodelay:
            net.set_nodelay(sock)
        await transfer(path_fd, sock, offset, length, flow, config)
    return flow.bytes
