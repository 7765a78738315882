"""Helpers for the pipeline tests: shell pipelines around zcrelay in subprocesses.

Readiness is the "listening on" line on stderr, never a sleep. Every wait is bounded.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import LISTENING, zcrelay_argv, zcrelay_env

ZCRELAY = " ".join(shlex.quote(a) for a in zcrelay_argv())
G = 1 << 30


def need(program: str) -> None:
    """Skip when `program` is missing, but only outside CI: in CI a missing program fails."""
    if shutil.which(program) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is required in CI")
        pytest.skip(f"{program} is not installed")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def sparse_file(path: Path, size: int, markers: list[tuple[int, bytes]]) -> Path:
    """A sparse file of `size` bytes: holes, with `markers` written at their offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in markers:
            f.seek(offset)
            f.write(data)
    return path


@dataclass
class Shell:
    """A `bash -c` pipeline; zcrelay's stderr is collected line by line."""

    proc: subprocess.Popen
    address: str | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.address
        return int(self.address.rsplit(":", 1)[1])

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        try:
            _, rest = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, rest = self.proc.communicate()
            raise AssertionError(f"timed out: {self.proc.args!r}\n" + "\n".join(self.lines) + rest)
        self.lines.extend(rest.splitlines())
        return self.proc.returncode, "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def shell(script: str, cwd: Path, listening: bool = False, **kwargs) -> Shell:
    """Run `script` with $Z set to this checkout's zcrelay; with `listening`, wait for the
    "listening on" line (bounded by the process: if it exits first, fail)."""
    env = zcrelay_env(Z=ZCRELAY)
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdin=kwargs.pop("stdin", subprocess.DEVNULL),
                            stdout=kwargs.pop("stdout", subprocess.DEVNULL), stderr=subprocess.PIPE,
                            text=True, **kwargs)
    sh = Shell(proc)
    if listening:
        while sh.address is None:
            line = proc.stderr.readline()
            if not line:
                code, err = sh.wait()
                raise AssertionError(f"exited ({code}) before listening:\n{err}")
            sh.lines.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match:
                sh.address = match.group(1)
    return sh


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line or "Traceback" in line]


class Sink:
    """A loopback TCP server in a thread: accepts one connection, counts and hashes what it
    receives until EOF, then closes."""

    def __init__(self, hold_open: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.size = 0
        self.sha = hashlib.sha256()
        self.eof = threading.Event()
        self.closed = threading.Event()
        self.release = threading.Event()
        self.hold_open = hold_open
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            buf = bytearray(1 << 20)
            while n := conn.recv_into(buf):
                self.size += n
                self.sha.update(memoryview(buf)[:n])
            self.eof.set()
            if self.hold_open:
                self.release.wait(30)
        self.closed.set()
        self.listener.close()

    def join(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the sink did not finish"


# Losing a connection with bytes still on their way to stdout: the pieces the tests need.

def fill(fd: int) -> bytes:
    """Write random bytes into `fd` (a pipe or a socket) without blocking until it is full, as
    a reader that has stopped reading leaves it; return what was written."""
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    written = bytearray()
    chunk = os.urandom(1 << 16)
    try:
        while True:
            try:
                written += chunk[:os.write(fd, chunk)]
            except BlockingIOError:
                return bytes(written)
    finally:
        os.set_blocking(fd, blocking)


def send_until_full(fd: int, data: bytes) -> int:
    """Send the start of `data` on the non-blocking socket `fd` until it would block (the
    receiver's window and our send buffer are full) or all is sent; return the bytes sent."""
    sent = 0
    while sent < len(data):
        try:
            sent += os.write(fd, data[sent:sent + (1 << 20)])
        except BlockingIOError:
            break
    return sent


def unacked(fd: int) -> int:
    """Bytes sent on the TCP socket `fd` that its peer's kernel has not acknowledged yet
    (SIOCOUTQ): the bytes sent minus this had reached the peer's kernel, and stay readable
    there after a reset (Linux keeps the receive queue of a reset connection)."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]


def read_exactly(fd: int, n: int) -> bytes:
    """Read `n` bytes from the blocking fd (fail at an early EOF)."""
    got = bytearray()
    while len(got) < n:
        chunk = os.read(fd, n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


def feed_until_closed(fd: int) -> None:
    """Write to the blocking fd until its reader goes (EPIPE), then close it."""
    chunk = b"u" * (1 << 20)
    try:
        while True:
            os.write(fd, chunk)
    except OSError:
        pass
    finally:
        os.close(fd)


def reset(sock) -> None:
    """Close `sock` with an RST (SO_LINGER 0), whatever it still holds."""
    import struct

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
