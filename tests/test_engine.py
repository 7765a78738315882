"""The engine's layers on real fds: syscalls, counted pipes and the pool, the mover (with a
clogged reader, injected errnos and cancellation) and the in-process relay on both paths."""

from __future__ import annotations

import ast
import errno
import fcntl
import os
import socket
import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from zcrelay import mover, syscalls
from zcrelay.errors import PeerGone, SpliceRefused, StreamError
from zcrelay.pipes import Pipe, PipePool
from zcrelay.relay import Engine, relay
from zcrelay.stats import Flow
from tests import traffic

MiB = 1 << 20
PACKAGE = Path(__file__).resolve().parent.parent / "zcrelay"


# --- syscalls ---------------------------------------------------------------------------------

def test_splice_and_tee_move_and_duplicate_bytes():
    a = Pipe.open(65536)
    b = Pipe.open(65536)
    try:
        os.write(a.w, b"hello world")
        assert syscalls.tee(a.r, b.w, 100) == 11  # duplicated, not consumed
        assert os.read(b.r, 100) == b"hello world"
        left, right = socket.socketpair()
        with left, right:
            assert syscalls.splice(a.r, left.fileno(), 100) == 11
            assert right.recv(100) == b"hello world"
        with pytest.raises(BlockingIOError):
            syscalls.splice(a.r, b.w, 100)  # empty pipe, SPLICE_F_NONBLOCK
        with pytest.raises(BlockingIOError):
            syscalls.tee(a.r, b.w, 100)
    finally:
        a.close()
        b.close()


def test_oversized_counts_are_capped_not_einval():
    p = Pipe.open()
    q = Pipe.open()
    try:
        os.write(p.w, b"x")
        assert syscalls.splice(p.r, q.w, 2**63 - 1) == 1
    finally:
        p.close()
        q.close()


def test_pipe_size_above_the_kernel_limit_is_clamped():
    limits = syscalls.read_pipe_limits()
    r, w, granted = syscalls.open_pipe(limits.max_size * 64)
    try:
        assert granted == fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        assert granted >= limits.max_size  # clamped to the limit, not left at 64 KiB
    finally:
        os.close(r)
        os.close(w)


def test_pool_reports_a_refused_size_once():
    notices = []
    limits = syscalls.PipeLimits(max_size=1 << 20, user_pages_soft=16384)
    pool = PipePool(size=64 * MiB, on_notice=notices.append, limits=limits)
    pipes = [pool.get() for _ in range(3)]
    for p in pipes:
        pool.put(p)
    pool.close()
    if pipes[0].size < 64 * MiB:
        assert len(notices) == 1 and "pipe-max-size" in notices[0]


# --- pipes and the pool -----------------------------------------------------------------------

def test_pool_keeps_at_most_max_idle_and_destroys_dirty_pipes():
    pool = PipePool(size=65536, max_idle=2)
    pipes = [pool.get() for _ in range(4)]
    dirty = pipes[0]
    os.write(dirty.w, b"left over")
    dirty.held = 9
    fd = dirty.r
    for p in pipes:
        pool.put(p)
    assert pool.idle == 2
    assert dirty.closed and pool.stats.destroyed_dirty == 1
    with pytest.raises(OSError):
        os.fstat(fd)  # closed; nothing was opened since, so the number is not reused
    reused = pool.get()
    assert reused.held == 0 and reused is not dirty
    pool.put(reused)
    pool.close()
    assert pool.idle == 0


def test_closed_pipe_forgets_its_fds():
    p = Pipe.open()
    p.close()
    assert p.r == -1 and p.w == -1
    p.close()  # idempotent


# --- the mover ----------------------------------------------------------------------------------

async def _pair():
    return trio.socket.socketpair()


async def test_splice_stream_moves_more_than_pipe_and_socket_buffers():
    (a_in, a_out), (b_in, b_out) = await _pair(), await _pair()
    data = os.urandom(24 * MiB)
    pool = PipePool(size=65536)
    flow = Flow()
    got = []

    async def feed():
        view = memoryview(data)
        while view:
            view = view[await a_in.send(view[:MiB]):]
        a_in.shutdown(socket.SHUT_WR)

    async def clogged_reader():
        # Reads slowly at first: the pump must wait for it, not spin or drop bytes.
        buf = bytearray()
        for _ in range(20):
            await trio.sleep(0.005)
            buf += await b_out.recv(4096)
        while chunk := await b_out.recv(MiB):
            buf += chunk
        got.append(bytes(buf))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        nursery.start_soon(clogged_reader)
        await mover.splice_stream(a_out.fileno(), b_in.fileno(), pool, flow)
        b_in.shutdown(socket.SHUT_WR)
    assert traffic.digest(got[0]) == traffic.digest(data)
    assert flow.spliced == len(data) and flow.copied == 0
    assert pool.stats.destroyed_dirty == 0 and pool.idle >= 1


async def test_splice_stream_is_a_checkpoint_even_at_once_eof():
    (a_in, a_out), (b_in, b_out) = await _pair(), await _pair()
    a_in.shutdown(socket.SHUT_WR)
    with trio.testing.assert_checkpoints():
        await mover.splice_stream(a_out.fileno(), b_in.fileno(), PipePool(), Flow())


async def test_copy_stream_is_a_checkpoint_and_moves_bytes():
    (a_in, a_out), (b_in, b_out) = await _pair(), await _pair()
    await a_in.send(b"abc")
    a_in.shutdown(socket.SHUT_WR)
    flow = Flow()
    with trio.testing.assert_checkpoints():
        await mover.copy_stream(a_out.fileno(), b_in.fileno(), flow)
    assert await b_out.recv(10) == b"abc" and flow.copied == 3


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSYS])
async def test_first_splice_refused_is_handled_before_any_byte(monkeypatch, err):
    (a_in, a_out), (b_in, b_out) = await _pair(), await _pair()
    await a_in.send(b"payload")

    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(syscalls, "splice_unchecked", refuse)
    with pytest.raises(SpliceRefused):
        await mover.splice_stream(a_out.fileno(), b_in.fileno(), PipePool(), Flow())
    monkeypatch.undo()
    assert await a_out.recv(100) == b"payload"  # nothing was consumed: a copy can take over


async def test_destination_refusing_after_drain_keeps_every_byte(monkeypatch):
    """The source gave bytes, then the destination refused splice: those bytes are written
    through user space (counted as copied) before SpliceRefused, in order."""
    (a_in, a_out), (b_in, b_out) = await _pair(), await _pair()
    await a_in.send(b"first bytes")
    real = syscalls.splice_unchecked

    def refuse_to_socket(src, dst, count, *args, **kwargs):
        if dst == b_in.fileno():
            raise OSError(errno.EINVAL, "refused")
        return real(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(syscalls, "splice_unchecked", refuse_to_socket)
    flow = Flow()
    with pytest.raises(SpliceRefused):
        await mover.splice_stream(a_out.fileno(), b_in.fileno(), PipePool(), flow)
    assert await b_out.recv(100) == b"first bytes" and flow.copied == 11


@pytest.mark.parametrize("err,kind", [(errno.ECONNRESET, PeerGone), (errno.EPIPE, PeerGone), (errno.EIO, StreamError)])
async def test_mid_stream_errors_are_translated_once(monkeypatch, err, kind):
    (a_in, a_out), (b_in, b_out) = await _pair(), await _pair()
    await a_in.send(b"x" * 1000)
    real = syscalls.splice_unchecked
    calls = []

    def fail_second_drain(src, dst, count, *args, **kwargs):
        if src == a_out.fileno():
            calls.append(1)
            if len(calls) == 2:
                raise OSError(err, os.strerror(err))
        return real(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(syscalls, "splice_unchecked", fail_second_drain)
    with pytest.raises(kind) as info:
        await mover.splice_stream(a_out.fileno(), b_in.fileno(), PipePool(), Flow())
    assert info.value.role == mover.SOURCE and info.value.errno == err


@pytest.mark.parametrize("err,reason,said", [
    (errno.ECONNRESET, "reset", "reset by target"), (errno.EPIPE, "reset", "reset by target"),
    (errno.ETIMEDOUT, "lost", "lost on target (destination: splice: "),
    (errno.EHOSTUNREACH, "lost", "lost on target (destination: splice: "),
])
def test_a_peer_that_vanished_is_lost_not_reset(err, reason, said):
    """A connection that timed out mid-stream (or whose host became unreachable) was logged
    "reset by target": a reset it never sent. It is "lost on target", with its cause."""
    from zcrelay.errors import translate
    from zcrelay.relay import RelayEnd

    error = translate(OSError(err, os.strerror(err)), mover.DESTINATION, "splice")
    assert isinstance(error, PeerGone) and error.reason == reason
    assert RelayEnd(error.reason, "b", str(error)).describe("client", "target").startswith(said)


async def test_cancelled_mid_stream_destroys_the_pipe_holding_bytes():
    """A pump blocked on a full destination is cancelled: the pipe with bytes in it is
    destroyed, never pooled for another stream."""
    (a_in, a_out), (b_in, b_out) = await _pair(), await _pair()
    pool = PipePool(size=65536)
    with trio.move_on_after(0.2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.flood, a_in)
            await mover.splice_stream(a_out.fileno(), b_in.fileno(), pool, Flow())  # nobody reads b_out
    assert pool.stats.destroyed_dirty == 1
    assert pool.idle == 0


# --- the relay, in process, both paths ------------------------------------------------------------

async def test_relay_reset_on_one_side_ends_both_promptly(path):
    """The server closes with unread data (its peer gets ECONNRESET) while the client stays
    open and silent: the relay ends at once, not after --linger."""
    (client, a), (b, server) = await _pair(), await _pair()
    engine = Engine(splice=(path == "splice"))
    await client.send(b"never read by the server")

    async def vanish():
        while syscalls.fionread(server.fileno()) == 0:
            await trio.sleep(0.001)
        server.close()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vanish)
            end = await relay(a, b, engine, Flow(), Flow(), linger=30)
    assert end.reason == "reset" and end.side == "b"
    client.close()


async def test_a_reset_whose_error_was_taken_is_not_passed_on_as_eof(path):
    """After an RST the kernel reports ECONNRESET once, to the first call that asks. A splice
    into the socket that had moved some bytes takes it and returns its count, and every read
    after that returns 0, as at the peer's FIN: the relay passed that 0 on as a FIN, and the
    far side saw a clean end of a stream cut short (5 resets in 30 through `zcrelay forward`,
    both directions busy). Here the test takes the error itself (SO_ERROR), as that splice
    does, before the relay starts: the relay must call it a reset and shut nothing down."""

    (client, a), (b, server) = await traffic.tcp_pair(), await traffic.tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # an RST to a
    await trio.lowlevel.wait_readable(a)  # it has come
    assert a.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET  # and is taken
    with trio.fail_after(5):
        end = await relay(a, b, Engine(splice=(path == "splice")), Flow(), Flow(), linger=30)
    assert (end.reason, end.side) == ("reset", "a"), end
    with pytest.raises(BlockingIOError):  # no FIN reached the server: it was not told "the end"
        os.read(server.fileno(), 1)
    for sock in (a, b, server):
        sock.close()


async def _reply_then_reset(path: str, linger: float, client_reads: bool):
    """A server replies (3 MiB) and resets while the client is still sending, as a server that
    answers early and closes with the request unread does. The client's window is small, so
    the relay holds most of the reply (in b's receive queue, its pipe, a's send queue) when the
    reset comes: both of the relay's streams then wait (on a's and b's buffers), and the
    reset wakes the one sending to b first. The client reads from then on (`client_reads`),
    or only once the relay has ended and its owner aborted a (as zcrelay forward does).
    Returns (the relay's end, its down flow, the reply, what the client got)."""
    import contextlib

    reply = os.urandom(3 << 20)
    (client, a), (b, server) = await traffic.tcp_pair(near_rcvbuf=65536), await traffic.tcp_pair()
    down = Flow()
    ended = []
    relayed = trio.Event()

    async def relaying():
        ended.append(await relay(a, b, Engine(splice=(path == "splice")), Flow(), down, linger=linger))
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # passed on
        a.close()
        relayed.set()

    async def upload():  # the request the server never reads
        with contextlib.suppress(OSError):
            while True:
                await client.send(b"x" * 65536)

    got = bytearray()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relaying)
            nursery.start_soon(upload)
            await server.send(b"")  # connected
            view = memoryview(reply)
            while view:
                view = view[await server.send(view):]
            while syscalls.tcp_unacked(server):  # the relay's kernel has taken it all
                await trio.sleep(0.001)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            server.close()  # the reset
            if not client_reads:
                await relayed.wait()
            with contextlib.suppress(ConnectionResetError):
                while data := await client.recv(1 << 20):
                    got += data
            await relayed.wait()
            nursery.cancel_scope.cancel()
    client.close()
    b.close()
    return ended[0], down, reply, bytes(got)


async def test_what_the_relay_holds_from_a_side_that_resets_reaches_the_other_first(path):
    """The relay held most of a reply when its server reset (see _reply_then_reset). Without a
    relay the reply would have sat in the client's receive queue, where a reset cannot take
    it: the relay ended at once and reset the client, and up to all of the reply was lost (113
    to 128 KiB of 3 MiB arrived through zcrelay forward), while its log counted it delivered.
    Every byte must reach the client, in order, before the reset is passed on."""
    end, down, reply, got = await _reply_then_reset(path, 30, client_reads=True)
    assert (end.reason, end.side) == ("reset", "b"), end
    assert (len(got), traffic.digest(got)) == (len(reply), traffic.digest(reply))
    assert down.bytes == len(reply)


async def test_what_a_reset_throws_away_is_not_counted_as_delivered(path):
    """The client does not read while the relay waits to hand it the reply of a server that
    reset: the linger ends the wait, and the reset passed on to the client throws away what
    the relay's kernel had not sent it. The count of bytes delivered is what the client got,
    not what the relay handed its kernel."""
    end, down, reply, got = await _reply_then_reset(path, 0.5, client_reads=False)
    assert (end.reason, end.side) == ("reset", "b"), end
    assert 0 < len(got) < len(reply) and got == reply[:len(got)]
    assert down.bytes == len(got)


@pytest.mark.parametrize("source", ["tcp", "unix"])
@pytest.mark.parametrize("capture", [False, True], ids=["reactor", "capture"])
async def test_a_fin_stuck_behind_bytes_the_target_does_not_take_starts_the_linger(path, capture, source, tmp_path):
    """The client uploads 64 KiB and sends its FIN; the target takes 12 KiB at most (a small
    window, and b's fixed small send buffer) and reads nothing: the relay holds the rest,
    with the FIN behind it, which it cannot pass on. The linger started only once the FIN was
    passed on, so the relay never ended (without an idle timeout, the default). It must end
    after the linger, resetting both sides: the target never got the whole upload, and a TCP
    client must not take a FIN for an upload delivered. The client's side may be a Unix
    socket, which has no TCP state to read the FIN from (that case hung longest); it cannot
    be reset either, so it sees an EOF."""
    from zcrelay import capture as capturing

    client, a = await traffic.tcp_pair() if source == "tcp" else trio.socket.socketpair()
    target, b = await traffic.tcp_pair(near_rcvbuf=4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fixed, and small: no autotuning
    upload = os.urandom(64 * 1024)
    view = memoryview(upload)
    while view:
        view = view[await client.send(view):]
    client.shutdown(socket.SHUT_WR)
    session = capturing.open_session(str(tmp_path), 1, "127.0.0.1:1", "t") if capture else None
    up = Flow()
    try:
        with trio.fail_after(10):
            start = trio.current_time()
            end = await relay(a, b, Engine(splice=(path == "splice")), up, Flow(), linger=0.3,
                              captures=session.captures if session else (None, None))
            elapsed = trio.current_time() - start
    finally:
        if session is not None:
            session.close()
    assert (end.reason, sorted(end.cut)) == ("linger", ["a", "b"]), end
    assert 0.3 <= elapsed < 5, elapsed
    for sock in (a, b):  # as zcrelay forward does with the sides in end.cut
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    got = bytearray()
    with pytest.raises(ConnectionResetError):
        while data := await target.recv(1 << 20):
            got += data
    if source == "tcp":
        with pytest.raises(ConnectionResetError):
            await client.recv(1)
    else:
        assert await client.recv(1) == b""
    assert len(got) < len(upload) and got == upload[:len(got)]
    assert len(got) <= up.bytes < len(upload)  # what was never sent to b is not counted
    client.close()
    target.close()


# --- layering ---------------------------------------------------------------------------------------

LOW_LAYERS = ["syscalls.py", "pipes.py", "stats.py", "errors.py", "addresses.py", "exitcodes.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_low_layers_do_not_import_trio_or_the_cli():
    for name in LOW_LAYERS:
        imported = _imports(PACKAGE / name)
        assert not any(m == "trio" or m.startswith("trio.") for m in imported), name
        assert not any(m.startswith("zcrelay.cli") for m in imported), name


def test_only_the_async_layer_waits_on_fds_and_only_the_cli_prints_or_exits():
    waiters = {"mover.py", "reactor.py", "direct.py", "teeing.py", "waits.py"}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(PACKAGE)
        if "wait_readable" in text or "wait_writable" in text:
            assert path.name in waiters, f"{rel} waits on fds; only the mover layer may"
        if rel.parts[0] != "cli":
            assert "sys.exit(" not in text and "trio.run(" not in text and "start_guest_run(" not in text, \
                f"{rel} exits or starts trio"
            assert not any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "print"
                           for n in ast.walk(ast.parse(text))), f"{rel} prints"


def test_run_blocking_waits_in_poll_and_refuses_to_suspend():
    """zcrelay.waits: outside trio a wait blocks in poll(2) until the fd is ready; a coroutine
    that would suspend (a trio call) is an error, not a hang."""
    import threading
    import types

    from zcrelay import mover, waits

    @types.coroutine
    def suspend():
        yield "an event loop's trap"

    async def would_suspend():
        await suspend()

    r, w = os.pipe()
    os.set_blocking(r, False)
    out_r, out_w = os.pipe()
    timer = threading.Timer(0.05, lambda: (os.write(w, b"late"), os.close(w)))
    timer.start()
    flow = Flow()
    try:
        # copy_stream meets EAGAIN first (nothing written yet), so it must wait and then copy.
        waits.run_blocking(mover.copy_stream, r, out_w, flow)
        assert os.read(out_r, 100) == b"late" and flow.copied == 4
        with pytest.raises(RuntimeError, match="suspend"):
            waits.run_blocking(would_suspend)
    finally:
        timer.join()
        for fd in (r, out_r, out_w):
            os.close(fd)


def test_blocking_deadlines_bound_waits_and_sleeps_and_nest():
    """zcrelay.waits without trio: move_on_after bounds a poll and a sleep; a deadline belongs
    to its own scope (an outer one that passes first is caught there, not by the inner)."""
    import time

    from zcrelay import waits

    r, w = os.pipe()
    try:
        async def scenario():
            seen = {}
            started = time.monotonic()
            with waits.move_on_after(0.05) as alone:
                await waits.wait_readable(r)  # nothing comes
            seen["alone"] = (alone.cancelled_caught, time.monotonic() - started)
            with waits.move_on_after(0.05) as outer:
                with waits.move_on_after(10) as inner:
                    await waits.sleep_until(waits.current_time() + 10)
            seen["nested"] = (outer.cancelled_caught, inner.cancelled_caught)
            with waits.move_on_after(10) as roomy:
                await waits.sleep_until(waits.current_time() + 0.01)
            seen["roomy"] = roomy.cancelled_caught
            return seen

        seen = waits.run_blocking(scenario)
    finally:
        os.close(r)
        os.close(w)
    caught, elapsed = seen["alone"]
    assert caught and 0.04 <= elapsed < 2, seen
    assert seen["nested"] == (True, False), seen
    assert seen["roomy"] is False



@pytest.mark.parametrize("then", ["eof", "more"])
async def test_splice_stream_passes_a_tcp_urgent_byte_in_its_place(then):
    """The mover (captures, connect, listen) as the reactor: a TCP urgent byte, which splice
    never passes (traffic.send_around_an_urgent_byte), is read inline and passed in its
    place, counted as one copied byte."""
    (a_in, a_out), (b_in, b_out) = await traffic.tcp_pair(), await traffic.tcp_pair()
    flow = Flow()
    got = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.send_around_an_urgent_byte, a_in, b_out, then, got)
            await mover.splice_stream(a_out.fileno(), b_in.fileno(), PipePool(size=65536), flow)
            b_in.shutdown(socket.SHUT_WR)
        while chunk := await b_out.recv(100):
            got.extend(chunk)
    expected = traffic.URGENT_SENT[then]
    assert bytes(got) == expected
    assert (flow.spliced, flow.copied, flow.fallback) == (len(expected) - 1, 1, mover.URGENT_BYTE)
    for sock in (a_in, a_out, b_in, b_out):
        sock.close()
