"""Property-based tests (hypothesis) of the relay's one promise: every byte arrives, in order,
both ways, whatever the message sizes, the pacing, the pipe size and the order of the two
half-closes, and the relay then ends at EOF.

A script is a list of steps run by one task, while a reader task on each side collects what
arrives: a send of N bytes from the client or the server, at most one TCP urgent byte each
way (TCP keeps a single urgent mark per socket), a sync (wait until everything sent so far has
arrived, so that sends do not pile up), and each side's shutdown of its writing half, once.
The script is run through relay() in process, on both paths and on pipes of one page, 64 KiB
and 1 MiB; through `zcrelay forward` in a subprocess, whose target sockets are handed from
their connect watch to the streams; and through `zcrelay forward --capture-dir`, whose
directions run as tasks (zcrelay.mover) and whose capture files must hold what crossed.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zcrelay.pipes import PipePool
from zcrelay.relay import Engine, relay
from zcrelay.stats import Flow
from tests import traffic
from tests.test_capture import sidecars
from tests.test_forward import path_args

SIDES = ("client", "server")
PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, database=None, print_blob=True,
    # `path` and `zcrelay` are the same for every example of a test, which is what is wanted.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Messages (a request, a reply: fewer bytes than a pipe has slots, or not) and bulk (more than
# a one-page pipe, a socket buffer, a 1 MiB pipe's slots).
_sizes = st.one_of(st.integers(1, 2000), st.integers(2001, 400_000), st.integers(400_001, 3_000_000))
_step = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(SIDES), _sizes),
    st.tuples(st.just("urgent"), st.sampled_from(SIDES), st.just(1)),
    st.tuples(st.just("sync"), st.just("client"), st.just(0)),
    st.tuples(st.just("shut"), st.sampled_from(SIDES), st.just(0)),
)
scripts = st.lists(_step, min_size=1, max_size=12)


@dataclass
class Peer:
    """One end of the conversation: what it sent, what it has read so far."""

    sock: trio.socket.SocketType
    sent: bytearray = field(default_factory=bytearray)
    got: bytearray = field(default_factory=bytearray)
    eof: bool = False
    shut: bool = False
    urgent_sent: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    async def read(self) -> None:
        while True:
            chunk = await self.sock.recv(1 << 20)
            if not chunk:
                self.eof = True
            self.got += chunk
            self._changed.set()
            self._changed = trio.Event()
            if not chunk:
                return

    async def wait_for(self, n: int) -> None:
        while len(self.got) < n and not self.eof:
            await self._changed.wait()

    async def send(self, data: bytes, flags: int = 0) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view, flags):]
        self.sent += data


async def run_script(script, client_sock, server_sock, run_relay=None) -> tuple[Peer, Peer, object]:
    """Play `script` between the two sockets while `run_relay()` relays (None: a relay of
    another process); return both peers and what run_relay returned, once both directions
    reached EOF."""
    peers = {"client": Peer(client_sock), "server": Peer(server_sock)}
    other = {"client": peers["server"], "server": peers["client"]}
    result = {}
    sends = 0

    async def play() -> None:
        nonlocal sends
        for kind, side, size in script:
            peer = peers[side]
            if kind == "sync":
                for name in SIDES:
                    await peers[name].wait_for(len(other[name].sent))
            elif peer.shut:
                continue  # nothing more from a side that shut down its writing half
            elif kind == "shut":
                peer.sock.shutdown(socket.SHUT_WR)
                peer.shut = True
            elif kind == "urgent" and not peer.urgent_sent:
                peer.urgent_sent = 1
                await peer.send(b"!", socket.MSG_OOB)
            elif kind == "send":
                sends += 1  # distinct bytes for every send: a reordering cannot go unseen
                await peer.send(hashlib.shake_128(f"{sends}".encode()).digest(size))
        for peer in peers.values():
            if not peer.shut:
                peer.sock.shutdown(socket.SHUT_WR)
                peer.shut = True

    async def relay_task() -> None:
        result["relay"] = await run_relay()

    with trio.fail_after(15):  # a stalled stream fails here, with the script in the report
        async with trio.open_nursery() as nursery:
            if run_relay is not None:
                nursery.start_soon(relay_task)
            for peer in peers.values():
                nursery.start_soon(peer.read)
            await play()
    return peers["client"], peers["server"], result.get("relay")


def assert_delivered(client: Peer, server: Peer) -> None:
    for receiver, sender, way in ((server, client, "upstream"), (client, server, "downstream")):
        assert receiver.eof, f"{way}: no EOF"
        assert len(receiver.got) == len(sender.sent), f"{way}: {len(receiver.got)} of {len(sender.sent)} bytes"
        assert receiver.got == sender.sent, f"{way}: bytes differ (same length)"


@PROPERTY_SETTINGS
@given(script=scripts, pipe_size=st.sampled_from([4096, 65536, 1 << 20]))
async def test_relay_delivers_every_byte_in_order(path, script, pipe_size):
    engine = Engine(pool=PipePool(size=pipe_size), splice=path == "splice")
    (client, a), (b, server) = await traffic.tcp_pair(), await traffic.tcp_pair()
    up, down = Flow(), Flow()
    with client, a, b, server:
        client_peer, server_peer, end = await run_script(
            script, client, server, lambda: relay(a, b, engine, up, down, linger=30))
    assert_delivered(client_peer, server_peer)
    assert end.reason == "eof", end
    assert (up.bytes, down.bytes) == (len(client_peer.sent), len(server_peer.sent))
    if path == "splice":  # only an urgent byte is copied (see reactor._pass_urgent_byte)
        assert (up.copied, down.copied) == (client_peer.urgent_sent, server_peer.urgent_sent)
    engine.close()


@pytest.fixture(params=["plain", "capture"])
def forwarder(request, zcrelay, path, tmp_path):
    """One `zcrelay forward` for every example of a test, in front of a listener of ours;
    "capture": with --capture-dir (its log lines are read to know when a capture is done)."""
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(64)
    capture = tmp_path if request.param == "capture" else None
    extra = ["--capture-dir", str(capture)] if capture else ["-q"]
    relay_proc = zcrelay("forward", "127.0.0.1:0", f"127.0.0.1:{target.getsockname()[1]}",
                         *extra, *path_args(path))
    with target:
        yield relay_proc, target, capture, [0]


@PROPERTY_SETTINGS
@given(script=scripts)
async def test_forward_delivers_every_byte_in_order(forwarder, script):
    relay_proc, target, capture, finished = forwarder
    listener = trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(target.fileno())))
    with listener:
        client = trio.socket.socket()
        await client.connect(("127.0.0.1", relay_proc.port))
        port = client.getsockname()[1]
        server, _ = await listener.accept()
    with client, server:
        client_peer, server_peer, _ = await run_script(script, client, server)
    assert_delivered(client_peer, server_peer)
    if capture is not None:
        finished[0] += 1  # the relay logs a connection once its capture files are final
        with trio.fail_after(15):
            await trio.to_thread.run_sync(relay_proc.wait_for_lines, " close=", finished[0],
                                          abandon_on_cancel=True)
        record = sidecars(Path(capture))[port]
        assert record["complete"] is True, record
        for direction, sent in (("up", client_peer.sent), ("down", server_peer.sent)):
            assert (Path(capture) / record[direction]["file"]).read_bytes() == sent, direction
