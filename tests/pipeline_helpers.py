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
