"""Opening listeners and connecting to targets, with errors a user can read.

Every socket here is non-blocking, which splice needs (SPLICE_F_NONBLOCK covers only the pipe
side): a trio socket in a trio run; `connect` under zcrelay.waits.run_blocking returns a stdlib
one. Callers own what these functions return.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import math
import os
import socket
import stat
import struct
from typing import TYPE_CHECKING, Callable

from zcrelay import mover, waits
from zcrelay.addresses import Address, format_sockname
from zcrelay.errors import BindError, ConnectError

if TYPE_CHECKING:
    from typing import TypeAlias

    import trio

    # What the helpers here take and `connect` returns: a trio socket in a trio run, a stdlib
    # one under zcrelay.waits.run_blocking or in the reactor's hands (zcrelay.forward).
    AnySocket: TypeAlias = socket.socket | trio.socket.SocketType

# socat's default backlog of 5 overflows under 32 concurrent clients and costs them seconds of
# SYN retransmits; the kernel caps this at net.core.somaxconn anyway.
BACKLOG = 4096


_CONNECT_REASONS = {
    errno.ECONNREFUSED: "refused",
    errno.ENETUNREACH: "unreachable",
    errno.EHOSTUNREACH: "unreachable",
    errno.EADDRNOTAVAIL: "unreachable",
    errno.ETIMEDOUT: "timeout",
    errno.ENOENT: "no-socket",
    errno.ECONNRESET: "reset",  # the target accepted, then reset, before the connect was seen
    errno.EMFILE: "out-of-fds",
    errno.ENFILE: "out-of-fds",
    errno.ENOBUFS: "out-of-memory",
}


def set_nodelay(sock: AnySocket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def abort(sock: AnySocket) -> None:
    """Make the next close send a TCP reset instead of a FIN (SO_LINGER with a zero timeout)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.fileno() >= 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


def cut_off(sock: socket.socket) -> None:
    """End the connection now, from any thread, even while another thread waits on it in a poll
    or a send: that wait ends at once, with an error (ECONNRESET, EPIPE). The fd stays open:
    closing it is still its owner's business, and any later call on it fails.

    TCP is reset: connect(2) to an AF_UNSPEC address dissolves the connection (the kernel's
    tcp_disconnect sends the RST and wakes every waiter), where SO_LINGER 0 (`abort`) acts only
    at the close. A unix socket has no reset: it is shut down both ways, and its peer sees an
    ordinary end of stream, as it would at the close."""
    abort(sock)  # should the disconnect fail, the owner's close still resets
    if sock.family in (socket.AF_INET, socket.AF_INET6) and _disconnect(sock.fileno()) == 0:
        return
    try:
        # A unix socket; or a TCP socket whose disconnect failed (not expected: the idle
        # watchdog's sockets are connected and non-blocking), where a FIN may then go out
        # before the owner's close resets.
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # no longer connected: nothing left to end


_libc_connect: Callable[..., int] | None = None


def _disconnect(fd: int) -> int:
    """connect(fd, AF_UNSPEC): 0, or the errno. Through libc, because Python's socket.connect
    takes only addresses of the socket's own family."""
    import ctypes  # loaded already (zcrelay.syscalls' tee)

    global _libc_connect
    if _libc_connect is None:
        fn = ctypes.CDLL(None, use_errno=True).connect
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
        fn.restype = ctypes.c_int
        _libc_connect = fn
    unspec = ctypes.create_string_buffer(16)  # a struct sockaddr, all zero: sa_family AF_UNSPEC
    return 0 if _libc_connect(fd, unspec, len(unspec)) == 0 else ctypes.get_errno() or errno.EIO


async def open_listener(address: Address, backlog: int = BACKLOG) -> trio.socket.SocketType:
    """A bound, listening socket for `address`; raises BindError. In a trio run only."""
    import trio

    if address.is_unix:
        return trio.socket.from_stdlib_socket(_bind_unix(address, backlog))
    family, sockaddr = await _listen_sockaddr(address)
    return trio.socket.from_stdlib_socket(_bind(address, family, sockaddr, backlog))


def bind_listeners(address: Address, count: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """`count` listening stdlib sockets for `address`, for as many processes (zcrelay.cli.workers),
    without trio (a name resolves blocking); raises BindError, having closed what it opened.

    A TCP address gets `count` sockets bound with SO_REUSEPORT, so the kernel spreads new
    connections over them; the first picks the port when 0 was asked. A Unix path cannot be
    bound twice: the one socket comes back `count` times, its accept queue shared."""
    if address.is_unix:
        return [_bind_unix(address, backlog)] * count
    family: int
    if address.host:
        try:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise _unresolvable(address, exc) from None
        family, sockaddr = infos[0][0], infos[0][4]
    else:
        family, sockaddr = _any_sockaddr(address)
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            # The first socket binds without SO_REUSEPORT, so a port already held by anyone,
            # a SO_REUSEPORT group included (a second `zcrelay forward -w 2` on the same
            # port), is EADDRINUSE as with one worker; it sets SO_REUSEPORT before listen(2)
            # so that the others can join it.
            socks.append(_bind(address, family, sockaddr, backlog, reuse_port=i > 0,
                               share=count > 1))
            sockaddr = (sockaddr[0], socks[0].getsockname()[1], *sockaddr[2:])  # the real port
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind(address: Address, family: int, sockaddr: tuple, backlog: int, *,
          reuse_port: bool = False, share: bool = False) -> socket.socket:
    """A non-blocking TCP listener; bind(2) does not block, so this is fine in a trio run.
    `reuse_port`: SO_REUSEPORT before bind(2), to join a group; `share`: after it, so that
    others may join this one."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and not address.host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        urgent_inline(sock)  # for every socket it accepts
        sock.bind(sockaddr)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.listen(_backlog(backlog))
    except OSError as exc:
        sock.close()
        raise BindError(address, exc.errno or errno.EIO) from None
    return sock


async def _listen_sockaddr(address: Address) -> tuple[int, tuple]:
    if not address.host:
        return _any_sockaddr(address)
    import trio

    try:
        infos = await trio.socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                              flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise _unresolvable(address, exc) from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _any_sockaddr(address: Address) -> tuple[int, tuple]:
    """Every interface: dual-stack when the host has IPv6, IPv4 otherwise."""
    return (socket.AF_INET6, ("::", address.port)) if socket.has_ipv6 and _ipv6_works() \
        else (socket.AF_INET, ("0.0.0.0", address.port))


def _unresolvable(address: Address, exc: socket.gaierror) -> BindError:
    return BindError(address, errno.EADDRNOTAVAIL, f"cannot resolve {address.host!r}: {exc.strerror}")


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


def _backlog(backlog: int) -> int:
    """listen(2) takes an int and the kernel caps it at net.core.somaxconn: a larger --backlog
    means "as large as the kernel allows", not an OverflowError."""
    return min(backlog, 0x7FFFFFFF)


def _bind_unix(address: Address, backlog: int) -> socket.socket:
    path = address.sockaddr_path
    if not path.startswith("\0"):
        _remove_stale_socket(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind(path)
        if not path.startswith("\0"):
            st = os.stat(path)
            _bound_files[path] = (os.getpid(), st.st_dev, st.st_ino)
        sock.listen(_backlog(backlog))
    except OSError as exc:
        sock.close()
        raise BindError(address, exc.errno or errno.EIO) from None
    return sock


# Socket files this process bound: path -> (pid, st_dev, st_ino).
_bound_files: dict[str, tuple[int, int, int]] = {}


def remove_bound_socket_files() -> None:
    """Remove the socket files this process bound, as socat does (unlink-close): left behind,
    one is replaced at the next start, but it misleads ls, tab completion and clients, which
    get ECONNREFUSED. Not a worker's (forked: another pid), nor a file that another process
    has put at the path since (another inode)."""
    for path, (pid, dev, ino) in list(_bound_files.items()):
        if pid != os.getpid():
            continue
        del _bound_files[path]
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
        except OSError:
            pass


def _remove_stale_socket(address: Address) -> None:
    """Remove a socket file left by a process that died; refuse to touch anything else."""
    assert address.path is not None
    try:
        mode = os.lstat(address.path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError(address, exc.errno or errno.EIO) from None
    if not stat.S_ISSOCK(mode):
        raise BindError(address, errno.EADDRINUSE, "the path exists and is not a socket")
    if _listed_as_listening(address.path):
        raise BindError(address, errno.EADDRINUSE)
    # Not listed: stale, or bound under another spelling of the path or in another network
    # namespace. A connect tells; it would cost a live server a connection (a one-shot
    # listener ends on it), which is why the listing is asked first. Non-blocking: a live
    # server whose backlog is full answers EAGAIN, where a blocking connect would hang.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(address.path)
        except ConnectionRefusedError:
            os.unlink(address.path)  # nobody listens: a stale socket file
            return
        except BlockingIOError:
            pass  # a backlog full: somebody listens
        except OSError as exc:
            raise BindError(address, exc.errno or errno.EIO) from None
    raise BindError(address, errno.EADDRINUSE)


_SO_ACCEPTCON = 0x10000  # /proc/net/unix's Flags of a listening socket


def _listed_as_listening(path: str) -> bool:
    """Whether /proc/net/unix (this network namespace's Unix sockets) lists a listening socket
    bound to `path`, spelled as given or as its absolute path."""
    names = {path, os.path.abspath(path)}
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f, None)  # the header
            for line in f:
                fields = line.rstrip("\n").split(None, 7)
                if len(fields) == 8 and fields[7] in names and int(fields[3], 16) & _SO_ACCEPTCON:
                    return True
    except (OSError, ValueError):
        pass
    return False


async def connect(address: Address, timeout: float | None,
                  on_resolved: Callable[[list], None] | None = None, *,
                  keep_reset: bool = False) -> AnySocket:
    """A connected socket to `address`, each resolved address tried in turn; raises ConnectError.

    `timeout` bounds the whole attempt, name resolution included (_getaddrinfo). A trio socket
    in a trio run, else a non-blocking stdlib socket. `on_resolved` gets the (family, sockaddr)
    list a name resolved to. `keep_reset`: a target that accepted and reset before the connect
    was seen (ECONNRESET) is connected to all the same: what it sent first is still readable,
    and the caller meets the reset at its first use of the socket (connect's stdout).
    """
    deadline = waits.current_time() + timeout if timeout else math.inf
    with waits.move_on_after(timeout if timeout else math.inf):
        return await _connect(address, on_resolved, deadline, keep_reset)
    raise ConnectError(address, "timeout", f"timed out after {timeout:g}s")


# The least time an address that is not the last is given (Go's net.partialDeadline).
MIN_ATTEMPT = 2.0


def attempt_time(left: float, addresses: int) -> float:
    """How long the next of `addresses` addresses may take to connect, with `left` seconds of
    the connect timeout left: an equal share, but at least MIN_ATTEMPT (or all that is left).
    Without shares, an address that drops SYNs (a broken IPv6 route) took the whole timeout
    and the next was never tried. As Go's dialer does (net.partialDeadline)."""
    share = left / addresses
    return share if share >= MIN_ATTEMPT else max(0.0, min(left, MIN_ATTEMPT))


def literal_targets(address: Address) -> list[tuple[int, object]] | None:
    """The (family, sockaddr) to connect to when no resolver is needed (a Unix path or an IP
    literal), else None: the name must go through getaddrinfo on each connection."""
    if address.is_unix:
        return [(socket.AF_UNIX, address.sockaddr_path)]
    numeric = _numeric(address.host)
    if numeric is not None:
        return [(numeric, (address.host, address.port))]
    return None


def connect_reason(err: int) -> str:
    """The one word a log line gives for a connect that failed with `err`."""
    return _CONNECT_REASONS.get(err or errno.EIO, "error")


def connect_error(address: Address, err: int) -> ConnectError:
    err = err or errno.EIO
    return ConnectError(address, connect_reason(err), os.strerror(err).lower())


def stream_socket(family: int) -> socket.socket:
    """A non-blocking, close-on-exec stream socket (stdlib), for connect_ex; TCP urgent bytes
    stay in its stream (`urgent_inline`)."""
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    if family != socket.AF_UNIX:
        urgent_inline(sock)
    return sock


def urgent_inline(sock: socket.socket) -> None:
    """SO_OOBINLINE, from the start: a TCP urgent byte stays in the stream, where the relay
    passes it on in its place. Set later, a second urgent byte that arrives while the reader
    stands at the first one's mark makes the kernel drop the first (tcp_check_urg). Accepted
    sockets inherit it from their listener."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)


async def _connect(address: Address, on_resolved: Callable[[list], None] | None,
                   deadline: float = math.inf, keep_reset: bool = False) -> AnySocket:
    targets = literal_targets(address)
    if targets is None:
        try:
            infos = await _getaddrinfo(address.host, address.port)
        except socket.gaierror as exc:
            raise ConnectError(address, "resolve", f"cannot resolve {address.host!r}: {exc.strerror}") from None
        targets = [(info[0], info[4]) for info in infos]
        if on_resolved is not None:
            on_resolved(targets)
    last: OSError | None = None
    for index, (family, sockaddr) in enumerate(targets):
        try:
            sock = stream_socket(family)
        except OSError as exc:
            last = exc
            break  # out of fds or memory: trying another address will not help
        more = len(targets) - index
        share = attempt_time(deadline - waits.current_time(), more) if more > 1 else math.inf
        try:
            # mover.connect rather than trio's socket.connect: trio resolves the address again
            # and wraps the wait in more machinery, a measurable share of a connection's cost.
            with waits.move_on_after(share) as attempt:
                await mover.connect(sock, sockaddr)
        except OSError as exc:
            if keep_reset and exc.errno == errno.ECONNRESET:
                # It accepted, then reset before the connect was seen: the connection existed,
                # and Linux keeps a reset connection's receive queue readable.
                return sock if waits.blocking() else _trio_socket(sock)
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        if attempt.cancelled_caught:  # its share is spent: the next address
            sock.close()
            last = OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
            continue
        return sock if waits.blocking() else _trio_socket(sock)
    assert last is not None
    raise connect_error(address, last.errno or errno.EIO)


async def _getaddrinfo(host: str, port: int) -> list:
    """getaddrinfo, given up on at the caller's deadline (the connect timeout). getaddrinfo(3)
    takes no timeout and cannot be interrupted: a DNS server that drops queries holds it for
    resolv.conf's timeout times attempts times servers, a stuck NSS module for ever. So it runs
    in a thread, which is abandoned, still looking, when the deadline comes: trio.socket's does
    that under trio; without trio (zcrelay.waits), _getaddrinfo_in_a_thread."""
    if waits.blocking():
        return await _getaddrinfo_in_a_thread(host, port)
    import trio

    return await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


async def _getaddrinfo_in_a_thread(host: str, port: int) -> list:
    """socket.getaddrinfo in a daemon thread, heard from as a worker hears its parent
    (waits.until_readable): the thread closes the write end of a pipe once it has the answer,
    and the wait for that EOF ends at the innermost waits.move_on_after deadline (or a Ctrl-C).
    One owner per fd: the thread closes the write end, we close the read end, so a thread that
    finishes after being given up on touches no fd but its own."""
    import threading  # here: only a lookup without trio needs it, not every command that imports net

    answer: list = []
    done_r, done_w = os.pipe2(os.O_CLOEXEC)

    def look_up() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed over to the waiting thread
            answer.append(exc)
        finally:
            os.close(done_w)

    try:
        try:
            threading.Thread(target=look_up, name=f"zcrelay getaddrinfo {host}", daemon=True).start()
        except BaseException:
            os.close(done_w)  # no thread to close it
            raise
        await waits.until_readable(done_r)
    finally:
        os.close(done_r)
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return answer[0]


def _trio_socket(sock: socket.socket) -> trio.socket.SocketType:
    import trio

    return trio.socket.from_stdlib_socket(sock)


@functools.lru_cache(maxsize=256)
def _numeric(host: str) -> int | None:
    """The address family of an IP literal, or None for a name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


def peer_name(sock: trio.socket.SocketType, peer: object = None) -> str:
    try:
        return format_sockname(peer if peer else sock.getpeername())
    except OSError:
        return "?"


def local_name(sock: AnySocket) -> str:
    return format_sockname(sock.getsockname())
