"""zcrelay as a Python library, used as the README's "From Python" section shows and as a program
that embeds it would: `relay` and `Engine` (zcrelay.relay), `Flow` (zcrelay.stats), `Forwarder`
(zcrelay.forward).

Real loopback sockets on port 0, no sleeps (trio events, nursery.start, and
trio.testing.wait_all_tasks_blocked where "the relay is stuck on a full destination" is the
state wanted), SHA-256 of what arrives in both directions, transfers larger than a pipe (1 MiB)
and than the socket buffers (8+ MiB). A library must not leak: every test that can counts the
process's fds (/proc/self/fd) before and after, and the pool's statistics say where each pipe went.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from functools import partial

import pytest
import trio
import trio.testing

from zcrelay.addresses import Address
from zcrelay.errors import BindError
from zcrelay.forward import Bound, Finished, ForwardConfig, Forwarder, Rule
from zcrelay.relay import Engine, relay
from zcrelay.stats import Flow
from tests import traffic
from tests.conftest import syn_dropping_listener, zcrelay_env

MiB = 1 << 20
BIG = 8 * MiB + 4321  # more than a 1 MiB pipe and than loopback's socket buffers, and odd
CHUNK = 256 << 10


def open_fds() -> int:
    """The process's open fds (the listing's own fd is counted every time alike), after a
    garbage collection: a socket an earlier test left to the collector would otherwise be
    closed, at a time of the collector's choosing, in the middle of a count."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def tcp_pair(bufsize: int | None = None) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A loopback TCP connection (near, far) on port 0. `bufsize` shrinks both sockets' send and
    receive buffers (set before connecting, so the window is small from the start)."""
    with trio.socket.socket() as listener:
        near = trio.socket.socket()
        for sock in (listener, near):
            if bufsize:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        await near.connect(listener.getsockname())
        far, _ = await listener.accept()
    return near, far


async def send_then_eof(sock, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view[:CHUNK]):]
    sock.shutdown(socket.SHUT_WR)


async def recv_to_eof(sock) -> bytes:
    got = bytearray()
    while chunk := await sock.recv(CHUNK):
        got += chunk
    return bytes(got)


async def recv_exactly(sock, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await sock.recv(min(CHUNK, n - len(got)))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


# --- the README's example: relay() between two connected trio sockets ---------------------------

async def test_readme_relay_moves_8mib_each_way_and_passes_half_close_on():
    """As the README does it (trio.SocketStream, `relay(client.socket, target.socket, ...)`): the
    client sends 8 MiB and half-closes; the server answers only once it has seen that EOF (so the
    relay must pass the half-close on and keep the other direction running), then sends 8 MiB
    and its own EOF. Both directions arrive intact, the relay ends "eof", the Flow counters add
    up to exactly the bytes sent, all spliced, and the relay closes neither socket."""
    base = open_fds()
    engine = Engine()
    up_data, down_data = payload(1, BIG), payload(2, BIG + 1)
    (user_sock, a), (b, server_sock) = await tcp_pair(), await tcp_pair()
    results: dict[str, str] = {}
    async with trio.SocketStream(user_sock) as user, trio.SocketStream(server_sock) as server, \
            trio.SocketStream(a) as client, trio.SocketStream(b) as target:

        async def the_user() -> None:
            await send_then_eof(user.socket, up_data)
            results["user got"] = sha(await recv_to_eof(user.socket))

        async def the_server() -> None:
            results["server got"] = sha(await recv_to_eof(server.socket))  # needs the half-close
            await send_then_eof(server.socket, down_data)

        up, down = Flow(), Flow()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(the_user)
                nursery.start_soon(the_server)
                end = await relay(client.socket, target.socket, engine, up, down, linger=30)
        assert results == {"server got": sha(up_data), "user got": sha(down_data)}
        assert (end.reason, end.side, end.describe("client", "target")) == ("eof", None, "eof")
        assert up.spliced + up.copied == up.bytes == len(up_data)
        assert down.spliced + down.copied == down.bytes == len(down_data)
        assert (up.copied, down.copied, up.fallback, down.fallback) == (0, 0, None, None)
        assert (up.end, down.end) == ("eof", "eof")
        assert engine.fallbacks == Counter()
        assert engine.pool.stats.destroyed_dirty == 0
        assert client.socket.fileno() >= 0 and target.socket.fileno() >= 0  # the caller's to close
    engine.close()
    assert open_fds() == base


# --- one Engine, many relays at once ------------------------------------------------------------

async def test_one_engine_carries_many_concurrent_relays_intact():
    """Eight relays share one Engine (one reactor, one pipe pool) and are all moving bytes at
    the same time: every server holds its connection after the first chunk until all eight
    have one. Each moves a different size each way (1.5 to 3.3 MiB), all arrive intact, and
    afterwards no stream is left in the reactor and no pipe outside the pool."""
    count = 8
    base = open_fds()
    engine = Engine()
    reactor = engine.reactor()
    assert engine.reactor() is reactor  # one reactor per trio run, whatever the relays
    all_flowing = trio.Event()
    flowing = 0
    outcomes: list[tuple] = []

    async def one(i: int) -> None:
        up_data, down_data = payload(10 + i, 3 * MiB // 2 + i * 257 * 1024), payload(50 + i, 3 * MiB - i * 4099)
        (user, a), (b, server) = await tcp_pair(), await tcp_pair()
        with user, a, b, server:
            got: dict[str, str] = {}

            async def the_server() -> None:
                first = await server.recv(CHUNK)
                nonlocal flowing
                flowing += 1
                if flowing == count:
                    all_flowing.set()
                await all_flowing.wait()
                got["up"] = sha(first + await recv_to_eof(server))

            async def the_user() -> None:
                got["down"] = sha(await recv_to_eof(user))

            up, down = Flow(), Flow()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_then_eof, user, up_data)
                nursery.start_soon(send_then_eof, server, down_data)
                nursery.start_soon(the_server)
                nursery.start_soon(the_user)
                end = await relay(a, b, engine, up, down, linger=30)
            outcomes.append((i, end.reason, got == {"up": sha(up_data), "down": sha(down_data)},
                             up.bytes == len(up_data), down.bytes == len(down_data)))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    assert sorted(outcomes) == [(i, "eof", True, True, True) for i in range(count)]
    assert reactor.waiting == 0
    assert engine.pool.stats.destroyed_dirty == 0
    assert engine.pool.idle <= engine.pool.max_idle
    # Open now: the reactor's epoll and eventfd, and the pool's idle pipes; nothing else.
    assert open_fds() == base + 2 + 2 * engine.pool.idle
    engine.close()
    assert open_fds() == base


# --- cancelling a relay from outside, mid-transfer -----------------------------------------------

async def test_cancelling_a_clogged_relay_returns_at_once_and_leaks_no_pipe():
    """Both directions flood into a relay whose far ends stop reading after 2 MiB (small
    buffers), so each stream sits with a pipe full of bytes. Cancelling the caller's scope ends
    relay() at once; both pipes still holding bytes are destroyed, never pooled; no stream is
    left in the reactor, and the fds are those of the reactor and the idle pool only. What got
    through is exactly what the Flows say: the far ends then read to EOF (the caller shuts the
    sockets down) a prefix of what was sent, as long as `spliced` says."""
    base = open_fds()
    engine = Engine()
    up_data, down_data = payload(3, 16 * MiB), payload(4, 16 * MiB)
    (user, a), (b, server) = await tcp_pair(64 << 10), await tcp_pair(64 << 10)
    up, down = Flow(), Flow()
    relay_scope = trio.CancelScope()
    relay_done = trio.Event()
    read_first: dict[str, bytes] = {}

    async def run_relay() -> None:
        with relay_scope:
            await relay(a, b, engine, up, down, linger=30)
        relay_done.set()

    async def flood(sock, data: bytes) -> None:
        view = memoryview(data)
        while view:  # more than every buffer on the way holds: blocks until cancelled
            view = view[await sock.send(view[:CHUNK]):]

    async def read_some(sock, name: str) -> None:
        read_first[name] = await recv_exactly(sock, 2 * MiB)  # then stops reading

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, user, up_data)
            nursery.start_soon(flood, server, down_data)
            nursery.start_soon(run_relay)
            async with trio.open_nursery() as readers:
                readers.start_soon(read_some, server, "up")
                readers.start_soon(read_some, user, "down")
            await trio.testing.wait_all_tasks_blocked()  # clogged: every task waits on a full fd
            assert engine.pool.stats.destroyed_dirty == 0
            idle_before = engine.pool.idle
            started = trio.current_time()
            relay_scope.cancel()
            await relay_done.wait()
            assert trio.current_time() - started < 1.0
            nursery.cancel_scope.cancel()  # the floods
    assert relay_scope.cancelled_caught
    assert engine.pool.stats.destroyed_dirty == 2  # each direction's pipe held bytes
    assert engine.pool.idle == idle_before
    assert engine.reactor().waiting == 0
    assert open_fds() == base + 4 + 2 + 2 * engine.pool.idle  # 4 sockets, epoll, eventfd

    # Nothing lost or duplicated up to the cancel, and the counters say exactly how much moved.
    b.shutdown(socket.SHUT_WR)
    a.shutdown(socket.SHUT_WR)
    with trio.fail_after(10):
        up_got = read_first["up"] + await recv_to_eof(server)
        down_got = read_first["down"] + await recv_to_eof(user)
    assert len(up_got) == up.spliced + up.copied > 2 * MiB
    assert len(down_got) == down.spliced + down.copied > 2 * MiB
    assert sha(up_got) == sha(up_data[:len(up_got)])
    assert sha(down_got) == sha(down_data[:len(down_got)])
    for sock in (user, a, b, server):
        sock.close()
    engine.close()
    assert open_fds() == base


# --- an Engine and the end of trio.run ------------------------------------------------------------

async def _relay_once(engine: Engine, seed: int, size: int) -> str:
    (user, a), (b, server) = await tcp_pair(), await tcp_pair()
    with user, a, b, server:
        data = payload(seed, size)
        got: list[bytes] = []

        async def read_it() -> None:
            got.append(await recv_to_eof(server))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_then_eof, user, data)
            nursery.start_soon(read_it)
            nursery.start_soon(send_then_eof, server, b"")
            end = await relay(a, b, engine, Flow(), Flow(), linger=30)
        assert await user.recv(1) == b""
        assert got == [data]
        return end.reason


def test_engines_across_trio_runs_work_and_free_each_runs_fds():
    """An embedder that calls trio.run more than once: a new Engine in a second run works, and
    so does the first engine in a third run. What belongs to a run (the reactor's epoll and
    eventfd) is freed when that run ends, even if the embedder never calls close(); what
    outlives it is the pool's idle pipes, which Engine.close() frees."""
    base = open_fds()
    first = Engine()
    assert trio.run(_relay_once, first, 5, 2 * MiB) == "eof"
    assert first.pool.idle >= 1
    assert open_fds() == base + 2 * first.pool.idle
    second = Engine()
    assert trio.run(_relay_once, second, 6, 3 * MiB) == "eof"
    assert open_fds() == base + 2 * (first.pool.idle + second.pool.idle)
    assert trio.run(_relay_once, first, 7, 2 * MiB) == "eof"
    assert open_fds() == base + 2 * (first.pool.idle + second.pool.idle)
    first.close()
    second.close()
    assert open_fds() == base


# --- misuse an embedder could commit -------------------------------------------------------------

async def _misuse(case: str, stack: list):
    """(a, b) for relay() as the misuse `case` has them, and the exception and message wanted."""
    (user, a), (b, server) = await tcp_pair(), await tcp_pair()
    stack += [user, a, b, server]
    # The peers have something to say, so a relay that started would have work to do.
    await user.send(b"hello")
    user.shutdown(socket.SHUT_WR)
    if case == "closed":
        b.close()
        return (a, b), ValueError, "b is closed"
    if case == "same socket twice":
        return (a, a), ValueError, "same socket"
    if case == "SocketStream, not its socket":
        return (trio.SocketStream(a), trio.SocketStream(b)), TypeError, r"pass its \.socket"
    if case == "a pipe":
        r, w = os.pipe()
        os.set_blocking(w, False)
        pipe = os.fdopen(w, "wb", buffering=0)
        stack += [pipe, os.fdopen(r, "rb")]
        return (a, pipe), TypeError, "not a socket"
    if case == "an int fd":
        return (a, b.fileno()), TypeError, "not a socket"
    if case == "a blocking stdlib socket":
        left, right = socket.socketpair()  # blocking, as the stdlib makes them
        stack += [left, right]
        return (a, left), ValueError, "blocking"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["closed", "same socket twice", "SocketStream, not its socket",
                                  "a pipe", "an int fd", "a blocking stdlib socket"])
async def test_misuse_is_a_clear_exception_before_anything_starts(case):
    """relay() given what it cannot relay raises at once, with a message that says what is
    wrong, instead of hanging (the same socket twice echoed it to itself and never ended; a
    blocking socket blocked the whole trio run inside splice), crashing the trio run (an end
    without shutdown() failed inside the reactor), or failing in the reactor with a message
    about epoll. Closing the engine right after, as an embedder's `finally:` would, must not
    crash the run either, and nothing is left open."""
    base = open_fds()
    stack: list = []
    (a, b), kind, said = await _misuse(case, stack)
    engine = Engine()
    try:
        with trio.fail_after(5):
            with pytest.raises(kind, match=said):
                await relay(a, b, engine, Flow(), Flow(), linger=1)
    finally:
        engine.close()
    await trio.testing.wait_all_tasks_blocked()  # the engine's tasks, if any, see it closed
    for thing in stack:
        thing.close()
    assert open_fds() == base


async def test_an_engine_closed_before_its_reactor_ran_does_not_crash_the_run():
    """Engine.reactor() starts the reactor's tasks; an engine closed before they first run (a
    relay that failed at once, an embedder's `finally: engine.close()`) used to kill the whole
    trio run with TrioInternalError (the task met a closed epoll). Its tasks must just end, and
    the run goes on: the same engine, closed, relays again (it used to raise "I/O operation on
    closed epoll object")."""
    base = open_fds()
    engine = Engine()
    engine.reactor()
    engine.close()
    await trio.testing.wait_all_tasks_blocked()
    assert open_fds() == base
    assert await _relay_once(engine, 8, 2 * MiB) == "eof"
    engine.close()
    assert open_fds() == base


# --- Forwarder embedded in a trio program ----------------------------------------------------------

class _Finished(logging.Handler):
    """Learns of each finished connection from the "zcrelay" logger's one line per connection,
    as a program that reads the log would (`on_finished` is the hook made for it: see below):
    the line and a trio.Event per line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if line.startswith("conn="):
            self.lines.append(line)
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, n: int) -> None:
        while len(self.lines) < n:
            await self.changed.wait()


async def test_forwarder_embedded_with_a_port_0_rule_serves_then_stops_on_cancel(capfd):
    """A program runs Forwarder.serve in its own nursery with a port-0 rule: nursery.start()
    hands back the bound addresses (Bound.address, "127.0.0.1:PORT"), which is how the embedder
    learns the port. One connection moves 8 MiB each way with half-close; a second is left
    mid-transfer when the program cancels the forwarder's scope: that one is shut, serve()
    returns, the port is closed, totals stay readable, every fd is freed, and the library
    printed nothing and touched no signal handler."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    base = open_fds()
    log = logging.getLogger("zcrelay")
    finished = _Finished()
    level, handlers_before, propagate = log.level, log.handlers[:], log.propagate
    # Only ours: a CLI test earlier in the session may have left the logger a handler on a
    # stderr that pytest has since closed ("--- Logging error ---" on the real stderr).
    log.handlers[:] = [finished]
    log.propagate = False
    log.setLevel(logging.INFO)
    up_data, down_data = payload(20, BIG), payload(21, BIG + 7)
    second_arrived = trio.Event()
    results: dict[str, str] = {}

    async def target(stream: trio.SocketStream) -> None:
        async with stream:
            first = await stream.receive_some(CHUNK)
            if first == b"second":
                second_arrived.set()
                await trio.sleep_forever()  # until the test's nursery is cancelled
            results["target got"] = sha(first + await recv_to_eof(stream.socket))
            await send_then_eof(stream.socket, down_data)

    try:
        async with trio.open_nursery() as servers:
            [target_listener] = await servers.start(partial(trio.serve_tcp, target, 0, host="127.0.0.1"))
            target_port = target_listener.socket.getsockname()[1]
            forwarder = Forwarder(ForwardConfig(rules=(Rule(Address("127.0.0.1", 0),
                                                            Address("127.0.0.1", target_port)),)))
            with trio.fail_after(20):
                async with trio.open_nursery() as embedding:
                    bound = await embedding.start(forwarder.serve)
                    assert isinstance(bound, list) and len(bound) == 1 and isinstance(bound[0], Bound)
                    host, _, port_text = bound[0].address.rpartition(":")
                    port = int(port_text)
                    assert host == "127.0.0.1" and port != 0

                    with trio.socket.socket() as client:
                        await client.connect(("127.0.0.1", port))
                        async with trio.open_nursery() as both:
                            both.start_soon(send_then_eof, client, up_data)
                            results["client got"] = sha(await recv_to_eof(client))
                    await finished.wait_for(1)

                    second = trio.socket.socket()
                    await second.connect(("127.0.0.1", port))
                    await second.send(b"second")
                    await second_arrived.wait()
                    assert forwarder.totals.active == 1
                    embedding.cancel_scope.cancel()  # the embedder stops the forwarder
                # serve() has returned: the connection left mid-transfer was shut down.
                with second:
                    assert await second.recv(1) == b""
            servers.cancel_scope.cancel()
    finally:
        log.handlers[:] = handlers_before
        log.propagate = propagate
        log.setLevel(level)

    assert results == {"target got": sha(up_data), "client got": sha(down_data)}
    assert len(finished.lines) == 2
    assert f"up={len(up_data)} down={len(down_data)}" in finished.lines[0]
    assert finished.lines[0].endswith("close=eof")
    assert finished.lines[1].endswith("close=shutdown")
    totals = forwarder.totals
    assert (totals.connections, totals.active, totals.closes) == (2, 0, Counter({"eof": 1, "shutdown": 1}))
    assert totals.up == len(up_data) + len(b"second") and totals.down == len(down_data)
    assert totals.spliced == totals.up + totals.down and totals.copied == 0
    with pytest.raises(OSError):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    assert open_fds() == base
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert capfd.readouterr() == ("", "")


async def test_forwarder_that_cannot_bind_raises_bind_error_and_leaves_the_run_alive(tmp_path):
    """A rule whose Unix path cannot be bound (its directory does not exist): serve() raises
    BindError through nursery.start, before anything is served. It used to kill the whole trio
    run instead (TrioInternalError: the engine was closed before its reactor task first ran)."""
    base = open_fds()
    rule = Rule(Address(path=str(tmp_path / "no such dir" / "sock")), Address("127.0.0.1", 9))
    forwarder = Forwarder(ForwardConfig(rules=(rule,)))
    async with trio.open_nursery() as nursery:
        with pytest.raises(BindError, match="cannot listen on"):
            await nursery.start(forwarder.serve)
    await trio.testing.wait_all_tasks_blocked()
    assert open_fds() == base


async def test_a_stopped_forwarder_serves_again_in_the_same_run():
    """An embedder stops a Forwarder (cancels its scope) and serves it again in the same run:
    the second serve binds new port-0 listeners and relays 2 MiB each way intact, and its
    connect timeout still fires for a target that drops SYNs. (The second serve used to fail
    on the first one's closed reactor; then its connect timeouts never fired, the first serve's
    cancelled timer being taken for a pending one; and its connections were counted against
    the first serve's closed listeners.)"""
    base = open_fds()
    data = payload(30, 2 * MiB + 3)

    async def echoed(port: int) -> bytes:
        with trio.socket.socket() as client:
            await client.connect(("127.0.0.1", port))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_then_eof, client, data)
                return await recv_to_eof(client)

    with syn_dropping_listener() as dropping:
        async with trio.open_nursery() as servers:
            [echo_listener] = await servers.start(partial(trio.serve_tcp, traffic.echo, 0, host="127.0.0.1"))
            rules = (Rule(Address("127.0.0.1", 0), Address("127.0.0.1", echo_listener.socket.getsockname()[1])),
                     Rule(Address("127.0.0.1", 0), Address("127.0.0.1", dropping)))
            forwarder = Forwarder(ForwardConfig(rules=rules, connect_timeout=0.5))
            with trio.fail_after(10):
                for serving in ("first", "again"):
                    async with trio.open_nursery() as embedding:
                        bound = await embedding.start(forwarder.serve)
                        ports = [int(b.address.rpartition(":")[2]) for b in bound]
                        assert sha(await echoed(ports[0])) == sha(data), serving
                        assert [listener.closed for listener in forwarder._listeners] == [False, False]
                        if serving == "again":
                            with trio.socket.socket() as client:
                                await client.connect(("127.0.0.1", ports[1]))
                                assert await recv_to_eof(client) == b""  # the connect timed out
                        embedding.cancel_scope.cancel()  # the first: with a connect timer pending
            servers.cancel_scope.cancel()
    totals = forwarder.totals
    assert (totals.connections, totals.closes) == (3, Counter({"eof": 2, "timeout": 1}))
    assert totals.up == totals.down == 2 * len(data)
    assert open_fds() == base


# --- the "zcrelay" logger of a program that sets no logging up ------------------------------------

# A program that embeds a Forwarder with --max-conns 1 and sets no logging up (argv[1] "none"),
# or calls logging.basicConfig() ("basicConfig"). Two clients connect: accepting the second finds
# the limit reached, a WARNING. A filter (not a handler: it leaves the logger's handlers as they
# are) tells the program that the warning was logged; it then stops and prints "warned".
EMBEDDER = """
import logging
import sys

import trio

from zcrelay.addresses import Address
from zcrelay.forward import ForwardConfig, Forwarder, Rule


async def main(setup):
    if setup == "basicConfig":
        logging.basicConfig()
    warned = trio.Event()

    def seen(record):
        if record.levelno >= logging.WARNING:
            warned.set()
        return True

    logging.getLogger("zcrelay").addFilter(seen)
    with trio.socket.socket() as target:
        await target.bind(("127.0.0.1", 0))
        target.listen(8)
        rule = Rule(Address("127.0.0.1", 0), Address("127.0.0.1", target.getsockname()[1]))
        forwarder = Forwarder(ForwardConfig(rules=(rule,), max_conns=1))
        clients = [trio.socket.socket() for _ in range(2)]
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                [bound] = await nursery.start(forwarder.serve)
                for client in clients:  # the second one waits in the backlog
                    await client.connect(("127.0.0.1", int(bound.address.rpartition(":")[2])))
                await warned.wait()
                nursery.cancel_scope.cancel()
        for client in clients:
            client.close()
    print("warned")


trio.run(main, sys.argv[1])
"""


def run_embedder(setup: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", EMBEDDER, setup], capture_output=True, text=True,
                          env=zcrelay_env(), timeout=60)
    assert done.returncode == 0 and done.stdout == "warned\n", done.stderr
    return done.stdout, done.stderr


def test_a_program_that_sets_no_logging_up_gets_no_zcrelay_warnings_on_stderr():
    """The "zcrelay" logger had no handler of its own, so in a program that set no logging up
    its warnings were printed on stderr by logging's last resort handler, as if the program had
    said them. A library's logger has a NullHandler: the program's stderr stays its own."""
    _, err = run_embedder("none")
    assert err == "", err


def test_a_program_that_sets_logging_up_still_gets_zcrelay_warnings():
    """The NullHandler keeps nothing from a handler the program sets up (here the root's)."""
    _, err = run_embedder("basicConfig")
    assert err.splitlines() == ["WARNING:zcrelay:--max-conns 1 reached: further clients wait in the listen "
                                "backlog until a connection ends (said once)"], err


async def test_the_cli_still_logs_as_before(zcrelay):
    """The command's own handler ('zcrelay: ' lines on stderr) is not the NullHandler: the
    warning and the per-connection line still come out, each once, as they did."""
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        relay = zcrelay("forward", "127.0.0.1:0", f"127.0.0.1:{listener.getsockname()[1]}", "--max-conns", "1")
        clients = [trio.socket.socket() for _ in range(2)]
        for client in clients:
            await client.connect(("127.0.0.1", relay.port))
        relay.wait_for_lines("--max-conns 1 reached", 1)
        code, err = relay.stop()
        for client in clients:
            client.close()
    assert code == 0, err
    lines = err.splitlines()
    assert lines.count("zcrelay: --max-conns 1 reached: further clients wait in the listen backlog until "
                       "a connection ends (said once)") == 1, err
    conn = re.compile(r"zcrelay: conn=1 rule=1 peer=127\.0\.0\.1:\d+ target=127\.0\.0\.1:\d+ up=0 down=0 "
                      r"spliced=0 copied=0 duration=\d+\.\d{3}s close=shutdown$")
    assert sum(bool(conn.match(line)) for line in lines) == 1, err
    assert all(line.startswith("zcrelay: ") for line in lines), err


# --- Forwarder(on_finished=...): a record of each finished connection -------------------------------

@contextmanager
def zcrelay_log_lines():
    """The "zcrelay" logger's messages (INFO and up) while it runs, with only this handler (a
    CLI test earlier in the session may have left one on a stderr pytest has since closed)."""
    log = logging.getLogger("zcrelay")
    level, handlers, propagate = log.level, log.handlers[:], log.propagate
    lines: list[tuple[int, str]] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append((record.levelno, record.getMessage()))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.handlers[:] = handlers
        log.propagate = propagate
        log.setLevel(level)


class Records:
    """An on_finished callback: keeps each record (and, given `totals`, a function that returns
    the forwarder's Totals, how many connections they had counted then), wakes who waits for
    the n-th, and raises after keeping it if told to."""

    def __init__(self, totals=None, raising: bool = False) -> None:
        self.records: list[Finished] = []
        self.counted: list[int] = []
        self.totals = totals
        self.raising = raising
        self.changed = trio.Event()

    def __call__(self, record: Finished) -> None:
        self.records.append(record)
        if self.totals is not None:
            self.counted.append(self.totals().connections)
        self.changed.set()
        self.changed = trio.Event()
        if self.raising:
            raise RuntimeError(f"embedder bug #{len(self.records)}")

    async def wait_for(self, n: int) -> None:
        while len(self.records) < n:
            await self.changed.wait()


async def echo_through(port: int, data: bytes) -> tuple[str, bytes]:
    """Send `data` through the forwarder's port and half-close; (the client's own address, as
    the forwarder's peer= shows it; what came back to EOF)."""
    with trio.socket.socket() as client:
        await client.connect(("127.0.0.1", port))
        host, client_port = client.getsockname()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_then_eof, client, data)
            return f"{host}:{client_port}", await recv_to_eof(client)


# reactor: a literal target, connected and relayed by callbacks (_Link); task: a captured
# connection, which takes a task (_handle). Each path calls on_finished from its own place.
PATHS = ["reactor", "task"]


@pytest.mark.parametrize("path", PATHS)
async def test_on_finished_gets_a_frozen_record_of_each_connection(tmp_path, path):
    """An embedder learned of finished connections only by parsing log lines. on_finished gets
    each one's record (Finished): who, where to, bytes each way, spliced and copied, how long,
    why it closed; the same record the log line is made from, frozen. It comes after the
    forwarder has counted the connection, for a relayed connection and a refused one alike."""
    base = open_fds()
    data = payload(40, 2 * MiB + 5)
    refusing = socket.socket()  # bound, not listening: a connect to it is refused
    refusing.bind(("127.0.0.1", 0))
    with refusing, zcrelay_log_lines() as lines:
        async with trio.open_nursery() as servers:
            [echo_listener] = await servers.start(partial(trio.serve_tcp, traffic.echo, 0, host="127.0.0.1"))
            echo_port = echo_listener.socket.getsockname()[1]
            rules = (Rule(Address("127.0.0.1", 0), Address("127.0.0.1", echo_port)),
                     Rule(Address("127.0.0.1", 0), Address("127.0.0.1", refusing.getsockname()[1])))
            config = ForwardConfig(rules=rules, capture_dir=str(tmp_path) if path == "task" else None)
            finished = Records(totals=lambda: forwarder.totals)
            forwarder = Forwarder(config, on_finished=finished)
            with trio.fail_after(20):
                async with trio.open_nursery() as embedding:
                    bound = await embedding.start(forwarder.serve)
                    ports = [int(b.address.rpartition(":")[2]) for b in bound]
                    peer, got = await echo_through(ports[0], data)
                    assert sha(got) == sha(data)
                    await finished.wait_for(1)
                    with trio.socket.socket() as client:
                        await client.connect(("127.0.0.1", ports[1]))
                        assert await client.recv(1) == b""  # the target refused: closed
                        refused_peer = "127.0.0.1:%d" % client.getsockname()[1]
                    await finished.wait_for(2)
                    embedding.cancel_scope.cancel()
            servers.cancel_scope.cancel()

    relayed, refused = finished.records
    assert isinstance(relayed, Finished)
    assert (relayed.number, relayed.rule, relayed.peer, relayed.target) == (1, 1, peer, rules[0].target)
    assert (relayed.up, relayed.down, relayed.close, relayed.fallbacks) == (len(data), len(data), "eof", ())
    assert relayed.spliced + relayed.copied == 2 * len(data) and relayed.spliced > 0
    assert 0 < relayed.duration < 20
    assert (refused.number, refused.rule, refused.peer, refused.target) == (2, 2, refused_peer, rules[1].target)
    assert (refused.up, refused.down, refused.spliced, refused.copied, refused.close) == (0, 0, 0, 0, "refused")
    assert finished.counted == [1, 2]  # the forwarder's totals already had each one
    with pytest.raises(AttributeError):  # immutable
        relayed.close = "changed"  # type: ignore[misc]
    # The log line is the record's: one record type for both.
    assert [text for _, text in lines if text.startswith("conn=")] == [r.log_line() for r in finished.records]
    assert open_fds() == base


@pytest.mark.parametrize("path", PATHS)
async def test_an_on_finished_that_raises_is_logged_and_the_forwarder_goes_on(tmp_path, path):
    """A bug in the embedder's callback must not take the forwarder down (in a connection's
    task it would have ended the whole nursery; in the reactor, the reactor): it is logged, as
    an error naming the connection and the exception, and the forwarder serves on, counts
    right, and stops cleanly."""
    base = open_fds()
    data = payload(41, MiB + 9)
    with zcrelay_log_lines() as lines:
        async with trio.open_nursery() as servers:
            [echo_listener] = await servers.start(partial(trio.serve_tcp, traffic.echo, 0, host="127.0.0.1"))
            rule = Rule(Address("127.0.0.1", 0), Address("127.0.0.1", echo_listener.socket.getsockname()[1]))
            finished = Records(raising=True)
            forwarder = Forwarder(ForwardConfig(rules=(rule,), capture_dir=str(tmp_path) if path == "task" else None),
                                  on_finished=finished)
            with trio.fail_after(20):
                async with trio.open_nursery() as embedding:
                    [bound] = await embedding.start(forwarder.serve)
                    port = int(bound.address.rpartition(":")[2])
                    for n in (1, 2, 3):
                        _, got = await echo_through(port, data)
                        assert sha(got) == sha(data), n
                        await finished.wait_for(n)
                    embedding.cancel_scope.cancel()
            servers.cancel_scope.cancel()
    assert [r.close for r in finished.records] == ["eof"] * 3
    errors = [text for level, text in lines if level >= logging.ERROR]
    assert errors == [f"conn={n}: on_finished raised RuntimeError: embedder bug #{n}" for n in (1, 2, 3)], lines
    totals = forwarder.totals
    assert (totals.connections, totals.active, totals.closes) == (3, 0, Counter({"eof": 3}))
    assert open_fds() == base


async def test_a_callers_on_bytes_is_kept_with_idle_and_linger():
    """A caller's Flow.on_bytes (a progress display, say) was overwritten by relay(idle=...),
    which counts activity through the same hook: the caller's callback saw no byte. With idle
    and linger both set (activity is tracked from the start, and again from the half-close),
    it must see every byte, once."""
    seen = {"up": 0, "down": 0}
    up = Flow(on_bytes=lambda n: seen.__setitem__("up", seen["up"] + n))
    down = Flow(on_bytes=lambda n: seen.__setitem__("down", seen["down"] + n))
    up_data, down_data = payload(71, 3 * MiB), payload(72, 2 * MiB + 5)
    (user, a), (b, server) = await tcp_pair(), await tcp_pair()
    got = {}
    with user, a, b, server, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_then_eof, user, up_data)
            nursery.start_soon(send_then_eof, server, down_data)

            async def read(name, sock):
                got[name] = sha(await recv_to_eof(sock))

            nursery.start_soon(read, "up", server)
            nursery.start_soon(read, "down", user)
            end = await relay(a, b, Engine(), up, down, idle=30, linger=30)
    assert end.reason == "eof" and got == {"up": sha(up_data), "down": sha(down_data)}
    assert seen == {"up": len(up_data), "down": len(down_data)} == {"up": up.bytes, "down": down.bytes}
