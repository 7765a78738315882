"""Start-up: a command imports its own modules only (issue #3, #4: start-up was most of the CPU
of a 1 GiB send or tee). Checked in a subprocess with `python -X importtime`."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import zcrelay_argv, zcrelay_env
from zcrelay.exitcodes import ExitCode


def run_importtime(*args: str, data: bytes | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run zcrelay with `python -X importtime`, `data` on stdin (None: /dev/null); the finished
    process (bytes) and the modules it imported."""
    argv = zcrelay_argv(*args)
    argv[1:1] = ["-X", "importtime"]
    proc = subprocess.run(argv, input=data, stdin=subprocess.DEVNULL if data is None else None,
                          capture_output=True, env=zcrelay_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = {line.rsplit(b"|", 1)[1].strip().decode() for line in proc.stderr.splitlines()
               if line.startswith(b"import time:") and b"|" in line}
    return proc, modules


def imported(*args: str) -> set[str]:
    return run_importtime(*args)[1]


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
    proc, modules = run_importtime("tee", str(tmp_path / "a"), data=data)
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


# -- `zcrelay tee [-a] FILE...` without typer (zcrelay.cli.teepipe) ---------------------------

# What zcrelay.cli.teepipe.main runs with besides FILEs and -a: every other option of `tee` at
# the value typer gives it when absent. A new option makes the comparison below fail until the
# fast path is checked against it.
PLAIN_TEE_DEFAULTS = {"output_error": None, "nopipe": False, "pipe_size": "1M", "listen": None,
                      "target": None, "capture_dir": None, "progress": None, "verbose": 0, "quiet": False}

WORDS = st.one_of(
    st.sampled_from(["-a", "--append", "-q", "-v", "-av", "-p", "--", "-", "--pipe-size", "2M", "-h",
                     "--no-progress", "--output-error", "warn", "tee", "--listen", "-l"]),
    st.text(alphabet="ab-./ é", min_size=0, max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(WORDS, max_size=6))
def test_plain_tee_is_what_typer_parses(words):
    """Whenever the fast path takes a command line, typer parses it to the same FILEs and -a,
    and every other option at its default; it takes no line with another option, `--` or `-`."""
    import typer

    from zcrelay.cli import load, teepipe
    from zcrelay.cli.common import parse_size

    plain = teepipe.plain_tee(["tee", *words])
    if plain is None:
        assert any(w.startswith("-") and w not in ("-a", "--append") for w in words)
        return
    files, append = plain
    command = typer.main.get_command(load({"tee"})).commands["tee"]
    params = command.make_context("tee", list(words)).params
    assert params == {"files": tuple(files), "append": append, **PLAIN_TEE_DEFAULTS}
    assert teepipe.PIPE_SIZE == PLAIN_TEE_DEFAULTS["pipe_size"]
    assert teepipe.PIPE_SIZE_BYTES == parse_size(teepipe.PIPE_SIZE)


def test_plain_tee_leaves_other_command_lines_to_typer(monkeypatch):
    from zcrelay.cli.teepipe import plain_tee

    assert plain_tee(["tee", "a", "-a", "b"]) == (["a", "b"], True)
    assert plain_tee(["tee"]) == ([], False)
    for args in (["connect", "a"], ["--version", "tee"], ["tee", "-q", "a"], ["tee", "--", "-a"], []):
        assert plain_tee(args) is None, args
    monkeypatch.setenv("_ZCRELAY_COMPLETE", "bash_complete")  # shell completion: typer's job
    assert plain_tee(["tee", "a"]) is None


@pytest.mark.parametrize("options,typer_wanted", [((), False), (("-a",), False), (("-q",), True)])
def test_plain_tee_runs_without_typer(tmp_path, options, typer_wanted):
    """`zcrelay tee [-a] FILE...` never imports typer (its import was most of tee's start-up);
    any other option still goes through typer. Every byte reaches stdout and both files, and
    -a keeps what the file held."""
    data = os.urandom(3 << 20 | 77)
    (tmp_path / "b").write_bytes(b"kept")
    proc, modules = run_importtime("tee", *options, str(tmp_path / "a"), str(tmp_path / "b"), data=data)
    assert "zcrelay.tee" in modules  # the probe works
    assert ("typer" in modules) == typer_wanted
    if not typer_wanted:  # nothing is logged: logging is not imported (zcrelay.logs), nor
        # socket, nor dataclasses (see zcrelay.stats)
        assert not {"logging", "socket", "dataclasses"} & modules
    want = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(proc.stdout).hexdigest() == want
    assert hashlib.sha256((tmp_path / "a").read_bytes()).hexdigest() == want
    kept = b"kept" if "-a" in options else b""
    assert hashlib.sha256((tmp_path / "b").read_bytes()).hexdigest() == hashlib.sha256(kept + data).hexdigest()


def test_plain_tee_logs_an_output_error_without_importing_logging_first(tmp_path):
    """The fast path sets logging up lazily (zcrelay.logs): an output error, the first thing
    it logs, still comes out as one 'zcrelay: ' line on stderr, the other outputs get every
    byte, and the exit code says an output failed."""
    data = os.urandom(1 << 20)
    missing = tmp_path / "no-such-dir" / "x"
    proc = subprocess.run(zcrelay_argv("tee", str(missing), str(tmp_path / "a")), input=data,
                          capture_output=True, env=zcrelay_env(), timeout=60)
    assert proc.returncode == ExitCode.OUTPUT_ERROR, proc.stderr
    assert proc.stderr.decode() == f"zcrelay: {missing}: No such file or directory\n"
    assert proc.stdout == data and (tmp_path / "a").read_bytes() == data
