"""Property-based tests (hypothesis) of `connect`/`listen`'s engine (zcrelay.pipeline and
zcrelay.direct): stdin reaches the peer and the peer reaches stdout, byte for byte, in order,
whatever the writes, the pipe sizes and the kinds of stdio.

stdin is a pipe (spliced straight to the socket) or a regular file (spliced through a pipe of
ours, from its current position); stdout is a pipe or a regular file; both ways run at once,
each side shutting down its writing half when done; `splice=False` is the copy path. On the
splice path no byte may be copied. `run_pipeline` runs in process under trio, on a real
loopback TCP connection; the far ends of the stdio pipes are threads doing blocking I/O, as
other processes would (test_pipeline checks that a blocked stdout does not stop stdin).
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import threading

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from zcrelay.pipeline import PipelineConfig, plan, run_pipeline
from zcrelay.stats import Flow
from tests import traffic
from tests.test_properties import PROPERTY_SETTINGS

writes = st.lists(st.integers(min_value=1, max_value=400_000), min_size=0, max_size=10)


@PROPERTY_SETTINGS
@given(up_sizes=writes, down_sizes=writes, seed=st.integers(0, 2**32),
       stdin_kind=st.sampled_from(("pipe", "file")), stdout_kind=st.sampled_from(("pipe", "file")),
       stdin_pipe=st.sampled_from(traffic.PIPE_SIZES), pipe_size=st.sampled_from(traffic.PIPE_SIZES),
       splice=st.booleans(), skip=st.integers(0, 3000))
def test_both_directions_arrive_whole(tmp_path_factory, up_sizes, down_sizes, seed, stdin_kind,
                                      stdout_kind, stdin_pipe, pipe_size, splice, skip):
    tmp = tmp_path_factory.mktemp("pipeline")
    up_data = traffic.payload(seed, "up", sum(up_sizes))
    down_data = traffic.payload(seed, "down", sum(down_sizes))
    config = PipelineConfig(splice=splice, pipe_size=pipe_size)
    up, down = Flow(), Flow()
    far_got, stdout_got = bytearray(), bytearray()
    if stdin_kind == "file":
        (tmp / "in").write_bytes(os.urandom(skip) + up_data)
    rng = random.Random(seed)

    async def main() -> None:
        near, far = await traffic.tcp_pair()
        with near, far:
            async with trio.open_nursery() as nursery:
                # The other ends of stdio pipes are threads, as they would be other processes.
                if stdin_kind == "pipe":
                    stdin, feed = os.pipe2(os.O_CLOEXEC)
                    fcntl.fcntl(feed, fcntl.F_SETPIPE_SZ, stdin_pipe)
                    threads.append(threading.Thread(target=traffic.write_pieces, args=(feed, up_data, up_sizes)))
                else:
                    stdin = os.open(tmp / "in", os.O_RDONLY | os.O_CLOEXEC)
                    os.lseek(stdin, skip, os.SEEK_SET)  # read from where the shell left it
                if stdout_kind == "pipe":
                    drain, stdout = os.pipe2(os.O_CLOEXEC)
                    threads.append(threading.Thread(target=traffic.read_to_eof, args=(drain, stdout_got)))
                else:
                    stdout = os.open(tmp / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

                async def peer_sends() -> None:
                    await traffic.send_chunks(far, down_data, rng)
                    far.shutdown(socket.SHUT_WR)

                async def peer_receives() -> None:
                    while data := await far.recv(1 << 20):
                        far_got.extend(data)

                nursery.start_soon(peer_sends)
                nursery.start_soon(peer_receives)
                for thread in threads:
                    thread.start()
                try:
                    with trio.fail_after(60):
                        end = await run_pipeline(near, config, up, down, plan(stdin, False, splice),
                                                 plan(stdout, True, splice), stdin, stdout)
                finally:
                    os.close(stdin)
                    os.close(stdout)  # the reader of a stdout pipe sees EOF
                    for thread in threads:
                        await trio.to_thread.run_sync(thread.join, 60)
                assert end.reason == "eof"
            if stdout_kind == "pipe":
                os.close(drain)

    threads: list[threading.Thread] = []
    trio.run(main)
    assert not any(thread.is_alive() for thread in threads)
    assert bytes(far_got) == up_data
    if stdout_kind == "file":
        stdout_got[:] = (tmp / "out").read_bytes()
    assert bytes(stdout_got) == down_data
    assert (up.bytes, down.bytes) == (len(up_data), len(down_data))
    if splice:
        assert up.copied == down.copied == 0 and not up.fallback and not down.fallback
    else:
        assert up.spliced == down.spliced == 0


def test_copy_falls_back_to_waiting_first_where_rwf_nowait_is_refused(monkeypatch):
    """A kernel (or fd) that refuses RWF_NOWAIT (EOPNOTSUPP) makes the copy wait for
    readiness before each plain read and write instead; the bytes still all arrive, in order."""
    import errno

    from zcrelay import direct, syscalls

    asked = {"read": 0, "write": 0}

    def refuse(kind):
        def call(*args):
            asked[kind] += 1
            if asked[kind] > 1:  # asked again after a refusal: fail rather than spin
                raise AssertionError(f"RWF_NOWAIT {kind} asked again after EOPNOTSUPP")
            raise OSError(errno.EOPNOTSUPP, "RWF_NOWAIT refused")
        return call

    monkeypatch.setattr(syscalls, "read_nowait", refuse("read"))
    monkeypatch.setattr(syscalls, "write_nowait", refuse("write"))
    data = traffic.payload(7, "up", 3_000_000)
    src, feed = os.pipe2(os.O_CLOEXEC)
    drain, dst = os.pipe2(os.O_CLOEXEC)
    got = bytearray()
    threads = [threading.Thread(target=traffic.write_pieces, args=(feed, data, [len(data)])),
               threading.Thread(target=traffic.read_to_eof, args=(drain, got))]
    for thread in threads:
        thread.start()
    flow = Flow()

    async def main() -> None:
        with trio.fail_after(60):
            await direct.copy_waiting(src, dst, flow)

    try:
        trio.run(main)
    finally:
        os.close(src)
        os.close(dst)
        for thread in threads:
            thread.join(60)
        os.close(drain)
    assert bytes(got) == data and flow.copied == len(data)
    assert asked == {"read": 1, "write": 1}  # asked once each, then never again


@pytest.mark.parametrize("stdin_state", ["at-eof", "open"])
@pytest.mark.parametrize("splice", [True, False])
def test_a_reset_whose_error_was_swallowed_is_not_an_eof(stdin_state, splice):
    """After an RST the kernel reports ECONNRESET once, to the first call that asks, and a
    splice into the socket that had already moved bytes swallows it (it returns the count);
    then the socket reads as at the peer's EOF, and a stdin splice into it may return 0 as
    at the end of stdin. The pipeline took that for a clean end: with stdin at its EOF it
    returned "eof" (exit 0, a cut download and a lost upload unreported); with stdin open
    it called the peer's stream complete and waited on stdin for ever. Here the peer sends
    its bytes and resets, and the error is taken (SO_ERROR) as the swallowing splice did:
    the bytes already received reach stdout, all of them (the sending direction, when it
    noticed first, cancelled the receiving one and some were lost), then the connection is
    reported lost."""
    import errno
    import hashlib
    import select
    import struct

    from zcrelay import syscalls
    from zcrelay.errors import ConnectionLost

    down_data = traffic.payload(11, "down", 300_000)
    up, down = Flow(), Flow()
    stdout_got = bytearray()

    async def main() -> None:
        near, far = await traffic.tcp_pair()
        with near, far:
            await far.send(down_data[:100_000])  # fits in near's receive buffer at once
            far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            far.close()  # the RST
            # Wait for it to arrive (POLLHUP: both ways shut), then swallow its error.
            poller = select.poll()
            poller.register(near.fileno(), select.POLLRDHUP)
            assert poller.poll(10_000), "no reset arrived"
            assert near.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
            queued.append(syscalls.fionread(near.fileno()))  # what near's kernel kept
            stdin, feed = os.pipe2(os.O_CLOEXEC)
            if stdin_state == "at-eof":
                os.close(feed)
            drain, stdout = os.pipe2(os.O_CLOEXEC)
            reader = threading.Thread(target=traffic.read_to_eof, args=(drain, stdout_got))
            reader.start()
            try:
                with trio.fail_after(20):
                    with pytest.raises(ConnectionLost) as lost:
                        await run_pipeline(near, PipelineConfig(splice=splice), up, down,
                                           plan(stdin, False, splice), plan(stdout, True, splice), stdin, stdout)
            finally:
                os.close(stdin)
                os.close(stdout)
                if stdin_state == "open":
                    os.close(feed)
                await trio.to_thread.run_sync(reader.join, 20)
                os.close(drain)
        errors.append(str(lost.value))

    errors: list[str] = []
    queued: list[int] = []
    trio.run(main)
    # What reached stdout is counted exactly, and it is all that near's kernel held.
    prefix = "connection lost while sending and receiving (reset by the peer): sent 0 bytes, received "
    assert len(errors) == 1 and errors[0].startswith(prefix) and errors[0].endswith(" bytes"), errors
    received = int(errors[0][len(prefix):-len(" bytes")])
    assert received == len(stdout_got)  # the copy path too: each write is counted as it returns
    assert len(stdout_got) == queued[0] > 0
    assert hashlib.sha256(stdout_got).digest() == hashlib.sha256(down_data[:len(stdout_got)]).digest()
    assert up.end is None and down.end is None


@pytest.mark.parametrize("stdout_kind, splice, connection", [
    ("pipe", True, "tcp"), ("pipe", False, "tcp"), ("socket", True, "tcp"), ("pipe", True, "unix")])
def test_a_reset_noticed_while_sending_keeps_the_bytes_already_received(stdout_kind, splice, connection):
    """The peer sends, then resets, while stdout is full (its reader is slow) and stdin is
    still being sent. The sending direction hears of the reset first (the receiving one waits
    on stdout), and it cancelled the receiving one: the bytes the relay had taken off the
    socket (in its copy buffer) and those Linux still held for it (a reset connection's receive
    queue stays readable, up to the reset) were dropped, though they had arrived before the
    reset. Every byte the relay's kernel held when the reset came must reach stdout, in order,
    before the connection is reported lost, and "received" counts them. stdout is a pipe,
    spliced into or copied to, or a socket (not splicable: copied). Over a Unix socket the
    peer closes instead (it has no reset): the bytes it had sent still come first."""
    import hashlib
    import re
    import select

    import trio.testing

    from tests.pipeline_helpers import feed_until_closed, fill, read_exactly, reset, send_until_full
    from zcrelay import syscalls
    from zcrelay.errors import ConnectionLost

    first = traffic.payload(21, "down", 3 << 20)  # more than the 1 MiB stdout pipe
    then = traffic.payload(22, "down", 8 << 20)  # more than the relay can hold: the rest stays
    up, down = Flow(), Flow()
    outcome: dict = {}
    stdout_got = bytearray()

    async def relay(near, stdin, stdout) -> None:
        try:
            outcome["end"] = await run_pipeline(near, PipelineConfig(splice=splice), up, down,
                                                plan(stdin, False, splice), plan(stdout, True, splice), stdin, stdout)
        except ConnectionLost as exc:
            outcome["lost"] = str(exc)

    async def main() -> None:
        if connection == "tcp":
            near, far = await traffic.tcp_pair()
        else:
            near, far = map(trio.socket.from_stdlib_socket, socket.socketpair())
        stdin, feed = os.pipe2(os.O_CLOEXEC)
        if stdout_kind == "pipe":
            drain, stdout = os.pipe2(os.O_CLOEXEC)
            fcntl.fcntl(stdout, fcntl.F_SETPIPE_SZ, 1 << 20)
        else:
            ends = socket.socketpair()
            drain, stdout = ends[0].detach(), ends[1].detach()
        feeder = threading.Thread(target=feed_until_closed, args=(feed,))  # far never reads it
        feeder.start()
        reader = threading.Thread(target=traffic.read_to_eof, args=(drain, stdout_got))
        try:
            with near, far, trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(relay, near, stdin, stdout)
                    # More than a pipe goes through first, so the windows have grown.
                    reading = trio.to_thread.run_sync(read_exactly, drain, len(first), abandon_on_cancel=True)
                    async with trio.open_nursery() as inner:
                        inner.start_soon(traffic.send_chunks, far, first, random.Random(5))
                        stdout_got.extend(await reading)
                    # stdout's reader stops; the peer sends what the relay will take, then resets.
                    outcome["filler"] = fill(stdout)
                    send_until_full(far.fileno(), then)
                    poller = select.poll()
                    poller.register(near.fileno(), select.POLLIN)
                    assert poller.poll(10_000), "nothing arrived"
                    # What the relay's kernel holds now (the relay runs no code until we
                    # yield): all of it must reach stdout.
                    outcome["queued"] = syscalls.fionread(near.fileno())
                    poller.modify(near.fileno(), select.POLLRDHUP)
                    if connection == "tcp":
                        reset(far)
                    else:
                        far.close()  # a Unix socket has no reset
                    assert poller.poll(10_000), "no reset arrived"
                    # Every task has seen what it will of the reset; then stdout is read again.
                    await trio.testing.wait_all_tasks_blocked()
                    reader.start()
        finally:
            os.close(stdout)  # the reader sees EOF
            os.close(stdin)  # the feeder sees EPIPE
            for thread in (reader, feeder):
                if thread.ident is not None:
                    await trio.to_thread.run_sync(thread.join, 20)
            os.close(drain)

    trio.run(main)
    assert "lost" in outcome, outcome
    why = "reset by the peer" if connection == "tcp" else "closed by the peer"
    match = re.fullmatch(rf"connection lost while sending and receiving \({why}\): "
                         r"sent \d+ bytes, received (\d+) bytes", outcome["lost"])
    assert match, outcome["lost"]
    # stdout: the first part, what the slow reader had left in stdout, then the start of the
    # second part: at least what the relay's kernel held when the reset came.
    head = first + outcome["filler"]
    got = bytes(stdout_got)
    assert hashlib.sha256(got[:len(head)]).digest() == hashlib.sha256(head).digest()
    tail = got[len(head):]
    assert len(tail) >= outcome["queued"] > 0, (len(tail), outcome["queued"])
    assert hashlib.sha256(tail).digest() == hashlib.sha256(then[:len(tail)]).digest()
    assert int(match.group(1)) == down.bytes == len(first) + len(tail)
