"""Odd inputs a user hit: a FIFO given as FILE, stderr, stdin or stdout closed, a temporary
directory too small for bench, and /proc files that report size 0.

Every command runs in a subprocess under `timeout`, on loopback only; each failure must be its
documented exit code and one line on stderr, never a traceback or a hang.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import subprocess
import time

import pytest

from tests.conftest import zcrelay_argv, zcrelay_env
from tests.pipeline_helpers import Sink, sha256_file

TIMEOUT = 20  # seconds, for `timeout`; subprocess waits a little longer
Z = "timeout %d %s" % (TIMEOUT, " ".join(shlex.quote(a) for a in zcrelay_argv()))


def sh(script: str, cwd, **kwargs) -> subprocess.CompletedProcess:
    """`bash -c script` with $Z the zcrelay command under `timeout`."""
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=zcrelay_env(Z=Z), capture_output=True,
                          text=True, timeout=TIMEOUT + 10, **kwargs)


def one_error(stderr: str, *words: str) -> str:
    """The one line of stderr, checked to be zcrelay's error and to name `words`."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("zcrelay: error: "), stderr
    for word in words:
        assert word in lines[0], stderr
    return lines[0]


@pytest.fixture
def closed_port():
    """A loopback port bound but not listening: a connect to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "in"
    path.write_bytes(os.urandom(3 << 20))
    return path


# --------------------------------------------------------------------------------------------
# 1. A FIFO given as FILE is refused at once (a plain open() blocked waiting for a writer).

@pytest.mark.parametrize("command", [
    "$Z send fifo 127.0.0.1:{port}",
    "$Z serve -l 127.0.0.1:0 fifo",
    "$Z bench --file fifo",
])
def test_fifo_is_refused_at_once(tmp_path, closed_port, command):
    os.mkfifo(tmp_path / "fifo")
    r = sh(command.format(port=closed_port), tmp_path)
    assert r.returncode == 8, (r.returncode, r.stderr)  # INPUT_ERROR; 124 was the hang
    one_error(r.stderr, "fifo: not a regular file")


# --------------------------------------------------------------------------------------------
# 2. stderr closed (2>&-): the data moves as without it, and no message reaches the data.

@pytest.mark.parametrize("command", ["connect 127.0.0.1:{port} < in", "send in 127.0.0.1:{port}"])
def test_a_sender_with_stderr_closed_moves_the_data(tmp_path, data, command):
    sink = Sink()
    r = sh(f"$Z {command.format(port=sink.port)} 2>&- > out", tmp_path)
    assert r.returncode == 0, r.stderr
    sink.join(TIMEOUT)
    assert sink.sha.hexdigest() == sha256_file(data)
    assert (tmp_path / "out").read_bytes() == b""  # no message reached the data either


def test_listen_with_stderr_closed_moves_the_data(tmp_path, data):
    """No "listening on" line to wait for (stderr is closed): connect until it is up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = subprocess.Popen(["bash", "-c", f"$Z listen 127.0.0.1:{port} < /dev/null 2>&- > out"],
                                cwd=tmp_path, env=zcrelay_env(Z=Z))
    try:
        for _ in range(200):
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                break
            except ConnectionRefusedError:
                time.sleep(0.05)  # no readiness line to read: stderr is closed
        else:
            pytest.fail("listen never accepted")
        with client:
            client.sendall(data.read_bytes())
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""  # stdin was /dev/null: EOF at once
        assert listener.wait(TIMEOUT + 5) == 0
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert sha256_file(tmp_path / "out") == sha256_file(data)


def test_tee_with_stderr_closed_writes_every_output(tmp_path, data):
    for script in ("$Z tee o7 < in 2>&- > out", "$Z tee -p o7 < in 2>&- > out"):  # plain and typer
        r = sh(script, tmp_path)
        assert r.returncode == 0, r.stderr
        assert sha256_file(tmp_path / "o7") == sha256_file(tmp_path / "out") == sha256_file(data)


def test_error_with_stderr_closed_is_not_written_to_stdout(tmp_path, closed_port):
    """Python leaves sys.stderr None when fd 2 is closed, and print(file=None) writes to stdout."""
    r = sh(f"$Z connect 127.0.0.1:{closed_port} 2>&-", tmp_path)
    assert r.returncode == 6  # CONNECT_FAILED
    assert r.stdout == ""


def test_error_with_stderr_closed_is_not_written_to_a_file(tmp_path, data):
    """Nor into a file opened later, which took fd 2: the unwritable FILE's error goes nowhere."""
    r = sh("$Z tee missing/o 2>&- o8 < in > out", tmp_path)
    assert r.returncode == 9  # OUTPUT_ERROR: one FILE failed
    assert sha256_file(tmp_path / "o8") == sha256_file(tmp_path / "out") == sha256_file(data)


# --------------------------------------------------------------------------------------------
# 3. tee with stdin or stdout closed: one line, and no FILE opened in its place.

@pytest.mark.parametrize("script, code, message", [
    ("$Z tee o1 <&-", 8, "standard input is closed"),
    ("$Z tee o1 < in >&-", 9, "standard output is closed"),
    ("$Z tee -p o1 < in >&-", 9, "standard output is closed"),
    ("$Z tee o1 <&- >&-", 8, "standard input is closed"),
])
def test_tee_with_stdio_closed(tmp_path, data, script, code, message):
    r = sh(script, tmp_path)
    assert r.returncode == code, r.stderr
    one_error(r.stderr, message)
    assert not (tmp_path / "o1").exists()


# --------------------------------------------------------------------------------------------
# 4. bench in a temporary directory without room: exit 9 and the path.

@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs with the options given; unmounted at the end. Skipped where mount fails."""
    mounted = []

    def mount(options: str):
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=TIMEOUT)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=TIMEOUT)


def _bench(tmpdir, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", str(TIMEOUT), *zcrelay_argv("bench", *args)], capture_output=True,
                          text=True, timeout=TIMEOUT + 10, env=zcrelay_env(TMPDIR=str(tmpdir)), **kwargs)


def test_bench_refuses_a_size_larger_than_the_free_space(tmpfs):
    small = tmpfs("size=64k")
    r = _bench(small, "--size", "1M", "--repeat", "1")
    assert r.returncode == 9, r.stderr
    one_error(r.stderr, str(small), "free", "--size")
    assert list(small.iterdir()) == []  # refused before writing anything


def test_bench_disk_full_names_the_path(tmpfs):
    """Room for the bytes but not for the file's inode (the root and bench's directory take
    the two): the write fails with ENOSPC after the free-space check passed."""
    small = tmpfs("size=1m,nr_inodes=2")
    r = _bench(small, "--size", "64K", "--repeat", "1")
    assert r.returncode == 9, r.stderr
    one_error(r.stderr, str(small), "payload", "No space left on device")
    assert list(small.iterdir()) == []


def test_bench_write_error_names_the_path(tmp_path):
    """A write past RLIMIT_FSIZE fails with EFBIG (Python ignores SIGXFSZ): the same path."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    r = _bench(tmpdir, "--size", "64K", "--repeat", "1", preexec_fn=limit)
    assert r.returncode == 9, r.stderr
    one_error(r.stderr, str(tmpdir), "payload", "File too large")
    assert list(tmpdir.iterdir()) == []


# --------------------------------------------------------------------------------------------
# 5. Files that report size 0 (procfs) are sent to their EOF.

def _send(path: str, port: int, *args: str) -> tuple[list[str], subprocess.CompletedProcess]:
    argv = zcrelay_argv("send", path, f"127.0.0.1:{port}", *args)
    r = subprocess.run(["timeout", str(TIMEOUT), *argv], capture_output=True, text=True,
                       timeout=TIMEOUT + 10, env=zcrelay_env())
    return argv, r


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_send_a_proc_file_that_splices(method):
    """/proc/sys/kernel/ostype reports size 0 and splices: zero-copy to EOF."""
    with open("/proc/sys/kernel/ostype", "rb") as f:
        expected = f.read()
    assert expected and os.stat("/proc/sys/kernel/ostype").st_size == 0
    sink = Sink()
    _, r = _send("/proc/sys/kernel/ostype", sink.port, "--method", method, "-v")
    assert r.returncode == 0, r.stderr
    sink.join(TIMEOUT)
    assert (sink.size, sink.sha.hexdigest()) == (len(expected), _sha(expected))
    assert f"sent {len(expected)} bytes by {method}" in r.stderr
    assert "user space" not in r.stderr


@pytest.mark.parametrize("method", ["splice", "sendfile"])
def test_send_a_proc_file_that_refuses_splice(method):
    """/proc/self/cmdline refuses splice and sendfile (EINVAL) before the first byte: read
    through user space, said with -v. Its content is the sender's own argv."""
    sink = Sink()
    argv, r = _send("/proc/self/cmdline", sink.port, "--method", method, "-v")
    assert r.returncode == 0, r.stderr
    sink.join(TIMEOUT)
    expected = b"".join(os.fsencode(a) + b"\0" for a in argv)
    assert (sink.size, sink.sha.hexdigest()) == (len(expected), _sha(expected))
    assert f"{method} refused the file (EINVAL)" in r.stderr


def test_send_a_large_proc_file_through_user_space():
    """/proc/self/environ, over a megabyte: many reads at explicit offsets, all in order."""
    env = {f"ZCRELAY_BIG_{i}": chr(ord("a") + i) * 100_000 for i in range(12)}
    environ = {"PYTHONPATH": zcrelay_env()["PYTHONPATH"], **env}
    sink = Sink()
    argv = zcrelay_argv("send", "/proc/self/environ", f"127.0.0.1:{sink.port}")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=environ)
    assert r.returncode == 0, r.stderr
    sink.join(TIMEOUT)
    expected = b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items())
    assert (sink.size, sink.sha.hexdigest()) == (len(expected), _sha(expected))


def test_serve_a_proc_file(zcrelay):
    """Not under `timeout`, which would take the stopping SIGTERM for itself: the fixture bounds
    every wait and kills what is left."""
    running = zcrelay("serve", "-l", "127.0.0.1:0", "/proc/self/cmdline")
    try:
        expected = b"".join(os.fsencode(a) + b"\0" for a in zcrelay_argv("serve", "-l", "127.0.0.1:0",
                                                                          "/proc/self/cmdline"))
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as client:
            received = b""
            while chunk := client.recv(65536):
                received += chunk
        assert _sha(received) == _sha(expected)
    finally:
        code, err = running.stop()
    assert code == 0, err
    assert "sent=" in err and " 0 failed" in err


def test_send_a_span_of_a_proc_file_is_refused(closed_port):
    _, r = _send("/proc/sys/kernel/ostype", closed_port, "--offset", "1")
    assert r.returncode == 2, r.stderr
    one_error(r.stderr, "reports size 0", "--offset")


def test_send_an_empty_file_sends_nothing(tmp_path):
    """An empty file is sent to its EOF too: nothing, exit 0."""
    (tmp_path / "empty").write_bytes(b"")
    sink = Sink()
    _, r = _send(str(tmp_path / "empty"), sink.port)
    assert r.returncode == 0, r.stderr
    sink.join(TIMEOUT)
    assert sink.size == 0


def test_length_zero_of_a_proc_file_sends_nothing():
    """--length 0 asks for no byte, whatever the file's size says: it used to be read as "the
    whole of a file that reports size 0", and sent /proc/sys/kernel/ostype whole."""
    sink = Sink()
    _, r = _send("/proc/sys/kernel/ostype", sink.port, "--length", "0")
    assert r.returncode == 0, r.stderr
    sink.join(TIMEOUT)
    assert sink.size == 0
