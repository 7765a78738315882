"""Between hosts: two network namespaces joined by a veth pair. The relay runs on the client
host and forwards to the server host's address; data crosses with matching SHA-256.

Needs root and iproute2. Skips without them only when CI is unset; in CI it must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests import traffic
from tests.conftest import ROOT, start_zcrelay, zcrelay_env
from tests.test_forward import conn_lines

MiB = 1 << 20
PREFIX = "10.237.0"  # inside the namespaces this test creates; nothing else sees it


def _require_netns() -> None:
    problem = None
    if os.geteuid() != 0:
        problem = "network namespaces need root"
    elif shutil.which("ip") is None:
        problem = "iproute2 (ip) is not installed"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts():
    """(client namespace, server namespace, server address), torn down afterwards."""
    _require_netns()
    tag = str(os.getpid())[-6:]
    client, server = f"zcc{tag}", f"zcs{tag}"
    ip("netns", "add", client)
    try:
        ip("netns", "add", server)
        ip("link", "add", f"zva{tag}", "netns", client, "type", "veth", "peer", "name", f"zvb{tag}", "netns", server)
        ip("-n", client, "addr", "add", f"{PREFIX}.1/24", "dev", f"zva{tag}")
        ip("-n", server, "addr", "add", f"{PREFIX}.2/24", "dev", f"zvb{tag}")
        for ns, dev in ((client, f"zva{tag}"), (server, f"zvb{tag}")):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield client, server, f"{PREFIX}.2"
    finally:
        subprocess.run(["ip", "netns", "del", client], capture_output=True)
        subprocess.run(["ip", "netns", "del", server], capture_output=True)


def in_ns(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_relay_between_two_hosts(hosts, mode):
    client_ns, server_ns, server_addr = hosts
    server = subprocess.Popen(in_ns(server_ns) + [sys.executable, "-m", "tests.netns_peer", "server", server_addr],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env=zcrelay_env())
    try:
        port = int(re.search(r":(\d+)$", server.stdout.readline().strip()).group(1))
        extra = ["--no-splice"] if mode == "copy" else []
        relay = start_zcrelay("forward", "127.0.0.1:0", f"{server_addr}:{port}", *extra, prefix=in_ns(client_ns))
        try:
            done = subprocess.run(in_ns(client_ns) + [sys.executable, "-m", "tests.netns_peer", "client",
                                                      "127.0.0.1", str(relay.port), "8", str(6 * MiB), str(6 * MiB)],
                                  capture_output=True, text=True, cwd=ROOT, env=zcrelay_env(), timeout=120)
            assert done.returncode == 0, done.stderr
            results = json.loads(done.stdout)
            received = {}
            while len(received) < 8:
                conn_id, length, sha = json.loads(server.stdout.readline())
                received[conn_id] = (length, sha)
            relay.wait_for_lines(" close=", 8)
        finally:
            code, err = relay.stop()
    finally:
        server.kill()
        server.wait()
    assert len(results) == 8
    for conn_id, up, down, got in results:
        assert tuple(got) == (down, traffic.digest(traffic.payload(conn_id, "down", down)))
        assert received[conn_id] == (up, traffic.digest(traffic.payload(conn_id, "up", up)))
    assert code == 0, err
    closes = [m.group(6) for m in conn_lines(err)]
    assert closes == ["eof"] * 8, err


def test_unreachable_target_is_logged_and_relay_serves_on(hosts):
    client_ns, _, _ = hosts
    relay = start_zcrelay("forward", "127.0.0.1:0", "10.238.0.1:80", prefix=in_ns(client_ns))
    try:
        # No route to 10.238.0.0/16 in the client namespace: connect fails with ENETUNREACH.
        probe = subprocess.run(in_ns(client_ns) + [sys.executable, "-c",
                               f"import socket; s=socket.create_connection(('127.0.0.1', {relay.port})); "
                               "print(repr(s.recv(10)))"],
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0 and probe.stdout.strip() in ("b''",), probe
    finally:
        code, err = relay.stop()
    assert conn_lines(err)[0].group(6) == "unreachable", err
    assert code == 0
