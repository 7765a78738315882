"""The syscall layer: splice(2), tee(2), sendfile(2) and pipe creation.

Standard library only, no trio: ints in, ints or OSError out, so every call can be tested
without an event loop. Facts behind the constants are in shared/SPLICE.md and the man pages
splice(2), tee(2), pipe(7).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
# Imported with the module, not at the first call: at the fd limit, the import of a C
# extension (its .so to open) failed, and a connection ended as internal-error (ImportError).
import termios
from collections import namedtuple

SPLICE_F_NONBLOCK = os.SPLICE_F_NONBLOCK
SPLICE_F_MORE = os.SPLICE_F_MORE

# splice(len=SIZE_MAX) fails with EINVAL (realm PR 157); HAProxy caps each call at 1 GiB
# (MAX_SPLICE_AT_ONCE in src/raw_sock.c). Every call here is capped the same way.
MAX_SPLICE_AT_ONCE = 1 << 30

# Default pipe capacity on Linux (pipe(7)): 16 pages.
DEFAULT_PIPE_SIZE = 65536

# errnos that mean "this pair of fds cannot be spliced" when they come from the first call of a
# stream (a tty, an O_APPEND file, an fd type without splice_read/splice_write). Nothing was
# consumed, so a user-space copy can take over safely.
SPLICE_REFUSED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EBADF, errno.EOPNOTSUPP})


def splice(src: int, dst: int, count: int, flags: int = SPLICE_F_NONBLOCK,
           offset_src: int | None = None, offset_dst: int | None = None) -> int:
    """Move up to `count` bytes from `src` to `dst`, one of which must be a pipe.

    Returns the bytes moved, 0 at end of input. Raises BlockingIOError on EAGAIN; EINTR is
    retried by CPython (PEP 475).
    """
    return os.splice(src, dst, min(count, MAX_SPLICE_AT_ONCE), offset_src, offset_dst, flags)


# os.splice itself, for a hot loop whose counts are already capped at MAX_SPLICE_AT_ONCE (the
# mover's): same arguments as os.splice, positional (src, dst, count, off_src, off_dst, flags).
splice_unchecked = os.splice


def _load_tee():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.tee
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t
    return fn


_tee = _load_tee()


def tee(src: int, dst: int, count: int, flags: int = SPLICE_F_NONBLOCK) -> int:
    """Duplicate up to `count` bytes from pipe `src` into pipe `dst` without consuming them.

    tee(2) is not in `os`, so this goes through ctypes (about 1 us a call). ctypes gets no
    automatic EINTR retry, so it is done here. Returns the bytes duplicated, 0 when `src` is
    empty and its write end closed; raises OSError (BlockingIOError on EAGAIN).
    """
    count = min(count, MAX_SPLICE_AT_ONCE)
    while True:
        n = _tee(src, dst, count, flags)
        if n >= 0:
            return n
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
    """sendfile(2) from a file (at `offset`, or its own position if None) to a socket or pipe."""
    return os.sendfile(out_fd, in_fd, offset, min(count, MAX_SPLICE_AT_ONCE))


# The kernel's pipe budget (pipe(7), /proc/sys/fs/pipe-*): `max_size`, the largest F_SETPIPE_SZ
# an unprivileged process may ask for; `user_pages_soft`, the pages of pipe buffers a user may
# hold before new pipes shrink (0: no limit). A named tuple, not a frozen dataclass: this module
# is on `zcrelay tee`'s start-up path, where importing dataclasses cost 11 ms (zcrelay.stats).
PipeLimits = namedtuple("PipeLimits", ("max_size", "user_pages_soft"))


def _read_int(path: str, default: int) -> int:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return default


def read_pipe_limits() -> PipeLimits:
    return PipeLimits(
        max_size=_read_int("/proc/sys/fs/pipe-max-size", 1 << 20),
        user_pages_soft=_read_int("/proc/sys/fs/pipe-user-pages-soft", 16384),
    )


# F_SETPIPE_SZ refusals that leave the pipe as it was: EPERM (above pipe-max-size, or the
# user's pipe pages spent), EINVAL, ENOMEM, and EBUSY (pipe(7): the new size is too small for
# the data the pipe holds now).
_SIZE_REFUSED = frozenset({errno.EPERM, errno.EINVAL, errno.ENOMEM, errno.EBUSY})


def set_pipe_size(fd: int, size: int, limits: PipeLimits | None = None) -> int:
    """Ask the kernel for a pipe of `size` bytes; return the size it gave.

    A refused size is not an error here: above pipe-max-size F_SETPIPE_SZ gives EPERM (even as
    root in some sandboxes), once a user's pipe page budget is spent every grow gives EPERM, and
    a shrink below what the pipe holds gives EBUSY.
    The request is then clamped to pipe-max-size and retried once; whatever the pipe ends up
    with is returned, and the caller compares it with what it asked for.
    """
    size = max(1, min(size, MAX_SPLICE_AT_ONCE))
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError as exc:
        if exc.errno not in _SIZE_REFUSED:
            raise
    limits = limits or read_pipe_limits()
    if size > limits.max_size:
        try:
            return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, limits.max_size)
        except OSError as exc:
            if exc.errno not in _SIZE_REFUSED:
                raise
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def open_pipe(size: int | None, limits: PipeLimits | None = None) -> tuple[int, int, int]:
    """Create a non-blocking, close-on-exec pipe and grow it towards `size`.

    Returns (read_fd, write_fd, granted_size). The caller owns both fds. `size=None` keeps the
    kernel's default.
    """
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        granted = set_pipe_size(w, size, limits) if size else fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w, granted


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def fionread(fd: int) -> int:
    """Bytes waiting in a pipe or socket's receive queue (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little", signed=True)


# ---- user-space copies that never block, on fds left blocking -------------------------------

# A per-call "do not block" (preadv2/pwritev2 with RWF_NOWAIT) is how the copy path reads and
# writes inherited stdio without setting O_NONBLOCK on the shell's shared open file
# description. Pipes and sockets honour it (EAGAIN instead of sleeping, a partial write into a
# pipe with some room); a terminal refuses it (EOPNOTSUPP), as does a kernel older than 4.14
# (EOPNOTSUPP, or EINVAL for the offset -1 before 4.6). A regular file is never asked: it may
# answer EAGAIN for a page not in the cache, which no poll would ever end.
NOWAIT_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EINVAL})


def can_ask_nowait(fd: int) -> bool:
    """Whether `fd` is a pipe or a socket, whose reads and writes take RWF_NOWAIT."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def read_nowait(fd: int, buf: bytearray | memoryview) -> int:
    """Read into `buf` what is there now: BlockingIOError rather than sleep, even on a
    blocking fd; 0 at EOF."""
    return os.preadv(fd, [buf], -1, os.RWF_NOWAIT)


def write_nowait(fd: int, data: bytes | memoryview) -> int:
    """Write as much of `data` as fits now: BlockingIOError rather than sleep, even on a
    blocking fd."""
    return os.pwritev(fd, [data], -1, os.RWF_NOWAIT)


# ---- TCP urgent data (MSG_OOB) -------------------------------------------------------------

_SIOCATMARK = 0x8905  # linux/sockios.h: is the socket's read position at the urgent mark?
# What SIOCATMARK answers on an fd that has no urgent data at all (a pipe, a file, a Unix socket).
NO_URGENT_DATA = frozenset({errno.ENOTTY, errno.EINVAL, errno.ENOTSOCK, errno.EOPNOTSUPP})


def read_urgent_byte(fd: int) -> bytes:
    """The TCP urgent byte at `fd`'s read position, read inline; b"" if the socket does not
    stand at an urgent mark. splice(2) stops at the mark and never passes it: it answers EAGAIN
    there, or 0 once a FIN has come, so a caller whose drain meets either asks here before it
    waits or calls it EOF. Sets SO_OOBINLINE, so the byte is read in its place in the stream.
    OSError with an errno in NO_URGENT_DATA: `fd` can have no urgent data, ask no more."""
    if not int.from_bytes(fcntl.ioctl(fd, _SIOCATMARK, bytes(4)), "little"):
        return b""
    set_urgent_inline(fd)
    return os.read(fd, 1)


def set_urgent_inline(fd: int) -> None:
    """SO_OOBINLINE on a TCP socket: its urgent bytes stay in the stream, where read(2) and
    splice(2) find them, instead of being skipped or left behind the mark. Nothing for other
    fds."""
    import socket  # here: `zcrelay tee` and `send` start without it (about 3 ms)

    try:
        sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed here
    except OSError:
        return  # not a socket
    try:
        if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    finally:
        sock.detach()


_TCP_CLOSE = 7  # tcpi_state, the first byte of struct tcp_info (include/net/tcp_states.h)
_IPPROTO_TCP, _TCP_INFO = 6, 11  # socket.IPPROTO_TCP, socket.TCP_INFO, without importing socket


def tcp_closed(sock) -> bool:
    """Whether `sock` (a socket object) is a TCP socket in state CLOSE. Before this side has
    sent its FIN, only a reset or an abort gets there (the peer's FIN leaves CLOSE_WAIT): the
    way to tell a reset whose ECONNRESET another call took from the peer's FIN, since after
    an RST the kernel reports the error once, to the first call that asks (a splice into the
    socket that had moved some bytes takes it and returns its count), and every read after
    that returns 0 as at a FIN. False for any other socket (a Unix socket refuses the option:
    EOPNOTSUPP), or when it cannot be told. Asked as every TCP connection's first side ends:
    no family test (an enum conversion, a tenth of this call's cost)."""
    try:
        return sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, 1)[0] == _TCP_CLOSE
    except OSError:
        return False


def peer_done(sock) -> bool:
    """Whether the peer of `sock` (a stream socket object, TCP or Unix) has sent all it ever
    will: its FIN came (a shutdown of its write side, or its close), or the connection is
    reset or lost. What it sent before may still wait in `sock`'s receive queue; poll(2)
    reports the FIN anyway (POLLRDHUP: the kernel's RCV_SHUTDOWN, which TCP sets only for a
    FIN that came in sequence, after every byte before it), and a reset or the end of both
    directions as POLLHUP or POLLERR. A zero-timeout poll: it never waits. False when it
    cannot be told."""
    import select  # here, as in set_urgent_inline

    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLRDHUP)
        events = poller.poll(0)
    except (OSError, ValueError):
        return False
    return bool(events) and bool(events[0][1] & (select.POLLRDHUP | select.POLLHUP | select.POLLERR))


_SIOCOUTQ = 0x5411  # TIOCOUTQ: a socket's bytes not yet acknowledged by its peer (tcp(7))
_SIOCOUTQNSD = 0x894B  # its bytes not yet sent at all


def send_queue(sock) -> int | None:
    """What a stream socket (a socket object) has sent that its peer has not taken yet
    (SIOCOUTQ): over TCP the bytes not yet acknowledged, on a Unix socket the memory of the
    messages its peer has not read (bytes plus the kernel's overhead). While nothing more is
    sent it falls as the peer takes bytes: a peer that reads slower than half a send buffer per
    poll is seen taking them only here (a socket polls writable once half its buffer is
    free). None when it cannot be told."""
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"), "little", signed=True)
    except (OSError, ValueError):
        return None


def look_at_queue(sock, sent: int, before: tuple | None) -> tuple[tuple, bool]:
    """A look at what `sock`'s peer has not taken yet (send_queue) with `sent`, the bytes sent
    into it so far: (this look, whether since `before`, an earlier look, the peer took bytes
    while none were sent, its queue having fallen). How a slow reader's progress is seen by
    the idle and linger clocks (zcrelay.relay, zcrelay.serving, zcrelay.files)."""
    now = (sent, send_queue(sock))
    took = (before is not None and now[0] == before[0] and now[1] is not None and before[1] is not None
            and now[1] < before[1])
    return now, took


def tcp_unacked(sock) -> int:
    """The bytes a TCP socket (a socket object) holds that its peer has not acknowledged:
    while there are any, a reset (SO_LINGER 0) would throw some away. 0 for a socket in CLOSE
    (reset or lost: it will deliver nothing more, and SIOCOUTQ goes on counting what was
    unacknowledged when it got there), for any other socket (a Unix socket's bytes wait in its
    peer's queue, where a close leaves them), or when it cannot be told."""
    return _tcp_queued(sock, _SIOCOUTQ)


def tcp_unsent(sock) -> int:
    """The bytes a TCP socket (a socket object) has not sent at all: what a reset certainly
    throws away (what was sent has most likely arrived, awaiting a delayed ACK). 0 as for
    tcp_unacked."""
    return _tcp_queued(sock, _SIOCOUTQNSD)


def _tcp_queued(sock, request: int) -> int:
    if tcp_closed(sock):  # also False for a socket that is not TCP
        return 0
    import socket  # here, as in set_urgent_inline

    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"), "little", signed=True)
    except OSError:
        return 0
