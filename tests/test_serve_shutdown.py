"""`zcrelay serve` stopped by SIGINT or SIGTERM while clients are mid-file: each client cut
short gets a reset, and the summary counts it as failed (its log line says "shutdown")."""

from __future__ import annotations

import re
import signal
import socket

import pytest

from tests.conftest import start_zcrelay
from tests.pipeline_helpers import random_file

# More than the stalled client's receive buffer, serve's send buffer (tcp_wmem's autotuned
# maximum, 4 MiB by default) and the file's pipe (1 MiB) hold together: the transfer to a client
# that stops reading cannot end.
SIZE = 32 << 20
SUMMARY = re.compile(r"stopped: (\d+) connections, (\d+) bytes sent, (\d+) failed(?: \((\d+) cut short\))?$")


def _read_to_the_end(sock: socket.socket) -> tuple[int, str]:
    """Read until EOF or an error: (bytes, "eof" or the error's name)."""
    total = 0
    try:
        while chunk := sock.recv(1 << 20):
            total += len(chunk)
        return total, "eof"
    except OSError as exc:
        return total, type(exc).__name__


@pytest.mark.parametrize("method", ["splice", "sendfile"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clients_cut_short_by_a_stop_are_counted_as_failed(tmp_path, method, signum):
    """One client reads a few bytes and stops reading; another reads the whole file and keeps
    its connection open (serve lingers, waiting for its close). The stop resets the first and
    leaves the second, which got everything. The summary said "0 failed": a user saw a clean
    stop where a client got part of the file. It must count the first as failed, cut short, and
    the second not at all."""
    data = random_file(tmp_path / "data", SIZE)
    server = start_zcrelay("serve", str(data), "--listen", "127.0.0.1:0", "--method", method,
                           "--linger", "60")  # `whole` is still lingering at the stop
    stalled = socket.socket()
    whole = socket.socket()
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        stalled.settimeout(30)
        stalled.connect(("127.0.0.1", server.port))
        assert stalled.recv(16), "serve sent nothing"  # the transfer has begun; now never read
        whole.settimeout(30)
        whole.connect(("127.0.0.1", server.port))
        assert _read_to_the_end(whole) == (SIZE, "eof")  # serve now lingers, until `whole` closes
        server.proc.send_signal(signum)
        _, err = server.proc.communicate(timeout=30)
        err = "\n".join(server.stderr_lines + err.splitlines())
        assert server.proc.returncode == 0, err
        size, end = _read_to_the_end(stalled)
    finally:
        stalled.close()
        whole.close()
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate()
    assert end == "ConnectionResetError" and 16 + size < SIZE, (size, end, err)
    summary = SUMMARY.search(err.splitlines()[-1])
    assert summary, err
    connections, sent, failed, cut_short = summary.groups()
    assert (connections, failed, cut_short) == ("2", "1", "1"), err
    assert SIZE + 16 <= int(sent) < 2 * SIZE, err
    conn_lines = {int(n): line for n, line in re.findall(r"conn=(\d+) (.*)", err)}
    assert conn_lines[1].endswith(" shutdown") and conn_lines[2].endswith(" shutdown"), err
