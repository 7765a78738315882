"""The demo behind `zcrelay demo`: a forward to a local echo target, checked end to end.

Everything runs in one process on loopback: an echo server on 127.0.0.1:0, a Forwarder in front
of it, and clients that send random data through the relay and compare the SHA-256 of what
comes back with what they sent. Each connection's bytes are its own (see STAMP), so the round
trip checks both directions: a relay would have to undo on the way back exactly what it got
wrong on the way there.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Iterator

import trio

from zcrelay.addresses import Address
from zcrelay.errors import ConnectError
from zcrelay.excgroups import BaseExceptionGroup
from zcrelay.forward import ForwardConfig, Forwarder, Rule
from zcrelay.net import BACKLOG, connect_reason

CHUNK = 1 << 20


@dataclass
class DemoResult:
    connections: int
    bytes_each_way: int
    seconds: float
    intact: int  # connections whose echo matched byte for byte
    spliced: int
    copied: int
    closes: dict[str, int] = field(default_factory=dict)  # the relay's close reasons, counted

    @property
    def ok(self) -> bool:
        return self.intact == self.connections


async def _echo(sock) -> None:
    with sock:
        while True:
            data = await sock.recv(CHUNK)
            if not data:
                sock.shutdown(socket.SHUT_WR)
                return
            view = memoryview(data)
            while view:
                view = view[await sock.send(view):]


async def _echo_server(listener, task_status=trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    async with trio.open_nursery() as nursery:
        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(_echo, sock)


# Each piece of a connection's stream is `block` headed by its connection's number and its own,
# little-endian so that the first bytes differ between connections even at --size 1. Without
# it every connection sent the same block again and again, and a relay that crossed two
# connections' streams, or replayed one pipe-full in place of the next, gave back the very bytes
# that were sent: the check passed.
STAMP = struct.Struct("<QQ")


def _pieces(conn: int, size: int, block: bytes) -> Iterator[memoryview]:
    """The `size` bytes connection number `conn` sends, as views of `block` and of its stamps."""
    rest = memoryview(block)[STAMP.size:]
    left, index = size, 0
    while left:
        for piece in (memoryview(STAMP.pack(conn, index)), rest):
            piece = piece[:left]
            left -= len(piece)
            yield piece
            if not left:
                break
        index += 1


async def _client(port: int, conn: int, size: int, block: bytes) -> bool:
    """Send connection `conn`'s bytes through the relay at `port`; True if the echo that comes
    back is the same bytes (SHA-256), in order; False too if the relay resets the connection.
    A connect that fails otherwise is a ConnectError."""
    sent, got = hashlib.sha256(), hashlib.sha256()
    sock = trio.socket.socket()
    with sock:
        try:
            await sock.connect(("127.0.0.1", port))
        except ConnectionResetError:
            return False  # the relay accepted the connection and reset it at once: as below
        except OSError as exc:
            # Alone, "Network is unreachable" said neither what the demo connects to nor why:
            # in a fresh network namespace, the loopback interface is down.
            err = exc.errno or errno.EIO
            raise ConnectError(Address("127.0.0.1", port), connect_reason(err),
                               f"{os.strerror(err).lower()} (the demo runs on the loopback "
                               f"interface: is lo up?)") from None

        async def send() -> None:
            for piece in _pieces(conn, size, block):
                sent.update(piece)
                while piece:
                    piece = piece[await sock.send(piece):]
            sock.shutdown(socket.SHUT_WR)

        cut = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while data := await sock.recv(CHUNK):
                    got.update(data)
        except BaseExceptionGroup as group:  # `except* (BrokenPipeError, ConnectionResetError)` for 3.10
            reset, rest = group.split((BrokenPipeError, ConnectionResetError))
            if reset is None:
                raise
            if rest is not None:
                raise rest
            # The relay reset the connection (under `ulimit -n 20`, no fd for its target socket):
            # the echo did not come back, a failed check; the relay's close reason says why.
            cut = True
    return not cut and sent.digest() == got.digest()


async def run_demo(size: int, connections: int, splice: bool, pipe_size: int,
                   on_ready=lambda listen, target: None) -> DemoResult:
    """Send `size` bytes on each of `connections` connections through a forward to an echo
    target and check every byte came back in order."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    # Room in the accept queue for every connection at once: at 128, from 130 connections on the
    # kernel dropped the SYNs past it and the relay retried them a second later (TCP's initial
    # retransmission timeout), which "time" and "throughput" then counted.
    listener.listen(BACKLOG)
    target = Address("127.0.0.1", listener.getsockname()[1])
    forwarder = Forwarder(ForwardConfig(rules=(Rule(Address("127.0.0.1", 0), target),),
                                        splice=splice, pipe_size=pipe_size))
    block = os.urandom(CHUNK)
    results: list[bool] = []
    with listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(_echo_server, listener)
            [bound] = await nursery.start(forwarder.serve)
            on_ready(bound.address, str(target))
            port = int(bound.address.rsplit(":", 1)[1])
            start = trio.current_time()
            async with trio.open_nursery() as clients:
                for conn in range(connections):
                    clients.start_soon(_check, results, port, conn, size, block)
            seconds = trio.current_time() - start
            while forwarder.totals.connections < connections:  # wait for the relay's accounting
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    totals = forwarder.totals
    return DemoResult(connections, size, seconds, sum(results), totals.spliced, totals.copied,
                      dict(totals.closes))


async def _check(results: list[bool], port: int, conn: int, size: int, block: bytes) -> None:
    results.append(await _client(port, conn, size, block))
