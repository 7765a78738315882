"""Misbehaving peers, all at once, through one `zcrelay forward`.

The other tests take one fault at a time. Here clients and servers that reset, vanish, close
with bytes unread, read slowly or behave run side by side, drawn from a seeded RNG, so that
each fault lands while other connections are mid-transfer in the same reactor. What must hold:
- every connection whose two peers behave arrives intact both ways (SHA-256), however its
  neighbours end;
- the relay logs one line for each connection, never a traceback, and serves on: a last batch
  of well-behaved connections arrives intact after the storm;
- no fd is left behind: the relay's fd table (pipes aside: the pool keeps a bounded few) is
  back where it started, and it exits 0 with a summary that counts every connection;
- with --capture-dir, each direction's file holds a prefix of what its sender sent, as long
  as the sidecar says was relayed, and all of it for connections that behaved;
- with --max-conns, the same, though most clients wait in the backlog for their turn.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import struct

import pytest
import trio

from tests import traffic
from tests.test_forward import conn_lines, path_args
from tests.test_forward_proofs import fd_count, pipe_fds

KiB, MiB = 1 << 10, 1 << 20
# Client → server header: connection id, bytes wanted back, what the server is to do.
HEADER = struct.Struct("!QQB")
SERVE, SERVE_SLOWLY, RESET_AFTER_HEADER, CLOSE_UNREAD, WAIT = range(5)
# What a client does.
BEHAVE, READ_SLOWLY, RESET_MIDWAY, VANISH = "behave", "read slowly", "reset midway", "vanish"
GO_SILENT = "go silent"  # with WAIT: both ends wait, with the connection open, for its end
RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def _reset(sock) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    sock.close()


class Peers:
    """The far end. received[id] = (length, sha256) of what a serving connection read."""

    def __init__(self, listener) -> None:
        self.listener = listener
        self.received: dict[int, tuple[int, str]] = {}
        self.done: set[int] = set()
        self._changed = trio.Event()

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                sock, _ = await self.listener.accept()
                nursery.start_soon(self._handle, sock)

    async def wait_for(self, ids) -> None:
        with trio.fail_after(60):
            while not set(ids) <= self.done:
                await self._changed.wait()
                self._changed = trio.Event()

    async def _handle(self, sock) -> None:
        conn_id = None
        try:
            conn_id, want, how = HEADER.unpack(await traffic.recv_exactly(sock, HEADER.size))
            if how == RESET_AFTER_HEADER:
                await sock.recv(64 * KiB)
                _reset(sock)
                return
            if how == WAIT:
                await until_closed(sock)
                return
            rng = random.Random(conn_id)
            if how == CLOSE_UNREAD:  # half the reply, then close with the request unread: a reset
                await traffic.send_chunks(sock, traffic.payload(conn_id, "down", want)[:want // 2], rng)
                return
            chunk = 4 * KiB if how == SERVE_SLOWLY else 256 * KiB
            received = await both_ways(sock, traffic.payload(conn_id, "down", want), rng,
                                       random.Random(~conn_id), chunk)
            if received is not None:
                self.received[conn_id] = received
        except (OSError, EOFError):
            pass  # the client misbehaved: this connection ends, nothing to record
        finally:
            sock.close()
            if conn_id is not None:
                self.done.add(conn_id)
                self._changed.set()


async def until_closed(sock) -> None:
    """Read (nothing is sent) until the relay closes the connection."""
    with trio.fail_after(60):
        while await sock.recv(64 * KiB):
            pass


async def both_ways(sock, data: bytes, send_rng, recv_rng, chunk: int) -> tuple[int, str] | None:
    """Send `data` then shut down the write side, while reading to EOF in reads of at most
    `chunk` bytes: (length, sha256) of what was read, or None if the connection was cut."""
    cut = []

    async def send() -> None:
        try:
            await traffic.send_chunks(sock, data, send_rng)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            cut.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        try:
            received = await traffic.recv_all(sock, recv_rng, chunk)
        except OSError as exc:
            cut.append(exc)
    return None if cut else received


def plan(rng: random.Random, count: int, silent: bool = False) -> list[tuple[int, str, int, int, int]]:
    """(id, client's behaviour, server's, bytes up, bytes down) for each connection. Half
    of them behave on both sides; sizes from 0 to 2 MiB, past a pipe and a socket buffer.
    With `silent`, one in eight goes silent at both ends after the header."""
    conns = []
    for conn_id in range(count):
        if silent and rng.random() < 1 / 8:
            client, server = GO_SILENT, WAIT
        elif rng.random() < 0.5:
            client, server = rng.choice([BEHAVE, READ_SLOWLY]), rng.choice([SERVE, SERVE_SLOWLY])
        else:
            client = rng.choice([BEHAVE, READ_SLOWLY, RESET_MIDWAY, VANISH])
            server = rng.choice([SERVE, SERVE_SLOWLY, RESET_AFTER_HEADER, CLOSE_UNREAD])
        up, down = (rng.choice([0, rng.randrange(1, 2 * MiB)]) for _ in range(2))
        conns.append((conn_id, client, server, up, down))
    return conns


def behaves(client: str, server: int) -> bool:
    return client in (BEHAVE, READ_SLOWLY) and server in (SERVE, SERVE_SLOWLY)


def upstream(conn_id: int, server: int, up: int, down: int) -> bytes:
    """Every byte a client (that does not vanish) means to send."""
    return HEADER.pack(conn_id, down, server) + traffic.payload(conn_id, "up", up)


async def run_client(address, conn_id: int, client: str, server: int, up: int, down: int):
    """Play one connection: (its local port (TCP), (length, sha256) of what came back or None
    if it was cut, which only a misbehaving side may cause)."""
    unix = isinstance(address, str)
    sock = trio.socket.socket(socket.AF_UNIX if unix else socket.AF_INET)
    with sock:
        await sock.connect(address)
        port = 0 if unix else sock.getsockname()[1]
        if client == VANISH:
            return port, None
        data = upstream(conn_id, server, up, down)
        if client == RESET_MIDWAY:
            await sock.send(data[: HEADER.size + up // 2])
            _reset(sock)
            return port, None
        if client == GO_SILENT:
            await sock.send(data[: HEADER.size])
            try:
                await until_closed(sock)
            except OSError:
                pass
            return port, None
        chunk = 4 * KiB if client == READ_SLOWLY else 256 * KiB
        received = await both_ways(sock, data, random.Random(conn_id * 7 + 1),
                                   random.Random(conn_id * 7 + 2), chunk)
        assert received is not None or not behaves(client, server), f"conn {conn_id} was cut"
        return port, received


def check_captures(directory, conns, ports: dict[int, int], err: str = "") -> None:
    """Each direction's file is a prefix of what its sender sent, at least as long as what the
    sidecar says was relayed (so complete, however the connection ended: no disk failed
    here); the whole of it where both sides behaved."""
    records = {}
    paths = sorted(directory.glob("*.json"))
    for path in paths:
        record = json.loads(path.read_text())
        records[int(record["peer"].rsplit(":", 1)[1])] = record
    # Once in a clean-clone CI run (2026-12-06) 103 records came for 104 connections, and the
    # assertion said no more: name what is missing, and what the relay logged of it.
    missing = [(conn, ports.get(conn[0])) for conn in conns if ports.get(conn[0]) not in records]
    assert len(paths) == len(records) == len(conns), (
        len(paths), len(records), missing,
        [line for line in err.splitlines() if any(f":{port} " in line for _, port in missing)])
    for conn_id, client, server, up, down in conns:
        record = records[ports[conn_id]]
        sent = {"up": b"" if client == VANISH else upstream(conn_id, server, up, down),
                "down": traffic.payload(conn_id, "down", down)}
        for direction, data in sent.items():
            captured = (directory / record[direction]["file"]).read_bytes()
            assert record[direction]["captured_bytes"] == len(captured) >= record[direction]["relayed_bytes"], \
                f"conn {conn_id} ({client}, {server}) {direction}: the capture lacks relayed bytes: {record}"
            assert record[direction]["complete"] is True, record
            if server == CLOSE_UNREAD and direction == "down":
                data = data[: down // 2]
            assert hashlib.sha256(captured).digest() == hashlib.sha256(data[: len(captured)]).digest(), \
                f"conn {conn_id} ({client}, {server}) {direction}: the capture is not what was sent"
            if behaves(client, server):
                assert len(captured) == len(data), (conn_id, direction)
        assert record["complete"] is True, record
        if behaves(client, server):
            assert record["close"] == "eof", record


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["relay", "trio-loop", "capture", "max-conns", "unix", "idle-timeout"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_misbehaving_peers_at_once_leave_the_rest_intact(zcrelay, path, seed, mode, tmp_path):
    """mode: a plain relay; the same under trio.run (ZCRELAY_LOOP=trio: the reactor as trio
    tasks, as the library runs it) rather than as the loop's host; with --capture-dir (the
    captures are checked too); with --max-conns 8, so most clients wait in the backlog and
    accepts pause and resume as connections end, however they end; Unix sockets both sides
    (where a close with bytes unread is the reset); with --idle-timeout 2 and connections
    that go silent at both ends, which only the timeout ends."""
    if mode == "unix":
        listener = trio.socket.socket(socket.AF_UNIX)
        await listener.bind(str(tmp_path / "target.sock"))
        listen, target = f"unix:{tmp_path / 'relay.sock'}", f"unix:{tmp_path / 'target.sock'}"
    else:
        listener = trio.socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind(("127.0.0.1", 0))
        listen, target = "127.0.0.1:0", f"127.0.0.1:{listener.getsockname()[1]}"
    listener.listen(1024)
    peers = Peers(listener)
    extra = {"capture": ["--capture-dir", str(tmp_path)], "max-conns": ["--max-conns", "8"],
             "idle-timeout": ["--idle-timeout", "2"]}.get(mode, [])
    relay = zcrelay("forward", listen, target, "--max-idle-pipes", "4", *extra, *path_args(path),
                    env={"ZCRELAY_LOOP": "trio"} if mode == "trio-loop" else {})
    pid = relay.proc.pid
    start_fds = fd_count(pid) - pipe_fds(pid)
    address = str(tmp_path / "relay.sock") if mode == "unix" else ("127.0.0.1", relay.port)
    conns = plan(random.Random(seed), 96, silent=mode == "idle-timeout")
    last = [(1000 + i, BEHAVE, SERVE, 1 * MiB + i, 3 * MiB - i) for i in range(8)]
    got: dict[int, tuple[int, str] | None] = {}
    ports: dict[int, int] = {}

    async def play(batch, limit: int) -> None:
        slots = trio.Semaphore(limit)

        async def one(conn_id, client, server, up, down) -> None:
            async with slots:
                ports[conn_id], got[conn_id] = await run_client(address, conn_id, client, server, up, down)

        async with trio.open_nursery() as nursery:
            for conn in batch:
                nursery.start_soon(one, *conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers.serve)
        with trio.fail_after(120):
            await play(conns, 32)
            await play(last, 8)  # after the storm: the relay still serves, intact
            await peers.wait_for([c[0] for c in conns + last if behaves(c[1], c[2])])
        for conn_id, client, server, up, down in conns + last:
            if behaves(client, server):
                want_down = traffic.digest(traffic.payload(conn_id, "down", down))
                want_up = traffic.digest(traffic.payload(conn_id, "up", up))
                assert got[conn_id] == (down, want_down), f"conn {conn_id} ({client}, {server}): down differs"
                assert peers.received.get(conn_id) == (up, want_up), f"conn {conn_id}: up differs"
        nursery.cancel_scope.cancel()

    total = len(conns) + len(last)
    with trio.fail_after(30):  # one log line per connection, as it ends
        await trio.to_thread.run_sync(relay.wait_for_lines, " close=", total, abandon_on_cancel=True)
    with trio.fail_after(20):  # and its fds go with it
        while fd_count(pid) - pipe_fds(pid) != start_fds:
            await trio.sleep(0.05)
    assert pipe_fds(pid) <= 2 * 4
    code, err = relay.stop()
    assert code == 0, err
    assert "Traceback" not in err, err
    assert len(conn_lines(err)) == total, err
    assert re.search(rf"stopped: {total} connections", err), err
    behaved = sum(behaves(c[1], c[2]) for c in conns)
    assert 30 < behaved < len(conns), behaved  # the plan really mixes both kinds
    silent = sum(c[1] == GO_SILENT for c in conns)
    idle = [m for m in conn_lines(err) if m.group(6) == "idle"]
    assert len(idle) == silent and (silent > 0) == (mode == "idle-timeout"), (silent, len(idle))
    if mode == "capture":
        check_captures(tmp_path, conns + last, ports, err)


# ---- `zcrelay serve`: one file to many clients, some of which misbehave ------------------

SERVE_SIZE = 4 * MiB  # past a pipe and a socket buffer
READ_ALL, READ_ALL_SLOWLY, CLOSE_UNREAD_MIDWAY, RESET_READING, HANG_UP = (
    "read all", "read all slowly", "close with bytes unread", "reset while reading", "hang up")


async def serve_client(address, how: str) -> tuple[int, str] | None:
    """One client of `zcrelay serve`: (length, sha256) of the whole file it read, or None."""
    sock = trio.socket.socket()
    with sock:
        await sock.connect(address)
        if how == HANG_UP:
            return None
        if how in (READ_ALL, READ_ALL_SLOWLY):
            sock.shutdown(socket.SHUT_WR)  # as `zcrelay connect < /dev/null` would
            chunk = 4 * KiB if how == READ_ALL_SLOWLY else 256 * KiB
            return await traffic.recv_all(sock, random.Random(len(how)), chunk)
        got = 0
        while got < SERVE_SIZE // 3:
            data = await sock.recv(64 * KiB)
            assert data, "EOF before a third of the file"
            got += len(data)
        if how == RESET_READING:
            _reset(sock)  # else: close() with bytes unread, which also sends a reset
        return None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["splice", "sendfile"])
async def test_serve_to_misbehaving_clients_at_once(zcrelay, tmp_path, method):
    """`zcrelay serve`: 48 clients at once, a third of them hanging up, closing with bytes
    unread or resetting midway. Each one that reads gets the whole file intact; serve logs a
    line per client, no traceback, gives back every fd, serves a last client, and exits 0."""
    path = tmp_path / "file"
    path.write_bytes(random.Random(3).randbytes(SERVE_SIZE))
    want = (SERVE_SIZE, traffic.digest(path.read_bytes()))
    server = zcrelay("serve", str(path), "--listen", "127.0.0.1:0", "--method", method, "--linger", "5")
    pid = server.proc.pid
    start_fds = fd_count(pid) - pipe_fds(pid)
    address = ("127.0.0.1", server.port)
    rng = random.Random(method)
    hows = [rng.choice([READ_ALL, READ_ALL_SLOWLY] * 3 + [CLOSE_UNREAD_MIDWAY, RESET_READING, HANG_UP])
            for _ in range(48)] + [READ_ALL]  # the last one: after the others
    got: dict[int, tuple[int, str] | None] = {}

    async def one(i: int) -> None:
        got[i] = await serve_client(address, hows[i])

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(48):
                nursery.start_soon(one, i)
        await one(48)
    for i, how in enumerate(hows):
        if how in (READ_ALL, READ_ALL_SLOWLY):
            assert got[i] == want, f"client {i} ({how}) did not get the file intact"
    assert {READ_ALL, CLOSE_UNREAD_MIDWAY, RESET_READING, HANG_UP} <= set(hows), hows
    with trio.fail_after(30):
        await trio.to_thread.run_sync(server.wait_for_lines, "conn=", 49, abandon_on_cancel=True)
    with trio.fail_after(20):  # a client's fds go as its log line comes
        while fd_count(pid) - pipe_fds(pid) != start_fds:
            await trio.sleep(0.05)
    code, err = server.stop()
    assert code == 0, err
    assert "Traceback" not in err and "internal-error" not in err, err
    lines = [line for line in err.splitlines() if "conn=" in line]
    assert len(lines) == 49, err
    assert sum(line.endswith(" ok") for line in lines) >= hows.count(READ_ALL) + hows.count(READ_ALL_SLOWLY)
    assert "stopped: 49 connections" in err, err


@pytest.mark.parametrize("method", ["splice", "sendfile"])
async def test_serve_stops_cleanly_with_transfers_in_flight(zcrelay, tmp_path, method):
    """SIGTERM while four clients are each in the middle of a 4 GiB file (sparse): serve
    exits 0, logs each of them close=shutdown with the bytes it sent, and the summary."""
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(4 << 30)
    server = zcrelay("serve", str(path), "--listen", "127.0.0.1:0", "--method", method)
    halfway = [trio.Event() for _ in range(4)]

    async def reader(i: int) -> None:
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", server.port))
            got = 0
            try:
                while data := await sock.recv(1 << 20):
                    got += len(data)
                    if got >= 8 << 20:
                        halfway[i].set()
            except OSError:
                pass

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(reader, i)
            for event in halfway:
                await event.wait()
            code, err = await trio.to_thread.run_sync(server.stop)
    assert code == 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "conn=" in line]
    assert len(lines) == 4 and all(line.endswith(" shutdown") for line in lines), err
    assert all(int(re.search(r" sent=(\d+)", line).group(1)) >= 8 << 20 for line in lines), err
    assert "stopped: 4 connections" in err, err
