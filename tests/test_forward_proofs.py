"""Zero-copy and resource proofs for `zcrelay forward`: the relay's own counters, strace, and
the relay's fd table while connections idle or churn."""

from __future__ import annotations

import os
import re
import resource
import shutil
import socket

import pytest
import trio

from tests import traffic
from tests.test_forward import conn_lines

MiB = 1 << 20
# read/write-family calls that could carry payload through user space.
COPYING_CALLS = "read,write,readv,writev,pread64,pwrite64,recvfrom,sendto,recvmsg,sendmsg,recvmmsg,sendmmsg"


def needs(program: str) -> None:
    if shutil.which(program) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (.ci/run installs it)")
        pytest.skip(f"{program} is not installed")


def pipe_fds(pid: int) -> int:
    """Pipe fds other than stdio (the test reads the relay's stderr through a pipe)."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        if int(name) <= 2:
            continue
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("pipe:"):
                count += 1
        except FileNotFoundError:
            pass
    return count


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
async def test_256mib_transfer_is_at_least_999_permille_spliced(zcrelay):
    async with trio.open_nursery() as nursery:
        server = await traffic.open_server()
        nursery.start_soon(server.serve)
        relay = zcrelay("forward", "127.0.0.1:0", f"127.0.0.1:{server.port}")
        results = await traffic.run_clients(("127.0.0.1", relay.port), 1, 256 * MiB, 256 * MiB)
        await traffic.check(results, server)
        nursery.cancel_scope.cancel()
    code, err = relay.stop()
    [line] = conn_lines(err)
    up, down, spliced, copied = (int(line.group(i)) for i in (2, 3, 4, 5))
    assert up + down >= 512 * MiB
    assert spliced / (spliced + copied) >= 0.999
    assert copied == 0


@pytest.mark.slow
async def test_strace_shows_no_payload_through_user_space(zcrelay, tmp_path):
    """Under strace -f, no read/recv/write/send-family call touches a TCP socket or a pipe of
    the relay while 64 MiB cross it each way; splice carries it all."""
    needs("strace")
    log = tmp_path / "strace.log"
    async with trio.open_nursery() as nursery:
        server = await traffic.open_server()
        nursery.start_soon(server.serve)
        relay = zcrelay("forward", "127.0.0.1:0", f"127.0.0.1:{server.port}",
                        prefix=["strace", "-f", "-yy", "-qq", "-o", str(log),
                                "-e", f"trace={COPYING_CALLS},splice"])
        results = await traffic.run_clients(("127.0.0.1", relay.port), 2, 32 * MiB, 32 * MiB)
        await traffic.check(results, server)
        nursery.cancel_scope.cancel()
    relay.stop()
    lines = log.read_text().splitlines()
    # The payload's pipes are those splice used (trio's import runs ldconfig through a pipe of
    # its own, which is not payload).
    payload_pipes = set(re.findall(r"pipe:\[\d+\]", "\n".join(l for l in lines if "splice(" in l)))
    assert payload_pipes
    calls = re.compile(rf"\b(?:{COPYING_CALLS.replace(',', '|')})\(\d+<(TCP|TCPv6|pipe:\[\d+\])")
    copying = [line for line in lines
               if (m := calls.search(line)) and (m.group(1).startswith("TCP") or m.group(1) in payload_pipes)]
    assert not copying, copying[:5]
    spliced = sum(int(m.group(1)) for m in (re.search(r"^\d+\s+splice\(.*\) = (\d+)$", line) for line in lines) if m)
    # Every payload byte crosses two splices (socket→pipe, pipe→socket).
    assert spliced >= 2 * 2 * (64 * MiB), spliced


@pytest.mark.slow
async def test_idle_connections_hold_no_pipes_and_churn_leaks_no_fds(zcrelay):
    """1,000 idle connections: the relay holds no pipe fds beyond the pool's idle bound.
    After 5,000 short connections, its fd count is back where it started."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 5000:
        pytest.skip(f"RLIMIT_NOFILE is {soft}; 1,000 idle connections need ~4,000 fds here")
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    max_idle = 4
    relay = zcrelay("forward", "127.0.0.1:0", f"127.0.0.1:{listener.getsockname()[1]}",
                    "--max-idle-pipes", str(max_idle), "-q")
    pid = relay.proc.pid
    start_fds = fd_count(pid) - pipe_fds(pid)  # the pool's idle pipes come and go, bounded below
    accepted = []

    async def accept_forever():
        while True:
            sock, _ = await listener.accept()
            accepted.append(sock)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_forever)
        clients = []
        for i in range(1000):
            c = trio.socket.socket()
            await c.connect(("127.0.0.1", relay.port))
            clients.append(c)
        while len(accepted) < 1000:
            await trio.sleep(0.01)
        # Traffic on 50 of them first, so the pool's idle bound is actually exercised.
        for c, s in zip(clients[:50], accepted[:50]):
            await c.send(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(await s.recv(1 << 20))
        assert pipe_fds(pid) <= 2 * max_idle, pipe_fds(pid)
        assert fd_count(pid) >= start_fds + 2000
        for sock in clients + accepted:
            sock.close()
        accepted.clear()

        async def short(i: int) -> None:
            c = trio.socket.socket()
            with c:
                await c.connect(("127.0.0.1", relay.port))
                await c.send(b"hello")
                c.shutdown(socket.SHUT_WR)
                while await c.recv(100):
                    pass

        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_close, listener, nursery)
        limit = trio.Semaphore(64)

        async def one(i):
            async with limit:
                await short(i)

        async with trio.open_nursery() as clients_nursery:
            for i in range(5000):
                clients_nursery.start_soon(one, i)
        # The relay logs nothing with -q; wait until its fd table settles back.
        with trio.fail_after(20):
            while fd_count(pid) - pipe_fds(pid) != start_fds:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert pipe_fds(pid) <= 2 * max_idle
    code, err = relay.stop()
    assert re.search(r"stopped: 6000 connections", err), err


async def _drain_then_close(sock) -> None:
    with sock:
        while await sock.recv(1 << 16):
            pass


async def _serve_close(listener, nursery) -> None:
    while True:
        sock, _ = await listener.accept()
        nursery.start_soon(_drain_then_close, sock)


async def test_fd_exhaustion_on_accept_backs_off_and_recovers(zcrelay):
    """With RLIMIT_NOFILE tiny, accept() hits EMFILE: the relay says so once, keeps the
    listener, and serves again when fds are freed."""
    async with trio.open_nursery() as nursery:
        server = await traffic.open_server()
        nursery.start_soon(server.serve)

        def low_fd_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

        relay = zcrelay("forward", "127.0.0.1:0", f"127.0.0.1:{server.port}", "--no-splice",
                        preexec_fn=low_fd_limit)
        holders = []
        for _ in range(30):  # each idle connection costs the relay 2 fds
            c = trio.socket.socket()
            await c.connect(("127.0.0.1", relay.port))
            await c.send(traffic.HEADER.pack(1000 + len(holders), 0))
            holders.append(c)
        saw = relay.read_line()
        while "out of file descriptors" not in saw:
            assert saw, "relay exited"
            saw = relay.read_line()
        for c in holders:
            c.close()
        results = await traffic.run_clients(("127.0.0.1", relay.port), 3, MiB, MiB, first_id=1)
        await traffic.check(results, server)
        nursery.cancel_scope.cancel()
    code, err = relay.stop()
    assert code == 0
    assert err.count("out of file descriptors") == 1, err
    assert "accepting again" in err
