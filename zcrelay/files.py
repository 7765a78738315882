"""`send` and `serve`: a regular file to sockets, zero-copy (policy layer).

The file is opened once; every transfer reads it at explicit offsets (splice's offset_src or
sendfile's offset), so concurrent clients share the fd without sharing a file position, and
the file position of the fd is never touched. A file that shrinks mid-transfer is noticed by
the mover (a 0 return before the expected end: no SIGBUS, unlike mmap) and ends that transfer
with direct.FileShrank; bytes past the file's end are never sent.

After the last byte the socket's write side is shut down and whatever the peer still sends is
read and dropped until it closes (bounded by `linger`): closing with unread bytes would send a
reset, which can destroy data still queued for the peer.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass

from zcrelay import direct, net, waits
from zcrelay.addresses import Address
from zcrelay.errors import ConnectionLost, InputFailed, StreamError, ZcrelayError
from zcrelay.mover import SOURCE
from zcrelay.pipes import Pipe
from zcrelay.ratelimit import RateLimit
from zcrelay.stats import Flow

log = logging.getLogger("zcrelay")

METHODS = ("splice", "sendfile")


class BadRange(ZcrelayError):
    """--offset/--length do not fit the file."""


@dataclass(frozen=True)
class SendConfig:
    method: str = "splice"
    pipe_size: int = 1 << 20
    rate_limit: int | None = None
    linger: float | None = 10.0  # seconds to wait for the peer's close after the last byte
    nodelay: bool = False


def open_file(path: str) -> tuple[int, int]:
    """Open a regular file for sending; return (fd, size). Raises InputFailed with a message
    naming the path: missing, unreadable, a directory, not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except IsADirectoryError:
        raise InputFailed(f"{path}: is a directory") from None
    except OSError as exc:
        raise InputFailed(f"cannot open {path}: {os.strerror(exc.errno or errno.EIO)}") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise InputFailed(f"{path}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputFailed(f"{path}: not a regular file")
    return fd, st.st_size


def span(size: int, offset: int, length: int | None) -> tuple[int, int]:
    """(offset, length) checked against the file's size; length None means to the end."""
    if offset > size:
        raise BadRange(f"--offset {offset} is past the end of the file ({size} bytes)")
    if length is None:
        return offset, size - offset
    if offset + length > size:
        raise BadRange(f"--offset {offset} --length {length} goes past the end of the file "
                       f"({size} bytes)")
    return offset, length


async def transfer(fd: int, sock: socket.socket, offset: int, length: int, flow: Flow,
                   config: SendConfig) -> None:
    """Send bytes [offset, offset + length) of `fd` to `sock`, then half-close and wait for the
    peer to close (at most config.linger seconds). Raises FileShrank, InputFailed or
    ConnectionLost. Closes nothing."""
    pacer = RateLimit(config.rate_limit) if config.rate_limit else None
    blocking = waits.blocking()  # then `sock` is a stdlib socket (net.connect)
    if blocking:
        # Nothing else runs in this process: let the kernel wait inside each send, as socat's
        # write(2) does, instead of EAGAIN, poll and retry (fewer syscalls and wake-ups).
        sock.setblocking(True)
    try:
        if config.method == "sendfile":
            await direct.send_file_sendfile(fd, sock.fileno(), offset, length, flow, pacer)
        else:
            pipe = Pipe.open(min(config.pipe_size, max(length, 4096)))
            try:
                await direct.send_file_splice(fd, sock.fileno(), offset, length, pipe, flow, pacer)
            finally:
                pipe.close()  # ours alone, never pooled: it may hold bytes after an error
    except StreamError as exc:
        if exc.role == SOURCE:
            raise InputFailed(f"reading the file: {os.strerror(exc.errno)}") from None
        why = "the peer stopped reading" if exc.errno == errno.EPIPE else os.strerror(exc.errno).lower()
        raise ConnectionLost(f"connection lost after {flow.bytes} of {length} bytes: {why}") from None
    finally:
        if blocking:
            sock.setblocking(False)  # the linger below waits with a deadline
    flow.end = "eof"
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    with waits.move_on_after(config.linger if config.linger is not None else float("inf")):
        await direct.drain_discard(sock.fileno())


async def send(path_fd: int, size: int, address: Address, offset: int, length: int | None,
               flow: Flow, config: SendConfig, connect_timeout: float | None) -> int:
    """Connect to `address` and send the span; return the bytes sent."""
    offset, length = span(size, offset, length)
    sock = await net.connect(address, connect_timeout)
    with sock:
        if config.nodelay:
            net.set_nodelay(sock)
        await transfer(path_fd, sock, offset, length, flow, config)
    return flow.bytes
