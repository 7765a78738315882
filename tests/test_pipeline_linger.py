"""`connect` and `listen` with --linger: a half-closed connection that moves no byte ends.

Without it, `listen -k` whose stdin is open and idle (`tail -f log | zcrelay listen -k`) held
a client that had sent its FIN for good: the next client waited in the backlog forever.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time

from tests.conftest import zcrelay_argv, zcrelay_env
from tests.pipeline_helpers import Sink, error_lines, shell

# Larger than a 1 MiB pipe and the loopback socket buffers.
SIZE = 3 << 20


def _flags(path: str) -> list[str]:
    return ["-v"] if path == "splice" else ["-v", "--no-splice"]


def _listening_port(proc: subprocess.Popen) -> int:
    """The port of the listening line (with -v, the stdio plans' lines come first)."""
    seen = []
    for line in proc.stderr:
        line = line if isinstance(line, str) else line.decode()
        seen.append(line)
        if match := re.search(r"listening on \S+:(\d+)", line):
            return int(match.group(1))
    raise AssertionError(f"no listening line: {seen}")


def _send_and_close(port: int, data: bytes, timeout: float) -> float:
    """Send `data`, shut down the write side, wait for the listener's FIN; return how long the
    FIN took after ours."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        sent = time.monotonic()
        s.settimeout(timeout)
        assert s.recv(1) == b"", "the listener sent bytes its idle stdin never had"
        return time.monotonic() - sent


def test_listen_keep_open_moves_on_when_stdin_is_idle(tmp_path, path):
    """stdin is an open pipe nobody writes to. Each client sends 3 MiB and its FIN; --linger
    0.5 ends each connection about half a second later, and the next client is served. stdout
    gets both clients' bytes, in order, whole."""
    out = tmp_path / "out"
    first, second = os.urandom(SIZE), os.urandom(SIZE)
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(zcrelay_argv("listen", "-k", "--linger", "0.5", "127.0.0.1:0", *_flags(path)),
                                stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                env=zcrelay_env())
    try:
        port = _listening_port(proc)
        waited = [_send_and_close(port, data, timeout=20) for data in (first, second)]
        assert all(0.4 <= w < 15 for w in waited), waited
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=20)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert not error_lines(err), err
    assert err.count("ended: linger") == 2, err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(first + second).hexdigest()


def test_without_linger_a_half_closed_connection_waits_for_stdin(tmp_path, path):
    """The default is unchanged: no limit. A client's FIN leaves the connection open while
    stdin is open; stdin's EOF then ends it, and the client gets the bytes stdin had."""
    proc = subprocess.Popen(zcrelay_argv("listen", "127.0.0.1:0", *_flags(path)), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=zcrelay_env())
    try:
        port = _listening_port(proc)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.shutdown(socket.SHUT_WR)
            s.settimeout(1.0)
            try:
                early = s.recv(1)
            except socket.timeout:
                early = None
            assert early is None, "the connection ended while stdin was still open"
            proc.stdin.write(b"late reply")
            proc.stdin.close()
            s.settimeout(20)
            got = b"".join(iter(lambda: s.recv(65536), b""))
        assert got == b"late reply"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_bytes_still_moving_are_not_cut_off(tmp_path, path):
    """The client half-closes at once; stdin then trickles 64 KiB every 0.1 s for 4 s: twice
    the --linger of 2 s in all, but twenty times inside it between two writes (slack for a
    loaded machine). The connection lives until stdin's EOF; the client gets every byte."""
    proc = subprocess.Popen(zcrelay_argv("listen", "--linger", "2", "127.0.0.1:0", *_flags(path)),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=zcrelay_env())
    sent = hashlib.sha256()

    def trickle() -> None:
        for _ in range(40):
            chunk = os.urandom(64 << 10)
            sent.update(chunk)
            proc.stdin.write(chunk)
            proc.stdin.flush()
            time.sleep(0.1)
        proc.stdin.close()

    try:
        port = _listening_port(proc)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.shutdown(socket.SHUT_WR)
            writer = threading.Thread(target=trickle)
            writer.start()
            got = hashlib.sha256()
            s.settimeout(20)
            total = 0
            while chunk := s.recv(1 << 20):
                got.update(chunk)
                total += len(chunk)
            writer.join(20)
        assert total == 40 * (64 << 10)
        assert got.hexdigest() == sent.hexdigest()
        assert proc.wait(20) == 0
        err = proc.stderr.read().decode()
        assert "ended: eof" in err and "linger" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_connect_ends_when_the_peer_goes_quiet_after_our_eof(tmp_path, path):
    """The mirror case: stdin's 3 MiB and EOF reach a server that keeps its side open and
    sends nothing; --linger 0.5 ends connect with status 0, and every byte had arrived."""
    src = tmp_path / "data"
    src.write_bytes(os.urandom(SIZE))
    sink = Sink(hold_open=True)
    try:
        proc = shell(f"$Z connect 127.0.0.1:{sink.port} --linger 0.5 {' '.join(_flags(path))} < data", tmp_path)
        code, err = proc.wait(timeout=30)
        assert code == 0, err
        assert "ended: linger" in err, err
        assert sink.eof.wait(10)
        assert sink.size == SIZE
        assert sink.sha.hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
    finally:
        sink.release.set()
        sink.join()
