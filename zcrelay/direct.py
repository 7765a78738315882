"""The mover for fds that are not both sockets: inherited stdio and files (mover layer).

This module sits beside zcrelay.mover, on the same layer: with it, the only code that waits on
fds. It moves bytes
- directly between a pipe and a socket with one splice(2) and no pipe of its own
  (`splice_direct`): stdin/stdout pipes of a shell pipeline;
- from a file at explicit offsets through one pipe (`send_file_splice`) or with sendfile(2)
  (`send_file_sendfile`), noticing a file that shrinks;
- through one pipe from any source to any destination (`splice_via_pipe`): regular-file stdio,
  using and advancing the file position like cat does;
- through user space when nothing else works (`copy_waiting`), asking each read and write of
  a pipe or a socket not to block (RWF_NOWAIT), and waiting for readiness before each call on
  anything else, because inherited stdio is blocking and must stay so.

Inherited stdio is never switched to O_NONBLOCK (that would change the shell's shared open file
description, trio issues 174 and 1707): SPLICE_F_NONBLOCK covers the pipe side of a splice, and
trio sockets are already non-blocking (shared/SPLICE.md).

Every errno that is not EAGAIN is translated once, by zcrelay.errors.translate, with the role of
the side that failed ("source" or "destination"). Every function is a checkpoint.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol

from zcrelay import syscalls
from zcrelay.errors import PEER_GONE, SpliceRefused, ZcrelayError, translate
from zcrelay.mover import (COPY_BUFSIZE, DESTINATION, SOURCE, pump, take_urgent_byte, urgent_byte_copied,
                           urgent_into_pipe)
from zcrelay.pipes import Pipe
from zcrelay.stats import Flow
from zcrelay.waits import checkpoint, wait_readable, wait_writable


class Pacer(Protocol):
    """Rate limiting as the loops see it: a bound on each call, and a wait after it."""

    chunk: int

    async def spent(self, n: int) -> None: ...


class FileShrank(ZcrelayError):
    """The file ended (splice or sendfile returned 0) before the expected length was sent."""

    def __init__(self, expected_end: int, reached: int) -> None:
        self.expected_end = expected_end
        self.reached = reached
        super().__init__(f"the file shrank while it was sent: it ended at byte {reached}, "
                         f"{expected_end - reached} bytes short of {expected_end}")


def _chunk(limit: int, pacer: Pacer | None) -> int:
    return min(limit, pacer.chunk) if pacer is not None else limit


async def _wait_readable(fd: int) -> None:
    """Wait until `fd` can be read. Regular files and some character devices (/dev/null) cannot
    be polled (epoll_ctl gives EPERM): they are always ready."""
    try:
        await wait_readable(fd)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise
        await checkpoint()


async def _wait_writable(fd: int) -> None:
    try:
        await wait_writable(fd)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise
        await checkpoint()


async def splice_direct(src: int, dst: int, flow: Flow, socket_role: str,
                        pacer: Pacer | None = None) -> None:
    """Move bytes src → dst with one splice(2) per chunk until src reaches EOF; one of the two
    is a pipe (a stdio pipe), the other a non-blocking socket, whose role (SOURCE or
    DESTINATION) is `socket_role`.

    Invariant: no byte is ever held by zcrelay; every byte splice reports is in dst.
    EAGAIN is ambiguous here (source empty, or destination full), and there is no pipe of ours
    whose count could tell. FIONREAD on the source tells instead: bytes waiting in the source
    mean the destination is full. A race (bytes arriving just after EAGAIN) costs one spurious
    wake-up, never a lost one: a wait on a writable dst returns at once and the splice is retried.

    Raises SpliceRefused (nothing consumed) when the first call refuses the pair; else
    StreamError subclasses naming the side.
    """
    moved = False
    marks = socket_role == SOURCE  # a TCP source may stop at an urgent mark (see mover)
    while True:
        try:
            # No SPLICE_F_MORE: like MSG_MORE it corks the last partial segment for up to
            # 200 ms, which stalls every request/response exchange over a stdin pipe.
            n = syscalls.splice(src, dst, _chunk(syscalls.MAX_SPLICE_AT_ONCE, pacer),
                                syscalls.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            n = -1
        except OSError as exc:
            if not moved and exc.errno in syscalls.SPLICE_REFUSED:
                raise SpliceRefused(exc.errno, "pipe") from exc
            raise translate(exc, _role(exc, socket_role), "splice") from exc
        if n <= 0 and marks:
            byte = take_urgent_byte(src)
            marks = byte is not None
            if byte:
                await _write_byte(dst, byte)
                urgent_byte_copied(flow)
                moved = True
                continue
        if n < 0:
            if _pending(src):
                await wait_writable(dst)
            else:
                await wait_readable(src)
            continue
        if n == 0:
            await checkpoint()
            return
        moved = True
        flow.add_spliced(n)
        if pacer is not None:
            await pacer.spent(n)
        else:
            await checkpoint()


async def _write_byte(dst: int, byte: bytes) -> None:
    """One byte into a stdio pipe (blocking, so wait for room first: a pipe that polls
    writable has a free slot, and one byte always fits in it)."""
    await wait_writable(dst)
    try:
        os.write(dst, byte)
    except OSError as exc:
        raise translate(exc, DESTINATION, "write") from exc


def _pending(fd: int) -> int:
    try:
        return syscalls.fionread(fd)
    except OSError:
        return 0


def _role(exc: OSError, socket_role: str) -> str:
    """Which side a direct splice error came from. EPIPE only comes from a destination (a pipe
    without readers, a socket shut down for writing); resets and the like from the socket; the
    rest (EIO...) from the stdio side."""
    if exc.errno == errno.EPIPE:
        return DESTINATION
    if exc.errno in PEER_GONE:
        return socket_role
    return SOURCE if socket_role == DESTINATION else DESTINATION


async def splice_via_pipe(src: int, dst: int, pipe: Pipe, flow: Flow,
                          pacer: Pacer | None = None) -> None:
    """Move bytes src → pipe → dst until src reaches EOF, using each file's own position.

    For regular-file stdio: splice with no offset reads and advances the file position of the
    shared open file description, as read(2) would, so `(zcrelay connect ...; cat) < file` hands
    the rest of the file on like any shell tool.

    Invariant: `pipe` is empty on entry and at the top of each turn (the pump empties it), so
    EAGAIN on the drain means "source empty", on the pump "destination full". The caller owns
    the pipe and destroys it if this raises (it may hold bytes then).
    Raises SpliceRefused before the first byte (the pipe then holds nothing the caller cares
    about: bytes drained but refused by dst are written out through user space first).
    """
    moved = False
    marks = True  # src may be a TCP socket that stops at an urgent mark (see mover)
    while True:
        urgent = False
        try:
            n = syscalls.splice(src, pipe.w, _chunk(pipe.size, pacer))
        except BlockingIOError:
            n = -1
        except OSError as exc:
            if not moved and exc.errno in syscalls.SPLICE_REFUSED:
                raise SpliceRefused(exc.errno, SOURCE) from exc
            raise translate(exc, SOURCE, "splice") from exc
        if n <= 0 and marks:  # EAGAIN or 0, or an urgent mark? (see mover.urgent_into_pipe)
            n, urgent, marks = urgent_into_pipe(src, pipe, n)
        if n < 0:
            await _wait_readable(src)
            continue
        if n == 0:
            await checkpoint()
            return
        pipe.held = n
        try:
            waited = await pump(pipe, dst, flow)
        except OSError as exc:
            if not moved and pipe.held == n and exc.errno in syscalls.SPLICE_REFUSED:
                while pipe.held:
                    data = os.read(pipe.r, pipe.held)
                    pipe.held -= len(data)
                    await write_waiting(dst, memoryview(data), flow)
                raise SpliceRefused(exc.errno, DESTINATION) from exc
            raise translate(exc, DESTINATION, "splice") from exc
        moved = True
        if urgent:
            urgent_byte_copied(flow, pumped=True)
        if pacer is not None:
            await pacer.spent(n)
        elif not waited:
            await checkpoint()


async def send_file_splice(file_fd: int, sock: int, offset: int, length: int, pipe: Pipe,
                           flow: Flow, pacer: Pacer | None = None) -> None:
    """Send bytes [offset, offset + length) of a file: file → pipe (explicit offsets, the file
    position is never touched) → socket.

    Invariant: the pipe is empty at the top of each turn; `position` is the next file byte to
    drain. A drain returning 0 before `offset + length` means the file shrank: FileShrank is
    raised at once, and no byte past the file's end is ever sent (splice only gives bytes that
    were in the file).
    """
    end = offset + length
    position = offset
    while position < end:
        want = _chunk(min(pipe.size, end - position), pacer)
        flags = syscalls.SPLICE_F_NONBLOCK | (syscalls.SPLICE_F_MORE if position + want < end else 0)
        try:
            n = syscalls.splice(file_fd, pipe.w, want, flags, offset_src=position)
        except BlockingIOError:  # the pipe is empty and a file does not block: cannot happen
            await checkpoint()
            continue
        except OSError as exc:
            raise translate(exc, SOURCE, "splice") from exc
        if n == 0:
            raise FileShrank(end, position)
        position += n
        pipe.held = n
        try:
            waited = await pump(pipe, sock, flow)
        except OSError as exc:
            raise translate(exc, DESTINATION, "splice") from exc
        if pacer is not None:
            await pacer.spent(n)
        elif not waited:
            await checkpoint()
    await checkpoint()


async def send_file_sendfile(file_fd: int, sock: int, offset: int, length: int, flow: Flow,
                             pacer: Pacer | None = None) -> None:
    """Send bytes [offset, offset + length) of a file with sendfile(2), no pipe at all.
    Same contract as send_file_splice."""
    end = offset + length
    position = offset
    while position < end:
        try:
            n = syscalls.sendfile(sock, file_fd, position, _chunk(end - position, pacer))
        except BlockingIOError:
            await wait_writable(sock)
            continue
        except OSError as exc:
            # sendfile cannot say which side failed; only the socket side fails with these.
            role = DESTINATION if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN) else SOURCE
            raise translate(exc, role, "sendfile") from exc
        if n == 0:
            raise FileShrank(end, position)
        position += n
        flow.add_spliced(n)
        if pacer is not None:
            await pacer.spent(n)
        else:
            await checkpoint()
    await checkpoint()


async def copy_waiting(src: int, dst: int, flow: Flow, pacer: Pacer | None = None,
                       bufsize: int = COPY_BUFSIZE) -> None:
    """Move bytes src → user space → dst until EOF: the fallback for a terminal, a device, an fd
    that refused splice, or --no-splice. The event loop never sleeps in a read or a write,
    though inherited stdio stays blocking: a pipe or a socket is asked per call not to block
    (RWF_NOWAIT, tried first, waited on at EAGAIN), so a pipe that another process also reads
    from cannot stall it either; anything else (a terminal, a device) is waited on before each
    call, and only a terminal that another process also reads may still stall one read."""
    buf = bytearray(_chunk(bufsize, pacer))
    view = memoryview(buf)
    reader = _Side(src)
    writer = _Side(dst)
    while True:
        n = await reader.read(buf)
        if n == 0:
            await checkpoint()
            return
        waited = await writer.write(view[:n], flow)
        if pacer is not None:
            await pacer.spent(n)
        elif not waited:
            await checkpoint()


async def copy_file_waiting(file_fd: int, offset: int, length: int, dst: int, flow: Flow,
                            pacer: Pacer | None = None, bufsize: int = COPY_BUFSIZE) -> None:
    """Copy bytes [offset, offset + length) of `file_fd` into `dst` through user space, read at
    explicit offsets: concurrent transfers (serve) share the fd, so its position is never used.
    FileShrank at an EOF before the end, as the zero-copy movers. The fallback for a file that
    refuses splice and sendfile (/proc/PID's files, /proc/config.gz)."""
    chunk = _chunk(bufsize, pacer)
    end = offset + length
    position = offset
    while position < end:
        try:
            data = os.pread(file_fd, min(chunk, end - position), position)
        except OSError as exc:
            raise translate(exc, SOURCE, "pread") from exc
        if not data:
            raise FileShrank(end, position)
        await write_waiting(dst, memoryview(data), flow)
        position += len(data)
        if pacer is not None:
            await pacer.spent(len(data))


async def write_waiting(dst: int, data: memoryview, flow: Flow) -> None:
    """Write all of `data` to `dst` (blocking or not) without the event loop sleeping in a
    write (see copy_waiting)."""
    if not await _Side(dst).write(data, flow):
        await checkpoint()


class _Side:
    """One fd of a user-space copy: read or written with RWF_NOWAIT when it is a pipe or a
    socket (try, wait on EAGAIN), else after waiting for readiness."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.nowait = syscalls.can_ask_nowait(fd)

    async def read(self, buf: bytearray) -> int:
        while True:
            if not self.nowait:
                await _wait_readable(self.fd)
            try:
                return syscalls.read_nowait(self.fd, buf) if self.nowait else os.readv(self.fd, [buf])
            except BlockingIOError:
                if self.nowait:
                    await _wait_readable(self.fd)
            except OSError as exc:
                if self.nowait and exc.errno in syscalls.NOWAIT_REFUSED:
                    self.nowait = False  # an older kernel: wait first, then a plain read
                    continue
                raise translate(exc, SOURCE, "read") from exc

    async def write(self, data: memoryview, flow: Flow) -> bool:
        """Write all of `data`; return whether it waited (a checkpoint was taken). Each write
        is counted as it returns, so a copy cancelled or failed mid-chunk counts the bytes
        that did go out (they were counted only once the whole chunk had)."""
        sent = 0
        waited = False
        while sent < len(data):
            if not self.nowait:
                await _wait_writable(self.fd)
                waited = True
            try:
                if self.nowait:
                    n = syscalls.write_nowait(self.fd, data[sent:])
                else:
                    n = os.write(self.fd, data[sent:])
                sent += n
                flow.add_copied(n)
            except BlockingIOError:
                if self.nowait:
                    await _wait_writable(self.fd)
                    waited = True
            except OSError as exc:
                if self.nowait and exc.errno in syscalls.NOWAIT_REFUSED:
                    self.nowait = False
                    continue
                raise translate(exc, DESTINATION, "write") from exc
        return waited


async def drain_discard(sock: int) -> int:
    """Read and drop what a socket still receives until EOF, so that closing it afterwards
    sends a FIN, not a reset that could destroy bytes still queued for the peer. Returns the
    bytes dropped. Raises a StreamError (SOURCE) when the socket fails instead, a reset above
    all: the peer closed before it read everything sent to it. Bounded in time by the caller
    (--linger), not in bytes: stopping after some amount closed the socket with bytes unread,
    which resets the connection under a peer that was still replying."""
    dropped = 0
    while True:
        try:
            n = len(os.read(sock, 65536))
        except BlockingIOError:
            await wait_readable(sock)
            continue
        except OSError as exc:
            raise translate(exc, SOURCE, "read") from exc
        if n == 0:
            break
        dropped += n
    await checkpoint()
    return dropped
