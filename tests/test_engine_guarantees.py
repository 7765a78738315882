"""Guarantees of the engine that a mutation of its code could break with no other test failing
(found by manual mutation testing): each test here fails on such a mutant. Real sockets and
pipes, on loopback; readiness by events, not sleeps; content checked by SHA-256."""

from __future__ import annotations

import errno
import os
import random
import socket

import pytest
import trio
import trio.testing

from zcrelay import syscalls
from zcrelay.pipes import PipePool
from zcrelay.relay import Engine, relay
from zcrelay.stats import Flow
from tests import traffic

MiB = 1 << 20


@pytest.mark.parametrize("role,side", [("source", "a"), ("destination", "b")])
async def test_splice_refused_after_the_first_byte_ends_the_relay_instead_of_copying(monkeypatch, role, side):
    """Copying is for a pair that splice refuses before the first byte (nothing was consumed
    then, and the refusal is about the fd types). An EINVAL once bytes have moved is a failure
    of this stream, not a refusal: the relay ends, naming the side, and copies nothing."""
    (client, a), (b, server) = trio.socket.socketpair(), trio.socket.socketpair()
    real = syscalls.splice_unchecked
    calls = []

    def splice(src, dst, *args):
        if (role == "source" and src == a.fileno()) or (role == "destination" and dst == b.fileno()):
            calls.append(1)
            if len(calls) == 2:  # the second message's drain or pump
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(src, dst, *args)

    monkeypatch.setattr(syscalls, "splice_unchecked", splice)
    engine = Engine(pool=PipePool(size=65536))
    up = Flow()
    first = os.urandom(1000)

    async def talk():
        await client.send(first)
        assert await server.recv(2000) == first  # relayed by splice
        await client.send(os.urandom(1000))
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk)
            end = await relay(a, b, engine, up, Flow(), linger=30)
    assert (end.reason, end.side) == ("einval", side), end
    assert up.copied == 0 and up.fallback is None and not engine.fallbacks
    assert up.spliced == len(first)
    for sock in (client, a, b, server):
        sock.close()


# --- the reactor --------------------------------------------------------------------------------

async def test_a_stream_that_never_waits_lets_others_run_between_budgets(tmp_path):
    """A regular file never answers EAGAIN: the stream must give way after each YIELD_EVERY
    bytes *while* it moves them, not only before its first step (a ticker that ran only
    before the first byte proved nothing). Every byte arrives."""
    from zcrelay import reactor as reactor_mod
    from zcrelay.reactor import Reactor

    size = 5 * reactor_mod.YIELD_EVERY // 2
    data = os.urandom(size)
    (tmp_path / "src").write_bytes(data)
    ticks = 0
    seen = []  # the ticker's count at each chunk the stream moved
    ended = trio.Event()

    def on_end(stream, error):
        assert error is None
        ended.set()

    r = Reactor(PipePool(size=65536))
    flow = Flow(on_bytes=lambda n: seen.append(ticks))
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.run)
            streams = r.start([(src.fileno(), dst.fileno(), flow)], on_end)
            with trio.fail_after(30):
                while not ended.is_set():
                    ticks += 1
                    await trio.lowlevel.checkpoint()
            r.stop(streams)
            nursery.cancel_scope.cancel()
    r.close()
    # Three budgets' worth: three steps, with the ticker run at least once between the first
    # and the last (trio may run it before or after the reactor in each batch).
    assert seen[-1] > seen[0], "the stream moved every budget in one step"
    assert flow.spliced == size
    assert traffic.digest((tmp_path / "dst").read_bytes()) == traffic.digest(data)


async def test_a_one_byte_drain_that_fills_a_one_slot_pipe_re_arms_an_edge_triggered_source(monkeypatch):
    """A one-page pipe has one slot: a drain of one byte may have filled it and left the rest
    on the socket. Edge-triggered, those bytes raise no new edge, so the stream must re-arm
    (n < slots is false), not wait as after a drain that emptied the socket."""
    from zcrelay.reactor import Reactor

    real_start = Reactor.start

    def start(self, pairs, on_end):  # as tests/test_reactor.py's _edge_triggered
        streams = real_start(self, pairs, on_end)
        for fd in {fd for s in streams for fd in (s.src, s.dst)}:
            if fd in self._level:
                self._to_edge(fd)
        return streams

    monkeypatch.setattr(Reactor, "start", start)
    engine = Engine(pool=PipePool(size=4096))
    engine.pool.put(engine.pool.get())  # warm: the straight-through step takes the first drain
    (client, a), (b, server) = trio.socket.socketpair(), trio.socket.socketpair()
    for byte in (b"a", b"b", b"c"):
        await client.send(byte)  # a Unix socket keeps each send in its own buffer: one slot each
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: relay(a, b, engine, Flow(), Flow(), linger=10))
            assert await traffic.recv_exactly(server, 3) == b"abc"
            nursery.cancel_scope.cancel()
    for sock in (client, a, b, server):
        sock.close()


async def test_a_stopped_relay_leaves_its_sockets_out_of_the_reactors_epoll():
    """relay() closes nothing: its caller may go on using a socket once it returns. The
    reactor must unregister it, or a level-triggered socket with unread bytes would be
    reported by the reactor's epoll on every turn, for nobody (a spinning reactor)."""
    (client, a), (b, server) = trio.socket.socketpair(), trio.socket.socketpair()
    engine = Engine()
    with trio.fail_after(5):
        end = await relay(a, b, engine, Flow(), Flow(), idle=0.05)
    assert end.reason == "idle"
    await client.send(b"after the relay")  # for the caller, who still owns `a`
    await server.send(b"and for b")
    reactor = engine.reactor()
    reported = {fd for fd, _ in reactor._epoll.poll(0)}
    assert not reported & {a.fileno(), b.fileno()}, reported
    assert await a.recv(100) == b"after the relay"
    for sock in (client, a, b, server):
        sock.close()
    engine.close()


# --- the relay's timeouts and its cut-short sides ------------------------------------------------

@pytest.mark.parametrize("path", ["splice", "copy"])
async def test_idle_counts_silence_not_age(path):
    """--idle-timeout ends a connection where no byte moved for that long: one that keeps
    talking (a message and its reply every few ms) for several idle periods is not ended, and
    once it falls silent it is ended as idle."""
    (client, a), (b, server) = trio.socket.socketpair(), trio.socket.socketpair()
    engine = Engine(splice=path == "splice")
    idle = 0.4  # a stall of the test itself longer than this would end the relay: room for a busy host
    ended = []
    rng = random.Random(11)
    talking = trio.CancelScope()

    async def relaying():
        ended.append((await relay(a, b, engine, Flow(), Flow(), idle=idle), trio.current_time()))
        talking.cancel()  # the talk cannot go on through a relay that ended

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relaying)
            until = trio.current_time() + 3 * idle
            with talking:
                while trio.current_time() < until:
                    message = rng.randbytes(200)
                    await client.send(message)
                    assert await traffic.recv_exactly(server, 200) == message
                    await server.send(message[::-1])
                    assert await traffic.recv_exactly(client, 200) == message[::-1]
                    await trio.sleep(idle / 10)  # pacing only: well within the idle timeout
    end, at = ended[0]
    assert at >= until, f"ended {until - at:.3f} s before the talk did: {end}"
    assert end.reason == "idle"
    for sock in (client, a, b, server):
        sock.close()


@pytest.mark.parametrize("capture", [False, True], ids=["reactor", "capture"])
@pytest.mark.parametrize("path", ["splice", "copy"])
async def test_a_slow_reader_is_not_idle(path, capture, tmp_path):
    """A client reads a 3 MiB download at about 1.6 MB/s with idle=0.4: the relay's socket to
    it polls writable only once half its send buffer is free, longer than that at this pace,
    so by the relay's own calls no byte moved and the client was cut off as idle. What it
    takes from the relay's send queue counts (check(), which relay() calls in its task): it
    gets everything, and the relay ends at the two EOFs."""
    from zcrelay import capture as capturing

    (client, a), (b, server) = await traffic.tcp_pair(near_rcvbuf=65536), await traffic.tcp_pair()
    reply = os.urandom(3 * MiB)
    session = capturing.open_session(str(tmp_path), 1, "127.0.0.1:1", "t") if capture else None
    engine = Engine(splice=path == "splice")
    ended = []
    got = bytearray()

    async def relaying():
        ended.append(await relay(a, b, engine, Flow(), Flow(), idle=0.4,
                                 captures=session.captures if session else (None, None)))

    async def serving():
        await traffic.send_chunks(server, reply, random.Random(5))
        server.shutdown(socket.SHUT_WR)

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relaying)
                nursery.start_soon(serving)
                while data := await client.recv(32 * 1024):
                    got += data
                    await trio.sleep(0.02)  # the slow reader's pace, not a wait for readiness
                client.shutdown(socket.SHUT_WR)  # the download is whole: the client is done too
    finally:
        if session is not None:
            session.close()
    assert (len(got), traffic.digest(bytes(got))) == (len(reply), traffic.digest(reply))
    assert ended[0].reason == "eof", ended[0]
    for sock in (client, a, b, server):
        sock.close()
    engine.close()


@pytest.mark.parametrize("path", ["splice", "copy"])
async def test_linger_counts_silence_after_the_half_close(path):
    """After the client's half-close a reply that keeps flowing for several --linger periods
    is not cut short; once it stops, the connection ends after the linger."""
    (client, a), (b, server) = trio.socket.socketpair(), trio.socket.socketpair()
    engine = Engine(splice=path == "splice")
    linger = 0.4  # as idle above
    ended = []
    flowing = trio.CancelScope()
    rng = random.Random(12)

    async def relaying():
        ended.append((await relay(a, b, engine, Flow(), Flow(), linger=linger), trio.current_time()))
        flowing.cancel()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relaying)
            client.shutdown(socket.SHUT_WR)
            assert await server.recv(10) == b""  # the half-close has been passed on
            until = trio.current_time() + 3 * linger
            with flowing:
                while trio.current_time() < until:
                    piece = rng.randbytes(300)
                    await server.send(piece)
                    assert await traffic.recv_exactly(client, 300) == piece
                    await trio.sleep(linger / 10)  # pacing only: well within the linger
    end, at = ended[0]
    assert at >= until, f"cut {until - at:.3f} s before the reply ended: {end}"
    assert end.reason == "linger"
    for sock in (client, a, b, server):
        sock.close()


@pytest.mark.parametrize("path", ["splice", "copy"])
async def test_bytes_the_relay_holds_for_a_side_make_it_cut_short(path):
    """The server's whole reply was read by the relay (its socket holds nothing unread) but
    the client reads none of it, so most of it stays with the relay: in the stream's pipe
    (splice) or its copy buffer (copy). Ended by --idle-timeout, the client is a side cut
    short (in RelayEnd.cut), which its owner resets rather than close with a FIN."""
    (client, a), (b, server) = trio.socket.socketpair(), trio.socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the client takes little at a time
    reply = os.urandom(100_000)  # one read of the copy path's buffer, one drain of a 1 MiB pipe
    await server.send(reply)
    assert syscalls.fionread(b.fileno()) == len(reply)  # all of it in b before the relay starts
    engine = Engine(splice=path == "splice")
    down = Flow()
    with trio.fail_after(5):
        end = await relay(a, b, engine, Flow(), down, idle=0.1)
    assert syscalls.fionread(b.fileno()) == 0 and 0 < down.bytes < len(reply)
    assert end.reason == "idle" and "a" in end.cut, end
    for sock in (client, a, b, server):
        sock.close()


# --- the mover (captures, connect, listen) ---------------------------------------------------------

async def test_the_movers_idle_stream_gives_its_pipe_back_each_time_it_waits():
    """splice_stream waits for its source with no pipe: the empty pipe goes back to the pool
    (and is taken again), never dropped, which would leak two fds per wait."""
    from zcrelay import mover

    (a_in, a_out), (b_in, b_out) = trio.socket.socketpair(), trio.socket.socketpair()
    pool = PipePool(size=65536)
    flow = Flow()
    messages = [os.urandom(1000 + i) for i in range(5)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async def talk():
                for message in messages:  # each one waits for the last: the mover meets EAGAIN
                    await a_in.send(message)
                    assert await traffic.recv_exactly(b_out, len(message)) == message
                a_in.shutdown(socket.SHUT_WR)

            nursery.start_soon(talk)
            await mover.splice_stream(a_out.fileno(), b_in.fileno(), pool, flow)
    assert flow.spliced == sum(map(len, messages))
    assert pool.stats.created == 1 and pool.idle == 1, pool.stats
    pool.close()
    for sock in (a_in, a_out, b_in, b_out):
        sock.close()


@pytest.mark.parametrize("role", ["source", "destination"])
async def test_the_mover_does_not_turn_to_copying_after_the_first_byte(monkeypatch, role):
    """SpliceRefused (which sends the caller to copy_stream) is for a refusal before the first
    byte. An EINVAL once bytes moved is a stream error naming the side, and nothing is copied."""
    from zcrelay import mover
    from zcrelay.errors import SpliceRefused, StreamError

    (a_in, a_out), (b_in, b_out) = trio.socket.socketpair(), trio.socket.socketpair()
    real = syscalls.splice_unchecked
    moved = []  # the counts of the calls on the failing side that moved bytes

    def splice(src, dst, *args):
        if (role == "source" and src == a_out.fileno()) or (role == "destination" and dst == b_in.fileno()):
            if moved:  # the first call after bytes moved on this side (an EAGAIN is not counted)
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            n = real(src, dst, *args)
            moved.append(n)
            return n
        return real(src, dst, *args)

    monkeypatch.setattr(syscalls, "splice_unchecked", splice)
    flow = Flow()
    first = os.urandom(1000)

    async def talk():
        await a_in.send(first)
        assert await traffic.recv_exactly(b_out, len(first)) == first
        await a_in.send(os.urandom(1000))

    errors = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk)
            try:
                await mover.splice_stream(a_out.fileno(), b_in.fileno(), PipePool(size=65536), flow)
            except StreamError as exc:
                errors.append(exc)
    [error] = errors
    assert not isinstance(error, SpliceRefused), error
    assert (error.role, error.errno) == (role, errno.EINVAL)
    assert flow.copied == 0 and flow.spliced == len(first)
    for sock in (a_in, a_out, b_in, b_out):
        sock.close()


# --- the capture path (a task per direction) -------------------------------------------------------

@pytest.mark.parametrize("path", ["splice", "copy"])
async def test_a_captured_relay_counts_its_fallbacks_and_captures_every_byte(tmp_path, path):
    """The capture path runs each direction through relay.one_way: with splice off, each
    direction's fallback is named and counted in the engine's fallbacks, as the reactor's
    are; either way both captures hold exactly what was relayed."""
    from zcrelay.capture import CaptureFile

    from tests.test_reactor import _exchange

    engine = Engine(pool=PipePool(size=65536), splice=path == "splice")
    up_data, down_data = os.urandom(3 * MiB + 17), os.urandom(2 * MiB + 5)
    fds = [os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) for name in ("up", "down")]
    captures = (CaptureFile(fds[0], "up"), CaptureFile(fds[1], "down"))
    pairs = trio.socket.socketpair(), trio.socket.socketpair()
    try:  # _exchange checks both directions' content
        end, up, down = await _exchange(*pairs, up_data, down_data, engine, captures=captures)
    finally:
        for capture in captures:
            capture.close()
        for fd in fds:
            os.close(fd)
    assert end.reason == "eof"
    assert traffic.digest((tmp_path / "up").read_bytes()) == traffic.digest(up_data)
    assert traffic.digest((tmp_path / "down").read_bytes()) == traffic.digest(down_data)
    if path == "splice":
        assert (up.spliced, down.spliced, up.copied, down.copied) == (len(up_data), len(down_data), 0, 0)
        assert not engine.fallbacks
    else:
        assert (up.copied, down.copied) == (len(up_data), len(down_data))
        assert up.fallback == down.fallback == "splice disabled"
        assert engine.fallbacks == {"splice disabled": 2}
    for sock in (*pairs[0], *pairs[1]):
        sock.close()


@pytest.mark.parametrize("path", ["splice", "copy"])
async def test_bytes_a_captured_direction_holds_when_cancelled_make_its_side_cut_short(tmp_path, path):
    """As test_bytes_the_relay_holds_for_a_side_make_it_cut_short, on the capture path (a
    task per direction): the down direction's task holds most of the reply (in its pipe, or
    its copy buffer) when --idle-timeout cancels it, and nothing is left unread in the
    server's socket. What it held (Flow.owed) still makes the client a side cut short."""
    from zcrelay.capture import CaptureFile

    (client, a), (b, server) = trio.socket.socketpair(), trio.socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reply = os.urandom(100_000)
    await server.send(reply)
    assert syscalls.fionread(b.fileno()) == len(reply)
    fd = os.open(tmp_path / "down", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    capture = CaptureFile(fd, "down")
    engine = Engine(splice=path == "splice")
    down = Flow()
    with trio.fail_after(5):
        end = await relay(a, b, engine, Flow(), down, idle=0.1, captures=(None, capture))
    capture.close()
    os.close(fd)
    assert syscalls.fionread(b.fileno()) == 0 and 0 < down.bytes < len(reply)
    assert end.reason == "idle" and "a" in end.cut, end
    assert (tmp_path / "down").read_bytes() == reply[:len((tmp_path / "down").read_bytes())]
    for sock in (client, a, b, server):
        sock.close()


def test_fionread_works_with_every_fd_taken():
    """syscalls.fionread imported array and termios at its first call: at the fd limit that
    import (a C extension's .so to open) failed, and a connection of forward's ended as
    internal-error (ImportError). In a child process: its fds filled up, then the first call."""
    import subprocess
    import sys

    script = (
        "import os, resource\n"
        "from zcrelay import syscalls\n"
        "r, w = os.pipe()\n"
        "os.write(w, b'abc')\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "held = []\n"
        "try:\n"
        "    while True:\n"
        "        held.append(os.open(os.devnull, os.O_RDONLY))\n"
        "except OSError:\n"
        "    pass\n"
        "print(syscalls.fionread(r))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert (done.returncode, done.stdout.strip()) == (0, "3"), done.stderr


def test_tcp_closed_tells_a_reset_from_a_fin_and_refuses_other_sockets():
    """syscalls.tcp_closed, asked as each TCP connection's first side ends: True only for a
    TCP socket the peer reset; a FIN, a Unix socket (which refuses TCP_INFO) and a closed
    socket are all False, never an exception."""
    import select
    import struct

    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        for how in ("fin", "reset"):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            with client, server:
                if how == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                readable, _, _ = select.select([server], [], [], 5)  # the FIN or the RST is in
                assert readable and syscalls.peer_done(server)
                assert syscalls.tcp_closed(server) is (how == "reset")
    a, b = socket.socketpair()
    with a, b:
        assert syscalls.tcp_closed(a) is False
    assert syscalls.tcp_closed(a) is False  # closed: EBADF, not raised
