"""`zcrelay forward --config FILE`: a file's values pass the same checks as the options of the
same name. A bad file is one line naming the file and the key, exit code 2, never a traceback:
before, `max-conns = "ten"` was a ValueError traceback, `splice = "no"` read as true,
`workers = 1000` forked 1000 processes and a negative timeout closed every connection at once."""

from __future__ import annotations

import math

import pytest
import trio
from typer.testing import CliRunner

from tests import traffic
from tests.conftest import run_zcrelay
from zcrelay.cli import forward as forward_cli
from zcrelay.cli.app import app
from zcrelay.exitcodes import ExitCode

# (the file's text or bytes, what the one-line error must name)
BAD = {
    "int-from-string": ('max-conns = "ten"\n', "max-conns"),
    "int-from-float": ("max-conns = 1.7\n", "max-conns"),
    "int-from-bool": ("backlog = true\n", "backlog"),
    "seconds-from-string": ('connect-timeout = "x"\n', "connect-timeout"),
    "seconds-from-array": ("connect-timeout = [1]\n", "connect-timeout"),
    "seconds-from-date": ("linger = 1979-05-27\n", "linger"),
    "seconds-from-bool": ("idle-timeout = false\n", "idle-timeout"),
    "bool-from-string": ('splice = "no"\n', "splice"),
    "bool-from-int": ("nodelay = 0\n", "nodelay"),
    "size-from-float": ("pipe-size = 65536.5\n", "pipe-size"),
    "size-from-bool": ("pipe-size = true\n", "pipe-size"),
    "size-garbage": ('pipe-size = "lots"\n', "pipe-size"),
    "size-negative": ("pipe-size = -65536\n", "pipe-size"),
    "size-below-a-page": ('pipe-size = "1K"\n', "pipe-size"),
    "workers-above-256": ("workers = 1000\n", "workers"),
    "workers-zero": ("workers = 0\n", "workers"),
    "max-conns-negative": ("max-conns = -5\n", "max-conns"),
    "max-idle-pipes-negative": ("max-idle-pipes = -1\n", "max-idle-pipes"),
    "backlog-zero": ("backlog = 0\n", "backlog"),
    "backlog-negative": ("backlog = -1\n", "backlog"),
    "connect-timeout-negative": ("connect-timeout = -1\n", "connect-timeout"),
    "linger-negative": ("linger = -0.5\n", "linger"),
    "idle-timeout-negative": ("idle-timeout = -3\n", "idle-timeout"),
    "resolve-ttl-negative": ("resolve-ttl = -1.0\n", "resolve-ttl"),
    "negative-infinity": ("linger = -inf\n", "linger"),
    "nan": ("connect-timeout = nan\n", "connect-timeout"),
    "negative-nan": ("idle-timeout = -nan\n", "idle-timeout"),
    "rule-not-tables": ("rule = 5\n", "rule"),
    "rule-array-of-ints": ("rule = [1]\n", "rule"),
    "rule-extra-key": ('[[rule]]\nlisten = "0"\ntarget = "127.0.0.1:9"\nnote = "x"\n', "rule"),
    "rule-listen-int": ('[[rule]]\nlisten = 8080\ntarget = "127.0.0.1:9"\n', "listen"),
    "rule-target-array": ('[[rule]]\nlisten = "0"\ntarget = ["127.0.0.1:9"]\n', "target"),
    "rule-target-no-port": ('[[rule]]\nlisten = "0"\ntarget = "localhost"\n', "target"),
    "unknown-key": ('pipe_sise = "1M"\n', "pipe_sise"),
    "utf16-bom": (b"\xff\xfew\x00o\x00r\x00k\x00e\x00r\x00s\x00", "UTF-8"),
    "binary": (bytes(range(128, 256)) * 4, "UTF-8"),
    "nested-too-deep": ("a = " + "[" * 5000, "nested"),
}


@pytest.mark.parametrize("content, key", BAD.values(), ids=BAD.keys())
def test_a_bad_config_value_is_one_usage_line_naming_file_and_key(tmp_path, content, key):
    config = tmp_path / "zcrelay.toml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    done = run_zcrelay("forward", "-c", str(config), "127.0.0.1:0", "127.0.0.1:9", timeout=20)
    err = done.stderr.decode()
    assert done.returncode == ExitCode.USAGE, err
    assert "Traceback" not in err, err
    [line] = err.splitlines()
    assert str(config) in line and key in line, line


def test_a_bad_file_value_is_refused_even_when_the_command_line_sets_it(tmp_path):
    """The file is wrong whatever overrides it: better said now than when the option is dropped."""
    config = tmp_path / "zcrelay.toml"
    config.write_text("workers = 1000\n")
    done = run_zcrelay("forward", "-c", str(config), "--workers", "2", "127.0.0.1:0", "127.0.0.1:9", timeout=20)
    assert done.returncode == ExitCode.USAGE and b"workers" in done.stderr, done.stderr


@pytest.fixture
def settings(monkeypatch):
    """Run `zcrelay forward ARGS` in this process up to the point it would serve; return what
    it would serve with (ForwardConfig, workers), or the CliRunner result when it refused."""
    taken = []
    monkeypatch.setattr(forward_cli, "run_forwarder",
                        lambda settings, workers=1: taken.append((settings, workers)) or ExitCode.OK)

    def run(*args: str):
        result = CliRunner().invoke(app, ["forward", *args])
        return taken.pop() if taken else result

    return run


def test_a_good_config_sets_options_and_rules(tmp_path, settings):
    config = tmp_path / "zcrelay.toml"
    config.write_text('pipe-size = "256K"\nmax-conns = 7\nmax-idle-pipes = 0\nconnect-timeout = 2.5\n'
                      "idle-timeout = inf\nlinger = 0\nresolve-ttl = 30\nsplice = false\nnodelay = false\n"
                      'backlog = 1\nworkers = 256\n[[rule]]\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:9"\n'
                      '[[rule]]\nlisten = "unix:/tmp/zcrelay-test.sock"\ntarget = "[::1]:9"\n')
    got, workers = settings("-c", str(config))
    assert [(str(r.listen), str(r.target)) for r in got.rules] == [
        ("127.0.0.1:0", "127.0.0.1:9"), ("unix:/tmp/zcrelay-test.sock", "[::1]:9")]
    assert got.pipe_size == 256 << 10 and got.max_conns == 7 and got.max_idle_pipes == 0
    assert got.connect_timeout == 2.5 and got.idle_timeout == math.inf and got.linger is None
    assert got.resolve_ttl == 30.0 and isinstance(got.resolve_ttl, float)
    assert got.splice is False and got.nodelay is False and got.backlog == 1 and workers == 256


def test_a_pipe_size_may_be_a_number_of_bytes(tmp_path, settings):
    config = tmp_path / "zcrelay.toml"
    config.write_text("pipe-size = 65536\n")
    got, _ = settings("-c", str(config), "0", "127.0.0.1:9")
    assert got.pipe_size == 65536


def test_the_command_line_wins_over_the_file(tmp_path, settings):
    config = tmp_path / "zcrelay.toml"
    config.write_text('pipe-size = "256K"\nmax-conns = 7\nconnect-timeout = 2.5\nlinger = 5\nbacklog = 9\n'
                      "workers = 3\nsplice = true\nnodelay = true\n")
    got, workers = settings("-c", str(config), "0", "127.0.0.1:9", "--pipe-size", "64K", "--max-conns", "0",
                            "--connect-timeout", "0", "--linger", "1", "--backlog", "2", "-w", "1",
                            "--no-splice", "--no-nodelay")
    assert got.pipe_size == 64 << 10 and got.max_conns == 0 and got.connect_timeout is None
    assert got.linger == 1.0 and got.backlog == 2 and workers == 1
    assert got.splice is False and got.nodelay is False


def test_without_a_file_the_defaults_hold(settings):
    got, workers = settings("0", "127.0.0.1:9")
    assert (got.pipe_size, got.max_conns, got.max_idle_pipes, got.connect_timeout, got.idle_timeout,
            got.linger, got.resolve_ttl, got.splice, got.nodelay, got.backlog, workers) == \
        (1 << 20, 0, 16, 10.0, None, 60.0, 5.0, True, True, 4096, 1)


@pytest.mark.parametrize("key, low, high", [("workers", 1, 256), ("backlog", 1, None), ("max-conns", 0, None),
                                            ("max-idle-pipes", 0, None), ("connect-timeout", 0, None),
                                            ("idle-timeout", 0, None), ("linger", 0, None),
                                            ("resolve-ttl", 0, None)])
def test_the_file_takes_exactly_the_range_the_option_takes(tmp_path, settings, key, low, high):
    """The bounds come from the option declarations: the edges are taken, one past them is not."""
    config = tmp_path / "zcrelay.toml"
    for value, good in [(low, True), (low - 1, False)] + ([(high, True), (high + 1, False)] if high else []):
        config.write_text(f"{key} = {value}\n")
        result = settings("-c", str(config), "0", "127.0.0.1:9")
        if good:
            assert isinstance(result, tuple), (key, value, result.output)
        else:
            assert not isinstance(result, tuple) and result.exit_code == ExitCode.USAGE, (key, value)
            assert key in result.output


async def test_a_config_file_with_every_kind_of_value_forwards(zcrelay, tmp_path):
    """The real command, end to end: rules from the file, infinite timeouts, the copy path."""
    async with trio.open_nursery() as nursery:
        server = await traffic.open_server()
        nursery.start_soon(server.serve)
        config = tmp_path / "zcrelay.toml"
        config.write_text(f"pipe-size = 65536\nconnect-timeout = inf\nidle-timeout = inf\nlinger = 30\n"
                          f'resolve-ttl = 0.5\nsplice = false\nnodelay = true\nmax-conns = 4\nbacklog = 16\n'
                          f'[[rule]]\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:{server.port}"\n')
        relay = zcrelay("forward", "--config", str(config))
        results = await traffic.run_clients(("127.0.0.1", relay.port), 3, 1 << 20, 1 << 20)
        await traffic.check(results, server)
        nursery.cancel_scope.cancel()
    relay.wait_for_lines(" close=", 3)
    code, err = relay.stop()
    assert code == 0 and "Traceback" not in err, err
    assert ", 0.00% spliced" in err, err
