"""The barest Python splice relay: a reference for what any Python relay that splices can reach.

Usage: python splice_floor_relay.py LISTEN_PORT TARGET_HOST:PORT [RCVLOWAT]
(LISTEN_PORT 0 picks a free port; prints "listening on 127.0.0.1:PORT" on stderr).

Not a relay to use: a floor to measure against. Per message it makes the fewest calls a
relay that keeps its payload on splice(2) can make from Python: a level-triggered epoll (so
no EAGAIN drain and no re-arming epoll_ctl), one splice from the source into the direction's
own pipe and one out of it. Nothing else: no pool (two pipes per connection for its whole
life), no counters, no timeouts, no half-close bound, no urgent data, no fallback, and a
blocking connect. A destination that does not take a whole message stalls only its own
direction: the source stops being read and the destination is watched for EPOLLOUT until the
pipe is empty (until the twentieth session it waited in select(2) with the whole relay, and an
iperf3 -R run could deadlock: the data socket waited on while the control connection, stuck
behind it, could not end the test). Whatever zcrelay's Python costs above this floor is what
a leaner zcrelay could save; whatever this floor costs above HAProxy is out of reach of any
Python relay that splices.

RCVLOWAT (an experiment of the fifteenth session, see README.md; off by default): after a
drain of 64 KiB or more, the source's SO_RCVLOWAT is set to RCVLOWAT bytes, so epoll reports
it only once that much has come (or its FIN); back to 1 after a smaller drain, and on every
source after 2 ms with no event at all, so a tail under the mark is delivered late, never lost.
"""

import fcntl
import os
import select
import socket
import sys

SPLICE, NONBLOCK = os.splice, os.SPLICE_F_NONBLOCK
MAX = 1 << 20
BULK = 64 << 10  # a drain this large sets the source's SO_RCVLOWAT (if RCVLOWAT is given)
FALLBACK = 0.002  # seconds with no event after which every source's mark drops back to 1


def main(port: int, host: str, target_port: int, rcvlowat: int = 0) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    # source fd → (destination fd, pipe read end, pipe write end); socks keeps the objects
    route: dict[int, tuple[int, int, int]] = {}
    socks: dict[int, socket.socket] = {}
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", file=sys.stderr, flush=True)
    marked: set[int] = set()  # sources whose SO_RCVLOWAT is rcvlowat
    stalled: dict[int, tuple[int, int]] = {}  # destination fd -> (its source, bytes in the pipe)
    paused: set[int] = set()  # the sources of stalled directions: not read meanwhile
    while True:
        events = epoll.poll(FALLBACK if marked else -1)
        if not events and marked:
            for fd in marked:
                socks[fd].setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            marked.clear()
        for fd, ev in events:
            if stalled and ev & select.EPOLLOUT and fd in stalled:
                src, n = stalled.pop(fd)
                paused.discard(src)
                if pump(src, n, epoll, route, socks, stalled, paused, marked):
                    continue  # still stalled
                if src in route:
                    set_mask(epoll, src, select.EPOLLIN)
                if fd in route:
                    set_mask(epoll, fd, select.EPOLLIN)
                elif fd in socks:
                    epoll.unregister(fd)  # its own direction ended while it was watched
            hop = route.get(fd)
            if hop is None:
                if fd == listener.fileno():
                    accept(listener, host, target_port, epoll, route, socks)
                continue
            if paused and fd in paused:
                continue  # a hang-up, which no mask holds back: read once delivered
            dst, r, w = hop
            try:
                n = SPLICE(fd, w, MAX, None, None, NONBLOCK)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n == 0:
                marked.discard(fd)
                close_direction(fd, epoll, route, socks, stalled)
                continue
            if rcvlowat and (n >= BULK) != (fd in marked):
                socks[fd].setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, rcvlowat if n >= BULK else 1)
                (marked.add if n >= BULK else marked.discard)(fd)
            pump(fd, n, epoll, route, socks, stalled, paused, marked)


def pump(src, n, epoll, route, socks, stalled, paused, marked) -> bool:
    """Splice the `n` bytes in src's pipe on to its destination. True if the destination
    would not take them all: the direction is stalled, its source no longer read and its
    destination watched for EPOLLOUT (see main)."""
    dst, r, _ = route[src]
    while n:
        try:
            n -= SPLICE(r, dst, n, None, None, NONBLOCK)
        except BlockingIOError:
            stalled[dst] = (src, n)
            paused.add(src)
            set_mask(epoll, src, 0)
            set_mask(epoll, dst, (select.EPOLLIN if dst in route else 0) | select.EPOLLOUT)
            return True
        except OSError:
            marked.discard(src)
            close_direction(src, epoll, route, socks, stalled)
            return False
    return False


def set_mask(epoll, fd, mask) -> None:
    try:
        epoll.modify(fd, mask)
    except FileNotFoundError:  # unregistered when its own direction ended
        epoll.register(fd, mask)


def accept(listener, host, target_port, epoll, route, socks) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        upstream = socket.create_connection((host, target_port))
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks[sock.fileno()] = sock
        for src, dst in ((client, upstream), (upstream, client)):
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, MAX)
            route[src.fileno()] = (dst.fileno(), r, w)
            epoll.register(src.fileno(), select.EPOLLIN)


def close_direction(fd, epoll, route, socks, stalled) -> None:
    """EOF or an error on fd: pass the FIN on; once both directions are done, close."""
    dst, r, w = route.pop(fd)
    if fd in stalled:  # the other direction waits to write to it
        set_mask(epoll, fd, select.EPOLLOUT)
    else:
        epoll.unregister(fd)
    os.close(r)
    os.close(w)
    try:
        socks[dst].shutdown(socket.SHUT_WR)
    except OSError:
        pass
    if dst not in route:  # the other direction ended too
        socks.pop(fd).close()
        socks.pop(dst).close()


if __name__ == "__main__":
    target_host, _, target = sys.argv[2].rpartition(":")
    try:
        main(int(sys.argv[1]), target_host, int(target), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    except KeyboardInterrupt:
        pass
