"""`send`'s deadlines without trio (zcrelay.waits): --idle-timeout in whatever thread the
library runs, and what it counts as idle; --connect-timeout over name resolution as well as
the connect.

In process: the library's `send` and `connect` under waits.run_blocking, as `zcrelay send` runs
them, on loopback only. Name resolution is made to hang by a stand-in for socket.getaddrinfo
(no network, no DNS): it answers only once its Event is set, which the fixture does at the end.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import threading
import time

import pytest
import trio

from zcrelay import files, net, syscalls, waits
from zcrelay.addresses import Address
from zcrelay.errors import ConnectError
from zcrelay.exitcodes import ExitCode
from zcrelay.stats import Flow
from tests.pipeline_helpers import Sink, random_file

SIZE = 24 << 20  # far more than the loopback socket buffers hold


class _Deaf:
    """A listener on 127.0.0.1 that accepts one client and reads nothing until `release()`;
    then a thread reads to the end: `end` is "eof" or the error's name, `got` what came."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = Address(host="127.0.0.1", port=self.listener.getsockname()[1])
        self._release = threading.Event()
        self.got = bytearray()
        self.end: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(30)
        conn, _ = self.listener.accept()
        with conn:
            self._release.wait(30)
            try:
                while chunk := conn.recv(1 << 16):
                    self.got.extend(chunk)
                self.end = "eof"
            except OSError as exc:
                self.end = type(exc).__name__

    def release(self) -> None:
        self._release.set()
        self.thread.join(30)
        self.listener.close()


def _send_in_a_thread(path, address: Address, config: files.SendConfig) -> tuple[dict, float]:
    """Run the library's `send` without trio in a thread that is not the main one; return what
    it raised or returned, and how long it took."""
    outcome: dict = {}
    flow = Flow()

    def run() -> None:
        fd, size = files.open_file(str(path))
        try:
            outcome["sent"] = waits.run_blocking(files.send, fd, size, address, 0, None, flow,
                                                 config, 10.0)
        except BaseException as exc:  # handed to the test, which is in another thread
            outcome["error"] = exc
        finally:
            os.close(fd)
        outcome["flow"] = flow

    sender = threading.Thread(target=run, name="not the main thread")
    started = time.monotonic()
    sender.start()
    sender.join(30)
    assert not sender.is_alive(), "send did not end"
    return outcome, time.monotonic() - started


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_the_idle_timeout_works_outside_the_main_thread(tmp_path, method):
    """Without trio the idle clock was SIGALRM, whose handler Python runs in the main thread
    only: a program calling send from any other thread got ValueError ("needs the main
    thread"). Now a receiver that never reads is given up on from any thread: IdleTimeout
    soon after the timeout, and the receiver is reset after the bytes its kernel took."""
    data = random_file(tmp_path / "data", SIZE)
    deaf = _Deaf()
    try:
        outcome, took = _send_in_a_thread(data, deaf.address,
                                          files.SendConfig(method=method, idle_timeout=0.3))
    finally:
        deaf.release()
    error = outcome.get("error")
    assert isinstance(error, files.IdleTimeout), outcome
    assert str(error).startswith("no byte moved for 0.3s (idle timeout)"), error
    assert 0.3 <= took < 5, took
    assert deaf.end == "ConnectionResetError"
    assert 0 < len(deaf.got) <= outcome["flow"].bytes < SIZE
    assert hashlib.sha256(deaf.got).digest() == hashlib.sha256(data.read_bytes()[:len(deaf.got)]).digest()
    assert not [t for t in threading.enumerate() if t.name == files.IDLE_WATCHDOG]


def test_the_idle_timeout_covers_the_copy_through_user_space(tmp_path, monkeypatch):
    """A file that refuses splice and sendfile (/proc/PID's files) is copied through user
    space, whose writes never block (RWF_NOWAIT) and whose waits are polls: the same clock
    ends them, from a thread that is not the main one. The refusal is a stand-in's EINVAL."""
    real_splice = syscalls.splice

    def refusing(src, dst, count, flags=syscalls.SPLICE_F_NONBLOCK, offset_src=None, offset_dst=None):
        if offset_src is not None:  # the file's side, as /proc/PID/environ refuses it
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_splice(src, dst, count, flags, offset_src, offset_dst)

    monkeypatch.setattr(syscalls, "splice", refusing)
    data = random_file(tmp_path / "data", SIZE)
    deaf = _Deaf()
    try:
        outcome, took = _send_in_a_thread(data, deaf.address, files.SendConfig(idle_timeout=0.3))
    finally:
        deaf.release()
    assert isinstance(outcome.get("error"), files.IdleTimeout), outcome
    assert outcome["flow"].fallback and outcome["flow"].copied == outcome["flow"].bytes > 0, outcome
    assert 0.3 <= took < 5, took
    assert deaf.end == "ConnectionResetError"


def test_an_idle_timeout_spares_a_receiver_that_reads(tmp_path):
    """The same thread-agnostic clock, with a receiver that reads everything: the whole file
    arrives, send returns its size, and no watchdog is left behind."""
    data = random_file(tmp_path / "data", SIZE)
    sink = Sink()
    outcome, _ = _send_in_a_thread(data, Address(host="127.0.0.1", port=sink.port),
                                   files.SendConfig(idle_timeout=5.0))
    sink.join(30)
    assert outcome.get("sent") == SIZE, outcome
    assert sink.sha.digest() == hashlib.sha256(data.read_bytes()).digest()
    assert not [t for t in threading.enumerate() if t.name == files.IDLE_WATCHDOG]


def test_an_idle_timeout_spares_a_slow_receiver(tmp_path):
    """A receiver that reads slowly but steadily (16 KiB every 10 ms, through a 64 KiB receive
    buffer, so the sender waits on it all along) moves bytes all the time: no IdleTimeout, for
    all that the transfer takes many times the timeout."""
    data = random_file(tmp_path / "data", 4 << 20)
    got = bytearray()
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # inherited at accept
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def read_slowly() -> None:
            conn, _ = listener.accept()
            with conn:
                while chunk := conn.recv(16 << 10):
                    got.extend(chunk)
                    time.sleep(0.01)  # the pace of a slow reader, not a wait for readiness

        reader = threading.Thread(target=read_slowly, daemon=True)
        reader.start()
        outcome, took = _send_in_a_thread(data, Address(host="127.0.0.1", port=listener.getsockname()[1]),
                                          files.SendConfig(idle_timeout=0.3))
        reader.join(30)
    assert outcome.get("sent") == 4 << 20, outcome
    assert took > 0.6, took  # the timeout twice over at least: the receiver set the pace
    assert hashlib.sha256(got).digest() == hashlib.sha256(data.read_bytes()).digest()


def test_a_stalled_file_read_counts_as_idle(tmp_path, monkeypatch):
    """What a slow source does (kept from the SIGALRM clock, which raised as soon as the read
    came back): the idle clock counts bytes moved, so a read of the file that takes longer than
    the timeout ends the transfer with IdleTimeout, as a receiver that stops reading does, and
    the receiver is reset. (`send` reads regular files only: a FIFO or a pipe is refused before
    the connect, see open_file.) The read is made slow by a stand-in for the file's splice."""
    data = random_file(tmp_path / "data", 4 << 20)
    real_splice = syscalls.splice
    slowed = threading.Event()

    def slow_file_read(src, dst, count, flags=syscalls.SPLICE_F_NONBLOCK, offset_src=None, offset_dst=None):
        if offset_src is not None and offset_src >= 1 << 20 and not slowed.is_set():
            slowed.set()
            time.sleep(1.0)  # a disk that stalls: three times the idle timeout
        return real_splice(src, dst, count, flags, offset_src, offset_dst)

    monkeypatch.setattr(syscalls, "splice", slow_file_read)
    outcome: dict = {}
    received = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def receive() -> None:
            conn, _ = listener.accept()
            with conn:
                try:
                    while chunk := conn.recv(1 << 16):
                        received.extend(chunk)
                    outcome["end"] = "eof"
                except OSError as exc:
                    outcome["end"] = type(exc).__name__

        peer = threading.Thread(target=receive, daemon=True)
        peer.start()
        fd, size = files.open_file(str(data))
        try:
            with pytest.raises(files.IdleTimeout):
                waits.run_blocking(files.send, fd, size, Address(host="127.0.0.1", port=listener.getsockname()[1]),
                                   0, None, Flow(), files.SendConfig(pipe_size=1 << 20, idle_timeout=0.3), 10.0)
        finally:
            os.close(fd)
        peer.join(30)
    assert slowed.is_set()
    assert outcome["end"] == "ConnectionResetError" and len(received) < len(data.read_bytes())


# ---- --connect-timeout over name resolution -----------------------------------------------

class _SlowResolver:
    """A stand-in for socket.getaddrinfo that never answers a name until `answer` is set (then
    127.0.0.1), as a resolver whose DNS server drops queries; numeric-only lookups (trio asks
    one first) fail at once, as they do for a name."""

    def __init__(self) -> None:
        self.answer = threading.Event()
        self.asked = threading.Event()

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        if flags & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        self.asked.set()
        if not self.answer.wait(10):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


@pytest.fixture
def slow_resolver(monkeypatch):
    resolver = _SlowResolver()
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    try:
        yield resolver
    finally:
        resolver.answer.set()  # the abandoned lookup ends, and its thread with it


def test_connect_timeout_bounds_name_resolution_without_trio(slow_resolver):
    """Without trio, getaddrinfo blocked the one thread for as long as the resolver took (with
    retries, tens of seconds for a DNS server that drops queries, or for ever): --connect-timeout
    held only once the name had resolved. It bounds the whole attempt now, as under trio: the
    same ConnectError as a connect that times out (exit code 6), within the timeout. The
    abandoned lookup, once it ends, leaves no fd behind."""
    fds = len(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        waits.run_blocking(net.connect, Address(host="stalled.example", port=9), 0.3)
    took = time.monotonic() - started
    assert slow_resolver.asked.is_set()
    assert caught.value.reason == "timeout" and str(caught.value).endswith("timed out after 0.3s"), caught.value
    assert 0.3 <= took < 3, took
    slow_resolver.answer.set()
    for thread in threading.enumerate():
        if thread.name.startswith("zcrelay getaddrinfo"):
            thread.join(10)
            assert not thread.is_alive()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_connect_timeout_bounds_name_resolution_under_trio(slow_resolver):
    """Under trio the lookup runs in a thread that a cancelled wait abandons (trio.socket's
    getaddrinfo): the connect timeout's cancel scope already bounds it. Kept so."""
    started = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        trio.run(net.connect, Address(host="stalled.example", port=9), 0.3)
    took = time.monotonic() - started
    assert slow_resolver.asked.is_set()
    assert caught.value.reason == "timeout" and str(caught.value).endswith("timed out after 0.3s"), caught.value
    assert 0.3 <= took < 3, took


def test_a_name_that_resolves_in_time_is_connected_to_without_trio(slow_resolver):
    """The lookup's thread hands its answer back: a name that resolves within the timeout is
    connected to, and on_resolved hears what it resolved to."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        slow_resolver.answer.set()
        resolved: list = []
        sock = waits.run_blocking(net.connect, Address(host="fine.example", port=port), 5.0, resolved.extend)
        with sock:
            assert sock.getpeername() == ("127.0.0.1", port)
    assert resolved == [(socket.AF_INET, ("127.0.0.1", port))]


def test_send_exits_6_when_the_name_does_not_resolve_in_time(tmp_path, slow_resolver):
    """The command's view: `zcrelay send FILE NAME:PORT --connect-timeout 0.3` with a resolver
    that does not answer exits 6 with the connect timeout's message, within the timeout."""
    from typer.testing import CliRunner

    from zcrelay.cli import load

    (tmp_path / "small").write_bytes(b"payload")
    started = time.monotonic()
    result = CliRunner().invoke(load({"send"}), ["send", str(tmp_path / "small"), "stalled.example:9",
                                                 "--connect-timeout", "0.3", "--no-progress"],
                                standalone_mode=False)  # the command's return value: its exit code
    took = time.monotonic() - started
    assert result.return_value == ExitCode.CONNECT_FAILED, result.output
    assert "timed out after 0.3s" in result.output, result.output
    assert took < 3, took


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_serve_does_not_take_a_slow_reader_for_an_idle_one(zcrelay, tmp_path, method):
    """serve (trio) with --idle-timeout 0.3 and a client that reads a 16 MiB file steadily at
    about 3 MB/s (64 KiB every 20 ms), more than its receive buffer and serve's send buffer
    hold: serve's socket polls writable only once half its send buffer (megabytes, autotuned)
    is free, longer than 0.3 s at this pace, so by serve's own calls no byte moved and the
    client was reset as idle (within about a second, both methods). What it takes from the
    send queue counts now (FileServer._notice_taken): it gets the whole file, logged ok."""
    data = random_file(tmp_path / "data", 16 << 20)
    server = zcrelay("serve", str(data), "--listen", "127.0.0.1:0", "--method", method, "--idle-timeout", "0.3")
    got = hashlib.sha256()
    size = 0
    with socket.socket() as client:
        client.settimeout(20)
        client.connect(("127.0.0.1", server.port))
        deadline = time.monotonic() + 20
        while (chunk := client.recv(64 * 1024)) and time.monotonic() < deadline:
            got.update(chunk)
            size += len(chunk)
            time.sleep(0.02)  # the slow reader's pace, not a wait for readiness
    server.wait_for_lines(" duration=", 1)
    code, err = server.stop()
    assert (size, got.hexdigest()) == (data.stat().st_size, hashlib.sha256(data.read_bytes()).hexdigest()), err
    assert re.search(r"conn=1 .* ok$", err, re.M), err
