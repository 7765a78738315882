"""The demo behind `zcrelay demo`: a forward to a local echo target, checked end to end.

Everything runs in one process on loopback: an echo server on 127.0.0.1:0, a Forwarder in front
of it, and clients that send random data through the relay and compare the SHA-256 of what
comes back with what they sent.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass

import trio

from zcrelay.addresses import Address
from zcrelay.forward import ForwardConfig, Forwarder, Rule

CHUNK = 1 << 20


@dataclass
class DemoResult:
    connections: int
    bytes_each_way: int
    seconds: float
    intact: int  # connections whose echo matched byte for byte
    spliced: int
    copied: int

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


async def _client(port: int, size: int, block: bytes) -> bool:
    sent, got = hashlib.sha256(), hashlib.sha256()
    sock = trio.socket.socket()
    with sock:
        await sock.connect(("127.0.0.1", port))

        async def send() -> None:
            left = size
            while left:
                piece = memoryview(block)[:min(left, len(block))]
                sent.update(piece)
                while piece:
                    n = await sock.send(piece)
                    piece, left = piece[n:], left - n
            sock.shutdown(socket.SHUT_WR)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while data := await sock.recv(CHUNK):
                got.update(data)
    return sent.digest() == got.digest()


async def run_demo(size: int, connections: int, splice: bool, pipe_size: int,
                   on_ready=lambda listen, target: None) -> DemoResult:
    """Send `size` bytes on each of `connections` connections through a forward to an echo
    target and check every byte came back in order."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(128)
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
                for _ in range(connections):
                    clients.start_soon(lambda: _append(results, _client(port, size, block)))
            seconds = trio.current_time() - start
            while forwarder.totals.connections < connections:  # wait for the relay's accounting
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    totals = forwarder.totals
    return DemoResult(connections, size, seconds, sum(results), totals.spliced, totals.copied)


async def _append(results: list[bool], check) -> None:
    results.append(await check)
