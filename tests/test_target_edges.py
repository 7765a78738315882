"""`zcrelay forward` against targets that misbehave right after they accept: a reset before
reading the request, a FIN before reading anything, a greeting and then a reset.

Each target is a real listener on 127.0.0.1 port 0 that the test drives by hand. The relay is
a subprocess, as users run it; each case checks what the client sees, the one log line of the
connection (close=), that stderr has no traceback, and that the relay then still serves a
connection that moves more than a pipe-full both ways. Both copy paths (the `path` fixture).

Where the target acts before the relay has seen its connect complete matters: the relay then
learns of the target from connect's outcome, not from its streams. "connect-unseen" makes that
so every time: strace holds the relay in connect(2) for 0.5 s, meanwhile the target has acted.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct

import pytest
import trio

from tests import traffic
from tests.test_forward import conn_lines, path_args, read_to_eof, send_all
from zcrelay import syscalls

MiB = 1 << 20
REQUEST = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
# Bounds on every wait: generous, as a loaded CI host is slow; a hang fails, never blocks.
STEP = 20
TRANSFER = 60
# The relay's connect(2) returns this long after the kernel sent the SYN (strace's delay_exit,
# in microseconds): the target accepts, acts, and is done long before.
CONNECT_HELD = ["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=connect",
                "-e", "inject=connect:delay_exit=500000"]


async def open_target() -> trio.socket.SocketType:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    return listener


def start_relay(zcrelay, listener, path: str, *, held: bool = False, host: str = "127.0.0.1"):
    """`zcrelay forward` to `listener` (by `host`: "localhost" takes the task path, which
    resolves the name, a literal the reactor's); with `held`, under strace (CONNECT_HELD)."""
    prefix = None
    if held:
        if shutil.which("strace") is None:
            if os.environ.get("CI"):
                pytest.fail("strace is not installed (.ci/run installs it)")
            pytest.skip("strace is not installed")
        prefix = CONNECT_HELD
    return zcrelay("forward", "127.0.0.1:0", f"{host}:{listener.getsockname()[1]}", *path_args(path),
                   prefix=prefix)


def reset(sock) -> None:
    """Close `sock` with a TCP reset rather than a FIN (SO_LINGER {1, 0})."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def wait_for_closes(relay, count: int) -> None:
    """Until the relay has logged `count` finished connections (close=), bounded: the reading
    thread is abandoned on timeout and ends when the fixture kills the relay."""
    with trio.fail_after(STEP):
        await trio.to_thread.run_sync(relay.wait_for_lines, " close=", count, abandon_on_cancel=True)


async def recv_until_reset(sock) -> bytes:
    """What arrives before the connection is reset; fails on a clean EOF (a FIN)."""
    got = bytearray()
    with pytest.raises(ConnectionResetError):
        while data := await sock.recv(MiB):
            got += data
        pytest.fail(f"a clean EOF after {len(got)} bytes, where the target had reset")
    return bytes(got)


async def still_serves(relay, listener) -> None:
    """One more connection through the relay moves 5 MiB up and 3 MiB down (more than the
    1 MiB pipe and the socket buffers at once), each checked by SHA-256, and ends at EOF."""
    up, down = os.urandom(5 * MiB), os.urandom(3 * MiB)
    at_target: list[bytes] = []
    at_client: list[bytes] = []

    async def target() -> None:
        sock, _ = await listener.accept()
        with sock:
            at_target.append(await exchange(sock, down))

    async def client() -> None:
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", relay.port))
            at_client.append(await exchange(sock, up))

    with trio.fail_after(TRANSFER):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(target)
            nursery.start_soon(client)
    assert (len(at_target[0]), traffic.digest(at_target[0])) == (len(up), traffic.digest(up))
    assert (len(at_client[0]), traffic.digest(at_client[0])) == (len(down), traffic.digest(down))


async def exchange(sock, data: bytes) -> bytes:
    """Send `data` then a FIN on `sock` while reading what comes back, to its EOF."""
    async with trio.open_nursery() as nursery:
        async def send() -> None:
            await send_all(sock, data)
            sock.shutdown(socket.SHUT_WR)

        nursery.start_soon(send)
        return await read_to_eof(sock)


async def first_line(relay):
    """The log line of the first connection, once the relay has written it."""
    await wait_for_closes(relay, 1)
    [line] = conn_lines("\n".join(relay.stderr_lines))
    return line


async def serves_on(relay, listener, first_close: str) -> None:
    """After the first connection: a second moves data, both lines say why they closed, and the
    relay stops cleanly (exit 0, a summary of both, no traceback anywhere on stderr)."""
    await still_serves(relay, listener)
    await wait_for_closes(relay, 2)
    listener.close()
    code, err = relay.stop()
    assert code == 0, err
    assert "Traceback" not in err, err
    assert [m.group(6) for m in conn_lines(err)] == [first_close, "eof"], err
    assert "stopped: 2 connections" in err, err


@pytest.mark.parametrize("moment", ["at-accept", "request-queued", "connect-unseen"])
async def test_a_target_that_resets_before_reading_resets_the_client(zcrelay, path, moment):
    """The client sends a request; the target accepts and resets without reading a byte: at
    once ("at-accept": the request may still be on its way, and the relay's send of it may
    meet the reset), once the request waits unread in its receive queue ("request-queued"),
    or at once while the relay has not yet seen its connect complete ("connect-unseen").
    Without a relay the client would get ECONNRESET; through it, the same, never a FIN (which
    would read as an empty reply, complete). The log says "reset by target"."""
    listener = await open_target()
    relay = start_relay(zcrelay, listener, path, held=moment == "connect-unseen")
    with trio.fail_after(STEP):
        client = trio.socket.socket()
        with client:
            await client.connect(("127.0.0.1", relay.port))
            await client.send(REQUEST)
            target, _ = await listener.accept()
            if moment == "request-queued":
                await trio.lowlevel.wait_readable(target)  # the request is there, unread
            reset(target)
            assert await recv_until_reset(client) == b""
    line = await first_line(relay)
    assert line.group(6) == "reset by target", relay.stderr_lines
    # up= counts what reached the target's kernel: all of it once queued there, none if the
    # relay had not sent it before the reset, and at once, either.
    ups = {"at-accept": (0, len(REQUEST)), "request-queued": (len(REQUEST),), "connect-unseen": (0,)}[moment]
    assert int(line.group(2)) in ups and int(line.group(3)) == 0, line.group(0)
    await serves_on(relay, listener, "reset by target")


@pytest.mark.parametrize("moment", ["at-accept", "connect-unseen"])
async def test_a_target_that_closes_at_once_gives_the_client_eof(zcrelay, path, moment):
    """The target accepts and closes (a FIN) before the client sent anything: the client gets
    EOF, and its own FIN afterwards ends the connection as "eof". (A target that closed with
    the client's request unread would reset instead: Linux does so for bytes left unread.)"""
    listener = await open_target()
    relay = start_relay(zcrelay, listener, path, held=moment == "connect-unseen")
    with trio.fail_after(STEP):
        client = trio.socket.socket()
        with client:
            await client.connect(("127.0.0.1", relay.port))
            target, _ = await listener.accept()
            target.close()
            assert await read_to_eof(client) == b""
            client.shutdown(socket.SHUT_WR)  # the relay passes it on and the connection is over
    line = await first_line(relay)
    assert line.group(6) == "eof", relay.stderr_lines
    assert (int(line.group(2)), int(line.group(3))) == (0, 0), line.group(0)
    await serves_on(relay, listener, "eof")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # the reactor's connect, a task's
@pytest.mark.parametrize("moment", ["connect-seen", "connect-unseen"])
async def test_a_target_that_greets_then_resets_delivers_the_greeting_then_the_reset(zcrelay, path, moment, host):
    """The target accepts, sends a 6 KiB greeting and resets once the relay's kernel has taken
    it (acknowledged: it arrived before the reset). Without a relay the greeting would sit in
    the client's receive queue, readable before the ECONNRESET; through the relay the client
    must get the whole greeting, in order, then a reset (not a FIN), and the log counts it.

    "connect-seen": the target greets once the client's request has come through (unread), so
    the relay runs. "connect-unseen": it greets and resets while the relay is held in its
    connect, which then fails with ECONNRESET. Linux still keeps the greeting readable in the
    reset socket (as net.connect's keep_reset says), but forward took that for a connect that
    failed, closed the socket with the greeting in it and reset the client at once: the client
    got 0 bytes and the log said down=0 (unheld too, in about a third of the runs, whenever the
    reset won the race with the relay's epoll)."""
    listener = await open_target()
    relay = start_relay(zcrelay, listener, path, held=moment == "connect-unseen", host=host)
    greeting = os.urandom(6 * 1024)
    with trio.fail_after(STEP):
        client = trio.socket.socket()
        with client:
            await client.connect(("127.0.0.1", relay.port))
            if moment == "connect-seen":
                await client.send(REQUEST)
            target, _ = await listener.accept()
            if moment == "connect-seen":
                await trio.lowlevel.wait_readable(target)  # relayed: the relay runs
            await send_all(target, greeting)
            while syscalls.tcp_unacked(target):  # no event says "acknowledged": a short poll
                await trio.sleep(0.001)
            reset(target)
            got = await recv_until_reset(client)
    line = await first_line(relay)
    assert (len(got), traffic.digest(got)) == (len(greeting), traffic.digest(greeting)), line.group(0)
    assert line.group(6) == "reset by target", relay.stderr_lines
    up = len(REQUEST) if moment == "connect-seen" else 0
    assert (int(line.group(2)), int(line.group(3))) == (up, len(greeting)), line.group(0)
    await serves_on(relay, listener, "reset by target")
