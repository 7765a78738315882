"""Start-up: a command imports its own modules only (issue #3, #4: start-up was most of the CPU
of a 1 GiB send or tee). Checked in a subprocess with `python -X importtime`."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from tests.conftest import zcrelay_argv, zcrelay_env


def imported(*args: str) -> set[str]:
    argv = zcrelay_argv(*args)
    argv[1:1] = ["-X", "importtime"]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=zcrelay_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
            and "|" in line}


@pytest.mark.parametrize("args,unwanted", [
    (("tee", "/dev/null"), {"zcrelay.forward", "zcrelay.bench", "zcrelay.files", "zcrelay.demo", "rich", "pydantic"}),
    (("--version",), {"zcrelay.tee", "zcrelay.forward", "zcrelay.files", "rich", "pydantic"}),
])
def test_a_command_imports_only_what_it_uses(args, unwanted):
    modules = imported(*args)
    assert "zcrelay.cli" in modules  # the probe works
    assert not modules & unwanted, sorted(modules & unwanted)


def test_help_still_lists_every_command():
    from zcrelay.cli import COMMANDS
    out = subprocess.run(zcrelay_argv("--help"), capture_output=True, text=True, env=zcrelay_env(),
                         timeout=60).stdout
    for name in COMMANDS:
        assert f" {name} " in out, name


def test_tee_with_a_pipe_on_stdin_runs_without_trio(tmp_path):
    """stdin a pipe: the tee is one loop with blocking waits (zcrelay.waits), trio is never
    imported, and every byte still reaches stdout and the file (more than a pipe holds)."""
    data = os.urandom(5 << 20 | 123)
    argv = zcrelay_argv("tee", str(tmp_path / "a"))
    argv[1:1] = ["-X", "importtime"]
    proc = subprocess.run(argv, input=data, capture_output=True, env=zcrelay_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = {line.rsplit(b"|", 1)[1].strip().decode() for line in proc.stderr.splitlines()
               if line.startswith(b"import time:")}
    assert "zcrelay.tee" in modules  # the probe works
    assert not {m for m in modules if m == "trio" or m.startswith("trio.")}
    want = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(proc.stdout).hexdigest() == want
    assert hashlib.sha256((tmp_path / "a").read_bytes()).hexdigest() == want


def test_send_runs_without_trio(tmp_path):
    """`send` is one stream: it never imports trio (its import was most of a 1 GiB send's CPU)."""
    import socket
    import threading

    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    got = bytearray()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def sink():
            conn, _ = listener.accept()
            with conn:
                while chunk := conn.recv(1 << 20):
                    got.extend(chunk)

        peer = threading.Thread(target=sink)
        peer.start()
        argv = zcrelay_argv("send", str(tmp_path / "f"), f"127.0.0.1:{listener.getsockname()[1]}")
        argv[1:1] = ["-X", "importtime"]
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=zcrelay_env(), timeout=60)
        peer.join(30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "zcrelay.files" in modules  # the probe works
    assert not {m for m in modules if m == "trio" or m.startswith("trio.")}
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
