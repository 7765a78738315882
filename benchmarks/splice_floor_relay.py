"""The barest Python splice relay: a reference for what any Python relay that splices can reach.

Usage: python splice_floor_relay.py LISTEN_PORT TARGET_HOST:PORT [RCVLOWAT]
(LISTEN_PORT 0 picks a free port; prints "listening on 127.0.0.1:PORT" on stderr).

Not a relay to use: a floor to measure against. Per message it makes the fewest calls a
relay that keeps its payload on splice(2) can make from Python: a level-triggered epoll (so
no EAGAIN drain and no re-arming epoll_ctl), one splice from the source into the direction's
own pipe and one out of it. Nothing else: no pool (two pipes per connection for its whole
life), no counters, no timeouts, no half-close bound, no urgent data, no fallback, a blocking
connect, and a stalled destination stalls every connection (it waits in select(2) until the
pipe is empty). Whatever zcrelay's Python costs above this floor is what a leaner zcrelay
could save; whatever this floor costs above HAProxy is out of reach of any Python relay that
splices.

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
    while True:
        events = epoll.poll(FALLBACK if marked else -1)
        if not events and marked:
            for fd in marked:
                socks[fd].setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            marked.clear()
        for fd, _ in events:
            hop = route.get(fd)
            if hop is None:
                if fd == listener.fileno():
                    accept(listener, host, target_port, epoll, route, socks)
                continue
            dst, r, w = hop
            try:
                n = SPLICE(fd, w, MAX, None, None, NONBLOCK)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n == 0:
                marked.discard(fd)
                close_direction(fd, epoll, route, socks)
                continue
            if rcvlowat and (n >= BULK) != (fd in marked):
                socks[fd].setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, rcvlowat if n >= BULK else 1)
                (marked.add if n >= BULK else marked.discard)(fd)
            while n:
                try:
                    n -= SPLICE(r, dst, n, None, None, NONBLOCK)
                except BlockingIOError:
                    select.select([], [dst], [])
                except OSError:
                    marked.discard(fd)
                    close_direction(fd, epoll, route, socks)
                    break


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


def close_direction(fd, epoll, route, socks) -> None:
    """EOF or an error on fd: pass the FIN on; once both directions are done, close."""
    dst, r, w = route.pop(fd)
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
