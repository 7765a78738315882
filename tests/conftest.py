"""Shared test fixtures: the zcrelay command in a subprocess, with a readiness signal.

Tests talk only to loopback addresses (or to namespaces they create) and never sleep to wait
for readiness: a subprocess is ready when it prints its "listening on" line.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (\S+)")


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_raise_fd_limit()


def zcrelay_env(**extra: str) -> dict[str, str]:
    """Environment for a zcrelay subprocess that runs this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def zcrelay_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "zcrelay", *args]


@dataclass
class Running:
    """A zcrelay process started by `start_zcrelay`, with what it printed so far on stderr."""

    proc: subprocess.Popen
    addresses: list[str]
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.addresses[0].rsplit(":", 1)[1])

    @property
    def ports(self) -> list[int]:
        return [int(a.rsplit(":", 1)[1]) if not a.startswith("unix:") else 0 for a in self.addresses]

    def stop(self, sig: int = 15, timeout: float = 20) -> tuple[int, str]:
        """Send `sig`, wait, and return (exit code, the rest of stderr)."""
        if self.proc.poll() is None:
            self.signal_group(sig)  # the group: a wrapper such as strace passes it on too
        try:
            _, rest = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            _, rest = self.proc.communicate()
        self.stderr_lines.extend(rest.splitlines())
        return self.proc.returncode, "\n".join(self.stderr_lines)

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait_for_lines(self, needle: str, count: int) -> None:
        """Read stderr until `count` lines containing `needle` have appeared (e.g. " close=" for
        finished connections: the relay's own word that it is done with them)."""
        seen = sum(needle in line for line in self.stderr_lines)
        while seen < count:
            line = self.read_line()
            if not line:
                raise AssertionError(f"zcrelay exited after {seen} of {count} {needle!r} lines")
            seen += needle in line

    def read_line(self) -> str:
        line = self.proc.stderr.readline()
        if line:
            self.stderr_lines.append(line.rstrip("\n"))
        return line


def start_zcrelay(*args: str, listeners: int = 1, prefix: list[str] | None = None,
                  preexec_fn=None, cwd: str | None = None, env: dict[str, str] | None = None) -> Running:
    """Start `zcrelay ARGS` (with `env` added to the environment) and wait (by reading stderr,
    no sleep) until it has printed `listeners` "listening on" lines. Raises if it exits first."""
    argv = (prefix or []) + zcrelay_argv(*args)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=zcrelay_env(**(env or {})),
                            preexec_fn=preexec_fn, cwd=cwd, start_new_session=True)
    running = Running(proc, [])
    while len(running.addresses) < listeners:
        line = running.read_line()
        if not line:
            code, err = running.stop()
            raise AssertionError(f"zcrelay exited ({code}) before listening:\n{err}")
        match = LISTENING.search(line)
        if match:
            running.addresses.append(match.group(1))
    return running


@pytest.fixture
def zcrelay():
    """Factory fixture: start zcrelay processes; every one still running is killed at the end."""
    started: list[Running] = []

    def start(*args: str, **kwargs) -> Running:
        running = start_zcrelay(*args, **kwargs)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.signal_group(signal.SIGKILL)
            running.proc.communicate()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs mounted for the test, to fill (ENOSPC). Needs root: skipped without it
    only outside CI."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the ENOSPC tests need root in CI")
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(params=["splice", "copy"])
def path(request) -> str:
    """Run a relay test on both the splice path and the user-space fallback path."""
    return request.param


def run_zcrelay(*args: str, timeout: float = 60, input: bytes | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `zcrelay ARGS` to completion (bytes in, bytes out)."""
    return subprocess.run(zcrelay_argv(*args), input=input, capture_output=True, timeout=timeout,
                          env=zcrelay_env(), **kwargs)


@contextmanager
def syn_dropping_listener() -> Iterator[int]:
    """The port of a listener whose accept queue is full: later SYNs are dropped (with
    tcp_abort_on_overflow=0, the default), so a connect to it times out."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(full.getsockname())
            fillers.append(s)
        yield full.getsockname()[1]
    finally:
        for s in fillers:
            s.close()
        full.close()
