"""Target names: resolved when a connection needs it, reused for --resolve-ttl seconds, and
resolved again after a connection could not reach them. Counted from outside: glibc's
getaddrinfo opens /etc/hosts once per call (nsswitch "hosts: files ..."), seen by strace."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest
import trio

from tests import traffic
from tests.test_forward import MiB, conn_lines, path_args, read_to_eof, send_all, serve_traffic
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


def _in_own_hosts(tmp_path, lines: str) -> list[str]:
    """A prefix that runs zcrelay with `lines` as its /etc/hosts (a private mount namespace:
    nothing outside sees it). Needs root and unshare(1)."""
    from tests.test_forward_proofs import needs

    needs("unshare")
    if os.geteuid() != 0:
        pytest.skip("a private /etc/hosts needs root (a mount namespace)")
    hosts = tmp_path / "hosts"
    hosts.write_text(lines)
    return ["unshare", "--mount", "sh", "-c", f'mount --bind "{hosts}" /etc/hosts && exec "$@"', "sh"]


def _families_in_order(prefix: list[str], name: str) -> list[int]:
    """The address families `name` resolves to, in getaddrinfo's order, seen from `prefix`."""
    done = subprocess.run([*prefix, sys.executable, "-c", f"import socket; print(*[int(i[0]) for i in "
                           f"socket.getaddrinfo({name!r}, 1, type=socket.SOCK_STREAM)])"],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"no private /etc/hosts here: {done.stderr.strip()}")
    return [int(f) for f in done.stdout.split()]


LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


async def test_a_first_address_that_drops_syns_leaves_time_for_the_next(zcrelay, tmp_path):
    """A name with two addresses, the first black-holed (SYNs dropped, as on a broken IPv6
    route) and the second served: the first took the whole --connect-timeout, so the second
    was never tried and every connection failed with close=timeout. As Go's dialer does, each
    address gets a share of the time left (at least 2 s), so the second is reached, on both
    the resolving path (first connection) and the reactor's (the next, from --resolve-ttl)."""
    prefix = _in_own_hosts(tmp_path, "::1 zcmulti\n127.0.0.1 zcmulti\n")
    first, second = _families_in_order(prefix, "zcmulti")
    with contextlib.ExitStack() as stack:
        while True:  # one port number, free in both families
            dropping = stack.enter_context(socket.socket(first))
            dropping.bind((LOOPBACK[first], 0))
            port = dropping.getsockname()[1]
            served = socket.socket(second)
            try:
                served.bind((LOOPBACK[second], port))
                break
            except OSError:
                served.close()
        stack.enter_context(served)
        served.listen(8)
        served.setblocking(False)
        dropping.listen(0)
        for _ in range(8):  # fill its accept queue: later SYNs are dropped
            filler = stack.enter_context(socket.socket(first))
            filler.setblocking(False)
            filler.connect_ex((LOOPBACK[first], port))
        relay = zcrelay("forward", "127.0.0.1:0", f"zcmulti:{port}", "--connect-timeout", "4",
                        "--resolve-ttl", "60", prefix=prefix)
        target_listener = trio.socket.from_stdlib_socket(served)
        for n in range(2):
            request, reply = os.urandom(2 * MiB + n), os.urandom(3 * MiB + n)
            async with trio.open_nursery() as nursery:

                async def target():
                    sock, _ = await target_listener.accept()
                    with sock:
                        got.append(await read_to_eof(sock))
                        await send_all(sock, reply)

                got: list[bytes] = []
                nursery.start_soon(target)
                client = trio.socket.socket()
                with client, trio.fail_after(20):
                    await client.connect(("127.0.0.1", relay.port))
                    await send_all(client, request)
                    client.shutdown(socket.SHUT_WR)
                    answer = await read_to_eof(client)
            assert traffic.digest(got[0]) == traffic.digest(request)
            assert traffic.digest(answer) == traffic.digest(reply)
        relay.wait_for_lines(" close=", 2)
        code, err = relay.stop()
    assert code == 0, err
    assert [m.group(6) for m in conn_lines(err)] == ["eof", "eof"], err


@contextlib.contextmanager
def _refused_then_served(monkeypatch):
    """A name that resolves (net._getaddrinfo, the resolver of both the trio and the blocking
    path) to two addresses: first 127.0.0.1 on a port bound but not listening (refused, and
    held so nobody else takes it), then 127.0.0.1 on a listener. Yields (address, listener,
    the (family, sockaddr) lists net.connect reported resolving)."""
    from zcrelay import net
    from zcrelay.addresses import Address

    with socket.socket() as refusing, socket.create_server(("127.0.0.1", 0)) as listener:
        refusing.bind(("127.0.0.1", 0))
        listener.settimeout(10)
        sockaddrs = [refusing.getsockname(), listener.getsockname()]

        async def two_addresses(host, port):
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", s) for s in sockaddrs]

        monkeypatch.setattr(net, "_getaddrinfo", two_addresses)
        yield Address("zcrelay-two-addresses.invalid", sockaddrs[1][1]), listener, sockaddrs


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def _no_collection_no_unclosed_sockets():
    """The cyclic GC off inside, then run once: no socket of net.connect's may end closed by the
    collector rather than by net.connect (ResourceWarning "unclosed"). Off, because a failed
    attempt's socket stays reachable only from a cycle (the OSError kept as `last`, its
    traceback, the connecting frame's locals): a collection at the wrong time closed a leaked
    one before the fd count below could see it."""
    import gc
    import warnings

    with warnings.catch_warnings():  # the garbage of earlier tests: not this block's
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.disable()
        try:
            yield
        finally:
            gc.enable()
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed


async def _connect_and_close(connect, address, listener, sockaddrs) -> None:
    """One net.connect to the two addresses: it must reach the second; both ends closed after."""
    resolved = []
    sock = await connect(address, 10, resolved.append)
    with sock:
        assert resolved == [[(socket.AF_INET, s) for s in sockaddrs]]
        assert sock.getpeername() == sockaddrs[1]
        accepted, _ = listener.accept()
        accepted.close()


ATTEMPTS = 20  # a leak of one fd per refused address shows as 20


async def test_a_refused_address_closes_its_socket_before_the_next(monkeypatch):
    """A name with two addresses, the first refused: net.connect (trio's path: serve, tee,
    connect, forward's resolving connections) reaches the second, and the socket of the refused
    attempt is closed, not left open for the rest of the process; ATTEMPTS connections, the fd
    count where it started."""
    from zcrelay import net

    with _refused_then_served(monkeypatch) as target:
        await _connect_and_close(net.connect, *target)  # any first-use fds before counting
        with _no_collection_no_unclosed_sockets():
            before = _open_fds()
            for _ in range(ATTEMPTS):
                await _connect_and_close(net.connect, *target)
            assert _open_fds() == before


def test_a_refused_address_closes_its_socket_without_trio_too(monkeypatch):
    """The same on the blocking path (zcrelay.waits.run_blocking: `send`, and `tee` from a
    pipe), where the resolver is socket.getaddrinfo."""
    from zcrelay import net, waits

    with _refused_then_served(monkeypatch) as target:
        waits.run_blocking(_connect_and_close, net.connect, *target)
        with _no_collection_no_unclosed_sockets():
            before = _open_fds()
            for _ in range(ATTEMPTS):
                waits.run_blocking(_connect_and_close, net.connect, *target)
            assert _open_fds() == before


async def test_a_forwarders_cached_addresses_close_a_refused_attempts_socket(monkeypatch):
    """forward's own connect loop (_Link, for a name resolved less than --resolve-ttl ago, in
    the reactor, not net.connect): a name with two addresses, the first refused. Each
    connection reaches the second, and the refused attempt's socket is closed (_drop_target):
    ATTEMPTS connections leave the fd count where it was (a leak of one fd each shows as
    ATTEMPTS)."""
    from zcrelay.addresses import parse
    from zcrelay.forward import ForwardConfig, Forwarder, Rule

    finished = []
    with _refused_then_served(monkeypatch) as (address, listener, sockaddrs):
        listener.setblocking(False)
        rule = Rule(parse("127.0.0.1:0", listen=True), address)
        forwarder = Forwarder(ForwardConfig(rules=(rule,), resolve_ttl=3600), on_finished=finished.append)

        async def one_connection() -> None:
            client = trio.socket.socket()
            with client:
                await client.connect(("127.0.0.1", port))
                accepted, _ = await trio.socket.from_stdlib_socket(listener).accept()
                with accepted:
                    await client.send(b"x")
                    assert await accepted.recv(1) == b"x"
                client.shutdown(socket.SHUT_WR)
                assert await client.recv(1) == b""
            with trio.fail_after(10):
                while len(finished) < count + 1:
                    await trio.sleep(0.01)  # polling the forwarder's record: no event says so

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                [bound] = await nursery.start(forwarder.serve)
                port = int(bound.address.rsplit(":", 1)[1])
                count = 0
                await one_connection()  # resolves (a task, net.connect), then caches the two
                count += 1
                await one_connection()  # the first from the cache: the reactor's fds are made
                with _no_collection_no_unclosed_sockets():
                    before = _open_fds()
                    for _ in range(ATTEMPTS):
                        count += 1
                        await one_connection()
                    assert _open_fds() == before
                nursery.cancel_scope.cancel()
    assert [f.close for f in finished] == ["eof"] * (ATTEMPTS + 2), finished
