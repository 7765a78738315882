"""A finished connection is freed by reference counting, not by the cyclic garbage collector.

Why it matters: a reference cycle per connection (owner -> stream -> bound method -> owner)
made every short connection feed the collector, whose passes cost `Connection: close` traffic
about 8% of the relay's CPU per connection (gc.disable() measured the same as breaking the
cycles). These tests relay real connections with the collector off, then collect with
DEBUG_SAVEALL: no object of the relay's may be found only through a cycle.
"""

from __future__ import annotations

import contextlib
import gc
import socket

import pytest
import trio

from zcrelay.addresses import parse
from zcrelay.forward import ForwardConfig, Forwarder, Rule
from zcrelay.relay import Engine, relay
from zcrelay.stats import Flow

# The relay's own per-connection objects, by class name.
RELAY_TYPES = {"Pair", "_Link", "_TaskRelay", "Stream", "Flow", "Connection", "RelayEnd", "Timer"}
CONNECTIONS = 40


@contextlib.contextmanager
def cyclic_garbage():
    """Yield a list that, after the block, holds the names of the relay's objects that only
    the cyclic collector could free."""
    found: list[str] = []
    gc.collect()
    gc.disable()
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found.extend(sorted(type(o).__qualname__ for o in gc.garbage if type(o).__qualname__ in RELAY_TYPES))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def _echo_once(listener: trio.socket.SocketType) -> None:
    """Serve connections: read one message, send it back, close."""
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()

            async def one(conn=conn) -> None:
                with conn:
                    data = await conn.recv(1024)
                    await conn.send(data)

            nursery.start_soon(one)


@pytest.mark.parametrize("idle", [None, 30.0], ids=["linger-only", "idle-timeout"])
async def test_forwarded_connections_leave_no_cycles(idle):
    """Short connections through the forwarder: the target closes first (Connection: close),
    the client then; with an idle timeout every flow reports its bytes from the start."""
    target = trio.socket.socket()
    await target.bind(("127.0.0.1", 0))
    target.listen(64)
    rule = Rule(parse("127.0.0.1:0", listen=True), parse(f"127.0.0.1:{target.getsockname()[1]}", listen=False))
    finished = []
    forwarder = Forwarder(ForwardConfig(rules=(rule,), idle_timeout=idle), on_finished=finished.append)
    with target, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_echo_once, target)
            [bound] = await nursery.start(forwarder.serve)
            port = int(bound.address.rsplit(":", 1)[1])
            await _one_client(port)  # the first connection's one-time set-up, outside the count
            with cyclic_garbage() as found:
                for i in range(CONNECTIONS):
                    await _one_client(port, i)
                while len(finished) < CONNECTIONS + 1:
                    await trio.sleep(0.01)  # the forwarder's record: no event says so
            nursery.cancel_scope.cancel()
    assert found == []
    assert {c.close for c in finished} == {"eof"}


async def _one_client(port: int, i: int = 0) -> None:
    client = trio.socket.socket()
    with client:
        await client.connect(("127.0.0.1", port))
        message = b"request %d" % i
        await client.send(message)
        got = b""
        while True:
            chunk = await client.recv(1024)
            if not chunk:
                break
            got += chunk
        assert got == message


async def test_library_relay_gives_the_flows_their_own_on_bytes_back():
    """relay() with an idle timeout wraps each flow's on_bytes to count activity; once it has
    returned the caller's own callback is back (nothing else holds the relay) and no cycle is
    left behind."""
    engine = Engine()
    seen: list[int] = []
    try:
        with cyclic_garbage() as found:
            for _ in range(10):
                a, a_peer = socket.socketpair()
                b, b_peer = socket.socketpair()
                with a, a_peer, b, b_peer:
                    for s in (a, b):
                        s.setblocking(False)
                    up, down = Flow(), Flow()
                    up.on_bytes = seen.append
                    a_peer.sendall(b"ping")
                    a_peer.shutdown(socket.SHUT_WR)
                    b_peer.sendall(b"pong")
                    b_peer.shutdown(socket.SHUT_WR)
                    with trio.fail_after(10):
                        end = await relay(a, b, engine, up, down, idle=30.0, linger=5.0)
                    assert end.reason == "eof", end
                    assert up.on_bytes == seen.append and down.on_bytes is None
                    assert b_peer.recv(16) == b"ping" and a_peer.recv(16) == b"pong"
                del up, down, end
    finally:
        engine.close()
    assert found == []
    assert sum(seen) == 40
