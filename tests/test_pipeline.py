"""`zcrelay connect` and `listen` in real shell pipelines: bytes, manners and exit codes."""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest

from tests.pipeline_helpers import G, error_lines, need, random_file, sha256_file, shell, sparse_file

# Larger than a 1 MiB pipe and the loopback socket buffers, so every loop waits at least once.
SIZE = 24 << 20

# The 1 GiB tar payload: sparse, with markers; its SHA-256 is a constant (hashing 1 GiB twice
# on this machine's CPU, without SHA instructions, would cost 12 s).
MARKERS_1G = [(0, b"zcrelay-1g-start"), (G // 2, b"middle-of-1g-zc!"), (G - 16, b"zcrelay-1g-end!!")]
SHA256_SPARSE_1G = "120c7b8f1a6299d34c3cc0535b8e4334c6e437803b53f3e2fbb1d4710d03bbe7"


@pytest.fixture
def data(tmp_path):
    return random_file(tmp_path / "data", SIZE)


def flags(path: str) -> str:
    return "-v" if path == "splice" else "-v --no-splice"


def test_pipe_to_pipe(tmp_path, data, path):
    """`cat file | zcrelay connect` → `zcrelay listen | cat > out`: both stdio ends are pipes."""
    listener = shell(f"$Z listen 127.0.0.1:0 {flags(path)} | cat > out", tmp_path, listening=True)
    sender = shell(f"cat data | $Z connect 127.0.0.1:{{port}} {flags(path)}".replace("{port}", str(listener.port)), tmp_path)
    code, err = sender.wait()
    assert code == 0, err
    code, lerr = listener.wait()
    assert code == 0, lerr
    assert sha256_file(tmp_path / "out") == sha256_file(data)
    method = "splice (pipe <-> socket)" if path == "splice" else "copy (splice disabled)"
    assert f"stdin: {method}" in err
    assert f"stdout: {method}" in lerr
    assert not error_lines(err + lerr)


def test_regular_files_both_ends(tmp_path, data, path):
    """stdin a regular file (`< file`), stdout a regular file (`> out`): file ↔ pipe ↔ socket."""
    listener = shell(f"$Z listen 127.0.0.1:0 {flags(path)} > out", tmp_path, listening=True)
    sender = shell(f"$Z connect 127.0.0.1:{listener.port} {flags(path)} < data", tmp_path)
    code, err = sender.wait()
    assert code == 0, err
    code, lerr = listener.wait()
    assert code == 0, lerr
    assert sha256_file(tmp_path / "out") == sha256_file(data)
    if path == "splice":
        assert "stdin: splice (file <-> pipe <-> socket)" in err
        assert "stdout: splice (file <-> pipe <-> socket)" in lerr
        assert "copied=0" in err and "copied=0" in lerr


def test_stdin_file_position_is_shared(tmp_path):
    """Like cat, zcrelay reads a regular-file stdin from its position and leaves it at the end."""
    (tmp_path / "data").write_bytes(b"skip-me\n" + b"x" * 100000)
    listener = shell("$Z listen 127.0.0.1:0 > out", tmp_path, listening=True)
    sender = shell(f"{{ read -r first; $Z connect 127.0.0.1:{listener.port}; "
                   f"echo \"pos=$(cat | wc -c)\" >&2; }} < data", tmp_path)
    code, err = sender.wait()
    assert code == 0, err
    assert "pos=0" in err
    listener.wait()
    assert (tmp_path / "out").read_bytes() == b"x" * 100000


def test_both_directions_at_once(tmp_path, data, path):
    other = random_file(tmp_path / "other", SIZE // 3)
    listener = shell(f"cat other | $Z listen 127.0.0.1:0 {flags(path)} | cat > got-by-listen", tmp_path, listening=True)
    sender = shell(f"cat data | $Z connect 127.0.0.1:{listener.port} {flags(path)} | cat > got-by-connect", tmp_path)
    assert sender.wait()[0] == 0
    assert listener.wait()[0] == 0
    assert sha256_file(tmp_path / "got-by-listen") == sha256_file(data)
    assert sha256_file(tmp_path / "got-by-connect") == sha256_file(other)


def test_append_mode_stdout_falls_back_to_copy(tmp_path, data):
    (tmp_path / "out").write_bytes(b"previous\n")
    listener = shell("$Z listen 127.0.0.1:0 -v >> out", tmp_path, listening=True)
    sender = shell(f"$Z connect 127.0.0.1:{listener.port} < data", tmp_path)
    assert sender.wait()[0] == 0
    code, lerr = listener.wait()
    assert code == 0, lerr
    assert "stdout: copy (stdout is in append mode" in lerr
    assert (tmp_path / "out").read_bytes() == b"previous\n" + data.read_bytes()


def test_tar_one_gib_both_ends(tmp_path):
    """1 GiB through `tar c | zcrelay connect` and `zcrelay listen | tar x`."""
    need("tar")
    src = tmp_path / "src"
    src.mkdir()
    sparse_file(src / "big", G, MARKERS_1G)
    random_file(src / "small", 3 << 20)
    (tmp_path / "dst").mkdir()
    listener = shell("$Z listen 127.0.0.1:0 | tar xf - -C dst", tmp_path, listening=True)
    sender = shell(f"tar cf - -C src . | $Z connect 127.0.0.1:{listener.port}", tmp_path)
    code, err = sender.wait(120)
    assert code == 0, err
    code, lerr = listener.wait(120)
    assert code == 0, lerr
    assert (tmp_path / "dst" / "big").stat().st_size == G
    assert sha256_file(tmp_path / "dst" / "small") == sha256_file(src / "small")
    assert sha256_file(tmp_path / "dst" / "big") == SHA256_SPARSE_1G



def test_head_closes_early(tmp_path, data):
    """`zcrelay listen | head -c 100`: the reader goes away; zcrelay ends quietly with 141."""
    listener = shell("$Z listen 127.0.0.1:0 | head -c 100 > out; echo \"rc=${PIPESTATUS[0]}\" >&2",
                     tmp_path, listening=True)
    sender = shell(f"cat data data data data | $Z connect 127.0.0.1:{listener.port}", tmp_path)
    code, lerr = listener.wait()
    assert "rc=141" in lerr, lerr
    assert "Traceback" not in lerr and "error" not in lerr
    assert (tmp_path / "out").read_bytes() == data.read_bytes()[:100]
    code, err = sender.wait()
    # The sender lost its peer mid-transfer: one line, exit 1 (FAILURE); no traceback.
    assert "Traceback" not in err
    if code != 0:
        assert code == 1
        assert len(error_lines(err)) == 1 and err.strip().startswith("zcrelay: error: connection lost")


def test_no_shutdown_and_close_after(tmp_path):
    """Default: stdin EOF shuts the write side down at once (the peer sees EOF and may close).
    --no-shutdown: the peer sees no EOF; --close-after bounds how long that lasts."""
    from tests.pipeline_helpers import Sink

    sink = Sink(hold_open=True)
    proc = shell(f"printf hello | $Z connect 127.0.0.1:{sink.port}", tmp_path)
    assert sink.eof.wait(10), "no EOF after stdin EOF"
    sink.release.set()
    assert proc.wait()[0] == 0

    sink = Sink(hold_open=True)
    proc = shell(f"printf hello | $Z connect 127.0.0.1:{sink.port} --no-shutdown --close-after 0.5", tmp_path)
    assert not sink.eof.wait(0.2), "--no-shutdown still shut down the write side"
    assert sink.eof.wait(10), "--close-after did not close"
    code, err = proc.wait()
    assert code == 0, err
    sink.release.set()
    sink.join()
    assert sink.size == 5


@pytest.mark.parametrize("script, code, message", [
    ("$Z connect 127.0.0.1:{closed}", 6, "cannot connect to 127.0.0.1:{closed}: connection refused"),
    ("$Z connect 127.0.0.1:{closed} >&-", 9, "stdout is closed"),
    ("$Z listen 127.0.0.1:{busy}", 3, "cannot listen on 127.0.0.1:{busy}"),
    ("$Z connect nonsense", 2, "no port"),
])
def test_errors_are_one_line(tmp_path, script, code, message):
    import socket

    with socket.socket() as closed, socket.create_server(("127.0.0.1", 0)) as busy:
        closed.bind(("127.0.0.1", 0))
        ports = {"closed": closed.getsockname()[1], "busy": busy.getsockname()[1]}
        proc = shell(script.format(**ports), tmp_path)
        rc, err = proc.wait()
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("zcrelay")
    assert message.format(**ports) in lines[0]


def test_listen_keep_open_survives_a_client_reset():
    """-k: a client that resets mid-stream ends that connection only, with a warning; the
    listener serves on and exits 0 on SIGTERM."""
    import re
    import signal
    import struct

    from tests.conftest import zcrelay_argv, zcrelay_env

    proc = subprocess.Popen(zcrelay_argv("listen", "-k", "127.0.0.1:0"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=zcrelay_env())
    try:
        port = int(re.search(r":(\d+)", proc.stderr.readline()).group(1))
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"x" * 100000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        line = proc.stderr.readline()
        assert "connection lost" in line, line
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"second")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(10) == b""  # served: the listener answered the FIN with its own
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=20)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, rest
    assert "error" not in rest and "Traceback" not in rest


@pytest.mark.parametrize("stdout, then", [("pipe", "eof"), ("pipe", "more"), ("file", "eof")])
def test_connect_passes_a_tcp_urgent_byte_in_its_place(tmp_path, stdout, then):
    """A server sends "abc", an urgent "!" (MSG_OOB) and "def". splice stops at the urgent
    mark and never passes it: EAGAIN there (the output stalled: "more"), or 0 once the FIN
    is in (the rest was cut off as EOF: "eof"). Through a stdout pipe (one splice, socket to
    pipe) and into a file (socket, our pipe, file), every byte arrives in order, the urgent
    one inline and reported."""
    import select

    from tests.conftest import zcrelay_argv, zcrelay_env

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    out = open(tmp_path / "out", "wb") if stdout == "file" else subprocess.PIPE
    proc = subprocess.Popen(zcrelay_argv("connect", f"127.0.0.1:{server.getsockname()[1]}", "-v"),
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE, env=zcrelay_env())
    try:
        with server:
            peer, _ = server.accept()
        with peer:
            peer.sendall(b"abc")
            peer.send(b"!", socket.MSG_OOB)
            peer.sendall(b"def")
            got = b""
            if then == "more":  # no FIN yet: the urgent byte and what follows must come anyway
                while len(got) < 7:
                    assert select.select([proc.stdout], [], [], 20)[0], f"stalled after {got!r}"
                    got += os.read(proc.stdout.fileno(), 100)
            peer.shutdown(socket.SHUT_WR)
            rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    got += (tmp_path / "out").read_bytes() if stdout == "file" else rest
    assert got == b"abc!def"
    assert proc.returncode == 0, err
    assert b"received=7 spliced=6 copied=1" in err and b"urgent byte copied" in err, err


@pytest.mark.parametrize("stdin", ["file", "pipe"])
def test_copy_path_never_blocks_one_direction_on_the_other(tmp_path, stdin):
    """--no-splice copies through user space on stdio that stays blocking. A write into a full
    stdout pipe must not stop the upload: here stdout is read only once the peer has the whole
    upload, so a relay that sleeps in that write never finishes (it did, before writes were
    asked not to block with RWF_NOWAIT)."""
    import hashlib
    import threading

    from tests.conftest import zcrelay_argv, zcrelay_env

    up = random_file(tmp_path / "up", 4 << 20)
    down = os.urandom(4 << 20)
    server = socket.create_server(("127.0.0.1", 0))
    got_up = hashlib.sha256()
    upload_done = threading.Event()

    def peer() -> None:
        conn, _ = server.accept()
        with conn:
            sender = threading.Thread(target=conn.sendall, args=(down,))
            sender.start()
            while chunk := conn.recv(1 << 20):
                got_up.update(chunk)
            upload_done.set()
            sender.join(60)

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    if stdin == "file":
        source = os.open(up, os.O_RDONLY | os.O_CLOEXEC)
    else:  # a blocking pipe, fed by a thread of ours
        source, feed = os.pipe2(os.O_CLOEXEC)

        def fill() -> None:
            with open(feed, "wb") as f:
                f.write(up.read_bytes())

        threading.Thread(target=fill, daemon=True).start()
    proc = subprocess.Popen(zcrelay_argv("connect", f"127.0.0.1:{server.getsockname()[1]}", "--no-splice"),
                            stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=zcrelay_env())
    os.close(source)
    try:
        # stdout (a 64 KiB pipe) is not read until the peer has the whole upload.
        finished = upload_done.wait(20)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.close()
    assert finished, "the upload stalled behind a blocked write to stdout"
    assert got_up.hexdigest() == sha256_file(up)
    assert hashlib.sha256(out).digest() == hashlib.sha256(down).digest()
    assert proc.returncode == 0, err


def test_connect_stdout_on_a_full_disk(tmp_path, small_tmpfs):
    """stdout is a file on a full file system: one line, exit 9 (OUTPUT_ERROR), and the file
    holds a prefix of what the peer sent."""
    import threading

    from tests.conftest import zcrelay_argv, zcrelay_env

    data = os.urandom(6_000_000)
    server = socket.create_server(("127.0.0.1", 0))

    def peer() -> None:
        conn, _ = server.accept()
        with conn:
            try:
                conn.sendall(data)
            except OSError:
                pass  # the relay may close before taking it all

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    with open(small_tmpfs / "out", "wb") as out:
        proc = subprocess.run(zcrelay_argv("connect", f"127.0.0.1:{server.getsockname()[1]}"),
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
                              env=zcrelay_env(), timeout=60)
    server.close()
    thread.join(10)
    assert proc.returncode == 9, proc.stderr
    assert proc.stderr.decode().splitlines() == ["zcrelay: error: writing stdout: No space left on device"]
    kept = (small_tmpfs / "out").read_bytes()
    assert 0 < len(kept) < len(data) and data.startswith(kept)


@pytest.mark.parametrize("command", ["connect", "tee"])
@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", -15)])
def test_pipeline_commands_keep_the_default_signal_actions(command, sig, code):
    """Mid-transfer, a pipeline command acts as netcat and GNU tee do: SIGINT exits 130 with
    nothing printed (no traceback), SIGTERM ends it by its default action (143 in a shell).
    Only the servers (forward, serve, listen -k, tee --listen) stop cleanly with status 0."""
    import signal

    from tests.conftest import zcrelay_argv, zcrelay_env

    with socket.create_server(("127.0.0.1", 0)) as listener:
        argv = (["connect", f"127.0.0.1:{listener.getsockname()[1]}"] if command == "connect"
                else ["tee", os.devnull])
        proc = subprocess.Popen(zcrelay_argv(*argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=zcrelay_env())
        feeder = threading.Thread(target=_feed, args=(proc.stdin,), daemon=True)
        feeder.start()
        try:
            if command == "connect":
                peer, _ = listener.accept()
                with peer:
                    assert peer.recv(1 << 16)
                    proc.send_signal(getattr(signal, sig))
                    _, err = proc.communicate(timeout=20)
            else:
                assert proc.stdout.read(1 << 16)
                proc.send_signal(getattr(signal, sig))
                _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    feeder.join(20)
    assert proc.returncode == code, err
    assert err == b"", err


def _feed(pipe) -> None:
    """Write to a child's stdin until it goes."""
    try:
        while True:
            pipe.write(b"x" * (1 << 20))
    except (BrokenPipeError, ValueError, OSError):
        pass


def test_reset_while_both_directions_are_busy_names_both(path):
    """The peer resets (SO_LINGER 0) while stdin is still being sent and the peer's stream is
    still being received. Both directions fail, and which one hears of it first is a race, so
    the one line names both and each one's count: a netcat user must learn that the download
    on stdout is cut short as much as the upload. It named one direction at random ("while
    receiving, after N bytes"), or said "the peer stopped reading" for a reset. The counts
    are exact: stdout holds the bytes received, and the peer the start of the bytes sent."""
    import hashlib
    import re
    import selectors
    import struct

    from tests.conftest import zcrelay_argv, zcrelay_env

    up_data, down_data = os.urandom(48 << 20), os.urandom(48 << 20)
    stdout = bytearray()
    got_up = bytearray()
    down_sent = 0
    with socket.create_server(("127.0.0.1", 0)) as server:
        argv = ["connect", f"127.0.0.1:{server.getsockname()[1]}"] + (["--no-splice"] if path == "copy" else [])
        proc = subprocess.Popen(zcrelay_argv(*argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=zcrelay_env())
        threads = [threading.Thread(target=_feed_data, args=(proc.stdin, up_data), daemon=True),
                   threading.Thread(target=_read_all, args=(proc.stdout, stdout), daemon=True)]
        try:
            for thread in threads:
                thread.start()
            peer, _ = server.accept()
            # One thread owns the peer, so that its close is a real close (an RST), not one
            # that waits for a send blocked in another thread.
            peer.setblocking(False)
            with selectors.DefaultSelector() as selector:
                selector.register(peer, selectors.EVENT_READ | selectors.EVENT_WRITE)
                while len(got_up) < 4 << 20 or down_sent < 2 << 20:  # both directions busy
                    ready = selector.select(30)
                    assert ready, f"stalled at {len(got_up)} bytes up, {down_sent} down"
                    if ready[0][1] & selectors.EVENT_READ:
                        chunk = peer.recv(1 << 20)
                        assert chunk, "the upload ended early"
                        got_up += chunk
                    if ready[0][1] & selectors.EVENT_WRITE:
                        down_sent += peer.send(down_data[down_sent:down_sent + (1 << 20)])
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # an RST, with bytes still on their way both ways
            proc.wait(30)
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for thread in threads:
                thread.join(30)
            proc.stderr.close()
    assert proc.returncode == 1, err
    lines = err.decode().splitlines()
    assert len(lines) == 1, err
    match = re.fullmatch(r"zcrelay: error: connection lost while sending and receiving \(reset by the peer\): "
                         r"sent (\d+) bytes, received (\d+) bytes", lines[0])
    assert match, lines[0]
    sent, received = int(match.group(1)), int(match.group(2))
    assert len(stdout) <= down_sent and sent < len(up_data)
    assert hashlib.sha256(stdout).digest() == hashlib.sha256(down_data[:len(stdout)]).digest()
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up_data[:len(got_up)]).digest()
    # Exact on both paths: the copy path counts each write as it returns (it counted a chunk
    # only once all of it was written, so a chunk cut short was missing from the count).
    assert received == len(stdout) and sent >= len(got_up)


def _feed_data(pipe, data: bytes) -> None:
    """Write `data` to a child's stdin, stopping quietly when it goes."""
    try:
        view = memoryview(data)
        for at in range(0, len(view), 1 << 20):
            pipe.write(view[at:at + (1 << 20)])
        pipe.close()
    except (BrokenPipeError, ValueError, OSError):
        pass


def _read_all(pipe, into: bytearray) -> None:
    """Read a child's stdout to EOF (it exits) into `into`."""
    while chunk := pipe.read1(1 << 20):
        into += chunk


@pytest.mark.parametrize("command", ["connect", "listen"])
def test_a_reset_noticed_while_sending_keeps_the_bytes_already_received(command, path):
    """The peer sends more than a pipe, then more while stdout's reader has stopped, then
    resets (SO_LINGER 0) while stdin is still being sent. zcrelay hears of the reset while
    sending (the receiving direction waits on stdout); it cancelled the receiving direction
    and exited, and the bytes its kernel had acknowledged (still readable after a reset on
    Linux) or it held in a copy buffer never reached stdout. They must, in order, before the
    one-line "connection lost" and exit status 1, and "received" counts exactly what stdout
    got. With -v zcrelay says, as it happens, that it writes out what was already received:
    the test reads stdout again only after that line (or the exit)."""
    import hashlib
    import re
    import select

    from tests.conftest import LISTENING, zcrelay_argv, zcrelay_env
    from tests.pipeline_helpers import feed_until_closed, fill, read_exactly, reset, send_until_full, unacked
    from tests.traffic import read_to_eof

    first, then = os.urandom(3 << 20), os.urandom(8 << 20)
    server = socket.create_server(("127.0.0.1", 0)) if command == "connect" else None
    where = f"127.0.0.1:{server.getsockname()[1]}" if server else "127.0.0.1:0"
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    argv = zcrelay_argv(command, where, "-v", *(["--no-splice"] if path == "copy" else []))
    proc = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=subprocess.PIPE, text=True, env=zcrelay_env())
    watchdog = threading.Timer(60, proc.kill)  # bounds every wait below: a killed relay is EOF
    watchdog.start()
    os.close(in_r)
    # A way into stdout's pipe of our own (its own open file description, non-blocking), to
    # fill it as a reader that stopped reading leaves it.
    extra = os.open(f"/proc/self/fd/{out_w}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.close(out_w)
    feeder = threading.Thread(target=feed_until_closed, args=(in_w,), daemon=True)  # never read
    feeder.start()
    lines: list[str] = []
    try:
        if server is not None:
            with server:
                peer, _ = server.accept()
        else:
            while not (match := LISTENING.search(line := proc.stderr.readline())):
                assert line, f"exited before listening: {lines}"
                lines.append(line)
            host, port = match.group(1).rsplit(":", 1)
            peer = socket.create_connection((host, int(port)))
        with peer:
            sender = threading.Thread(target=peer.sendall, args=(first,))
            sender.start()
            got = read_exactly(out_r, len(first))
            sender.join(30)
            filler = fill(extra)
            # A small send buffer, so that "writable" means a third of it was acknowledged.
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)
            peer.setblocking(False)
            sent = send_until_full(peer.fileno(), then)
            poller = select.poll()
            poller.register(peer, select.POLLOUT)
            assert poller.poll(10_000), "the relay's kernel took none of it"
            acked = sent - unacked(peer.fileno())
            reset(peer)
        for line in proc.stderr:  # until zcrelay has heard of the reset, or has exited
            lines.append(line)
            if "writing out what was already received" in line:
                break
        os.close(extra)
        extra = -1
        rest = bytearray()
        read_to_eof(out_r, rest)
        proc.wait(60)
        lines.extend(proc.stderr.readlines())
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if extra >= 0:
            os.close(extra)
        feeder.join(30)
        os.close(out_r)
        proc.stderr.close()
    err = "".join(lines)
    assert proc.returncode == 1, err
    assert got == first
    tail = bytes(rest[len(filler):])
    assert hashlib.sha256(rest[:len(filler)]).digest() == hashlib.sha256(filler).digest()
    assert len(tail) >= acked > 0, (len(tail), acked, err)
    assert hashlib.sha256(tail).digest() == hashlib.sha256(then[:len(tail)]).digest()
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1, err
    match = re.fullmatch(r"zcrelay: error: connection lost while sending and receiving \(reset by the peer\): "
                         r"sent (\d+) bytes, received (\d+) bytes\n", errors[0])
    assert match, errors[0]
    assert int(match.group(2)) == len(first) + len(tail)


def test_a_reset_keeps_what_the_kernel_received_for_a_file_stdout(tmp_path, path):
    """`zcrelay connect ... > file` while stdin is still being sent: the peer sends 16 MiB
    faster than zcrelay writes them out, then resets. What zcrelay's kernel had acknowledged
    (megabytes, in its receive queue, readable after the reset on Linux) was dropped as soon
    as the sending direction heard of the reset; the file must hold all of it, in order, and
    "received" count it."""
    import hashlib
    import re

    from tests.conftest import zcrelay_argv, zcrelay_env
    from tests.pipeline_helpers import feed_until_closed, reset, unacked

    data = os.urandom(16 << 20)
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    with socket.create_server(("127.0.0.1", 0)) as server, open(tmp_path / "out", "wb") as out:
        argv = zcrelay_argv("connect", f"127.0.0.1:{server.getsockname()[1]}",
                            *(["--no-splice"] if path == "copy" else []))
        proc = subprocess.Popen(argv, stdin=in_r, stdout=out, stderr=subprocess.PIPE, env=zcrelay_env())
        os.close(in_r)
        feeder = threading.Thread(target=feed_until_closed, args=(in_w,), daemon=True)  # never read
        feeder.start()
        try:
            peer, _ = server.accept()
            with peer:
                peer.settimeout(60)
                peer.sendall(data)
                acked = len(data) - unacked(peer.fileno())
                reset(peer)
            err = proc.communicate(timeout=60)[1].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            feeder.join(30)
    got = (tmp_path / "out").read_bytes()
    assert proc.returncode == 1, err
    assert len(got) >= acked, (len(got), acked, err)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data[:len(got)]).digest()
    match = re.fullmatch(r"zcrelay: error: connection lost while sending and receiving \(reset by the peer\): "
                         r"sent \d+ bytes, received (\d+) bytes\n", err)
    assert match, err
    assert int(match.group(1)) == len(got)
