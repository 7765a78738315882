"""The reactor (zcrelay.reactor) through relay(), in process, on real sockets: refusals that
fall back before the first byte, errors mid-stream, cancellation with bytes in a pipe, and the
byte budget that keeps one stream from starving the others."""

from __future__ import annotations

import errno
import os
import random
import select
import socket

import pytest
import trio

from zcrelay import addresses, net
from zcrelay import reactor as reactor_mod
from zcrelay import syscalls
from zcrelay.pipes import PipePool
from zcrelay.reactor import Reactor
from zcrelay.relay import Engine, Pair, relay
from zcrelay.stats import Flow
from tests import traffic

MiB = 1 << 20


async def _two_pairs():
    """(client, a), (b, server): the relay runs between a and b."""
    return trio.socket.socketpair(), trio.socket.socketpair()


async def _exchange(client_pair, server_pair, up_data: bytes, down_data: bytes, engine: Engine, **kwargs):
    """Run relay(a, b) while the client and the server each send their data and read to EOF."""
    (client, a), (b, server) = client_pair, server_pair
    got = {}

    async def side(sock, data, key):
        async def send():
            view = memoryview(data)
            while view:
                view = view[await sock.send(view[:200_000]):]
            sock.shutdown(socket.SHUT_WR)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got[key] = await traffic.recv_all(sock, random.Random(2))

    up, down = Flow(), Flow()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, client, up_data, "client")
            nursery.start_soon(side, server, down_data, "server")
            end = await relay(a, b, engine, up, down, linger=10, **kwargs)
    assert got["server"] == (len(up_data), traffic.digest(up_data)), "upstream differs"
    assert got["client"] == (len(down_data), traffic.digest(down_data)), "downstream differs"
    return end, up, down


def _warm(engine: Engine, warm: bool) -> Engine:
    """With `warm`, the pool holds a spare pipe before the relay starts, as a busy relay's
    does: a stream's first wake-up then takes the straight-through step of _step_splice."""
    if warm:
        engine.pool.put(engine.pool.get())
    return engine


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSYS])
async def test_source_refusing_splice_falls_back_to_copy_before_any_byte(monkeypatch, err, warm):
    pairs = await _two_pairs()
    refused_fd = pairs[0][1].fileno()  # a: the up direction's source
    real = syscalls.splice_unchecked

    def refuse_source(src, dst, *args):
        if src == refused_fd:
            raise OSError(err, os.strerror(err))
        return real(src, dst, *args)

    monkeypatch.setattr(syscalls, "splice_unchecked", refuse_source)
    engine = _warm(Engine(pool=PipePool(size=65536)), warm)
    up_data, down_data = os.urandom(3 * MiB), os.urandom(2 * MiB)
    end, up, down = await _exchange(*pairs, up_data, down_data, engine)
    reason = f"splice refused on source ({errno.errorcode[err]})"
    assert end.reason == "eof"
    assert up.fallback == reason and up.copied == len(up_data) and up.spliced == 0
    assert engine.fallbacks == {reason: 1}
    assert down.fallback is None and down.spliced == len(down_data) and down.copied == 0


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_destination_refusing_after_drain_keeps_every_byte(monkeypatch, warm):
    """The source gave a chunk into the pipe, then the destination refused splice: that chunk
    is written through user space first and the stream goes on copying, in order."""
    pairs = await _two_pairs()
    refused_fd = pairs[1][0].fileno()  # b: the up direction's destination
    real = syscalls.splice_unchecked

    def refuse_destination(src, dst, *args):
        if dst == refused_fd:
            raise OSError(errno.EINVAL, "refused")
        return real(src, dst, *args)

    monkeypatch.setattr(syscalls, "splice_unchecked", refuse_destination)
    engine = _warm(Engine(pool=PipePool(size=65536)), warm)
    up_data, down_data = os.urandom(5 * MiB), os.urandom(MiB)
    end, up, down = await _exchange(*pairs, up_data, down_data, engine)
    assert up.fallback == "splice refused on destination (EINVAL)"
    assert up.copied == len(up_data) and up.spliced == 0
    assert engine.pool.stats.destroyed_dirty == 0  # the chunk was taken out, the pipe reused


@pytest.mark.parametrize("err,reason", [(errno.ECONNRESET, "reset"), (errno.EIO, "eio")])
async def test_mid_stream_error_ends_the_relay_naming_the_side(monkeypatch, err, reason, path):
    (client, a), (b, server) = await _two_pairs()
    fail_fd = a.fileno()
    calls = []
    real_splice, real_readv = syscalls.splice_unchecked, os.readv

    def fail_second(real):
        def call(src, *args):
            if src == fail_fd:
                calls.append(1)
                if len(calls) == 2:
                    raise OSError(err, os.strerror(err))
            return real(src, *args)
        return call

    monkeypatch.setattr(syscalls, "splice_unchecked", fail_second(real_splice))
    monkeypatch.setattr(reactor_mod.os, "readv", fail_second(real_readv))
    engine = Engine(splice=(path == "splice"))

    async def talk():
        await client.send(b"x" * 1000)
        await trio.testing.wait_all_tasks_blocked()
        await client.send(b"y" * 1000)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk)
            end = await relay(a, b, engine, Flow(), Flow(), linger=30)
    assert end.reason == reason and end.side == "a", end
    assert engine.reactor().waiting == 0


async def test_error_while_filling_the_pipe_comes_after_the_bytes_before_it(monkeypatch):
    """A bulk drain (>= _FILL_FROM) drains again before pumping; a source error met there is
    held until the bytes already in the pipe are delivered, then ends the relay as usual."""
    (client, a), (b, server) = await _two_pairs()
    fail_fd = a.fileno()
    calls = []
    real_splice = syscalls.splice_unchecked

    def splice(src, dst, *args):
        if src == fail_fd:
            calls.append("drain")
            if calls.count("drain") == 2:  # the fill, right after the first (bulk) drain
                raise OSError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
        elif dst == b.fileno():
            calls.append("pump")
        return real_splice(src, dst, *args)

    monkeypatch.setattr(syscalls, "splice_unchecked", splice)
    data = os.urandom(reactor_mod._FILL_FROM + 12345)
    await client.send(data)  # all of it in a's buffer before the relay starts: one drain
    engine = Engine()
    with trio.fail_after(10):
        end = await relay(a, b, engine, Flow(), Flow(), linger=30)
        got = bytearray()
        while len(got) < len(data):
            got += await server.recv(1 << 20)
    assert calls[:3] == ["drain", "drain", "pump"], calls  # the error came while bytes were held
    assert traffic.digest(bytes(got)) == traffic.digest(data)
    assert end.reason == "reset" and end.side == "a", end
    assert engine.reactor().waiting == 0


async def test_cancelled_relay_destroys_the_pipe_holding_bytes():
    """Nobody reads the server side: a pipe fills and the pump waits. Cancelling the relay
    destroys that pipe (it still holds bytes) and leaves nothing waiting in the reactor."""
    (client, a), (b, server) = await _two_pairs()
    engine = Engine(pool=PipePool(size=65536))
    with trio.move_on_after(0.3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.flood, client)
            await relay(a, b, engine, Flow(), Flow())
    assert engine.pool.stats.destroyed_dirty == 1
    assert engine.pool.idle == 0
    assert engine.reactor().waiting == 0


async def test_a_stream_that_never_waits_gives_way_every_budget(tmp_path):
    """A regular file never answers EAGAIN (and epoll refuses it): the stream must still hand
    the CPU back after each YIELD_EVERY bytes, and move every byte."""
    size = 5 * reactor_mod.YIELD_EVERY // 2
    src_path = tmp_path / "src"
    data = os.urandom(size)
    src_path.write_bytes(data)
    dst_path = tmp_path / "dst"
    pool = PipePool(size=65536)
    r = Reactor(pool)
    ended = trio.Event()
    ticks_at_end = []
    ticks = 0

    def on_end(stream, error):
        assert error is None
        ticks_at_end.append(ticks)
        ended.set()

    with open(src_path, "rb") as src, open(dst_path, "wb") as dst:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.run)
            flow = Flow()
            streams = r.start([(src.fileno(), dst.fileno(), flow)], on_end)
            while not ended.is_set():
                ticks += 1
                await trio.lowlevel.checkpoint()
            r.stop(streams)
            nursery.cancel_scope.cancel()
    r.close()
    assert ticks_at_end[0] >= 2  # three budgets' worth of steps, the ticker ran between them
    assert flow.spliced == size and traffic.digest(dst_path.read_bytes()) == traffic.digest(data)


@pytest.mark.parametrize("trigger", ["level", "edge"])
async def test_relay_both_ways_with_half_close(monkeypatch, path, trigger):
    """More than a pipe and a socket buffer each way, random data, both paths, with the
    streams' fds level- and edge-triggered; each side shuts down its write side when done and
    still reads the other's data to the end."""
    if trigger == "edge":
        _edge_triggered(monkeypatch)
    engine = Engine(pool=PipePool(size=65536), splice=(path == "splice"))
    up_data, down_data = os.urandom(17 * MiB), os.urandom(11 * MiB)
    end, up, down = await _exchange(*await _two_pairs(), up_data, down_data, engine)
    assert end.reason == "eof"
    if path == "splice":
        assert (up.spliced, down.spliced) == (len(up_data), len(down_data))
        assert up.copied == down.copied == 0 and not engine.fallbacks
    else:
        assert (up.copied, down.copied) == (len(up_data), len(down_data))
        assert up.fallback == "splice disabled" and engine.fallbacks["splice disabled"] == 2
    assert engine.reactor().waiting == 0 and engine.pool.stats.destroyed_dirty == 0


async def test_timers_run_in_order_skip_cancelled_and_survive_compaction():
    """Reactor.call_at: callbacks run in deadline order from the timer task; cancelled ones
    never run; compacting a heap full of cancelled timers keeps the live ones."""
    engine = Engine()
    reactor = engine.reactor()
    ran = []
    now = trio.current_time()
    live = [reactor.call_at(now + 0.03 * (3 - i), lambda i=i: ran.append(i)) for i in range(3)]
    dead = [reactor.call_at(now + 0.01, lambda: ran.append("dead")) for _ in range(600)]
    for timer in dead:
        timer.cancel()
    soon = reactor.call_soon(lambda: ran.append("soon"))
    with trio.fail_after(5):
        while len(ran) < 4:
            await trio.sleep(0.01)
    assert ran == ["soon", 2, 1, 0], ran
    assert not reactor._timers  # the cancelled ones were dropped, not kept
    soon.cancel()  # after it ran: harmless
    live[0].cancel()
    engine.close()


@pytest.mark.parametrize("deaf", [False, True], ids=["", "out-deafened-first"])
@pytest.mark.parametrize("path", ["splice", "copy"])
async def test_source_is_not_heard_while_the_destination_is_full_and_nothing_is_lost(path, deaf):
    """A stream waiting for its destination to drain is not woken by data reaching its source
    (on bulk transfers those wake-ups were 40-50% of all); once the destination drains, the
    source is asked again and every byte it got meanwhile arrives, in order. With `deaf`, the
    destination had stopped asking for EPOLLOUT (as after a wake-up nobody waited for): the
    stream's wait must ask for it again, or it would never be woken."""
    engine = Engine(pool=PipePool(size=65536), splice=path == "splice")
    (client, a), (b, server) = await _two_pairs()
    reactor = engine.reactor()
    sent = bytearray()
    up = Flow()

    def send_some(size: int) -> int:
        chunk = os.urandom(size)
        try:
            n = client._sock.send(chunk)  # the stdlib socket: no wait, so nothing blocks the test
        except BlockingIOError:
            return 0
        sent.extend(chunk[:n])
        return n

    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def run_relay():
            await relay(a, b, engine, up, Flow(), linger=10)
            done.set()

        nursery.start_soon(run_relay)
        await trio.testing.wait_all_tasks_blocked()
        if deaf:
            reactor._deafen(b.fileno(), select.EPOLLOUT)
            assert not reactor._masks[b.fileno()] & select.EPOLLOUT
        with trio.fail_after(20):
            # Nobody reads `server`: send until the stream waits on its destination.
            while b.fileno() not in reactor._writers:
                assert send_some(65536), "the client filled up before the relay waited"
                await trio.testing.wait_all_tasks_blocked()
            turns = reactor._turns
            arrivals = 0
            for _ in range(20):  # each would have been a wake-up for nothing
                arrivals += bool(send_some(1024))
                await trio.testing.wait_all_tasks_blocked()
            assert arrivals >= 5
            assert reactor._turns - turns <= 2, "the full stream was woken by its source"
            client.shutdown(socket.SHUT_WR)
            got = await traffic.recv_all(server, random.Random(3))
            assert got == (len(sent), traffic.digest(bytes(sent)))
            server.shutdown(socket.SHUT_WR)
            await done.wait()
    assert up.bytes == len(sent)


async def _tcp_pairs():
    """(client, a), (b, server) as loopback TCP connections: the re-arm after a small drain
    rests on how TCP sockets report readiness, so it is tested on them."""
    return await traffic.tcp_pair(), await traffic.tcp_pair()


def _edge_triggered(monkeypatch) -> None:
    """Streams' fds start edge-triggered, as after Reactor._to_edge (a hang-up nobody waited
    for): their streams then wait after a drain to EAGAIN or a re-arm, never on a level."""
    real_start = Reactor.start

    def start(self, pairs, on_end):
        streams = real_start(self, pairs, on_end)
        for fd in {fd for s in streams for fd in (s.src, s.dst)}:
            if fd in self._level:
                self._to_edge(fd)
        return streams

    monkeypatch.setattr(Reactor, "start", start)


async def test_a_hang_up_nobody_waits_for_is_reported_once(path):
    """The server sends 48 KiB and closes while the client, which has shut down its write
    side, reads nothing through tiny buffers: the down stream waits on the client's full
    socket, and the server's socket, its data and FIN all in, hangs up both ways (EPOLLHUP,
    which no mask turns off). Level-triggered, each turn would report it again and the
    reactor would spin; it turns that fd edge-triggered once, and every task blocks. Then the
    client reads it all, intact."""
    engine = Engine(pool=PipePool(size=1 << 20), splice=(path == "splice"))
    (client, a), (b, server) = await traffic.tcp_pair(near_rcvbuf=4096), await traffic.tcp_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = os.urandom(48 << 10)
    reactor = engine.reactor()
    served = trio.Event()
    ended = []

    async def relayed():
        ended.append(await relay(a, b, engine, Flow(), Flow(), linger=30))

    async def serve():
        view = memoryview(data)
        while view:
            view = view[await server.send(view):]
        server.close()
        served.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relayed)
            client.shutdown(socket.SHUT_WR)
            nursery.start_soon(serve)
            await served.wait()
            await trio.testing.wait_all_tasks_blocked()  # would never return while it spun
            assert b.fileno() not in reactor._level and reactor._writers, "no hang-up unclaimed"
            turns = reactor._turns
            await trio.testing.wait_all_tasks_blocked()
            assert reactor._turns == turns
            assert await traffic.recv_all(client, random.Random(9)) == (len(data), traffic.digest(data))
    assert ended[0].reason == "eof", ended


@pytest.mark.parametrize("trigger", ["level", "edge"])
async def test_drains_cut_short_by_a_one_page_pipe_lose_nothing(monkeypatch, path, trigger):
    """A one-page pipe holds one slot, so most drains stop with bytes still queued on the
    socket. Each such drain is small. Level-triggered, the next turn reports the bytes left
    behind. Edge-triggered, the stream re-arms instead of draining to EAGAIN, and the re-arm
    must report them; either way a miss would stall the transfer."""
    rearms = []
    real_rearm = Reactor._rearm

    def counting_rearm(self, s):
        if s.src not in self._level:
            rearms.append(s.src)
        real_rearm(self, s)

    monkeypatch.setattr(Reactor, "_rearm", counting_rearm)
    if trigger == "edge":
        _edge_triggered(monkeypatch)
    engine = Engine(pool=PipePool(size=4096), splice=path == "splice")
    up_data, down_data = os.urandom(3 * MiB), os.urandom(2 * MiB)
    end, up, down = await _exchange(*await _tcp_pairs(), up_data, down_data, engine)
    assert end.reason == "eof"
    if path == "splice":
        assert engine.pool.granted == 4096
        assert up.spliced == len(up_data) and down.spliced == len(down_data)
    if path == "splice" and trigger == "edge":
        assert len(rearms) >= (len(up_data) + len(down_data)) // 4096 // 2
    else:
        assert not rearms


@pytest.mark.parametrize("pipe_size", [1 << 20, 4096])
async def test_bytes_and_eof_that_arrived_together_are_both_relayed(path, pipe_size):
    """The client sends a short message and shuts down before the relay starts: one wake-up
    brings the bytes and the FIN. The stream delivers the bytes and must still see the FIN,
    with nothing else happening on that socket: the server answers only after EOF. With a
    1 MiB pipe the message is fewer bytes than the pipe has slots (the wait without re-arm is
    considered, and the hang-up must rule it out); with one page it is not (the re-arm)."""
    engine = Engine(pool=PipePool(size=pipe_size), splice=path == "splice")
    (client, a), (b, server) = await _tcp_pairs()
    up_data, down_data = os.urandom(100), os.urandom(300)
    await client.send(up_data)
    client.shutdown(socket.SHUT_WR)
    got = {}

    async def serve():
        got["server"] = await traffic.recv_all(server, random.Random(4))
        await server.send(down_data)
        server.shutdown(socket.SHUT_WR)

    async def read():
        got["client"] = await traffic.recv_all(client, random.Random(5))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(read)
            end = await relay(a, b, engine, Flow(), Flow(), linger=10)
    assert end.reason == "eof"
    assert got["server"] == (len(up_data), traffic.digest(up_data))
    assert got["client"] == (len(down_data), traffic.digest(down_data))


async def test_no_pipe_before_the_first_byte_falls_back_to_copy(monkeypatch, path):
    """The pool cannot make a pipe (fd exhaustion): a stream that has moved nothing yet copies
    instead, and says why; nothing is lost."""
    engine = Engine(pool=PipePool(size=65536), splice=path == "splice")

    def no_pipe():
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(engine.pool, "get", no_pipe)
    up_data, down_data = os.urandom(3 * MiB), os.urandom(2 * MiB)
    end, up, down = await _exchange(*await _tcp_pairs(), up_data, down_data, engine)
    assert end.reason == "eof"
    assert (up.copied, down.copied) == (len(up_data), len(down_data)) and up.spliced == 0
    if path == "splice":
        assert up.fallback == down.fallback == "splice refused on pipe (EMFILE)"
        assert engine.fallbacks == {up.fallback: 2}


async def test_no_pipe_after_bytes_moved_ends_the_relay_with_the_reason():
    """Once bytes have moved, a stream no longer falls back (the brief: only before the first
    byte): no pipe ends the relay, and its end says why."""
    engine = Engine(pool=PipePool(size=4096, max_idle=0))
    real_get = engine.pool.get
    calls = []

    def second_fails():
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_get()

    engine.pool.get = second_fails
    (client, a), (b, server) = await _tcp_pairs()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.flood, client)
            end = await relay(a, b, engine, Flow(), Flow(), linger=10)
            nursery.cancel_scope.cancel()
    assert end.reason == "out-of-fds" and "EMFILE" in end.detail, end


async def test_small_messages_wait_without_a_re_arm(monkeypatch):
    """Ping-pong of 100-byte messages on 1 MiB pipes (256 slots): each drain takes fewer bytes
    than the pipe has slots, after a wake-up without a hang-up, so the stream waits at once,
    with neither a drain to EAGAIN nor an epoll_ctl; every message arrives intact."""
    rearms = []
    real_rearm = Reactor._rearm
    monkeypatch.setattr(Reactor, "_rearm", lambda self, s: (rearms.append(s.src), real_rearm(self, s)))
    engine = Engine(pool=PipePool(size=1 << 20))
    (client, a), (b, server) = await _tcp_pairs()
    rng = random.Random(6)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: relay(a, b, engine, Flow(), Flow(), linger=10))
            for _ in range(50):
                message = rng.randbytes(100)
                await client.send(message)
                assert await traffic.recv_exactly(server, 100) == message
                await server.send(message[::-1])
                assert await traffic.recv_exactly(client, 100) == message[::-1]
            nursery.cancel_scope.cancel()
    assert len(rearms) <= 2, rearms


@pytest.mark.parametrize("edge", [False, True], ids=["level", "edge"])
async def test_a_large_message_delivered_is_followed_by_a_drain_at_once(monkeypatch, edge):
    """A drain of _CHASE_FROM bytes or more (a loopback segment holds 65,483), once delivered,
    is followed by another drain in the same step, since a sender streaming faster than a
    segment per wake-up has most likely sent more meanwhile. Here nothing more comes: that drain
    meets EAGAIN once per message, and the stream waits. A smaller message is followed by no
    drain. Every message arrives intact, level- or edge-triggered."""
    if edge:
        _edge_triggered(monkeypatch)
    engine = Engine(pool=PipePool(size=1 << 20))
    (client, a), (b, server) = await _tcp_pairs()
    real = syscalls.splice_unchecked
    found_empty = []

    def counting(src, dst, count, *args):
        try:
            return real(src, dst, count, *args)
        except BlockingIOError:
            if src == a.fileno():
                found_empty.append(count)
            raise

    monkeypatch.setattr(syscalls, "splice_unchecked", counting)
    chase = reactor_mod._CHASE_FROM
    rng = random.Random(8)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: relay(a, b, engine, Flow(), Flow(), linger=10))
            for size in [100, chase - 1, chase, 60_000, 100, chase + 1, 1312]:
                found_empty.clear()
                message = rng.randbytes(size)
                await client.send(message)
                assert await traffic.recv_exactly(server, size) == message
                # The reply is stepped after the step that delivered the message has ended.
                await server.send(b"k")
                assert await traffic.recv_exactly(client, 1) == b"k"
                assert len(found_empty) == (1 if size >= chase else 0), (size, found_empty)
            nursery.cancel_scope.cancel()


async def test_messages_delivered_in_parts_arrive_whole_and_in_order(monkeypatch):
    """Each pump moves at most 97 bytes: a message the straight-through step drained is only
    partly delivered, and the loop delivers the rest before the stream waits again. Messages
    of 1 to 5,000 bytes each way, every one intact."""
    engine = Engine(pool=PipePool(size=1 << 20))
    (client, a), (b, server) = await _tcp_pairs()
    sockets = {a.fileno(), b.fileno()}
    real = syscalls.splice_unchecked
    partial = []

    def short_pumps(src, dst, count, *args):
        if dst in sockets and count > 97:
            partial.append(count)
            count = 97
        return real(src, dst, count, *args)

    monkeypatch.setattr(syscalls, "splice_unchecked", short_pumps)
    rng = random.Random(7)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: relay(a, b, engine, Flow(), Flow(), linger=10))
            for size in [1, 97, 98, 255, 256, 1312, 5000] + [rng.randrange(1, 5000) for _ in range(20)]:
                message = rng.randbytes(size)
                await client.send(message)
                assert await traffic.recv_exactly(server, size) == message
                await server.send(message[::-1])
                assert await traffic.recv_exactly(client, size) == message[::-1]
            nursery.cancel_scope.cancel()
    assert partial, "no pump was cut short"


async def test_small_messages_into_a_full_destination_lose_nothing(monkeypatch):
    """The client sends 1,000-byte messages, each stepped through the relay before the next,
    while the server reads nothing: a drained message meets a full destination (a Unix socket
    takes a message whole or not at all), and the stream waits for it to drain. Then the
    server reads: 2 MiB in order, with the SHA-256 sent."""
    waits = []
    real_wait = Reactor._wait

    def counting_wait(self, table, fd, s):
        if table is self._writers:
            waits.append(fd)
        real_wait(self, table, fd, s)

    monkeypatch.setattr(Reactor, "_wait", counting_wait)
    engine = Engine(pool=PipePool(size=1 << 20))
    (client, a), (b, server) = await _two_pairs()
    data = os.urandom(2 * MiB)
    got = {}

    async def send():
        for i in range(0, len(data), 1000):
            await client.send(data[i:i + 1000])
            if not waits:
                await trio.testing.wait_all_tasks_blocked()
        client.shutdown(socket.SHUT_WR)

    async def receive():
        while not waits:  # the relay's stream waits on the server's full socket
            await trio.testing.wait_all_tasks_blocked()
        got["server"] = await traffic.recv_all(server, random.Random(8))
        server.shutdown(socket.SHUT_WR)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
            end = await relay(a, b, engine, Flow(), Flow(), linger=10)
    assert got["server"] == (len(data), traffic.digest(data))
    assert end.reason == "eof" and waits


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ECONNRESET])
async def test_a_message_whose_delivery_fails_falls_back_or_ends_the_relay(monkeypatch, err):
    """A small message, drained on a wake-up with a spare pipe at hand, meets an error on its
    way out: a refusal before any byte left turns the stream to copying with the message
    first (EINVAL), any other error ends the relay naming the destination (ECONNRESET)."""
    engine = _warm(Engine(pool=PipePool(size=1 << 20)), True)
    (client, a), (b, server) = await _tcp_pairs()
    real = syscalls.splice_unchecked

    def failing_pump(src, dst, *args):
        if dst == b.fileno():
            raise OSError(err, os.strerror(err))
        return real(src, dst, *args)

    monkeypatch.setattr(syscalls, "splice_unchecked", failing_pump)
    up = Flow()
    with trio.fail_after(10):
        ended = []
        async with trio.open_nursery() as nursery:
            async def relayed():
                ended.append(await relay(a, b, engine, up, Flow(), linger=10))
                nursery.cancel_scope.cancel()

            nursery.start_soon(relayed)
            await client.send(b"hello")
            if err == errno.EINVAL:
                assert await traffic.recv_exactly(server, 5) == b"hello"
                assert up.fallback == "splice refused on destination (EINVAL)" and up.copied == 5
                nursery.cancel_scope.cancel()
    if err == errno.ECONNRESET:
        assert ended[0].reason == "reset" and ended[0].side == "b", ended
        assert engine.pool.stats.destroyed_dirty == 1  # the message's pipe held it


@pytest.mark.parametrize("found", ["EAGAIN", "zero"])
async def test_a_drain_that_finds_nothing_after_a_wake_up_loses_nothing(monkeypatch, found):
    """The drain a wake-up leads to can find nothing: an earlier drain took the bytes that
    raised the edge (EAGAIN), or a zero comes that the wake-up did not vouch for as EOF (it
    reported no FIN). Faked once, on the drain of a message: after EAGAIN the stream waits
    for the next arrival, after a zero it drains again; every byte arrives, in order, and the
    idle timer is touched on the way (on_bytes)."""
    engine = Engine(pool=PipePool(size=1 << 20))
    (client, a), (b, server) = await _tcp_pairs()
    real = syscalls.splice_unchecked
    armed = []

    def nothing_once(src, dst, *args):
        if src == a.fileno() and armed and armed.pop():
            if found == "EAGAIN":
                raise BlockingIOError(errno.EAGAIN, "faked")
            return 0
        return real(src, dst, *args)

    monkeypatch.setattr(syscalls, "splice_unchecked", nothing_once)
    first, second, third = b"x" * 300, b"y" * 400, b"z" * 500
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: relay(a, b, engine, Flow(), Flow(), idle=60, linger=10))
            await client.send(first)  # a pipe goes back to the pool: the next step is the fast one
            assert await traffic.recv_exactly(server, len(first)) == first
            armed.append(True)
            await client.send(second)
            await trio.testing.wait_all_tasks_blocked()
            assert not armed, "the drain was not faked"
            await client.send(third)
            assert await traffic.recv_exactly(server, 900) == second + third
            nursery.cancel_scope.cancel()


async def test_a_handed_over_socket_is_not_registered_twice_and_a_closed_one_is_forgotten():
    """watch → unwatch(keep=True) → start: the socket is already in the epoll set, so start
    registers nothing (a second register fails with EEXIST, a syscall and an exception per
    connection). A socket unwatched with keep=True and then closed (the connection ended
    before its streams started) must not leave that mark on the fd number: a new socket
    that gets the number is registered and relays."""
    engine = Engine(pool=PipePool(size=65536))
    reactor = engine.reactor()
    registered = []

    class CountingEpoll:
        def __init__(self, epoll):
            self._epoll = epoll

        def register(self, fd, mask):
            registered.append(fd)
            return self._epoll.register(fd, mask)

        def __getattr__(self, name):
            return getattr(self._epoll, name)

    reactor._epoll = CountingEpoll(reactor._epoll)
    (client, a), (b, server) = await _tcp_pairs()
    reactor.watch(b.fileno(), lambda events: None)
    reactor.unwatch(b.fileno(), keep=True)
    registered.clear()
    up_data, down_data = os.urandom(MiB), os.urandom(MiB)
    await _exchange((client, a), (b, server), up_data, down_data, engine)
    assert registered == [a.fileno()]

    doomed = trio.socket.socket()
    number = doomed.fileno()
    reactor.watch(number, lambda events: None)
    reactor.unwatch(number, keep=True)
    reactor.unwatch(number, closing=True)  # the connection ended first (forward's _finish)
    doomed.close()
    (client, first), (b, server) = await _tcp_pairs()
    os.dup2(first.fileno(), number)  # the number comes back as a relayed socket
    first.close()
    a = trio.socket.from_stdlib_socket(socket.socket(fileno=number))
    await _exchange((client, a), (b, server), up_data, down_data, engine)


@pytest.mark.parametrize("then", ["eof", "more"])
async def test_tcp_urgent_data_is_relayed_in_order(path, then):
    """A client sends "abc", an urgent byte (MSG_OOB) and "def". splice stops at the urgent
    mark and never passes it: it answers EAGAIN there (the stream would stall: "more"), or 0
    once the FIN is in (the rest would be cut off as EOF: "eof"). Both paths deliver every
    byte in order, the urgent one inline, and count it."""
    engine = Engine(pool=PipePool(size=65536), splice=path == "splice")
    (client, a), (b, server) = await _tcp_pairs()
    got = bytearray()
    expected = traffic.URGENT_SENT[then]

    async def send():
        await traffic.send_around_an_urgent_byte(client, server, then, got)
        got.extend(await traffic.recv_exactly(server, len(expected) - len(got)))
        assert await server.recv(10) == b""  # then EOF
        server.shutdown(socket.SHUT_WR)

    up = Flow()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            end = await relay(a, b, engine, up, Flow(), linger=10)
    assert end.reason == "eof"
    assert bytes(got) == expected
    assert up.bytes == len(expected)
    if path == "splice":
        assert up.copied == 1 and up.spliced == len(expected) - 1
        assert engine.fallbacks[reactor_mod.URGENT_BYTE] == 1


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_handed_over_socket_waits_or_is_stepped_as_its_watch_saw_it(monkeypatch, path, when):
    """forward hands a connected target socket from its (edge-triggered) connect watch to the
    streams, which take it level-triggered. If the target speaks later ("after"), the stream
    waits for its source at once, with no drain that meets EAGAIN. If bytes were already there
    ("before"), no new edge will come for them: the level must report them, or they would
    never move."""
    engine = Engine(pool=PipePool(size=65536), splice=path == "splice")
    reactor = engine.reactor()
    (client, a), (b, server) = await _tcp_pairs()
    early = os.urandom(1000)
    if when == "before":
        await server.send(early)
        await trio.lowlevel.wait_readable(b)
    eagain = []
    real_splice = syscalls.splice_unchecked

    def counting(src, *args):
        try:
            return real_splice(src, *args)
        except BlockingIOError:
            eagain.append(src)
            raise

    monkeypatch.setattr(syscalls, "splice_unchecked", counting)
    up, down = Flow(), Flow()
    started, done = trio.Event(), trio.Event()

    def connected(events):
        reactor.unwatch(b.fileno(), keep=True)
        Pair(reactor, a, b, up, down, linger=10, on_done=lambda _pair: done.set())
        started.set()

    reactor.watch(b.fileno(), connected)
    await started.wait()
    up_data, down_data = os.urandom(3 * MiB), os.urandom(2 * MiB)
    got = {}
    with trio.fail_after(10):
        # The reactor has taken the turn that stepped any ready stream once the server has
        # the client's first bytes.
        await client.send(up_data[:100])
        assert await traffic.recv_exactly(server, 100) == up_data[:100]
        if path == "splice" and when == "after":
            assert b.fileno() not in eagain
        if when == "before":
            assert await traffic.recv_exactly(client, len(early)) == early

        async def side(sock, data, key, seed):
            async with trio.open_nursery() as nursery:
                async def send():
                    await traffic.send_chunks(sock, data, random.Random(seed))
                    sock.shutdown(socket.SHUT_WR)
                nursery.start_soon(send)
                got[key] = await traffic.recv_all(sock, random.Random(seed + 1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, client, up_data[100:], "client", 1)
            nursery.start_soon(side, server, down_data, "server", 3)
        await done.wait()
    # got[key]: what that side read
    assert got["client"] == (len(down_data), traffic.digest(down_data))
    assert got["server"] == (len(up_data) - 100, traffic.digest(up_data[100:]))


async def test_an_urgent_byte_and_a_fin_that_came_together_are_both_relayed(path):
    """"abc", an urgent "!", "def" and the FIN are all in before the relay starts: one wake-up
    reports the data, the FIN and the mark together. A FIN vouches that no mark is left (so a
    zero is EOF, with no SIOCATMARK) only when the wake-up did not also report one: here the
    drain stops at the mark, and the zero that follows is the mark, not EOF."""
    engine = Engine(pool=PipePool(size=1 << 20), splice=path == "splice")
    (client, a), (b, server) = await _tcp_pairs()
    await client.send(b"abc")
    await client.send(b"!", socket.MSG_OOB)
    await client.send(b"def")
    client.shutdown(socket.SHUT_WR)
    poll = select.poll()
    poll.register(a.fileno(), select.POLLRDHUP)
    while not any(events & select.POLLRDHUP for _fd, events in poll.poll(10_000)):
        pass  # loopback: in already, in practice
    up = Flow()
    got = {}

    async def serve():
        got["server"] = await traffic.recv_exactly(server, 7)
        assert await server.recv(10) == b""
        server.shutdown(socket.SHUT_WR)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            end = await relay(a, b, engine, up, Flow(), linger=10)
    assert end.reason == "eof" and got["server"] == b"abc!def"
    if path == "splice":
        assert up.copied == 1 and up.spliced == 6


async def test_short_connections_ask_for_no_urgent_mark_and_re_arm_nothing(monkeypatch):
    """Request, then a reply with the FIN, then the client's FIN (HTTP with Connection: close):
    every zero a drain meets came after a wake-up that reported the FIN and no mark, so it is
    EOF with no SIOCATMARK; and a reply that came with its FIN is followed by a drain that
    sees the FIN, not by a re-arm and another wake-up."""
    asked, rearms = [], []
    real_pass, real_rearm = Reactor._pass_urgent_byte, Reactor._rearm
    monkeypatch.setattr(Reactor, "_pass_urgent_byte", lambda self, s, pipe: (asked.append(s.src), real_pass(self, s, pipe))[1])
    monkeypatch.setattr(Reactor, "_rearm", lambda self, s: (rearms.append(s.src), real_rearm(self, s)))
    engine = Engine(pool=PipePool(size=1 << 20))
    rng = random.Random(8)
    for _ in range(20):
        (client, a), (b, server) = await _tcp_pairs()
        request, reply = rng.randbytes(80), rng.randbytes(1300)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: relay(a, b, engine, Flow(), Flow(), linger=10))
                await client.send(request)
                assert await traffic.recv_exactly(server, len(request)) == request
                os.write(server.fileno(), reply)  # and the FIN with no checkpoint between
                server.shutdown(socket.SHUT_WR)
                assert await traffic.recv_exactly(client, len(reply)) == reply
                assert await client.recv(10) == b""
                client.shutdown(socket.SHUT_WR)
                assert await server.recv(10) == b""
        for sock in (client, a, b, server):
            sock.close()
    assert asked == [] and rearms == []


def test_a_second_urgent_byte_at_the_first_ones_mark_loses_nothing_on_an_inline_socket():
    """The narrowest case of TCP urgent data: the stream stands at an urgent mark, woken
    without EPOLLPRI (the byte came after the wake-up), when a second urgent byte arrives. On a
    socket without SO_OOBINLINE the kernel then drops the first (tcp_check_urg), so the
    sockets zcrelay opens carry it from the start (net.urgent_inline). Turns are taken by
    hand so that each urgent byte arrives between a poll and the step it wakes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    net.urgent_inline(listener)  # inherited, as by forward's accepted sockets
    with listener:
        client = socket.create_connection(listener.getsockname())
        a, _ = listener.accept()
        b = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert a.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE)
    for sock in (a, b):
        sock.setblocking(False)
    reactor = Reactor(PipePool(size=65536))
    up, ends = Flow(), []
    reactor.start([(a.fileno(), b.fileno(), up)], lambda stream, error: ends.append(error))
    injected = [lambda: client.send(b"1", socket.MSG_OOB), lambda: client.send(b"2", socket.MSG_OOB)]
    real_poll = reactor._epoll.poll

    def poll_then_inject(timeout, most):
        events = real_poll(timeout, most)
        if events and injected:
            injected.pop(0)()  # after the poll, before the step it wakes
        return events

    reactor._epoll = type("Epoll", (), {"poll": staticmethod(poll_then_inject),
                                        "__getattr__": lambda self, name: getattr(real_poll.__self__, name)})()
    client.send(b"a")
    for _ in range(20):
        reactor._turn(1)
        if up.bytes == 3:
            break
    client.shutdown(socket.SHUT_WR)
    for _ in range(20):
        if ends:
            break
        reactor._turn(1)
    b.shutdown(socket.SHUT_WR)
    received = b""
    while chunk := server.recv(100):
        received += chunk
    assert received == b"a12" and ends == [None]
    assert up.copied == 1  # the second is passed at its mark; the first became stream data
    reactor.close()
    for sock in (client, a, b, server):
        sock.close()


async def test_sockets_zcrelay_opens_keep_urgent_bytes_inline():
    """Listeners (and so every socket they accept) and connecting sockets: SO_OOBINLINE."""
    listener = await net.open_listener(addresses.parse("127.0.0.1:0", listen=True))
    outgoing = net.stream_socket(socket.AF_INET)
    with listener, outgoing:
        assert outgoing.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE)
        assert outgoing.connect_ex(listener.getsockname()) in (0, errno.EINPROGRESS)
        accepted, _ = await listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE)


@pytest.mark.parametrize("path", ["splice", "copy"])
async def test_streams_that_epoll_refuses_leave_the_reactor_as_it_was(path):
    """Reactor.start is all or nothing: when epoll refuses one of its fds (ENOSPC past
    fs.epoll.max_user_watches, ENOMEM, EBADF), the error comes out and nothing the refused
    start touched stays behind. No fd stays registered or marked level-triggered, a
    handed-over fd keeps its watch's registration, no fallback is counted, and a Pair armed
    with an idle timeout leaves no timer that would later fire for a relay that never started
    (its callback would stop streams that do not exist: an exception in the reactor's timer
    task, which ended the trio run and every relay in it)."""
    engine = Engine(pool=PipePool(size=65536), splice=(path == "splice"))
    reactor = engine.reactor()
    (client, a), (c, server) = await _tcp_pairs()
    spare = trio.socket.socket()
    socks = {sock.fileno(): sock for sock in (a, c, spare)}
    pairs = [(a.fileno(), spare.fileno(), Flow()), (c.fileno(), spare.fileno(), Flow())]
    # The order start visits them in (its own set's): the refused fd is the last, after a
    # handed-over one and a new one. (A set of ints is visited by value, and by insertion
    # order where two collide: the same expression over the same pairs gives the same order.)
    handed, new, refused = order = list({fd for src, dst, _ in pairs for fd in (src, dst)})
    real = reactor._epoll

    class RefusingEpoll:
        def _refuse(self, fd):
            if fd == refused:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def register(self, fd, mask):
            self._refuse(fd)
            return real.register(fd, mask)

        def modify(self, fd, mask):
            self._refuse(fd)
            return real.modify(fd, mask)

        def __getattr__(self, name):
            return getattr(real, name)

    reactor.watch(handed, lambda events: None)
    reactor.unwatch(handed, keep=True)  # as forward hands over a connected target
    masks_before = dict(reactor._masks)
    reactor._epoll = RefusingEpoll()

    with pytest.raises(OSError) as raised:
        reactor.start(pairs, lambda s, e: None)
    assert raised.value.errno == errno.ENOSPC
    assert reactor._masks == masks_before and reactor._handed == {handed}
    assert not reactor._level & set(order) and reactor.waiting == 0
    assert not engine.fallbacks
    real.register(new, select.EPOLLIN)  # not left registered: no EEXIST
    real.unregister(new)

    timers = len(reactor._timers)
    with pytest.raises(OSError):
        Pair(reactor, socks[new], socks[refused], Flow(), Flow(), idle=0.01, linger=None, on_done=lambda pair: None)
    assert len(reactor._timers) == timers and reactor.waiting == 0
    reactor._epoll = real
    spare.close()

    # The same sockets relay afterwards, intact, the handed-over one included.
    up_data, down_data = os.urandom(3 * MiB), os.urandom(2 * MiB)
    end, _, _ = await _exchange((client, a), (c, server), up_data, down_data, engine)
    assert end.reason == "eof"


async def test_a_reactor_closed_before_it_ran_returns_from_run():
    reactor = Reactor(PipePool(size=65536))
    reactor.close()
    with trio.fail_after(5):
        await reactor.run()
