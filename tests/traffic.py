"""Traffic for relay tests: clients and a server that send seeded random data both ways in
random chunk sizes and check SHA-256 of everything that arrives.

Protocol: a client opens with a 16-byte header (connection id, bytes it wants back), then sends
its payload and shuts down its write side. The server sends the requested bytes back, reads the
client's payload to EOF and records (length, SHA-256) under the id. Each payload is a function
of (id, direction), so both ends know what the other should have received.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import threading
from dataclasses import dataclass, field

import trio

HEADER = struct.Struct("!QQ")


def payload(conn_id: int, direction: str, size: int) -> bytes:
    rng = random.Random(f"{conn_id}-{direction}")
    block = 32 << 20  # randbytes() of more than 2**28 bytes overflows a C int
    return b"".join(rng.randbytes(min(block, size - at)) for at in range(0, size, block))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Pipe sizes the property tests draw from: one page, the default, pipe-max-size's default.
PIPE_SIZES = (4096, 64 << 10, 1 << 20)


def write_pieces(fd: int, data: bytes, sizes: list[int]) -> None:
    """Write `data` to the blocking fd in writes of `sizes` bytes (as another process would
    feed a pipe), then close it."""
    view = memoryview(data)
    try:
        for size in sizes:
            chunk, view = view[:size], view[size:]
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
    finally:
        os.close(fd)


def read_to_eof(fd: int, into: bytearray) -> None:
    """Read the blocking fd to EOF into `into` (as another process would drain a pipe)."""
    while chunk := os.read(fd, 1 << 20):
        into += chunk


async def send_chunks(sock, data: bytes, rng: random.Random, max_chunk: int = 256 * 1024) -> None:
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        size = rng.randint(1, max_chunk)
        sent += await sock.send(view[sent:sent + size])


async def recv_all(sock, rng: random.Random, max_chunk: int = 256 * 1024) -> tuple[int, str]:
    """Read to EOF in random-sized reads; return (length, sha256)."""
    h = hashlib.sha256()
    total = 0
    while True:
        data = await sock.recv(rng.randint(1, max_chunk))
        if not data:
            return total, h.hexdigest()
        h.update(data)
        total += len(data)


async def flood(sock, chunk: int = 65536) -> None:
    """Send until cancelled: fills whatever is downstream when nobody reads the far end."""
    data = b"y" * chunk
    while True:
        await sock.send(data)


async def tcp_pair(near_rcvbuf: int | None = None) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A loopback TCP connection (near, far): what urgent data and readiness need (a
    socketpair is a Unix socket). `near_rcvbuf` is set before connecting, so the window near
    offers is small from the start."""
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        near = trio.socket.socket()
        if near_rcvbuf is not None:
            near.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, near_rcvbuf)
        await near.connect(listener.getsockname())
        far, _ = await listener.accept()
    return near, far


URGENT_SENT = {"eof": b"abc!def", "more": b"abc!defghi"}


async def send_around_an_urgent_byte(sender, receiver, then: str, got: bytearray) -> None:
    """Send "abc", an urgent "!" (MSG_OOB) and "def" through a relay, then shut down; with
    then="more", "ghi" follows once the receiver has "!def", past the mark. `got` collects
    what the receiver read meanwhile. splice stops at an urgent mark and never passes it: it
    answers EAGAIN there (a stall: "more") or 0 once the FIN is in (cut off as EOF: "eof")."""
    await sender.send(b"abc")
    got.extend(await recv_exactly(receiver, 3))  # the mark comes after these
    await sender.send(b"!", socket.MSG_OOB)
    await sender.send(b"def")
    if then == "more":
        got.extend(await recv_exactly(receiver, 4))
        await sender.send(b"ghi")
    sender.shutdown(socket.SHUT_WR)


async def echo(stream: trio.SocketStream) -> None:
    """A trio.serve_tcp handler that sends back what it receives, then EOF after the peer's."""
    async with stream:
        while data := await stream.receive_some(1 << 16):
            await stream.send_all(data)
        await stream.send_eof()


async def recv_exactly(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await sock.recv(n - len(buf))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} header bytes")
        buf += data
    return buf


@dataclass
class Server:
    """The far end of a relay: received[(id)] = (length, sha256) of what each client sent."""

    listener: object
    received: dict[int, tuple[int, str]] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)  # by connection id
    _recorded: trio.Event = field(default_factory=trio.Event)  # set (and replaced) per record

    async def wait_for(self, conn_ids, timeout: float = 60) -> None:
        """Until every id has a record. A client is done when the server's FIN arrives, which
        can be before the relay has delivered the client's last bytes to the server."""
        with trio.fail_after(timeout):
            while any(i not in self.received and i not in self.errors for i in conn_ids):
                await self._recorded.wait()
                self._recorded = trio.Event()

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                sock, _ = await self.listener.accept()
                nursery.start_soon(self._handle, sock)

    async def _handle(self, sock) -> None:
        conn_id = -1
        with sock:
            try:
                conn_id, want = HEADER.unpack(await recv_exactly(sock, HEADER.size))
                rng = random.Random(conn_id)
                data = payload(conn_id, "down", want)

                async def send_back() -> None:
                    await send_chunks(sock, data, rng)
                    sock.shutdown(socket.SHUT_WR)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_back)
                    self.received[conn_id] = await recv_all(sock, random.Random(~conn_id))
            except Exception as exc:  # recorded; check() fails a test whose clients saw it
                self.errors[conn_id] = exc
            finally:
                self._recorded.set()


async def open_server(host: str = "127.0.0.1", family=socket.AF_INET) -> Server:
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await listener.bind((host, 0))
    listener.listen(1024)
    return Server(listener)


@dataclass
class Result:
    conn_id: int
    up_size: int
    down_size: int
    received: tuple[int, str] | None = None


async def client(address, conn_id: int, up_size: int, down_size: int, family=socket.AF_INET) -> Result:
    """Send `up_size` bytes, ask for `down_size` back; return what arrived."""
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    with sock:
        await sock.connect(address)
        rng = random.Random(conn_id * 7 + 1)
        result = Result(conn_id, up_size, down_size)

        async def send_up() -> None:
            await sock.send(HEADER.pack(conn_id, down_size))
            await send_chunks(sock, payload(conn_id, "up", up_size), rng)
            sock.shutdown(socket.SHUT_WR)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_up)
            result.received = await recv_all(sock, random.Random(conn_id * 7 + 2))
        return result


async def check(results: list[Result], server: Server) -> None:
    """Every byte arrived, in order, both ways. Call it while the server still serves."""
    await server.wait_for([r.conn_id for r in results])
    for r in results:
        assert r.conn_id not in server.errors, server.errors[r.conn_id]
        expected_down = payload(r.conn_id, "down", r.down_size)
        assert r.received == (r.down_size, digest(expected_down)), f"conn {r.conn_id}: downstream differs"
        expected_up = payload(r.conn_id, "up", r.up_size)
        assert server.received.get(r.conn_id) == (r.up_size, digest(expected_up)), f"conn {r.conn_id}: upstream differs"


async def run_clients(address, count: int, up_size: int, down_size: int, limit: int | None = None,
                      family=socket.AF_INET, first_id: int = 0) -> list[Result]:
    results: list[Result] = []
    slots = trio.Semaphore(limit or count)

    async def one(i: int) -> None:
        async with slots:
            results.append(await client(address, first_id + i, up_size, down_size, family))

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    return results


class TwoWayFlood:
    """Blocking sockets `client` and `target` (the two ends of one relayed connection) each
    send their own 1 MiB block again and again, and each reads what the other sends, in
    threads, until the relay goes. `flowing` is set once `threshold` bytes have arrived each
    way; `received` counts them. For tests that stop a relay in full flow: afterwards,
    `stop()` closes both sockets (a sender blocked on a full buffer ends too) and joins."""

    def __init__(self, client: socket.socket, target: socket.socket, threshold: int) -> None:
        self.block = {"up": os.urandom(1 << 20), "down": os.urandom(1 << 20)}
        self.received = {"up": 0, "down": 0}
        self.flowing = threading.Event()
        self.threshold = threshold
        self.socks = (client, target)
        self.threads = [threading.Thread(target=self._send, args=(client, self.block["up"])),
                        threading.Thread(target=self._send, args=(target, self.block["down"])),
                        threading.Thread(target=self._read, args=(target, "up")),
                        threading.Thread(target=self._read, args=(client, "down"))]
        for t in self.threads:
            t.start()

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            while True:
                sock.sendall(data)
        except OSError:
            pass  # the relay is gone

    def _read(self, sock: socket.socket, direction: str) -> None:
        try:
            while chunk := sock.recv(1 << 16):
                self.received[direction] += len(chunk)
                if min(self.received.values()) >= self.threshold:
                    self.flowing.set()
        except OSError:
            pass

    def sent_prefix(self, direction: str, n: int) -> bytes:
        """The first `n` bytes of what was sent in `direction`."""
        block = self.block[direction]
        return (block * (n // len(block) + 1))[:n]

    def stop(self) -> None:
        for sock in self.socks:
            sock.close()
        for t in self.threads:
            t.join(30)
