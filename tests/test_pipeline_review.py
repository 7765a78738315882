"""`zcrelay connect` and `listen` as a demanding netcat user drives them: stdio of odd kinds,
urgent data, and what the manual promises. Subprocess tests; every wait is bounded."""

from __future__ import annotations

import socket
import subprocess

from tests.conftest import zcrelay_argv, zcrelay_env


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"EOF after {got!r}"
        got += chunk
    return got


def _recv_to_eof(sock: socket.socket) -> bytes:
    got = bytearray()
    while chunk := sock.recv(1 << 16):
        got += chunk
    return bytes(got)


def test_a_tcp_socket_stdin_passes_urgent_bytes_in_their_place(path):
    """stdin is a TCP socket (as inetd or systemd's Accept=yes hand it over). Its sender sends
    "abc", two urgent bytes (MSG_OOB) and "def". The manual promises that an urgent byte is
    relayed in its place (only TCP's single mark may drop one that arrived before zcrelay
    ran). A socket stdin is copied through user space, and the copy read it without
    SO_OOBINLINE, so the kernel skipped every urgent byte: the peer got "abcdef"."""
    with socket.create_server(("127.0.0.1", 0)) as sink, socket.create_server(("127.0.0.1", 0)) as side:
        sender = socket.create_connection(side.getsockname())
        stdin, _ = side.accept()
        argv = zcrelay_argv("connect", f"127.0.0.1:{sink.getsockname()[1]}",
                            *(["--no-splice"] if path == "copy" else []))
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=zcrelay_env())
        stdin.close()
        try:
            peer, _ = sink.accept()
            with peer, sender:
                peer.settimeout(20)
                sender.sendall(b"abc")
                got = _recv_exactly(peer, 3)  # zcrelay is copying: from here on, urgent bytes
                sender.send(b"!", socket.MSG_OOB)
                sender.send(b"?", socket.MSG_OOB)
                sender.sendall(b"def")
                sender.shutdown(socket.SHUT_WR)
                got += _recv_to_eof(peer)
            err = proc.communicate(timeout=20)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert got == b"abc!?def"
    assert proc.returncode == 0, err


def test_a_request_written_in_two_pieces_is_not_held_back_by_nagle():
    """Request/response over `coproc zcrelay connect`: the client writes a request in two
    pieces (a header, then its body) and waits for the answer. With Nagle's algorithm on, the
    second piece waited in zcrelay's kernel for the ACK of the first, which the server's
    kernel delays (40 ms on Linux): every exchange took 40 ms or more, as with nc and socat.
    zcrelay's own pipes avoid SPLICE_F_MORE for this very reason, and forward sets
    TCP_NODELAY on both sides; connect and listen must not stall either. The body is written
    once the server has the header (its own readiness signal), so the two pieces are two
    segments."""
    import statistics
    import threading
    import time

    rounds = 15
    header_in = threading.Event()
    body_sent = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as server:

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(20)
                for _ in range(rounds):
                    _recv_exactly(conn, 7)  # "header-"
                    header_in.set()
                    assert body_sent.wait(20)
                    body_sent.clear()
                    _recv_exactly(conn, 5)  # "body\n"
                    conn.sendall(b"ok\n")
                _recv_to_eof(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        proc = subprocess.Popen(zcrelay_argv("connect", f"127.0.0.1:{server.getsockname()[1]}"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=zcrelay_env(), bufsize=0)
        times = []
        try:
            for _ in range(rounds):
                proc.stdin.write(b"header-")
                assert header_in.wait(20), "the header never arrived"
                header_in.clear()
                start = time.monotonic()
                proc.stdin.write(b"body\n")
                body_sent.set()
                assert proc.stdout.read(3) == b"ok\n"
                times.append(time.monotonic() - start)
            err = proc.communicate(timeout=20)[1]  # closes stdin: EOF, the server closes
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        thread.join(20)
    assert proc.returncode == 0, err
    assert statistics.median(times) < 0.02, [round(t * 1000, 1) for t in times]


def test_a_target_that_sends_then_resets_at_once_is_a_lost_connection_not_a_refused_one():
    """The target accepts, sends "bye" and resets before zcrelay has seen its connect complete.
    zcrelay said "cannot connect ...: connection reset by peer", exit 6 (the target refused,
    unreachable or silent), and wrote nothing, though the target was reached and its bytes
    were readable (8 of 8 runs on loopback). Now stdout gets them and the reset is a lost
    connection (exit 1) that says how much was received."""
    import struct

    with socket.create_server(("127.0.0.1", 0)) as target:
        proc = subprocess.Popen(zcrelay_argv("connect", f"127.0.0.1:{target.getsockname()[1]}"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=zcrelay_env())
        try:
            target.settimeout(20)
            conn, _ = target.accept()
            conn.send(b"bye")
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert (proc.returncode, out) == (1, b"bye"), err
    assert b"received 3 bytes" in err and b"cannot connect" not in err, err


async def test_a_connect_that_sees_the_reset_first_keeps_what_the_target_sent(monkeypatch):
    """The race behind the test above, made certain: the target accepts, sends "bye" and
    resets before zcrelay's connect reads SO_ERROR, which then says ECONNRESET. With
    keep_reset (connect's CLI passes it), net.connect hands the socket over, and "bye" is
    read before the reset; without it, a ConnectError ("cannot connect") as before."""
    import struct

    import pytest
    import trio

    from zcrelay import mover, net, syscalls
    from zcrelay.addresses import Address
    from zcrelay.errors import ConnectError

    real = mover.connect

    async def connect_then_reset(sock, sockaddr):
        await real(sock, sockaddr)
        conn, _ = target.accept()
        conn.send(b"bye")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        while not syscalls.peer_done(sock):  # the RST is in: bounded by fail_after below
            await trio.sleep(0.001)
        raise OSError(104, "Connection reset by peer")  # what SO_ERROR said in the race

    monkeypatch.setattr(mover, "connect", connect_then_reset)
    with socket.create_server(("127.0.0.1", 0)) as target, trio.fail_after(10):
        target.settimeout(10)
        address = Address("127.0.0.1", target.getsockname()[1])
        with pytest.raises(ConnectError):
            await net.connect(address, 10)
        sock = await net.connect(address, 10, keep_reset=True)
        with sock:
            assert await sock.recv(10) == b"bye"
            with pytest.raises(ConnectionResetError):
                await sock.recv(10)
