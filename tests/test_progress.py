"""Progress on a terminal, never on stdout nor over data on the terminal; a terminal as stdin
falls back to a copy (with -v)."""

from __future__ import annotations

import os
import pty
import socket
import subprocess
import sys
import threading
import time

from tests.conftest import zcrelay_argv, zcrelay_env
from tests.pipeline_helpers import Sink, random_file, sha256_file, shell

SIZE = 16 << 20


def _read_all(fd: int, proc: subprocess.Popen, timeout: float = 60) -> bytes:
    """Everything the terminal's master side gets until the process exits (bounded)."""
    import select

    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every slave fd is closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return bytes(out)


def test_send_shows_progress_on_a_terminal_only(tmp_path):
    data = random_file(tmp_path / "data", SIZE)
    sink = Sink()
    out = open(tmp_path / "stdout", "wb")
    # 4 MB/s for 16 MiB: a few seconds, so the display refreshes several times.
    code, text = _stderr_on_a_terminal(zcrelay_argv("send", "data", f"127.0.0.1:{sink.port}", "--rate-limit", "8M"),
                                       tmp_path, out)
    assert code == 0
    sink.join()
    assert sink.sha.hexdigest() == sha256_file(data)
    assert "data" in text and "MiB" in text and "━" in text, text[-2000:]
    assert text.count("\r") + text.count("\x1b[") > 3  # refreshed in place, more than once
    assert (tmp_path / "stdout").read_bytes() == b""


def test_no_progress_when_stderr_is_not_a_terminal(tmp_path):
    random_file(tmp_path / "data", 1 << 20)
    sink = Sink()
    code, err = shell(f"$Z send data 127.0.0.1:{sink.port}", tmp_path).wait()
    assert code == 0 and err == "", err


def test_terminal_stdin_is_copied_and_reported(tmp_path):
    """A terminal cannot splice: stdin is copied (said with -v), waiting for input without
    blocking the event loop: the reverse direction keeps flowing meanwhile."""
    back = random_file(tmp_path / "back", SIZE)
    listener = shell("$Z listen 127.0.0.1:0 < back > got", tmp_path, listening=True)
    master, slave = pty.openpty()
    out = open(tmp_path / "out", "wb")
    proc = subprocess.Popen(zcrelay_argv("connect", f"127.0.0.1:{listener.port}", "-v", "--no-progress"),
                            cwd=tmp_path, env=zcrelay_env(), stdin=slave, stdout=out,
                            stderr=subprocess.PIPE)
    os.close(slave)
    os.write(master, b"typed line\n")
    # The peer's data flows while nobody types; when the peer closes, a terminal stdin does
    # not keep the pipeline alive.
    code = proc.wait(60)
    err = proc.stderr.read().decode()
    os.close(master)
    assert code == 0, err
    assert "stdin: copy (a terminal cannot splice)" in err
    assert sha256_file(tmp_path / "out") == sha256_file(back)
    listener.wait()
    assert (tmp_path / "got").read_bytes() in (b"typed line\n", b"")


PACED = ("import os, sys, time\n"
         "data = open(sys.argv[1], 'rb').read()\n"
         "for i in range(0, len(data), 1 << 18):\n"
         "    os.write(1, data[i:i + (1 << 18)])\n"
         "    time.sleep(0.02)  # pacing, so the display has a run to follow: not a readiness wait\n")


def test_tee_shows_progress_on_a_terminal_and_keeps_its_outputs_clean(tmp_path):
    """A capture is long work: with stderr a terminal and stdout not, `zcrelay tee` shows a
    progress display there, and stdout and FILE get exactly the input."""
    data = random_file(tmp_path / "data", SIZE)
    master, slave = pty.openpty()
    producer = subprocess.Popen([sys.executable, "-c", PACED, "data"], cwd=tmp_path, stdout=subprocess.PIPE)
    out = open(tmp_path / "stdout", "wb")
    proc = subprocess.Popen(zcrelay_argv("tee", "copy"), cwd=tmp_path, env=zcrelay_env(COLUMNS="100"),
                            stdin=producer.stdout, stdout=out, stderr=slave)
    producer.stdout.close()
    os.close(slave)
    screen = _read_all(master, proc)
    os.close(master)
    assert proc.wait(10) == 0 and producer.wait(10) == 0
    text = screen.decode(errors="replace")
    assert "tee" in text and "MiB" in text and "━" in text, text[-2000:]
    assert text.count("\r") + text.count("\x1b[") > 3  # refreshed in place, more than once
    digest = sha256_file(data)
    assert sha256_file(tmp_path / "stdout") == digest
    assert sha256_file(tmp_path / "copy") == digest


def _stderr_on_a_terminal(argv: list[str], cwd, stdout, stdin=subprocess.DEVNULL) -> tuple[int, str]:
    """Run with stderr alone on a terminal; its exit status and what the terminal showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, env=zcrelay_env(COLUMNS="100"), stdin=stdin, stdout=stdout,
                            stderr=slave)
    os.close(slave)
    screen = _read_all(master, proc)
    os.close(master)
    return proc.wait(10), screen.decode(errors="replace")


def _on_one_terminal(argv: list[str], cwd, stdin=None) -> tuple[int, str]:
    """Run with stdout and stderr (and stdin, unless given) on one terminal; what it shows."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, env=zcrelay_env(COLUMNS="100"),
                            stdin=slave if stdin is None else stdin, stdout=slave, stderr=slave)
    os.close(slave)
    screen = _read_all(master, proc)
    os.close(master)
    return proc.wait(10), screen.decode(errors="replace")


def test_no_progress_over_data_on_the_terminal(tmp_path):
    """`zcrelay connect HOST:PORT` typed in a terminal (netcat's use): a display redrawn over
    what the peer sends would garble it. With stdin or stdout on the terminal the default is
    no display; --progress still forces one."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"hello from the peer\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    code, text = _on_one_terminal(zcrelay_argv("connect", f"127.0.0.1:{port}"), tmp_path)
    thread.join(10)
    server.close()
    assert code == 0, text
    assert "hello from the peer" in text
    assert "━" not in text and "bytes" not in text, text

    # Hex digits: random bytes shown on the terminal could spell the display's own marks.
    (tmp_path / "data").write_text(os.urandom(1 << 19).hex())
    with open(tmp_path / "data", "rb") as stdin:
        code, text = _on_one_terminal(zcrelay_argv("tee", "copy"), tmp_path, stdin=stdin)
    assert code == 0
    assert "━" not in text and "MiB" not in text
    assert sha256_file(tmp_path / "copy") == sha256_file(tmp_path / "data")


def test_tee_relay_capture_refuses_progress(tmp_path):
    proc = subprocess.run(zcrelay_argv("tee", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9",
                                       "--capture-dir", str(tmp_path), "--progress"),
                          cwd=tmp_path, env=zcrelay_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--progress is for the pipeline mode" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_progress_label_is_the_file_name_as_it_is(tmp_path):
    """The label is the file's name, shown, not interpreted: rich read "[red]" in a name as
    markup (the display said "odd", in red) and wrote an escape sequence in a name raw to the
    terminal (here one that sets the window title)."""
    name = "[red]odd\x1b]0;pwned\x07name"
    data = random_file(tmp_path / name, 1 << 20)
    sink = Sink()
    code, text = _stderr_on_a_terminal(zcrelay_argv("send", name, f"127.0.0.1:{sink.port}", "--progress"),
                                       tmp_path, subprocess.DEVNULL)
    assert code == 0
    sink.join()
    assert sink.sha.hexdigest() == sha256_file(data)
    assert "[red]odd" in text, text[-2000:]
    assert "\x1b]0;" not in text and "\x07" not in text, text[-2000:]


def test_a_signal_that_ends_the_run_gives_the_cursor_back(tmp_path):
    """rich hides the terminal's cursor while the display is shown. SIGTERM (`timeout`, `kill`)
    ends zcrelay by the signal's default action, and nothing showed the cursor again: the shell
    prompt came back on the display's line with no cursor in the terminal. The cursor is shown,
    on a line of its own, before the process dies of the signal."""
    import select

    master, slave = pty.openpty()
    r, w = os.pipe()
    proc = subprocess.Popen(zcrelay_argv("tee", "copy"), cwd=tmp_path, env=zcrelay_env(COLUMNS="100"),
                            stdin=r, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(r)
    os.close(slave)
    try:
        os.write(w, b"x" * 65536)  # and the pipe stays open: tee waits for more
        screen = bytearray()
        deadline = time.monotonic() + 30
        while b"KiB" not in screen and time.monotonic() < deadline:  # the display is drawn
            if select.select([master], [], [], 0.5)[0]:
                screen += os.read(master, 65536)
        assert b"\x1b[?25l" in screen, bytes(screen)
        proc.send_signal(15)
        screen += _read_all(master, proc)
    finally:
        os.close(w)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        os.close(master)
    assert proc.returncode == -15
    assert screen.rfind(b"\x1b[?25h") > screen.rfind(b"\x1b[?25l"), bytes(screen[-300:])
    assert screen.endswith(b"\n\x1b[?25h"), bytes(screen[-300:])  # \r\n on a terminal
