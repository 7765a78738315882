"""`zcrelay demo` as users run it: a subprocess, small sizes (the default moves 512 MiB)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import struct
from collections import Counter
from types import SimpleNamespace

import pytest
import trio

from tests.conftest import ROOT, run_zcrelay, zcrelay_argv, zcrelay_env
from zcrelay import demo


def test_demo_checks_every_byte_and_says_so():
    done = run_zcrelay("demo", "--size", "1M", "--connections", "2")
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "listening on 127.0.0.1:" in err and "(echo)" in err, err
    assert "2/2 intact" in err and "Traceback" not in err, err


def test_demo_warnings_are_zcrelays_lines():
    """A pipe size above the kernel's limit is a warning, given as every command gives them
    ("zcrelay: ..."): the demo had not set logging up, so it came out bare."""
    limit = int(open("/proc/sys/fs/pipe-max-size").read())
    if limit >= 1 << 30:
        pytest.skip("pipe-max-size is too large to ask for more")
    argv = zcrelay_argv("demo", "--size", "1M", "--connections", "1", "--pipe-size", str(2 * limit))
    if os.geteuid() == 0:  # root may grow pipes past the limit: drop those capabilities for the child
        argv = ["setpriv", "--bounding-set", "-sys_resource,-sys_admin", "--", *argv]
    done = subprocess.run(argv, capture_output=True, env=zcrelay_env(), timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    [line] = [line for line in err.splitlines() if "pipe-max-size" in line]
    assert line.startswith(f"zcrelay: pipe size {2 * limit} is above the kernel's limit"), err


def test_demo_report_read_by_head_is_a_broken_pipe():
    """`zcrelay demo 2>&1 | head -1`: the report (a table on stderr) meets a reader that went
    away. rich turned that into exit 1; as for bench's and connect's stdout it is 141, with no
    message, and the one line head asked for is the listening line."""
    import shlex

    argv = " ".join(shlex.quote(a) for a in zcrelay_argv("demo", "--size", "1M", "--connections", "1"))
    done = subprocess.run(["bash", "-c", f"{argv} 2>&1 | head -1; echo \"status=${{PIPESTATUS[0]}}\""],
                          capture_output=True, env=zcrelay_env(), timeout=60)
    out = done.stdout.decode()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("zcrelay: listening on 127.0.0.1:"), out
    assert lines[1] == "status=141", (out, done.stderr)


@pytest.mark.parametrize("command", [
    ("demo", "--size", "1M", "--connections", "1"),
    ("forward", "127.0.0.1:0", "127.0.0.1:1"),
], ids=["demo", "forward"])
def test_stderr_whose_reader_is_gone_before_the_first_line_is_a_broken_pipe(command):
    """`zcrelay demo 2>&1 | true`: the listening line meets a reader already gone. That was
    exit 1 (with an error line nobody could read); it is 141, as when the report meets it.
    The pipe's read end is closed before zcrelay starts, so there is no race with `true`."""
    r, w = os.pipe()
    os.close(r)
    try:
        done = subprocess.run(zcrelay_argv(*command), stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                              env=zcrelay_env(), timeout=60)
    finally:
        os.close(w)
    assert done.returncode == 141


def test_zero_size_is_a_usage_error():
    """--size 0 sent nothing and reported "1/1 intact": a check of no bytes cannot fail."""
    done = run_zcrelay("demo", "--size", "0", "--connections", "1")
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, lines
    assert len(lines) == 1 and "--size" in lines[0], lines


def _in_own_netns(script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh, with $@ the zcrelay argv) in a network namespace of its own, so the
    kernel's TCP counters are the test's alone. Needs root (unshare -n)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("a network namespace of the test's own needs root, unshare and ip")
    return subprocess.run(["unshare", "-n", "sh", "-c", script, "sh", *zcrelay_argv("demo")],
                          capture_output=True, env=zcrelay_env(), timeout=120)


def test_every_connection_is_accepted_at_once():
    """--connections is allowed up to 256, but the echo target listened with a backlog of 128:
    from 130 connections on, the kernel dropped the extra SYNs and the clients retried a second
    later (TCP's initial RTO), so "time" and "throughput" were a second off. Counted in a
    namespace of the test's own: TcpExt ListenOverflows must stay 0."""
    done = _in_own_netns('ip link set lo up && "$@" --size 4K --connections 256 && cat /proc/net/netstat')
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    assert "256/256 intact" in err, err
    names, values = [line.split()[1:] for line in out.splitlines() if line.startswith("TcpExt:")]
    counters = dict(zip(names, map(int, values)))
    assert counters["ListenOverflows"] == 0 and counters["ListenDrops"] == 0, counters


def test_loopback_down_is_one_clear_line():
    """With the loopback interface down (a fresh network namespace) the demo said only
    "zcrelay: error: Network is unreachable": not what it was connecting to, nor why."""
    done = _in_own_netns('"$@" --size 4K --connections 1')
    lines = [line for line in done.stderr.decode().splitlines() if "listening on" not in line]
    assert done.returncode == 6, lines
    assert len(lines) == 1 and "127.0.0.1:" in lines[0] and "loopback" in lines[0], lines


class _CrossWired:
    """A broken relay in place of zcrelay.forward.Forwarder: each client's bytes go to a target
    connection of its own, but the replies come back from its neighbour's."""

    def __init__(self, config) -> None:
        self.target = config.rules[0].target
        self.totals = SimpleNamespace(connections=0, spliced=0, copied=0, closes=Counter())

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket()
        with listener:
            await listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            task_status.started([SimpleNamespace(address=f"127.0.0.1:{listener.getsockname()[1]}")])
            clients, targets = [], []
            for _ in range(2):
                clients.append((await listener.accept())[0])
                targets.append(trio.socket.socket())
                await targets[-1].connect((self.target.host, self.target.port))
            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(self._pump, clients[i], targets[i])
                    nursery.start_soon(self._pump, targets[1 - i], clients[i])
            for sock in clients + targets:
                sock.close()
            self.totals.connections = 2
            await trio.sleep_forever()

    @staticmethod
    async def _pump(src, dst) -> None:
        while data := await src.recv(1 << 16):
            view = memoryview(data)
            while view:
                view = view[await dst.send(view):]
        dst.shutdown(socket.SHUT_WR)


def test_echo_check_tells_connections_apart(monkeypatch):
    """Every connection sent the same 1 MiB block over and over, so a relay that crossed two
    connections' streams (or replayed one pipe-full of bytes in place of the next) gave back
    the very bytes that were sent, and the demo said "2/2 intact"."""
    monkeypatch.setattr(demo, "Forwarder", _CrossWired)
    result = trio.run(demo.run_demo, 3 * demo.CHUNK + 123, 2, True, 1 << 20)
    assert result.intact == 0 and not result.ok


def test_echo_check_passes_a_sound_relay():
    """The same check, in process, through zcrelay's own forward: both connections intact."""
    result = trio.run(demo.run_demo, 3 * demo.CHUNK + 123, 2, True, 1 << 20)
    assert result.ok and result.intact == 2


class _Dropping:
    """A relay with no file descriptor left for its target sockets, in place of Forwarder: it
    accepts each client and resets it at once, counting the close as forward does ("out-of-fds")."""

    def __init__(self, config) -> None:
        self.totals = SimpleNamespace(connections=0, spliced=0, copied=0, closes=Counter())

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket()
        with listener:
            await listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            task_status.started([SimpleNamespace(address=f"127.0.0.1:{listener.getsockname()[1]}")])
            while True:
                sock, _ = await listener.accept()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # a reset: the client's send gets EPIPE, its recv ECONNRESET
                self.totals.connections += 1
                self.totals.closes["out-of-fds"] += 1


def test_a_connection_the_relay_drops_is_a_failed_check(monkeypatch):
    """Under `ulimit -n 20` forward accepted the demo's clients but had no fd for their target
    sockets, and reset them: the client's BrokenPipeError ended the demo with "zcrelay: error:
    Broken pipe" and exit status 1, nothing said about file descriptors. A dropped connection
    is one whose echo did not come back, and the relay's close reasons go with the result."""
    monkeypatch.setattr(demo, "Forwarder", _Dropping)
    result = trio.run(demo.run_demo, 3 * demo.CHUNK, 2, True, 1 << 20)
    assert result.intact == 0 and not result.ok
    assert result.closes == {"out-of-fds": 2}


_DROPPING_DEMO = """
import sys
from tests import test_demo
from zcrelay import demo
demo.Forwarder = test_demo._Dropping
from zcrelay.cli import main
main(sys.argv[1:])
"""


def test_a_relay_out_of_fds_is_no_resources_in_one_line():
    """The same, as the user sees it: the table says which check failed and why the relay
    closed, then one line and NO_RESOURCES (7), as when the demo's own sockets run out."""
    done = subprocess.run([zcrelay_argv()[0], "-c", _DROPPING_DEMO, "demo", "--size", "1M",
                           "--connections", "2"], capture_output=True, timeout=60, cwd=ROOT,
                          env=zcrelay_env())
    err = done.stderr.decode()
    assert done.returncode == 7, err
    assert "0/2 intact" in err and "out-of-fds" in err and "Broken pipe" not in err, err
    assert err.splitlines()[-1].startswith("zcrelay: error: ") and "file descriptors" in err.splitlines()[-1], err
    assert "Traceback" not in err, err
