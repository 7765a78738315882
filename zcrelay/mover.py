"""The async mover: moves one direction of a stream in the calling task (files, pipelines,
captures). With zcrelay.reactor, which moves relay streams, it is the code that waits on fds.

Every loop tries the syscall first and waits only on EAGAIN (BlockingIOError); every errno that
is not EAGAIN is translated once, by zcrelay.errors.translate, into a stream error naming the
side that failed. Every function here is a checkpoint even when nothing blocked, so a loopback
stream that never sees EAGAIN still yields to other connections and can be cancelled.

Names follow Go's splice path (src/internal/poll/splice_linux.go): `drain` moves source→pipe,
`pump` moves pipe→destination.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable

from zcrelay import syscalls, waits
from zcrelay.errors import OutOfResources, SpliceRefused, translate
from zcrelay.pipes import Pipe, PipePool
from zcrelay.stats import Flow
from zcrelay.waits import checkpoint, wait_readable, wait_writable

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    import socket

SOURCE = "source"
DESTINATION = "destination"

# A stream that never has to wait still yields to the scheduler after this many bytes. A trio
# checkpoint costs as much CPU as a 1 MiB splice pair on loopback (measured with strace -c and
# py-spy: one scheduler pass per drain/pump cycle was half of zcrelay's CPU per GB), so yielding
# every cycle doubled the cost; at ~1 GB/s, 4 MiB is still a yield every few milliseconds.
YIELD_EVERY = 4 << 20

# The reason a TCP urgent byte is counted as copied: splice cannot pass it (see
# syscalls.read_urgent_byte), so it is read and put into the pipe in its place.
URGENT_BYTE = "urgent byte copied (TCP MSG_OOB)"

# The user-space fallback's buffer. 256 KiB: large enough that the copy path is not limited by
# syscall count on loopback, small enough to stay in L2 on this machine.
COPY_BUFSIZE = 256 * 1024


async def splice_stream(src: int, dst: int, pool: PipePool, flow: Flow,
                        max_chunk: int = syscalls.MAX_SPLICE_AT_ONCE,
                        on_drained: Callable[[Pipe], Awaitable[None]] | None = None) -> None:
    """Move bytes src → pipe → dst with splice(2) until src reaches EOF, then return.

    The caller owns src and dst and decides what EOF means (half-close, close). Bytes moved are
    added to `flow.spliced`.

    Invariant: at the top of each turn this stream holds no pipe, or an empty one. A drain fills
    the pipe once; the pump empties it completely before the next drain. So bytes leave in the
    order they came, and EAGAIN on the drain can only mean "source empty" (the pipe is empty);
    on the pump it can only mean "destination full" (the pipe holds bytes).

    Raises SpliceRefused, with nothing lost, when splice refuses the fd pair (or no pipe can be
    had) before the first byte has moved: the caller may fall back to copy_stream. If the
    destination refuses after the source already gave bytes, those bytes are written through
    user space first (counted as copied), so the fallback keeps every byte in order. Any other
    failure raises a StreamError. Cancellation at any await is safe: a pipe still holding bytes
    is destroyed, never pooled.

    `on_drained(pipe)`, if given, runs after each drain and before its pump, with `pipe.held`
    exact: the capture tees the chunk there (tee(2) consumes nothing, so the pump still moves
    every byte).
    """
    # The hot loop: one drain and one pump a cycle, so every line here runs once per chunk.
    # Locals instead of attribute lookups, and the pump inlined (no coroutine per chunk): with
    # 1 MiB pipes the interpreter's share of the CPU per GB was as large as the kernel's.
    splice = syscalls.splice_unchecked  # every count below is <= MAX_SPLICE_AT_ONCE
    flags = syscalls.SPLICE_F_NONBLOCK
    max_chunk = min(max_chunk, syscalls.MAX_SPLICE_AT_ONCE)
    add = flow.add_spliced
    pipe: Pipe | None = None
    moved = False
    marks = True  # src may stop at a TCP urgent mark (until SIOCATMARK says it cannot)
    unyielded = 0  # bytes moved since this stream last let other tasks run
    try:
        while True:
            if pipe is None:
                pipe = _get_pipe(pool, moved)
            urgent = False
            try:
                n = splice(src, pipe.w, max_chunk, None, None, flags)
            except BlockingIOError:
                n = -1
            except OSError as exc:
                if not moved and exc.errno in syscalls.SPLICE_REFUSED:
                    raise SpliceRefused(exc.errno, SOURCE) from exc
                raise translate(exc, SOURCE, "splice") from exc
            if n <= 0 and marks:  # EAGAIN or 0, or an urgent mark? (urgent_into_pipe)
                n, urgent, marks = urgent_into_pipe(src, pipe, n)
            if n < 0:
                # The pipe is empty, so the source is: give the pipe back while we wait,
                # an idle stream holds no pipe.
                pool.put(pipe)
                pipe = None
                await wait_readable(src)
                continue
            if n == 0:
                await checkpoint()
                return
            # Pump: the pipe holds bytes, so EAGAIN can only mean the destination is full.
            # pipe.held is kept exact across every await, for the finally below.
            held = pipe.held = n
            if on_drained is not None:
                await on_drained(pipe)
            waited = False
            while held:
                try:
                    m = splice(pipe.r, dst, held, None, None, flags)
                except BlockingIOError:
                    pipe.held = held
                    await wait_writable(dst)
                    waited = True
                    continue
                except OSError as exc:
                    pipe.held = held
                    if not moved and held == n and exc.errno in syscalls.SPLICE_REFUSED:
                        await _flush_by_copy(pipe, dst, flow)
                        raise SpliceRefused(exc.errno, DESTINATION) from exc
                    raise translate(exc, DESTINATION, "splice") from exc
                if m == 0:  # the pipe holds bytes: a zero means someone else took them
                    raise RuntimeError(f"{pipe!r} was emptied behind the mover's back")
                held -= m
                add(m)
            pipe.held = 0
            moved = True
            if urgent:
                urgent_byte_copied(flow, pumped=True)
            if waited:
                unyielded = 0
            else:
                unyielded += n
                if unyielded >= YIELD_EVERY:
                    await checkpoint()
                    unyielded = 0
    finally:
        if pipe is not None:
            flow.owed = pipe.held  # cancelled mid-pump: bytes the destination never gets
            pool.put(pipe)


def take_urgent_byte(src: int) -> bytes | None:
    """The TCP urgent byte `src` stands at, read inline (syscalls.read_urgent_byte); b"" if
    it stands at none; None if it can have none (a pipe, a file, a Unix socket: ask no more).
    For a drain that met EAGAIN or 0, which at an urgent mark mean neither "empty" nor EOF."""
    try:
        return syscalls.read_urgent_byte(src)
    except OSError as exc:
        if exc.errno in syscalls.NO_URGENT_DATA:
            return None
        raise translate(exc, SOURCE, "recv") from exc


def urgent_into_pipe(src: int, pipe: Pipe, n: int) -> tuple[int, bool, bool]:
    """After a drain of `src` into the empty `pipe` met EAGAIN (n -1) or 0: that may be a TCP
    urgent mark, which splice never passes, and the rest of the stream would stall or be cut
    off as if at EOF. The byte is put into the pipe, in its place. Returns (bytes now in the
    pipe, whether an urgent byte is among them, whether `src` can have urgent marks at all)."""
    byte = take_urgent_byte(src)
    if not byte:
        return n, False, byte is not None
    os.write(pipe.w, byte)  # one byte into an empty pipe: never blocks
    return 1, True, True


def urgent_byte_copied(flow: Flow, pumped: bool = False) -> None:
    """Count a passed urgent byte as copied. `pumped`: it went through the pipe, and the pump
    counted it as spliced, but it came through user space."""
    if pumped:
        flow.spliced -= 1
    flow.copied += 1
    flow.fallback = flow.fallback or URGENT_BYTE


def _get_pipe(pool: PipePool, moved: bool) -> Pipe:
    try:
        return pool.get()
    except OSError as exc:
        if not moved:
            # Before the first byte a missing pipe is a refusal like any other: copy instead.
            raise SpliceRefused(exc.errno or 0, "pipe") from exc
        raise OutOfResources("pipe", exc.errno or 0, "pipe2") from exc


async def pump(pipe: Pipe, dst: int, flow: Flow) -> bool:
    """Empty `pipe` into `dst`; return whether it had to wait for `dst`.

    Invariant: `pipe.held > 0` on entry and 0 on return. Since the pipe holds bytes, EAGAIN
    means the destination is full. OSErrors other than EAGAIN propagate raw: the caller knows
    whether this is the first byte and translates them.
    """
    waited = False
    while pipe.held:
        try:
            m = syscalls.splice(pipe.r, dst, pipe.held)
        except BlockingIOError:
            await wait_writable(dst)
            waited = True
            continue
        if m == 0:  # pipe.held says bytes are there: a zero means someone else took them
            raise RuntimeError(f"{pipe!r} was emptied behind the mover's back")
        pipe.held -= m
        flow.add_spliced(m)
    return waited


async def _flush_by_copy(pipe: Pipe, dst: int, flow: Flow) -> None:
    """Write what `pipe` holds to `dst` through user space (dst refused splice)."""
    while pipe.held:
        data = os.read(pipe.r, pipe.held)
        pipe.held -= len(data)
        await write_all(dst, memoryview(data), flow)


async def connect(sock: socket.socket, sockaddr) -> None:
    """Connect a non-blocking socket: try at once, wait for writability only on EINPROGRESS.

    Raises OSError with the connect's errno (ECONNREFUSED...). The caller owns `sock` and closes
    it on failure or cancellation.
    """
    import socket  # here: `zcrelay tee` imports this module and never connects

    err = sock.connect_ex(sockaddr)
    delay = 0.0
    while err == errno.EAGAIN and sock.family == socket.AF_UNIX:
        # A Unix listener whose backlog is full answers EAGAIN, not EINPROGRESS, and offers
        # nothing to wait on: back off and retry (the caller's connect timeout bounds this).
        delay = unix_retry_delay(delay)
        await waits.sleep_until(waits.current_time() + delay)
        err = sock.connect_ex(sockaddr)
    if err == errno.EINPROGRESS:
        await wait_writable(sock.fileno())
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    else:
        await checkpoint()
    if err:
        raise OSError(err, os.strerror(err))


def unix_retry_delay(previous: float) -> float:
    """The next wait before retrying a connect that a full Unix backlog refused with EAGAIN:
    5 ms, doubling up to 200 ms (previous 0: the first retry)."""
    return min(2 * previous, 0.2) if previous else 0.005


async def copy_stream(src: int, dst: int, flow: Flow, bufsize: int = COPY_BUFSIZE,
                      on_read: Callable[[memoryview], Awaitable[None]] | None = None) -> None:
    """Move bytes src → user space → dst until src reaches EOF, then return.

    The fallback path: two copies per byte, counted in `flow.copied`. Used only when splice was
    refused before the first byte moved, or turned off. `on_read(chunk)`, if given, runs on
    each chunk before it is written (the capture writes it to its file there).
    """
    buf = bytearray(bufsize)
    view = memoryview(buf)
    while True:
        try:
            n = os.readv(src, [buf])
        except BlockingIOError:
            await wait_readable(src)
            continue
        except OSError as exc:
            raise translate(exc, SOURCE, "read") from exc
        if n == 0:
            await checkpoint()
            return
        copied = flow.copied
        try:
            if on_read is not None:
                await on_read(view[:n])
            waited = await write_all(dst, view[:n], flow)
        except BaseException:
            flow.owed = n - (flow.copied - copied)  # read, then cancelled or failed: never sent
            raise
        if not waited:
            await checkpoint()


async def write_all(dst: int, data: memoryview, flow: Flow) -> bool:
    """Write all of `data` to `dst`, counting each write as copied as it returns (a write cut
    short by a cancellation is counted for what it wrote); return whether it had to wait."""
    waited = False
    sent = 0
    while sent < len(data):
        try:
            m = os.write(dst, data[sent:])
        except BlockingIOError:
            await wait_writable(dst)
            waited = True
            continue
        except OSError as exc:
            raise translate(exc, DESTINATION, "write") from exc
        sent += m
        flow.add_copied(m)
    return waited
