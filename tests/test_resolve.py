"""Target names: resolved when a connection needs it, reused for --resolve-ttl seconds, and
resolved again after a connection could not reach them. Counted from outside: glibc's
getaddrinfo opens /etc/hosts once per call (nsswitch "hosts: files ..."), seen by strace."""

from __future__ import annotations

import socket

import pytest
import trio

from tests import traffic
from tests.test_forward import MiB, conn_lines, path_args, serve_traffic
from tests.test_forward_proofs import needs


def hosts_lookups(log) -> int:
    return sum('"/etc/hosts"' in line for line in log.read_text().splitlines())


def traced(tmp_path) -> tuple[list[str], object]:
    needs("strace")
    log = tmp_path / "strace.log"
    return ["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(log)], log


@pytest.mark.parametrize("ttl, lookups", [("60", 1), ("0", 10)])
async def test_a_target_name_is_resolved_once_per_ttl(zcrelay, tmp_path, path, ttl, lookups):
    """10 connections one after another to localhost:PORT, every byte checked both ways: with
    a TTL the first resolves and the others reuse it (the reactor's path); 0 resolves each."""
    prefix, log = traced(tmp_path)
    async with trio.open_nursery() as nursery:
        server = await serve_traffic(nursery)
        relay = zcrelay("forward", "127.0.0.1:0", f"localhost:{server.port}", "--resolve-ttl", ttl,
                        *path_args(path), prefix=prefix)
        results = await traffic.run_clients(("127.0.0.1", relay.port), 10, MiB, 2 * MiB, limit=1)
        await traffic.check(results, server)
        nursery.cancel_scope.cancel()
    relay.wait_for_lines(" close=", 10)
    code, err = relay.stop()
    assert code == 0, err
    assert [m.group(6) for m in conn_lines(err)] == ["eof"] * 10
    assert hosts_lookups(log) == lookups, err


async def test_a_refused_target_name_is_resolved_again(zcrelay, tmp_path):
    """The addresses found may be stale (the name moved): a refused connection drops them."""
    prefix, log = traced(tmp_path)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        relay = zcrelay("forward", "127.0.0.1:0", f"localhost:{port}", "--resolve-ttl", "60", prefix=prefix)
        for _ in range(5):
            client = trio.socket.socket()
            with client:
                await client.connect(("127.0.0.1", relay.port))
                assert await client.recv(1) == b""  # the relay closes it: nothing to reach
            relay.wait_for_lines(" close=", _ + 1)
    code, err = relay.stop()
    assert code == 0, err
    assert [m.group(6) for m in conn_lines(err)] == ["refused"] * 5
    assert hosts_lookups(log) == 5, err


def test_a_negative_ttl_is_a_usage_error(tmp_path):
    from tests.conftest import run_zcrelay

    config = tmp_path / "ttl.toml"
    config.write_text("resolve-ttl = -1\n")
    done = run_zcrelay("forward", "127.0.0.1:0", "localhost:9", "--config", str(config))
    err = done.stderr.decode()
    assert done.returncode == 2 and "resolve-ttl" in err and "Traceback" not in err, err
