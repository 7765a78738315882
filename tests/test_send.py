"""`zcrelay send` and `serve`: files to sockets, zero-copy, with the file shrinking under them."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import threading
import time

import pytest

from tests.conftest import syn_dropping_listener
from tests.pipeline_helpers import G, Sink, error_lines, random_file, sha256_file, shell, sparse_file

SIZE = 24 << 20

# 5 GiB, sparse, with markers on both sides of the 4 GiB line (a 32-bit offset would wrap
# there). The SHA-256 is a constant: computing it costs ~30 s of this machine's CPU.
MARKERS_5G = [(0, b"zcrelay-5g-start"), (4 * G - 8, b"across4G-across4"), (5 * G - 16, b"zcrelay-5g-end!!")]
SHA256_SPARSE_5G = "e334f1a616fc42d461e2be0ababe1b14a2b86e9c9e8eabe77689be9ebc571707"


@pytest.fixture
def data(tmp_path):
    return random_file(tmp_path / "data", SIZE)


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_send_to_listen(tmp_path, data, method):
    listener = shell("$Z listen 127.0.0.1:0 > out", tmp_path, listening=True)
    sender = shell(f"$Z send data 127.0.0.1:{listener.port} --method {method} -v", tmp_path)
    code, err = sender.wait()
    assert code == 0, err
    assert listener.wait()[0] == 0
    assert sha256_file(tmp_path / "out") == sha256_file(data)
    assert f"sent {SIZE} bytes by {method}" in err


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_offset_and_length(tmp_path, data, method):
    sink = Sink()
    code, err = shell(f"$Z send data 127.0.0.1:{sink.port} --method {method} --offset 1000001 "
                      f"--length 5M", tmp_path).wait()
    assert code == 0, err
    sink.join()
    assert sink.size == 5 << 20
    assert sink.sha.hexdigest() == hashlib.sha256(data.read_bytes()[1000001:1000001 + (5 << 20)]).hexdigest()


def test_five_gib_sparse(tmp_path):
    """Files over 4 GiB: offsets are 64-bit all the way; size and SHA-256 match."""
    big = sparse_file(tmp_path / "big", 5 * G, MARKERS_5G)
    sink = Sink()
    code, err = shell(f"$Z send big 127.0.0.1:{sink.port}", tmp_path).wait(180)
    assert code == 0, err
    sink.join(180)
    assert sink.size == 5 * G == big.stat().st_size
    assert sink.sha.hexdigest() == SHA256_SPARSE_5G


@pytest.mark.parametrize("script, code, message", [
    ("$Z send missing 127.0.0.1:1", 8, "cannot open missing: No such file or directory"),
    ("mkdir adir; $Z send adir 127.0.0.1:1", 8, "adir: is a directory"),
    ("$Z send /dev/null 127.0.0.1:1", 8, "not a regular file"),
    ("echo x > small; $Z send small 127.0.0.1:1 --offset 10", 2, "past the end of the file"),
    ("echo x > small; $Z send small 127.0.0.1:{closed}", 6, "connection refused"),
    ("echo x > small; $Z send small 127.0.0.1:1 --method mmap", 2, "is not one of splice, sendfile"),
    ("$Z serve missing --listen 127.0.0.1:0", 8, "cannot open missing"),
    # A name with a newline or an escape sequence, quoted: one line, nothing for the terminal.
    ("$Z send $'no\\nsuch\\e[2J' 127.0.0.1:1", 8, "cannot open 'no\\nsuch\\x1b[2J': No such file"),
    ("mkdir $'odd\\ndir'; $Z send $'odd\\ndir' 127.0.0.1:1", 8, "'odd\\ndir': is a directory"),
])
def test_send_errors(tmp_path, script, code, message):
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        rc, err = shell(script.format(closed=closed.getsockname()[1]), tmp_path).wait()
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zcrelay"), err
    assert message in lines[0]


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_serve_concurrent_clients(tmp_path, data, method):
    server = shell(f"exec $Z serve data --listen 127.0.0.1:0 --method {method}", tmp_path, listening=True)
    try:
        clients = [shell(f"$Z connect 127.0.0.1:{server.port} < /dev/null > out{i}", tmp_path) for i in range(4)]
        for client in clients:
            code, err = client.wait()
            assert code == 0, err
        server.proc.send_signal(signal.SIGTERM)
        code, err = server.wait()
    finally:
        server.kill()
    assert code == 0, err
    want = sha256_file(data)
    for i in range(4):
        assert sha256_file(tmp_path / f"out{i}") == want
    conn_lines = [line for line in err.splitlines() if "conn=" in line]
    assert len(conn_lines) == 4, err
    assert all(f"sent={SIZE} spliced={SIZE} copied=0" in line and line.endswith(" ok") for line in conn_lines)
    assert "stopped: 4 connections" in err
    assert not error_lines(err)


def test_rate_limit_keeps_splice(tmp_path, data):
    sink = Sink()
    started = time.monotonic()
    code, err = shell(f"$Z send data 127.0.0.1:{sink.port} --rate-limit 48M --length 12M -v", tmp_path).wait()
    took = time.monotonic() - started
    assert code == 0, err
    sink.join()
    assert sink.size == 12 << 20
    assert took >= 0.2, took  # 12M at 48M/s is 0.25 s; Python's start-up adds to it
    assert "by splice" in err


def test_send_bounds_its_connect_and_linger_without_trio(tmp_path):
    """`send` runs without trio (zcrelay.waits): its deadlines must still hold. A target whose
    accept queue is full drops SYNs (--connect-timeout ends it, exit 6); a peer that reads
    everything but never closes is left after --linger (exit 0, every byte delivered)."""
    import socket
    import threading

    (tmp_path / "small").write_bytes(b"payload" * 1000)
    with syn_dropping_listener() as port:
        started = time.monotonic()
        rc, err = shell(f"$Z send small 127.0.0.1:{port} --connect-timeout 0.5", tmp_path).wait()
        assert rc == 6 and "timed out after 0.5s" in err, err
        assert time.monotonic() - started < 5

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        got = bytearray()

        def keep_open():
            conn, _ = listener.accept()
            while chunk := conn.recv(65536):  # to the sender's FIN, then stay silent and open
                got.extend(chunk)
            done.wait(10)
            conn.close()

        done = threading.Event()
        peer = threading.Thread(target=keep_open)
        peer.start()
        started = time.monotonic()
        rc, err = shell(f"$Z send small 127.0.0.1:{listener.getsockname()[1]} --linger 0.5", tmp_path).wait()
        elapsed = time.monotonic() - started
        done.set()
        peer.join()
    assert rc == 0, err
    assert 0.5 <= elapsed < 5, elapsed
    assert bytes(got) == b"payload" * 1000



def test_serve_opens_the_file_for_each_client(zcrelay, tmp_path):
    """A file replaced after serve started (an editor's save, a new build: a rename over it)
    is what the next client gets; serve kept sending the inode it opened at start. A client
    that comes while the file is missing gets a reset (it got a clean empty stream, an empty
    file's), serve an error line, and serve goes on."""
    import socket

    path = tmp_path / "data"
    first = random_file(path, 3 << 20)
    first_sum = sha256_file(first)
    server = zcrelay("serve", str(path), "--listen", "127.0.0.1:0")

    def fetch() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.shutdown(socket.SHUT_WR)
            return b"".join(iter(lambda: sock.recv(1 << 20), b""))

    assert hashlib.sha256(fetch()).hexdigest() == first_sum
    random_file(tmp_path / "new", 5 << 20)
    os.rename(tmp_path / "new", path)
    second = fetch()
    assert len(second) == 5 << 20 and hashlib.sha256(second).hexdigest() == sha256_file(path)
    path.unlink()
    with pytest.raises(OSError) as reset:  # not an empty stream, an empty file's
        fetch()
    # ENOTCONN: the reset came before fetch's own shutdown(2).
    assert reset.value.errno in (errno.ECONNRESET, errno.ENOTCONN), reset.value
    server.wait_for_lines("conn=3 ", 1)
    path.write_bytes(b"back")
    assert fetch() == b"back"
    code, err = server.stop()
    assert code == 0, err
    third = next(line for line in err.splitlines() if "conn=3 " in line)
    assert third.endswith(f"error (cannot open {path}: No such file or directory)"), err
    assert "stopped: 4 connections" in err and "1 failed" in err, err


def test_send_waits_for_a_talkative_peer_to_close(tmp_path):
    """After its last byte `send` reads and drops what the peer still sends, until the peer's
    FIN or --linger. It stopped after 1 MiB and closed with bytes unread, which resets the
    connection: a peer that replies with more (an echo, a log) saw its reply fail."""
    import hashlib
    import socket
    import threading

    payload = os.urandom(3 << 20)
    (tmp_path / "data").write_bytes(payload)
    reply = os.urandom(16 << 20)  # larger than both sockets' buffers
    outcome = {}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def talkative():
            conn, _ = listener.accept()
            with conn:
                got = hashlib.sha256()
                reader = threading.Thread(target=lambda: [got.update(c) for c in iter(lambda: conn.recv(1 << 16), b"")])
                reader.start()
                try:
                    conn.sendall(reply)
                    conn.shutdown(socket.SHUT_WR)
                    outcome["reply"] = "sent"
                except OSError as exc:
                    outcome["reply"] = repr(exc)
                reader.join()
                outcome["got"] = got.hexdigest()

        peer = threading.Thread(target=talkative)
        peer.start()
        rc, err = shell(f"$Z send data 127.0.0.1:{listener.getsockname()[1]}", tmp_path).wait()
        peer.join()
    assert rc == 0, err
    assert outcome == {"reply": "sent", "got": hashlib.sha256(payload).hexdigest()}, outcome


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_receiver_that_closes_without_reading_everything_is_a_failure(tmp_path, method):
    """Every byte is in the receiver's socket buffer, which it closes unread (as a receiver
    that gives up does): the kernel resets the connection and the bytes are lost. `send`
    sees the reset while it waits for the peer's FIN (--linger) and must say so (exit 1, one
    line), not exit 0; it never prints on stdout."""
    import socket
    import threading

    payload = os.urandom(64 << 10)  # fits in loopback's socket buffers
    (tmp_path / "small").write_bytes(payload)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def give_up():
            conn, _ = listener.accept()
            with conn:  # wait until all of it has arrived, read none of it, close: a reset
                assert len(conn.recv(len(payload), socket.MSG_PEEK | socket.MSG_WAITALL)) == len(payload)

        peer = threading.Thread(target=give_up)
        peer.start()
        sender = shell(f"$Z send small 127.0.0.1:{listener.getsockname()[1]} --method {method}", tmp_path,
                       stdout=subprocess.PIPE)
        out, err = sender.proc.communicate(timeout=60)
        peer.join()
    assert sender.proc.returncode == 1, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zcrelay: error: connection lost after the last of "
                                                   f"{len(payload)} bytes"), err
    assert "reset" in lines[0], err


def _limit_free_fds(pid: int, free: int) -> None:
    """Lower `pid`'s RLIMIT_NOFILE until exactly `free` fd numbers are left below it."""
    import resource

    taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    limit = next(n for n in range(1, 1 << 16) if n - len({fd for fd in taken if fd < n}) == free)
    hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))


def test_serve_out_of_fds_is_an_error_said_once_not_a_bug(zcrelay, tmp_path):
    """A client accepted with the last free fd, whose pipe could not be made, was logged as
    "internal-error (OSError: [Errno 24] ...)"; and while accept itself failed for want of an
    fd, "out of file descriptors" was logged at every retry, ten lines a second."""
    import resource
    import socket

    data = random_file(tmp_path / "data", 1 << 20)
    server = zcrelay("serve", str(data), "--listen", "127.0.0.1:0")
    pid = server.proc.pid
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    _limit_free_fds(pid, 1)  # the client's socket, and no fd left for its pipe
    with socket.create_connection(("127.0.0.1", server.port)) as first:
        # A reset, not an empty stream: the client must not take it for an empty file.
        with pytest.raises(ConnectionResetError):
            first.recv(1)
    server.wait_for_lines("conn=1 ", 1)
    _limit_free_fds(pid, 0)  # accept itself fails
    with socket.create_connection(("127.0.0.1", server.port)) as second:
        server.wait_for_lines("out of file descriptors", 1)
        time.sleep(0.5)  # the retries under test (one each 0.1 s), not a wait for readiness
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
        received = b""
        while chunk := second.recv(1 << 20):
            received += chunk
    assert hashlib.sha256(received).hexdigest() == sha256_file(data)
    server.wait_for_lines("conn=2 ", 1)
    code, err = server.stop()
    assert code == 0, err
    first_line = next(line for line in err.splitlines() if "conn=1 " in line)
    assert first_line.endswith("error (out of resources: Too many open files)"), err
    assert "internal-error" not in err and "Traceback" not in err
    assert err.count("out of file descriptors") == 1, err
    assert "stopped: 2 connections, 1048576 bytes sent, 1 failed" in err


def _sysfs_file() -> str:
    """A sysfs attribute: st_size says a page (4096), the content is a line."""
    for path in ("/sys/class/net/lo/address", "/sys/kernel/mm/transparent_hugepage/enabled"):
        try:
            with open(path, "rb") as f:
                content = f.read()
        except OSError:
            continue
        if 0 < len(content) < os.stat(path).st_size:
            return path
    pytest.skip("no sysfs attribute to read here")


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_a_sysfs_file_is_sent_whole_not_called_shrunk(tmp_path, zcrelay, method):
    """sysfs reports size 4096 for every attribute whatever its content, and the file ends
    sooner without ever shrinking: `send` exited 10 ("the file shrank") after sending all of
    it, and `serve` logged every client as an error, where cat sees a plain file."""
    import socket

    path = _sysfs_file()
    with open(path, "rb") as f:
        content = f.read()
    sink = Sink()
    code, err = shell(f"$Z send {path} 127.0.0.1:{sink.port} --method {method}", tmp_path).wait()
    assert code == 0, err
    assert err == ""
    sink.join()
    assert sink.sha.hexdigest() == hashlib.sha256(content).hexdigest()

    server = zcrelay("serve", path, "--listen", "127.0.0.1:0", "--method", method)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        received = b"".join(iter(lambda: sock.recv(65536), b""))
    assert received == content
    server.wait_for_lines("conn=1 ", 1)
    code, err = server.stop()
    assert code == 0, err
    assert next(line for line in err.splitlines() if "conn=1 " in line).endswith(" ok"), err


def _receive_until_the_end(sock, received: threading.Event, after: int) -> tuple[int, str]:
    """Read until EOF or an error: (bytes, "eof" or the error's name); `received` is set once
    `after` bytes have come."""
    total = 0
    try:
        while chunk := sock.recv(1 << 16):
            total += len(chunk)
            if total >= after:
                received.set()
        return total, "eof"
    except OSError as exc:
        return total, type(exc).__name__
    finally:
        received.set()


@contextlib.contextmanager
def _receiver(outcome: dict, received: threading.Event, mark: int):
    """A listener on 127.0.0.1 whose one client a thread reads to its end
    (_receive_until_the_end, into outcome["end"]); yields its port, joins the thread after."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listener:
        def receive():
            conn, _ = listener.accept()
            with conn:
                outcome["end"] = _receive_until_the_end(conn, received, mark)

        peer = threading.Thread(target=receive)
        peer.start()
        try:
            yield listener.getsockname()[1]
        finally:
            peer.join(30)


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_truncated_during_send(tmp_path, method):
    """The file shrinks mid-send: exit 10 with one line, within a second, nothing past the end,
    and the receiver sees a reset. `send` closed with a FIN, so the receiver (`zcrelay listen >
    out`, nc, a download) saw a clean end of stream and took the truncated file for the whole."""
    victim = sparse_file(tmp_path / "victim", 256 << 20, [(0, b"start")])
    outcome = {}
    received = threading.Event()
    with _receiver(outcome, received, 2 << 20) as port:
        sender = shell(f"$Z send victim 127.0.0.1:{port} --method {method} --rate-limit 32M", tmp_path)
        assert received.wait(30), sender.wait()
        os.truncate(victim, 1 << 20)
        truncated = time.monotonic()
        code, err = sender.wait(10)
        took = time.monotonic() - truncated
    assert code == 10, err
    assert took < 1.0, took
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zcrelay: error: the file shrank while it was sent"), err
    size, end = outcome["end"]
    assert 2 << 20 <= size < 256 << 20
    assert end == "ConnectionResetError", outcome


def test_a_client_cut_short_by_serve_stopping_sees_a_reset(zcrelay, tmp_path):
    """SIGTERM stops serve while a client is mid-file: the client got a clean end of stream and
    a truncated file with no sign of it; it must get a reset. Serve still exits 0 with its
    summary."""
    import socket

    data = random_file(tmp_path / "data", 16 << 20)
    server = zcrelay("serve", str(data), "--listen", "127.0.0.1:0", "--rate-limit", "4M")
    received = threading.Event()
    outcome = {}
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        reader = threading.Thread(target=lambda: outcome.update(end=_receive_until_the_end(sock, received, 1 << 20)))
        reader.start()
        assert received.wait(30)
        code, err = server.stop()
        reader.join(30)
    assert code == 0, err
    size, end = outcome["end"]
    assert size < 16 << 20
    assert end == "ConnectionResetError", outcome
    assert "stopped: 1 connections" in err, err


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_send_interrupted_by_a_signal_resets_the_peer(tmp_path, signum, status):
    """Ctrl-C mid-send: exit 130 and nothing printed, as documented; SIGTERM: death by its
    default action, as documented. But the receiver got a FIN and a clean end of a truncated
    stream (SIGTERM's kernel close sent one too); it must get a reset."""
    random_file(tmp_path / "data", 64 << 20)
    outcome = {}
    received = threading.Event()
    with _receiver(outcome, received, 1 << 20) as port:
        sender = shell(f"exec $Z send data 127.0.0.1:{port} --rate-limit 8M", tmp_path)
        assert received.wait(30), sender.wait()
        sender.proc.send_signal(signum)
        code, err = sender.wait()
    assert code == status and err == "", err
    size, end = outcome["end"]
    assert size < 64 << 20
    assert end == "ConnectionResetError", outcome


@pytest.mark.parametrize("method", ["splice", "sendfile"])
@pytest.mark.parametrize("span", [(), ("--offset", "100", "--length", "1000")])
def test_a_sized_file_that_refuses_zero_copy_is_copied(tmp_path, method, span):
    """/proc/config.gz has a real size and refuses splice and sendfile (EINVAL) before the
    first byte: `send` exited 8 ("reading the file: Invalid argument") where cat works. The
    fallback to a user-space copy was kept for files of size 0 only; a span is copied as asked."""
    path = "/proc/config.gz"
    if not os.path.exists(path):
        pytest.skip(f"{path}: no such file here")
    with open(path, "rb") as f:
        content = f.read()
    offset, length = (int(span[1]), int(span[3])) if span else (0, len(content))
    sink = Sink()
    code, err = shell(f"$Z send {path} 127.0.0.1:{sink.port} --method {method} -v " + " ".join(span),
                      tmp_path).wait()
    assert code == 0, err
    sink.join()
    assert sink.sha.hexdigest() == hashlib.sha256(content[offset:offset + length]).hexdigest()
    assert f"{method} refused the file (EINVAL)" in err, err


def test_serve_idle_timeout_lets_a_stalled_client_go_and_spares_a_slow_one(zcrelay, tmp_path):
    """A client that stops reading held its socket, the file and a pipe (4 fds) for as long as
    it chose, and a few hundred of them ran serve out of fds. With --idle-timeout, one that
    lets no byte move for that long is reset and counted as failed; one that reads slowly but
    steadily (here serve's --rate-limit keeps the transfer 8 times longer than the timeout)
    gets the whole file."""
    import socket

    data = random_file(tmp_path / "data", 8 << 20)
    server = zcrelay("serve", str(data), "--listen", "127.0.0.1:0", "--idle-timeout", "0.5", "--rate-limit", "2M")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    stalled.connect(("127.0.0.1", server.port))
    with socket.create_connection(("127.0.0.1", server.port)) as steady:
        got = b"".join(iter(lambda: steady.recv(1 << 20), b""))
    assert hashlib.sha256(got).hexdigest() == sha256_file(data)
    stalled.settimeout(30)
    with pytest.raises(ConnectionResetError):  # after what its kernel took
        while stalled.recv(1 << 20):
            pass
    stalled.close()
    code, err = server.stop()
    assert code == 0, err
    assert "idle (0.5s without a byte moving)" in err and "2 connections" in err and "1 failed" in err, err


class _Stalled:
    """A listener (TCP on 127.0.0.1, or unix:PATH) whose one client is accepted and then not
    read from until `release()`; after that a thread reads it to its end, hashing:
    `end` is "eof" or the error's name, `size` and `sha` what came before it."""

    def __init__(self, unix_path=None) -> None:
        import socket

        if unix_path is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(unix_path))
            self.listener.listen(1)
            self.address = f"unix:{unix_path}"
        self.accepted = threading.Event()
        self._release = threading.Event()
        self.size = 0
        self.sha = hashlib.sha256()
        self.end = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(60)
        conn, _ = self.listener.accept()
        self.accepted.set()
        with conn:
            self._release.wait(60)
            try:
                while chunk := conn.recv(1 << 16):
                    self.size += len(chunk)
                    self.sha.update(chunk)
                self.end = "eof"
            except OSError as exc:
                self.end = type(exc).__name__

    def release(self) -> None:
        self._release.set()
        if self.accepted.is_set():
            self.thread.join(60)
        self.listener.close()


def _assert_a_prefix(stalled: _Stalled, data) -> None:
    content = data.read_bytes()
    assert 0 < stalled.size < len(content), stalled.size
    assert stalled.sha.hexdigest() == hashlib.sha256(content[:stalled.size]).hexdigest()


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_send_idle_timeout_resets_a_receiver_that_never_reads(tmp_path, data, method):
    """A receiver that accepts and never reads held `send` forever: there was no idle timeout.
    With --idle-timeout, once no byte has moved for that long, `send` gives up: exit 1 (a peer
    that stopped reading, as for EPIPE), one line, and the receiver gets a reset after what its
    kernel took, not a clean end of a truncated file."""
    stalled = _Stalled()
    started = time.monotonic()
    code, err = shell(f"$Z send data {stalled.address} --method {method} --idle-timeout 0.3",
                      tmp_path).wait(30)
    took = time.monotonic() - started
    stalled.release()
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zcrelay: error: no byte moved for 0.3s"), err
    assert f" of {SIZE} bytes" in lines[0], err
    assert took < 10, took
    assert stalled.end == "ConnectionResetError"
    _assert_a_prefix(stalled, data)


def test_send_cut_short_to_a_unix_receiver_says_it_was_not_told(tmp_path, data):
    """A unix socket has no reset (SO_LINGER 0 does nothing on AF_UNIX): a receiver whose
    transfer is cut short sees an ordinary end of stream after the bytes it got. The sender
    must exit non-zero and say that the receiver could not be told."""
    stalled = _Stalled(tmp_path / "sock")
    code, err = shell(f"$Z send data {stalled.address} --idle-timeout 0.3", tmp_path).wait(30)
    stalled.release()
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zcrelay: error: no byte moved for 0.3s"), err
    assert "unix socket" in lines[0] and "cannot be reset" in lines[0], err
    assert stalled.end == "eof"  # what a unix receiver sees: nothing better exists
    _assert_a_prefix(stalled, data)


def test_a_file_that_shrinks_under_a_unix_receiver_is_said_not_told(tmp_path):
    """The file shrinks mid-send to a unix socket: exit 10 as for TCP, and the one line says
    the receiver saw an ordinary end of stream."""
    victim = sparse_file(tmp_path / "victim", 256 << 20, [(0, b"start")])
    stalled = _Stalled(tmp_path / "sock")
    sender = shell(f"$Z send victim {stalled.address} --rate-limit 32M", tmp_path)
    assert stalled.accepted.wait(30)
    stalled._release.set()  # reads from now on
    while stalled.size < (2 << 20) and sender.proc.poll() is None:
        time.sleep(0.01)  # polling a counter the reader thread advances, not a wait for readiness
    os.truncate(victim, 1 << 20)
    code, err = sender.wait(30)
    stalled.release()
    assert code == 10, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zcrelay: error: the file shrank"), err
    assert "cannot be reset" in lines[0], err
    assert stalled.end == "eof"


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_send_idle_timeout_spares_a_rate_limited_transfer(tmp_path, method):
    """--rate-limit sleeps between chunks by design (4 KiB at 8K/s: half a second each, longer
    than the timeout): that is not the receiver stalling, and must not end the transfer."""
    payload = os.urandom(12 << 10)
    (tmp_path / "small").write_bytes(payload)
    sink = Sink()
    code, err = shell(f"$Z send small 127.0.0.1:{sink.port} --method {method} --rate-limit 8K "
                      f"--idle-timeout 0.3", tmp_path).wait(30)
    assert code == 0, err
    sink.join()
    assert sink.sha.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_serve_idle_timeout_spares_a_rate_limited_client(zcrelay, tmp_path):
    """serve's --idle-timeout fired while --rate-limit slept between chunks: a client reading
    at once was reset, a third of the way in."""
    import socket

    data = random_file(tmp_path / "data", 12 << 10)
    server = zcrelay("serve", str(data), "--listen", "127.0.0.1:0", "--idle-timeout", "0.3",
                     "--rate-limit", "8K")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        got = b"".join(iter(lambda: sock.recv(1 << 16), b""))
    assert hashlib.sha256(got).hexdigest() == sha256_file(data)
    server.wait_for_lines("conn=1 ", 1)
    code, err = server.stop()
    assert code == 0, err
    assert next(line for line in err.splitlines() if "conn=1 " in line).endswith(" ok"), err


def test_transfer_under_trio_gives_up_on_an_idle_receiver(tmp_path):
    """The library's transfer honours SendConfig.idle_timeout in a trio run as well (serve,
    a program that embeds it): IdleTimeout, a ConnectionLost, after the bytes that fit."""
    import socket

    import trio

    from zcrelay import files
    from zcrelay.stats import Flow

    data = random_file(tmp_path / "data", 8 << 20)
    ours, theirs = socket.socketpair()
    fd = os.open(data, os.O_RDONLY)
    flow = Flow()

    async def main():
        sock = trio.socket.from_stdlib_socket(ours)
        with pytest.raises(files.IdleTimeout) as idle:
            await files.transfer(fd, sock, 0, 8 << 20, flow, files.SendConfig(idle_timeout=0.3))
        assert isinstance(idle.value, files.ConnectionLost)
        assert str(idle.value).startswith("no byte moved for 0.3s")
        sock.close()

    try:
        trio.run(main)
    finally:
        os.close(fd)
    got = b"".join(iter(lambda: theirs.recv(1 << 16), b""))
    theirs.close()
    assert 0 < len(got) == flow.bytes < 8 << 20
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data.read_bytes()[:len(got)]).hexdigest()


@pytest.mark.parametrize("method", ["splice", "sendfile"])
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_a_receiver_gone_mid_send_is_named_and_its_count_not_taken_for_received(tmp_path, data, method, family):
    """The receiver reads 1 MiB, then resets (TCP, SO_LINGER 0) or closes (unix). sendfile's
    EPIPE was called "the peer stopped reading" for a reset, and "connection lost after N
    bytes" counted what was handed to the kernel (4.5 MB where the receiver had read 1 MiB):
    a user resuming with --offset N would leave a hole. Exit 1, one line, the right cause,
    and the count said to be what was sent, not what arrived."""
    import socket
    import struct

    if family == "tcp":
        listener = socket.create_server(("127.0.0.1", 0))
        where = f"127.0.0.1:{listener.getsockname()[1]}"
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "sock"))
        listener.listen(1)
        where = f"unix:{tmp_path / 'sock'}"
    got = bytearray()

    def give_up():
        conn, _ = listener.accept()
        while len(got) < 1 << 20:
            got.extend(conn.recv((1 << 20) - len(got)))
        if family == "tcp":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    peer = threading.Thread(target=give_up)
    peer.start()
    with listener:
        code, err = shell(f"$Z send data {where} --method {method}", tmp_path).wait()
        peer.join()
    assert code == 1, err
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data.read_bytes()[:1 << 20]).hexdigest()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    why = "reset by the peer" if family == "tcp" else "closed by the peer"
    assert lines[0].startswith(f"zcrelay: error: connection lost ({why}): sent "), err
    assert f" of {SIZE} bytes, of which the receiver may have read fewer" in lines[0], err
