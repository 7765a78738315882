"""The reactor's per-message cost, in process: request/response pairs over loopback TCP.

A benchmark, not a test. It measures what wrk's keep-alive rows cannot separate from the
noise of wrk and nginx sharing two cores: the CPU the reactor itself spends per
request/response pair, and how many Python bytecodes it runs for it.

    client c  ->  a [reactor]  b  ->  server s

One thread does everything, with no trio: the client sends a request, one reactor turn moves
it, the server reads it and replies, one turn moves the reply, the client reads it. Only the
two turns are timed (`time.thread_time`, user + system of this thread) and, with `--opcodes`,
traced (`sys.settrace` with opcode events, counted in zcrelay's own frames). The kernel work
of a splice into loopback TCP (delivery to the reader's socket) runs inside those turns, as it
does in `zcrelay forward`.

    PYTHONPATH=. .venv/bin/python benchmarks/reactor_pingpong.py [--pairs N] [--opcodes]

It also times a floor: the same syscalls (one epoll_wait a turn, two splices a message; since
the twelfth session the streams' sockets are level-triggered and the reply's epoll_ctl is
gone from both) made by the barest Python loop, with no state, no checks and no pool. What
lies between the two is all that any change to the reactor's Python could save.

Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import socket
import statistics
import sys
import time

from zcrelay.pipes import PipePool
from zcrelay.reactor import Reactor
from zcrelay.stats import Flow

REQUEST = b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: pingpong\r\n\r\n"  # 62 bytes
REPLY = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"x" * 260 + b"\r\n\r\n" + b"y" * 1024  # 1,312


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    for sock in (client, accepted):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    return client, accepted


def _four_sockets() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """(c, a, b, s): the client c talks to a, b talks to the server s; the relay between a and
    b owns non-blocking sockets, as zcrelay's are."""
    c, a = _tcp_pair()
    b, s = _tcp_pair()
    for sock in (a, b):
        sock.setblocking(False)
    return c, a, b, s


def _recv_exactly(sock: socket.socket, n: int) -> None:
    while n:
        n -= len(sock.recv(n))


class _OpCounter:
    """Counts opcode events in frames of zcrelay's modules."""

    def __init__(self) -> None:
        self.count = 0
        self.by_function: dict[str, int] = {}
        self._prefix = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zcrelay")
        self._prefix = os.path.realpath(self._prefix)

    def trace(self, frame, event, arg):
        if event == "call":
            if not os.path.realpath(frame.f_code.co_filename).startswith(self._prefix):
                return None
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return self._local
        return None

    def _local(self, frame, event, arg):
        if event == "opcode":
            self.count += 1
            name = frame.f_code.co_name
            self.by_function[name] = self.by_function.get(name, 0) + 1
        return self._local


def measure(pairs: int, opcodes: bool = False) -> dict:
    c, a, b, s = _four_sockets()
    ended = []
    reactor = Reactor(PipePool(size=1 << 20))
    up, down = Flow(), Flow()
    streams = reactor.start([(a.fileno(), b.fileno(), up), (b.fileno(), a.fileno(), down)],
                            lambda stream, error: ended.append(error))
    turn = reactor._turn
    counter = _OpCounter() if opcodes else None

    def moved(flow: Flow, goal: int) -> float:
        """Turn the reactor until `flow` has moved `goal` bytes in all; the CPU time it took."""
        t0 = time.thread_time()
        if counter:
            sys.settrace(counter.trace)
        while flow.spliced < goal:
            turn(0)
        if counter:
            sys.settrace(None)
        return time.thread_time() - t0

    def one_pair() -> float:
        c.sendall(REQUEST)
        spent = moved(up, goal_up)
        _recv_exactly(s, len(REQUEST))
        s.sendall(REPLY)
        spent += moved(down, goal_down)
        _recv_exactly(c, len(REPLY))
        return spent

    try:
        turn(0)  # the streams' registration reports: nothing to read yet
        goal_up = goal_down = 0
        for _ in range(200):  # warm-up: the pool's pipe, caches, specialised bytecode
            goal_up += len(REQUEST)
            goal_down += len(REPLY)
            one_pair()
        if counter:
            counter.count = 0
            counter.by_function.clear()
        spent = []
        for _ in range(pairs):
            goal_up += len(REQUEST)
            goal_down += len(REPLY)
            spent.append(one_pair())
        assert not ended, f"a stream ended: {ended}"
        assert up.copied == down.copied == 0
    finally:
        reactor.stop(streams)
        reactor.close()
        for sock in (a, b, c, s):
            sock.close()
    result = {"pairs": pairs, "cpu_us_per_pair": 1e6 * sum(spent) / pairs}
    if counter:
        result["opcodes_per_pair"] = counter.count / pairs
        result["by_function"] = {k: v / pairs for k, v in
                                 sorted(counter.by_function.items(), key=lambda kv: -kv[1])}
    return result


def measure_floor(pairs: int) -> float:
    """CPU µs per pair of the barest loop making the reactor's syscalls (see the docstring)."""
    c, a, b, s = _four_sockets()
    r, w = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    epoll = select.epoll()
    mask = select.EPOLLIN | select.EPOLLPRI | select.EPOLLRDHUP  # level-triggered, as the reactor's
    route = {a.fileno(): b.fileno(), b.fileno(): a.fileno()}
    for fd in route:
        epoll.register(fd, mask)
    splice, flags = os.splice, os.SPLICE_F_NONBLOCK

    def turn() -> None:
        for fd, _ in epoll.poll(0, 1024):
            splice(r, route[fd], splice(fd, w, 1 << 30, None, None, flags), None, None, flags)

    def run(n: int) -> float:
        spent = 0.0
        for _ in range(n):
            c.sendall(REQUEST)
            t0 = time.thread_time()
            turn()
            spent += time.thread_time() - t0
            _recv_exactly(s, len(REQUEST))
            s.sendall(REPLY)
            t0 = time.thread_time()
            turn()
            spent += time.thread_time() - t0
            _recv_exactly(c, len(REPLY))
        return 1e6 * spent / n

    try:
        epoll.poll(0)
        run(200)
        return run(pairs)
    finally:
        epoll.close()
        for fd in (r, w):
            os.close(fd)
        for sock in (a, b, c, s):
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--opcodes", action="store_true", help="also count bytecodes (slow)")
    args = parser.parse_args()
    times, floors = [], []
    for _ in range(args.rounds):  # interleaved, so a drift of the machine hits both alike
        times.append(measure(args.pairs)["cpu_us_per_pair"])
        floors.append(measure_floor(args.pairs))
    for name, values in (("reactor", times), ("floor (same syscalls, barest loop)", floors)):
        print(f"{name}: {statistics.median(values):.2f} µs CPU per request/response pair "
              f"(median of {args.rounds} rounds of {args.pairs}: "
              + ", ".join(f"{t:.2f}" for t in values) + ")")
    if args.opcodes:
        r = measure(min(args.pairs, 2000), opcodes=True)
        print(f"bytecodes per pair: {r['opcodes_per_pair']:.0f}")
        for name, n in r["by_function"].items():
            print(f"  {name:<24} {n:7.1f}")


if __name__ == "__main__":
    main()
