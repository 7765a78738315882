"""Relay capture (`zcrelay tee --listen ... --capture-dir`, `zcrelay forward --capture-dir`):
a real zcrelay subprocess between real loopback sockets, every byte checked by SHA-256."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import stat
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import zcrelay_argv, zcrelay_env
from tests.traffic import TwoWayFlood

CONNECTIONS = 32


def capturing_relay(zcrelay, command: str, target: "Target", directory, *flags: str):
    """A relay to `target` that captures into `directory`: "tee" (tee --listen), "forward",
    or "workers" (forward --workers 2)."""
    if command == "tee":
        return zcrelay("tee", "--listen", "0", "--target", f"127.0.0.1:{target.port}",
                       "--capture-dir", str(directory), *flags)
    workers = ["--workers", "2"] if command == "workers" else []
    return zcrelay("forward", "0", f"127.0.0.1:{target.port}", "--capture-dir", str(directory), *workers, *flags)


class Target:
    """A loopback server: per connection, receives until EOF (hashing) while sending its own
    random bytes; `half_close` connections send only after the client's EOF."""

    def __init__(self, sizes: dict[int, int] | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.received: dict[int, str] = {}  # client port → sha256 of what arrived
        self.sent: dict[int, str] = {}
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.down_size = sizes or {}
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                # the relay connects from its own port: learn the client's from the first line
                header = b""
                while not header.endswith(b"\n"):
                    header += conn.recv(1)
                client_port, size, half = (int(x) for x in header.split())
                data = os.urandom(size)
                self.sent[client_port] = hashlib.sha256(data).hexdigest()
                h = hashlib.sha256(header)
                sender = threading.Thread(target=_send_all, args=(conn, data))
                if not half:
                    sender.start()
                while chunk := conn.recv(1 << 20):
                    h.update(chunk)
                self.received[client_port] = h.hexdigest()
                if half:
                    sender.start()
                sender.join()
        except BaseException as exc:  # noqa: BLE001  (reported by the test)
            self.errors.append(exc)

    def close(self) -> None:
        """Stop accepting and let every handler finish recording what it received."""
        self.sock.close()
        for t in list(self.threads):
            t.join(timeout=60)


def _send_all(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def client(port: int, up_size: int, down_size: int, half: bool, results: dict, errors: list) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            me = sock.getsockname()[1]
            data = f"{me} {down_size} {int(half)}\n".encode() + os.urandom(up_size)
            results[me] = {"up": hashlib.sha256(data).hexdigest()}
            sender = threading.Thread(target=_send_all, args=(sock, data))
            sender.start()
            h = hashlib.sha256()
            while chunk := sock.recv(1 << 20):
                h.update(chunk)
            sender.join()
            results[me]["down"] = h.hexdigest()
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)


def run_clients(port: int, sizes: list[tuple[int, int, bool]]) -> dict:
    results: dict = {}
    errors: list = []
    threads = [threading.Thread(target=client, args=(port, up, down, half, results, errors))
               for up, down, half in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sidecars(directory: Path) -> dict[int, dict]:
    """client port → sidecar record."""
    out = {}
    for path in directory.glob("*.json"):
        record = json.loads(path.read_text())
        out[int(record["peer"].rsplit(":", 1)[1])] = record
    return out


# One warning line per connection whose capture lost anything (CaptureSession.close).
CAPTURE_LOST = re.compile(r"conn=(\d+) capture stopped: (.+); the relay goes on without it$")
CLOSE_LINE = re.compile(r"conn=(\d+) .* up=(\d+) down=(\d+) .*close=")


def _lines_by_conn(err: str, pattern: re.Pattern) -> dict[int, list[re.Match]]:
    found: dict[int, list[re.Match]] = {}
    for line in err.splitlines():
        if match := pattern.search(line):
            found.setdefault(int(match.group(1)), []).append(match)
    return found


@pytest.mark.parametrize("command", ["tee", "forward", "workers"])
def test_32_connections_captured_whole(zcrelay, tmp_path, command):
    """Must-show 2: 32 concurrent connections, random data both ways (half of them
    half-closed: the target answers only after the client's EOF); each direction's file has
    the SHA-256 of what crossed the relay in that direction. "workers": forward --workers 2,
    whose workers number connections apart, so no file name is taken twice."""
    target = Target()
    cap = tmp_path / "cap"
    cap.mkdir()
    relay = capturing_relay(zcrelay, command, target, cap)
    sizes = [((i * 131071) % (3 << 20) + 1, (i * 65537) % (2 << 20), i % 2 == 1) for i in range(CONNECTIONS)]
    results = run_clients(relay.port, sizes)
    relay.wait_for_lines(" close=", CONNECTIONS)
    code, err = relay.stop()
    target.close()
    assert code == 0, err
    assert not target.errors, target.errors
    records = sidecars(cap)
    assert len(records) == CONNECTIONS
    for port, hashes in results.items():
        assert target.received[port] == hashes["up"]  # the relay itself is intact
        assert target.sent[port] == hashes["down"]
        record = records[port]
        assert record["complete"] is True, record
        assert record["end"] is not None and record["close"] == "eof"
        for direction in ("up", "down"):
            path = cap / record[direction]["file"]
            assert sha256_file(path) == hashes[direction], (port, direction)
            assert record[direction]["captured_bytes"] == record[direction]["relayed_bytes"] == path.stat().st_size
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "100.00% spliced" in err


def test_capture_refuses_existing_file_names(tmp_path):
    """O_EXCL | O_NOFOLLOW: a planted symlink is never followed (checked on the session)."""
    from zcrelay import capture

    wall = 1700000000.25
    fields = {"time": capture.stamp(wall), "conn": 7, "peer": capture.safe_peer("127.0.0.1:9")}
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / capture.TEMPLATE.format(direction="up", **fields)).symlink_to(victim)
    session = capture.open_session(str(tmp_path), 7, "127.0.0.1:9", "t", wall)
    try:
        up, down = session.captures
        assert up is None and down is not None
        assert "File exists" in session.notes["up"]
    finally:
        session.close()
    assert victim.read_text() == "keep"


def test_full_disk_stops_capture_not_relay(zcrelay, small_tmpfs):
    """Must-show 3: a capture that fills its file system stops with a clear log line (one per
    connection, test_a_full_disk_logs_one_line_per_connection) and is marked incomplete; the
    relayed bytes still arrive intact, both ways."""
    target = Target()
    relay = zcrelay("tee", "--listen", "0", "--target", f"127.0.0.1:{target.port}", "--capture-dir", str(small_tmpfs))
    results = run_clients(relay.port, [(8 << 20, 6 << 20, False), (100, 50, True)])
    relay.wait_for_lines(" close=", 2)
    code, err = relay.stop()
    target.close()
    assert code == 0, err
    assert not target.errors
    for port, hashes in results.items():
        assert target.received[port] == hashes["up"]
        assert target.sent[port] == hashes["down"]
    assert "No space left on device (ENOSPC)" in err
    assert "relay goes on without it" in err
    records = sidecars(small_tmpfs)
    big = [r for r in records.values() if r["up"]["relayed_bytes"] > 1 << 20]
    assert big, records
    for record in big:
        assert record["complete"] is False
        failed = [d for d in ("up", "down") if record[d]["error"]]
        assert failed and all("ENOSPC" in record[d]["error"] for d in failed)
        for d in failed:
            assert record[d]["captured_bytes"] < record[d]["relayed_bytes"]
    # One line per connection whose capture lost anything, naming what the sidecar says
    lost = _lines_by_conn(err, CAPTURE_LOST)
    assert all(len(matches) == 1 for matches in lost.values()), err
    by_conn = {record["conn"]: record for record in records.values()}
    for conn, record in by_conn.items():
        failed = [d for d in ("up", "down") if record[d]["error"]]
        if not failed:
            assert conn not in lost, err
            continue
        [line] = lost[conn]
        for d in failed:
            assert f"{d} after {record[d]['captured_bytes']} bytes" in line.group(2), (record, err)
    for conn in set(lost) - set(by_conn):
        assert "sidecar not written" in lost[conn][0].group(2), err


def test_removed_directory_does_not_stop_the_relay(zcrelay, tmp_path):
    target = Target()
    cap = tmp_path / "cap"
    cap.mkdir()
    relay = zcrelay("forward", "0", f"127.0.0.1:{target.port}", "--capture-dir", str(cap))
    cap.rmdir()
    results = run_clients(relay.port, [(1 << 20, 1 << 20, False)])
    relay.wait_for_lines(" close=", 1)
    code, err = relay.stop()
    target.close()
    assert code == 0, err
    for port, hashes in results.items():
        assert target.received[port] == hashes["up"] and target.sent[port] == hashes["down"]
    assert "No such file or directory" in err


def test_capture_dir_must_exist(tmp_path):
    r = subprocess.run([*zcrelay_argv("tee", "--listen", "0", "--target", "127.0.0.1:9",
                                                           "--capture-dir", str(tmp_path / "nope"))],
                       capture_output=True, env=zcrelay_env(), timeout=30)
    assert r.returncode == 2
    assert b"does not exist" in r.stderr


@pytest.mark.parametrize("command", ["tee", "forward"])
def test_capture_dir_must_be_writable(tmp_path, command):
    """A directory zcrelay cannot create files in (here its permissions; a read-only mount
    alike) was accepted, and then every connection logged that its capture failed. Root
    writes anywhere: as root, zcrelay runs without CAP_DAC_OVERRIDE, as a user would."""
    cap = tmp_path / "ro"
    cap.mkdir(mode=0o555)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    args = ["--listen", "127.0.0.1:0", "--target", "127.0.0.1:9"] if command == "tee" else ["127.0.0.1:0", "127.0.0.1:9"]
    r = subprocess.run([*prefix, *zcrelay_argv(command, *args, "--capture-dir", str(cap))],
                       capture_output=True, text=True, env=zcrelay_env(), timeout=30)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "is not writable" in r.stderr, r.stderr
    assert "listening on" not in r.stderr


@pytest.mark.parametrize("option", [["-a"], ["--append"], ["-p"], ["--output-error", "exit"],
                                    ["--output-error", "bogus"]])
def test_capture_refuses_the_pipeline_modes_options(tmp_path, option):
    """-a, -p and --output-error (a bad MODE too) were ignored in silence by relay capture,
    which then ran as if they had not been given."""
    r = subprocess.run(zcrelay_argv("tee", *option, "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9",
                                    "--capture-dir", str(tmp_path)),
                       capture_output=True, text=True, env=zcrelay_env(), timeout=30)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not for relay capture" in r.stderr, r.stderr
    assert "listening on" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_capture_payload_moves_only_by_tee_and_splice(zcrelay, tmp_path):
    """Must-show 4 for relay capture: under strace -f -yy, the payload's sockets, pipes and
    capture files see no read/write-family call (trio's wake-up socketpair moves 1 byte)."""
    from tests.test_tee import check_zero_copy

    target = Target()
    cap = tmp_path / "cap"
    cap.mkdir()
    trace = tmp_path / "trace"
    prefix = ["strace", "-f", "-yy", "-s", "0", "-o", str(trace), "-e",
              "trace=read,write,readv,writev,pread64,pwrite64,sendto,recvfrom,sendmsg,recvmsg,tee,splice"]
    relay = zcrelay("forward", "0", f"127.0.0.1:{target.port}", "--capture-dir", str(cap), prefix=prefix)
    results = run_clients(relay.port, [(16 << 20, 16 << 20, False)])
    # The clients are done; wait for the relay's own line for the connection (its capture is
    # finished then), not just for the bytes.
    relay.wait_for_lines(" close=", 1)
    # SIGTERM goes to zcrelay itself, not to strace (which would only detach)
    children = Path(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read_text().split()
    os.kill(int(children[0]), 15)
    code, err = relay.stop(sig=0)
    target.close()
    assert code == 0, err
    (record,) = sidecars(cap).values()
    assert record["complete"] is True
    files = [str(cap / record[d]["file"]) for d in ("up", "down")]
    (port,) = results
    moved = check_zero_copy(trace.read_text(), 32 << 20, *files)
    assert moved["tee"] >= 32 << 20


def test_client_reset_is_passed_on_with_capture(zcrelay, tmp_path):
    """A client that resets mid-stream: with --capture-dir, as without, the relay logs
    close=reset and resets the target's connection (trio's nursery wraps the PeerGone in an
    ExceptionGroup; the capture path must hand the relay the error itself)."""
    cap = tmp_path / "cap"
    cap.mkdir()
    server = socket.create_server(("127.0.0.1", 0))
    relay = zcrelay("forward", "0", f"127.0.0.1:{server.getsockname()[1]}", "--capture-dir", str(cap))
    client_sock = socket.create_connection(("127.0.0.1", relay.port))
    conn, _ = server.accept()
    client_sock.sendall(os.urandom(100_000))
    got = 0
    while got < 100_000:  # everything arrived: the relay holds nothing more for this direction
        chunk = conn.recv(1 << 20)
        assert chunk
        got += len(chunk)
    client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client_sock.close()  # RST
    conn.settimeout(30)
    with pytest.raises(ConnectionResetError):
        while conn.recv(1 << 16):
            pass
    conn.close()
    server.close()
    relay.wait_for_lines(" close=", 1)
    code, err = relay.stop()
    assert code == 0, err
    line = next(l for l in err.splitlines() if "conn=" in l)
    assert "close=reset" in line, err
    assert "internal" not in err and "Traceback" not in err, err


def _offer_chunks(capture, chunks) -> None:
    """Feed `capture` (a CaptureFile) as a relay direction does, in its own trio run: for each
    (pipe, chunk), write the chunk into the pipe, offer it to the capture, then read it back
    out (the relay's pump, in short) and check it; then close the capture's input."""
    import trio

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(capture.writer)
            for src, chunk in chunks:
                view = memoryview(chunk)
                while view:  # a pipe write may be short
                    view = view[os.write(src.w, view):]
                src.held = len(chunk)
                await capture.offer(src)
                got = b""
                while len(got) < len(chunk):
                    got += os.read(src.r, len(chunk) - len(got))
                assert got == chunk
                src.held = 0
            capture.close_input()

    trio.run(main)


def test_capture_copy_fallback_covers_every_chunk(tmp_path, monkeypatch):
    """In-process, real pipes and a real file: splice(2) into the capture file refused with
    EINVAL (a file system without splice_write). The copy fallback must take every chunk, not
    only the first; the capture stays complete."""
    import errno

    from zcrelay import capture as capturing, syscalls
    from zcrelay.pipes import Pipe

    fd = os.open(tmp_path / "cap", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    real_splice = syscalls.splice

    def splice(src, dst, n, *args, **kwargs):
        if dst == fd:
            raise OSError(errno.EINVAL, "refused")
        return real_splice(src, dst, n, *args, **kwargs)

    monkeypatch.setattr(syscalls, "splice", splice)
    capture = capturing.CaptureFile(fd, "cap")
    chunks = [os.urandom(10_000 + i) for i in range(4)]
    src = Pipe.open(1 << 16)
    try:
        _offer_chunks(capture, [(src, chunk) for chunk in chunks])
    finally:
        src.close()
        capture.close()
        os.close(fd)
    assert capture.error is None, capture.error
    assert capture.fallback == "splice refused (EINVAL)"
    assert (tmp_path / "cap").read_bytes() == b"".join(chunks)
    assert capture.captured == sum(map(len, chunks))


def test_connection_open_at_shutdown_is_logged_as_shutdown(zcrelay, tmp_path):
    """SIGTERM while a captured connection is open: its line says close=shutdown (the
    cancellation reaches it through the capture's nursery, inside an exception group)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        relay = zcrelay("forward", "0", f"127.0.0.1:{listener.getsockname()[1]}", "--capture-dir", str(tmp_path))
        with socket.create_connection(("127.0.0.1", relay.port)) as client:
            client.sendall(b"hello")
            target, _ = listener.accept()
            with target:
                assert target.recv(10) == b"hello"
                code, err = relay.stop()
    assert code == 0, err
    [line] = [l for l in err.splitlines() if " close=" in l]
    assert line.endswith("close=shutdown"), line


def test_copy_path_captures_whole(zcrelay, tmp_path):
    """With --no-splice the capture is written from the copy buffer (mover.copy_stream's
    on_read): each file still has the SHA-256 of what crossed the relay in its direction."""
    target = Target()
    cap = tmp_path / "cap"
    cap.mkdir()
    relay = zcrelay("forward", "0", f"127.0.0.1:{target.port}", "--capture-dir", str(cap), "--no-splice")
    results = run_clients(relay.port, [(3 << 20, 2 << 20, False), (1 << 20, 3 << 20, True)])
    relay.wait_for_lines(" close=", 2)
    code, err = relay.stop()
    target.close()
    assert code == 0, err
    records = sidecars(cap)
    assert len(records) == 2
    for port, hashes in results.items():
        assert target.received[port] == hashes["up"] and target.sent[port] == hashes["down"]
        for direction in ("up", "down"):
            assert sha256_file(cap / records[port][direction]["file"]) == hashes[direction], (port, direction)
    assert "0.00% spliced" in err


def test_shutdown_mid_stream_leaves_complete_captures(zcrelay, tmp_path, path):
    """SIGTERM while bytes flow both ways through a captured connection. A chunk already
    tee'd for the file (often already relayed) is still written as the connection is
    cancelled: each file is a prefix of what its sender sent, holds at least every byte
    relayed, and its direction is complete in the sidecar."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        copy = ["--no-splice"] if path == "copy" else []
        relay = zcrelay("forward", "0", f"127.0.0.1:{listener.getsockname()[1]}", "--capture-dir", str(tmp_path), *copy)
        client = socket.create_connection(("127.0.0.1", relay.port))
        target, _ = listener.accept()
        flood = TwoWayFlood(client, target, 8 << 20)
        assert flood.flowing.wait(60), flood.received
        code, err = relay.stop()  # SIGTERM, both ways in full flow
        flood.stop()
    assert code == 0, err
    [record] = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert record["close"] == "shutdown" and record["end"] is not None, (record, err)
    for direction in ("up", "down"):
        info = record[direction]
        captured = (tmp_path / info["file"]).read_bytes()
        assert info["captured_bytes"] == len(captured) >= info["relayed_bytes"] >= 8 << 20, info
        assert captured == flood.sent_prefix(direction, len(captured)), f"{direction}: the capture is not what was sent"
        assert info["complete"] is True, info
    assert record["complete"] is True, record


async def test_a_bug_meeting_a_shutdown_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    """A connection task whose cleanup fails (a bug) as shutdown cancels it ends with both a
    Cancelled and the bug in one exception group. The bug is logged as that connection's
    internal-error; only the cancellation goes on, so the forwarder stops cleanly (no
    traceback for the CLI to print). In process, with relay() replaced by one that fails so."""
    import logging

    import trio

    from zcrelay import forward
    from zcrelay.addresses import parse

    in_relay = trio.Event()

    async def relay_failing_in_cleanup(*args, **kwargs):
        async def cleanup_fails() -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise RuntimeError("bug in cleanup")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cleanup_fails)
            in_relay.set()
            await trio.sleep_forever()

    monkeypatch.setattr(forward, "relay", relay_failing_in_cleanup)
    caplog.set_level(logging.INFO, logger="zcrelay")
    with socket.socket() as target_listener:
        target_listener.bind(("127.0.0.1", 0))
        target_listener.listen()
        rule = forward.Rule(parse("127.0.0.1:0", listen=True),
                            parse(f"127.0.0.1:{target_listener.getsockname()[1]}", listen=False))
        forwarder = forward.Forwarder(forward.ForwardConfig(rules=(rule,), capture_dir=str(tmp_path)))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                [bound] = await nursery.start(forwarder.serve)
                client = trio.socket.socket()
                with client:
                    await client.connect(("127.0.0.1", int(bound.address.rsplit(":", 1)[1])))
                    await in_relay.wait()
                    nursery.cancel_scope.cancel()  # shutdown, as SIGTERM does
    lines = [r.getMessage() for r in caplog.records if "conn=" in r.getMessage()]
    assert len(lines) == 1 and "close=internal-error (RuntimeError: bug in cleanup)" in lines[0], lines


def test_a_later_chunk_from_a_larger_pipe_is_captured_whole(tmp_path):
    """In-process, real pipes and a real file. A direction's pipe can change between chunks:
    an idle stream gives its pipe back to the pool, and under the kernel's pipe budget
    (pipe-user-pages-soft) a new pipe is smaller than a pooled one. The capture's private
    pipe, sized for the first chunk's pipe, took only part of a later chunk from a larger
    pipe: a RuntimeError, which ended the connection (close=internal-error). The private pipe
    must follow the source's size, and the file hold every chunk in order."""
    from zcrelay import capture as capturing
    from zcrelay.pipes import Pipe

    fd = os.open(tmp_path / "cap", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    capture = capturing.CaptureFile(fd, "cap")
    small, large = Pipe.open(1 << 12), Pipe.open(1 << 20)
    assert small.size < large.size
    chunks = [(small, os.urandom(small.size)), (large, os.urandom(large.size)), (small, os.urandom(100))]
    try:
        _offer_chunks(capture, chunks)
    finally:
        small.close()
        large.close()
        capture.close()
        os.close(fd)
    assert capture.error is None, capture.error
    assert (tmp_path / "cap").read_bytes() == b"".join(c for _, c in chunks)
    assert capture.captured == sum(len(c) for _, c in chunks)


def test_a_sidecar_written_in_short_writes_is_whole(tmp_path, monkeypatch):
    """A write(2) to a file may take fewer bytes than asked (a disk filling up): the sidecar
    was written with one os.write and its tail silently dropped, leaving invalid JSON."""
    from zcrelay import capture as capturing
    from zcrelay.stats import Flow

    real_write = os.write
    monkeypatch.setattr(capturing.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    session = capturing.open_session(str(tmp_path), 7, "127.0.0.1:5000", "127.0.0.1:80")
    try:
        session.write_sidecar(Flow(), Flow(), close="eof", ended=1.0)
    finally:
        session.close()
    [sidecar] = tmp_path.glob("*.json")
    record = json.loads(sidecar.read_text())
    assert record["close"] == "eof", record


def _fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte (bounded: the tmpfs is 2 MiB)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for _ in range(4096):
            try:
                f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        else:
            raise AssertionError("the tmpfs never filled")
        for size in (512, 64, 1):  # the last partial page, if any
            while True:
                try:
                    if not f.write(b"\0" * size):
                        break
                except OSError:
                    break
    return filler


@pytest.mark.parametrize("space_at_end", [False, True])
def test_a_sidecar_never_written_is_not_left_empty(small_tmpfs, space_at_end):
    """A connection that starts on a full disk: the sidecar's name is taken (O_EXCL) but its
    record cannot be written. An empty *.json was left for good, which no JSON reader takes.
    Once space is free the end record is written; if it never is, the empty file is removed."""
    from zcrelay import capture as capturing
    from zcrelay.stats import Flow

    filler = _fill(small_tmpfs)
    session = capturing.open_session(str(small_tmpfs), 7, "127.0.0.1:5000", "127.0.0.1:80")
    try:
        if space_at_end:
            filler.unlink()
        session.write_sidecar(Flow(), Flow(), close="eof", ended=2.0)
    finally:
        session.close()
    sidecars_left = list(small_tmpfs.glob("*.json"))
    if space_at_end:
        [sidecar] = sidecars_left
        assert json.loads(sidecar.read_text())["close"] == "eof"
    else:
        assert sidecars_left == []
    assert not [p for p in small_tmpfs.iterdir() if p.name.endswith(".tmp")]


def test_a_private_pipe_refused_is_named_as_such(tmp_path, monkeypatch):
    """Past the fd limit a capture's private pipe cannot be made (pipe2: EMFILE): the log line
    and the sidecar said "tee: Too many open files (EMFILE)", an errno tee(2) never gives,
    which sent a reader to the wrong syscall. The relay's chunk is untouched."""
    import errno as errno_mod

    from zcrelay import capture as capturing
    from zcrelay.pipes import Pipe

    src = Pipe.open(1 << 16)
    fd = os.open(tmp_path / "cap", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    capture = capturing.CaptureFile(fd, "cap")

    def no_pipe(*args, **kwargs):
        raise OSError(errno_mod.EMFILE, os.strerror(errno_mod.EMFILE))

    monkeypatch.setattr(capturing.Pipe, "open", no_pipe)
    try:
        _offer_chunks(capture, [(src, b"chunk")])
    finally:
        src.close()
        capture.close()
        os.close(fd)
    assert capture.error == "private pipe: Too many open files (EMFILE)", capture.error


@pytest.mark.parametrize("command, verbose", [("tee", False), ("forward", False), ("forward", True)])
def test_a_full_disk_logs_one_line_per_connection(zcrelay, small_tmpfs, command, verbose):
    """A capture directory on a full disk: each connection loses its up file, its down file
    and its sidecar. That was a warning for each, three lines per connection, a flood with
    many connections. Now exactly one line per connection says what was lost and why, and
    nothing else on stderr mentions the capture's errors (without -v); with -v the details
    are there too, and the one line still once. The relay is untouched, both ways."""
    _fill(small_tmpfs)
    target = Target()
    flags = ["-v"] if verbose else []
    relay = capturing_relay(zcrelay, command, target, small_tmpfs, *flags)
    connections = 6
    sizes = [((i + 1) * 300_001, (i + 1) * 200_003, i % 2 == 1) for i in range(connections)]
    results = run_clients(relay.port, sizes)
    relay.wait_for_lines(" close=", connections)
    code, err = relay.stop()
    target.close()
    assert code == 0, err
    assert not target.errors, target.errors
    for port, hashes in results.items():
        assert target.received[port] == hashes["up"], port  # the relay itself is intact
        assert target.sent[port] == hashes["down"], port
    closes = _lines_by_conn(err, CLOSE_LINE)
    lost = _lines_by_conn(err, CAPTURE_LOST)
    assert len(closes) == connections and all(len(v) == 1 for v in closes.values()), err
    assert sorted(lost) == sorted(closes), err
    for conn, matches in lost.items():
        assert len(matches) == 1, (conn, err)  # exactly one line for the connection
        what = re.fullmatch(r"No space left on device \(ENOSPC\): up after (\d+) bytes, "
                            r"down after (\d+) bytes, sidecar not written", matches[0].group(2))
        assert what, matches[0].group(0)
        [close] = closes[conn]
        # what the files kept is less than what was relayed: the line names a real loss
        assert int(what.group(1)) < int(close.group(2)) and int(what.group(2)) < int(close.group(3)), err
    enospc = [line for line in err.splitlines() if "ENOSPC" in line]
    if verbose:  # the details, at debug: each part as it failed
        for conn in closes:
            for detail in (f"conn={conn} capture up stopped after", f"conn={conn} capture down stopped after",
                           f"conn={conn} capture sidecar "):
                assert any(detail in line for line in enospc), (detail, err)
    else:
        # nothing else: no spam, but the one alert at the first loss (the next may come a
        # minute later at the earliest: test_a_long_connection_is_reported_when_its_capture_stops)
        [alert] = [line for line in enospc if "capture into" in line]
        assert f"capture into {small_tmpfs} failing: No space left on device (ENOSPC)" in alert, err
        assert len(enospc) == connections + 1, err
    assert list(small_tmpfs.glob("*.json")) == []  # never left empty (test_a_sidecar_never...)


@pytest.mark.parametrize("command", ["tee", "forward"])
def test_a_long_connection_is_reported_when_its_capture_stops(zcrelay, small_tmpfs, command):
    """A connection that goes on after its capture fills the disk: its own line comes when it
    ends, so a warning must come while it is still open (it could be hours). The client
    sends 3 MiB into a 2 MiB tmpfs and keeps the connection open until the alert is on
    stderr; then it finishes, and the connection's line and its bytes follow as usual."""
    target = Target()
    relay = capturing_relay(zcrelay, command, target, small_tmpfs)
    data = os.urandom(3 << 20)
    with socket.create_connection(("127.0.0.1", relay.port)) as client:
        header = f"{client.getsockname()[1]} 1000 0\n".encode()
        client.sendall(header + data)
        relay.wait_for_lines("capture into", 1)  # the connection is still open: no EOF sent
        assert not any(" close=" in line for line in relay.stderr_lines), relay.stderr_lines
        client.shutdown(socket.SHUT_WR)
        received = b"".join(iter(lambda: client.recv(1 << 16), b""))
    relay.wait_for_lines(" close=", 1)
    code, err = relay.stop()
    target.close()
    assert code == 0, err
    assert not target.errors, target.errors
    port = int(header.split()[0])
    assert target.received[port] == hashlib.sha256(header + data).hexdigest()
    assert target.sent[port] == hashlib.sha256(received).hexdigest() and len(received) == 1000
    [alert] = [line for line in err.splitlines() if "capture into" in line]
    assert re.search(rf"capture into {re.escape(str(small_tmpfs))} failing: No space left on device "
                     rf"\(ENOSPC\) \(conn=1 up after \d+ bytes\)", alert), alert
    assert len(_lines_by_conn(err, CAPTURE_LOST)[1]) == 1, err


def test_the_alert_of_one_error_in_one_directory_comes_once_a_minute(monkeypatch, caplog):
    """_alert, on a clock of the test's own: the first ENOSPC in a directory is a warning, the
    same error there within a minute is not, another error or directory is, and a minute
    later the first is again."""
    import logging

    from zcrelay import capture

    clock = [1000.0]
    monkeypatch.setattr(capture.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(capture, "_alerted", {})
    caplog.set_level(logging.WARNING, logger="zcrelay")
    for when, directory, err in [(0, "/a", errno.ENOSPC), (30, "/a", errno.ENOSPC), (31, "/a", errno.EIO),
                                 (32, "/b", errno.ENOSPC), (59.9, "/a", errno.ENOSPC), (60, "/a", errno.ENOSPC)]:
        clock[0] = 1000.0 + when
        capture._alert(directory, err, 1, "up after 0 bytes")
    said = [r.getMessage().split(" (conn=")[0] for r in caplog.records]
    assert said == ["capture into /a failing: No space left on device (ENOSPC)",
                    "capture into /a failing: Input/output error (EIO)",
                    "capture into /b failing: No space left on device (ENOSPC)",
                    "capture into /a failing: No space left on device (ENOSPC)"]


def test_one_line_names_each_part_with_its_own_reason(tmp_path, caplog):
    """In process, a real directory: the up file's name is taken (a planted symlink: EEXIST)
    and the down capture's private pipe is refused (EMFILE). The one line groups the parts by
    reason and names the failed step where "after N bytes" does not say it; a second close
    logs nothing more."""
    import logging

    from zcrelay import capture
    from zcrelay.stats import Flow

    wall = 1700000000.25
    fields = {"time": capture.stamp(wall), "conn": 7, "peer": capture.safe_peer("127.0.0.1:9")}
    (tmp_path / capture.TEMPLATE.format(direction="up", **fields)).symlink_to(tmp_path / "victim")
    caplog.set_level(logging.WARNING, logger="zcrelay")
    session = capture.open_session(str(tmp_path), 7, "127.0.0.1:9", "t", wall)
    try:
        up, down = session.captures
        assert up is None and down is not None
        down.fail(errno.EMFILE, "private pipe")
        session.write_sidecar(Flow(), Flow(), close="eof", ended=wall + 1)  # as forward's end does
        # Until the connection's capture is over, only the directory's alerts: one per error
        alerts = [f"capture into {tmp_path} failing: File exists (EEXIST) (conn=7 up not started); "
                  f"each connection that loses capture is named when it ends",
                  f"capture into {tmp_path} failing: Too many open files (EMFILE) (conn=7 down after "
                  f"0 bytes); each connection that loses capture is named when it ends"]
        assert [r.getMessage() for r in caplog.records] == alerts
    finally:
        session.close()
    session.close()
    assert [r.getMessage() for r in caplog.records] == alerts + [
        "conn=7 capture stopped: File exists (EEXIST): up not started; "
        "Too many open files (EMFILE): down after 0 bytes (private pipe); the relay goes on without it"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert "EMFILE" in record["down"]["error"] and "EEXIST" in record["up"]["error"]
