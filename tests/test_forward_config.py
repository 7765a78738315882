"""`zcrelay forward --config FILE`: a file's values pass the same checks as the options of the
same name. A bad file is one line naming the file and the key, exit code 2, never a traceback:
before, `max-conns = "ten"` was a ValueError traceback, `splice = "no"` read as true,
`workers = 1000` forked 1000 processes and a negative timeout closed every connection at once."""

from __future__ import annotations

import math
import os
import resource
import socket
import subprocess

import pytest
import trio
from typer.testing import CliRunner

from tests import traffic
from tests.conftest import run_zcrelay, zcrelay_argv, zcrelay_env
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


def one_line(done, code: int, *needles: str) -> str:
    """The one line a refused command prints: `code`, no traceback, every needle in it."""
    err = done.stderr.decode(errors="replace")
    assert done.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick, closed again): rules that clash or loop
    are refused before anything binds, so nothing races for it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("make", ["missing", "directory", "unreadable"])
def test_a_config_file_that_cannot_be_read_is_an_input_error(tmp_path, make):
    """EXIT STATUS: 8 is "a file to read is missing, unreadable or not a regular file", 2 a
    malformed one. A missing --config was 2, as if its text were wrong; an unreadable one was
    still 2, refused by the option parser's own check ("Path ... is not readable") before
    zcrelay's. Root reads anything: as root, zcrelay runs without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, as a user would."""
    config = tmp_path / "zcrelay.toml"
    prefix = []
    if make == "directory":
        config.mkdir()
    elif make == "unreadable":
        config.write_text("linger = 5\n")
        config.chmod(0)
        if os.geteuid() == 0:
            prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    done = subprocess.run([*prefix, *zcrelay_argv("forward", "-c", str(config), "127.0.0.1:0", "127.0.0.1:9")],
                          capture_output=True, timeout=20, env=zcrelay_env())
    one_line(done, ExitCode.INPUT_ERROR, str(config), "cannot read")


def _small_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_an_endless_config_file_is_refused_not_read_into_memory():
    """`-c /dev/zero` (or a huge file by mistake) was read whole: a MemoryError traceback under
    a limit, the machine's memory without one. A config file is at most 1 MiB."""
    done = run_zcrelay("forward", "-c", "/dev/zero", timeout=30, preexec_fn=_small_address_space)
    one_line(done, ExitCode.USAGE, "/dev/zero", "1 MiB")


# (the file, the line the error must name, what else it must say)
AT_LINE = {
    "top-level-key": ("# limits\nlinger = 5\n\nmax-conns = \"ten\"\n", 4, "max-conns"),
    "quoted-key": ('linger = 5\n"backlog" = -1\n', 2, "backlog"),
    "unknown-key": ("linger = 5\nworkers = 2\nlinger_ = 1\n", 3, "linger_"),
    "second-rule-target": ('[[rule]]\nlisten = "0"\ntarget = "127.0.0.1:9"\n\n[[rule]]\n# the db\n'
                           'listen = "0"\ntarget = "localhost"\n', 8, "rule 2: target"),
    "rule-listen-not-a-string": ('linger = 1\n[[rule]]\ntarget = "127.0.0.1:9"\nlisten = 80\n', 4, "listen"),
    "rule-extra-key": ('[[rule]]\nlisten = "0"\ntarget = "127.0.0.1:9"\n[[rule]]\nlisten = "0"\n'
                       'target = "127.0.0.1:9"\nweight = 2\n', 4, "rule 2"),
    "inline-rules": ('linger = 1\nrule = [{listen = "0", target = "x"}]\n', 2, "rule 1: target"),
    "key-after-rules": ('[[rule]]\nlisten = "0"\ntarget = "127.0.0.1:9"\n', None, None),
}


@pytest.mark.parametrize("text, line, says", [v for v in AT_LINE.values() if v[1]],
                         ids=[k for k, v in AT_LINE.items() if v[1]])
def test_a_bad_config_value_names_its_line(tmp_path, text, line, says):
    """As a TOML syntax error does ("at line 3, column 5"): a value refused after parsing said
    only the file and the key, and in a file of many [[rule]] tables, not which one."""
    config = tmp_path / "zcrelay.toml"
    config.write_text(text)
    done = run_zcrelay("forward", "-c", str(config), timeout=20)
    one_line(done, ExitCode.USAGE, f"{config}, line {line}:", says)


def test_a_config_address_with_a_nul_is_a_usage_error(tmp_path):
    """TOML can write "\\u0000", which no argv can: bind and lstat raised ValueError (a traceback)."""
    config = tmp_path / "zcrelay.toml"
    config.write_text('[[rule]]\nlisten = "unix:/tmp/a\\u0000b"\ntarget = "127.0.0.1:9"\n')
    one_line(run_zcrelay("forward", "-c", str(config), timeout=20), ExitCode.USAGE, f"{config}, line 2", "NUL")


ADDRESS_FAULTS = {
    # A name that Python's idna codec refuses raised UnicodeError out of getaddrinfo: a traceback.
    "label-too-long": (["a" * 64 + ".example:0", "127.0.0.1:9"], "LISTEN"),
    "empty-label": (["127.0.0.1:0", "db..internal:5432"], "TARGET"),
    "name-too-long": ([".".join(["a" * 60] * 5) + ":0", "127.0.0.1:9"], "LISTEN"),
    # int() refuses more than 4300 digits with a ValueError of its own.
    "port-of-5000-digits": (["127.0.0.1:0", "127.0.0.1:" + "9" * 5000], "out of range"),
    "bare-port-of-5000-digits": (["0" * 5000 + "7" * 4400, "127.0.0.1:9"], "LISTEN"),
    # An empty zone was "cannot resolve '::1%'", exit 5 (ADDRESS_NOT_AVAILABLE).
    "empty-ipv6-zone": (["[::1%]:0", "127.0.0.1:9"], "interface"),
    "rule-without-equals": (["--rule", "127.0.0.1:0"], "--rule"),
    # Each '=' a place to split at: parsed at every one of them, this took over a minute.
    "rule-of-128k-equals-signs": (["--rule", "unix:/a" + "=" * 130000 + "1"], "no port"),
}


@pytest.mark.parametrize("argv, says", ADDRESS_FAULTS.values(), ids=ADDRESS_FAULTS.keys())
def test_a_malformed_address_is_one_usage_line(argv, says):
    one_line(run_zcrelay("forward", *argv, timeout=20), ExitCode.USAGE, says)


def test_a_unix_path_that_is_not_utf8_is_measured_in_bytes_not_a_traceback(tmp_path):
    """A file name in another encoding reaches Python with surrogates; str.encode() raised
    UnicodeEncodeError checking its length. Too long, it is now the usual usage error."""
    long_path = os.fsdecode(b"/tmp/" + b"\xff" * 103)
    one_line(run_zcrelay("forward", f"unix:{long_path}", "127.0.0.1:9", timeout=20), ExitCode.USAGE,
             "at most 107 bytes")


async def _forwards_from_unix(zcrelay, sock_path: str, *args: str):
    """Run `zcrelay forward *args` (TARGET as {target}), relay two clients' 1 MiB each way
    intact from the Unix listener `sock_path`, stop it: exit 0, the socket file removed.
    Returns the relay."""
    async with trio.open_nursery() as nursery:
        server = await traffic.open_server()
        nursery.start_soon(server.serve)
        relay = zcrelay("forward", *(a.format(target=f"127.0.0.1:{server.port}") for a in args))
        results = await traffic.run_clients(sock_path, 2, 1 << 20, 1 << 20, family=socket.AF_UNIX)
        await traffic.check(results, server)
        nursery.cancel_scope.cancel()
    relay.wait_for_lines(" close=", 2)
    code, err = relay.stop()
    assert code == 0 and "Traceback" not in err, err
    assert not os.path.lexists(sock_path)  # removed at exit, found under its own name
    return relay


async def test_a_unix_path_that_is_not_utf8_forwards(zcrelay, tmp_path):
    sock_path = os.fsdecode(bytes(tmp_path) + b"/\xff\xfe.sock")
    await _forwards_from_unix(zcrelay, sock_path, f"unix:{sock_path}", "{target}")


def _clashes(tmp_path) -> dict[str, tuple[list[str], str]]:
    port = free_port()
    sock = tmp_path / "relay.sock"
    config = tmp_path / "zcrelay.toml"
    config.write_text(f'linger = 1\n[[rule]]\nlisten = "127.0.0.1:{port}"\ntarget = "127.0.0.1:9"\n')
    return {
        "same-port-twice": ([f"127.0.0.1:{port}", "127.0.0.1:9", "--rule", f"127.0.0.1:{port}=127.0.0.1:10"],
                            "rule 2"),
        "bare-port-and-loopback": ([str(port), "127.0.0.1:9", "--rule", f"127.0.0.1:{port}=127.0.0.1:10"],
                                   "rule 1"),
        "all-interfaces-and-loopback": ([f":{port}", "127.0.0.1:9", "--rule", f"127.0.0.1:{port}=127.0.0.1:10"],
                                        "rule 2"),
        "unix-path-twice": ([f"unix:{sock}", "127.0.0.1:9", "--rule", f"unix:{tmp_path}/./relay.sock=127.0.0.1:10"],
                            "rule 2"),
        "abstract-twice": ([f"unix:@zcrelay-{port}", "127.0.0.1:9", "--rule", f"unix:@zcrelay-{port}=127.0.0.1:10"],
                           "rule 2"),
        "file-and-command-line": (["-c", str(config), "--rule", f"127.0.0.1:{port}=127.0.0.1:10"],
                                  f"{config}, line 2"),
    }


@pytest.mark.parametrize("case", ["same-port-twice", "bare-port-and-loopback", "all-interfaces-and-loopback",
                                  "unix-path-twice", "abstract-twice", "file-and-command-line"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_two_rules_on_one_listen_address_are_a_usage_error(tmp_path, case, workers):
    """Two rules on one address: the second bind said "address already in use" (exit 3), as if
    another process held it. It is a fault in the rules, said before anything binds."""
    argv, says = _clashes(tmp_path)[case]
    done = run_zcrelay("forward", "-w", workers, *argv, timeout=20)
    one_line(done, ExitCode.USAGE, says, "listens on")


def test_port_zero_and_distinct_addresses_are_no_clash(settings):
    port = str(free_port())
    got, _ = settings("127.0.0.1:0", "127.0.0.1:9", "--rule", "127.0.0.1:0=127.0.0.1:9",
                      "--rule", f"127.0.0.1:{port}=127.0.0.1:9", "--rule", f"[::1]:{port}=127.0.0.1:9",
                      "--rule", f"127.0.0.2:{port}=127.0.0.1:9", "--rule", f"unix:@a{port}=127.0.0.1:9",
                      "--rule", f"unix:@b{port}=127.0.0.1:9")
    assert len(got.rules) == 7


LOOPS = {
    "same-address": lambda p, d: [f"127.0.0.1:{p}", f"127.0.0.1:{p}"],
    "bare-ports": lambda p, d: [str(p), str(p)],
    "localhost": lambda p, d: [f"127.0.0.1:{p}", f"localhost:{p}"],
    "all-interfaces-to-loopback": lambda p, d: [f":{p}", f"127.0.0.1:{p}"],
    "ipv6-all-to-ipv4-mapped": lambda p, d: [f"[::]:{p}", f"[::ffff:127.0.0.1]:{p}"],
    "unix-path": lambda p, d: [f"unix:{d}/r.sock", f"unix:{d}/r.sock"],
    "two-rules-in-a-ring": lambda p, d: [f"127.0.0.1:{p}", f"127.0.0.1:{p + 1}", "--rule",
                                         f"127.0.0.1:{p + 1}=localhost:{p}"],
    "three-rules-in-a-ring": lambda p, d: [f"unix:{d}/a.sock", f"unix:{d}/b.sock", "--rule",
                                           f"unix:{d}/b.sock=127.0.0.1:{p}", "--rule", f"{p}=unix:{d}/a.sock"],
}


@pytest.mark.parametrize("argv", LOOPS.values(), ids=LOOPS.keys())
def test_a_rule_that_forwards_to_its_own_listener_is_refused(tmp_path, settings, argv):
    """A target that leads back to a listener of the same rules: the first client's connection
    connected to the relay itself, again and again, until every file descriptor was taken."""
    port = free_port() if "--rule" not in argv(1, tmp_path) else free_port() - 1
    result = settings(*argv(port, tmp_path))
    assert not isinstance(result, tuple), f"served {argv(port, tmp_path)}"
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "loop" in result.output or "its own listener" in result.output, result.output


def test_a_loop_is_one_usage_line_before_anything_binds():
    port = free_port()
    one_line(run_zcrelay("forward", str(port), f"localhost:{port}", timeout=20), ExitCode.USAGE,
             "rule 1 (LISTEN TARGET)", "its own listener")


def test_chains_and_other_hosts_on_the_same_port_are_no_loop(settings):
    """Rules may feed one another without a ring, and a listener on all interfaces commonly
    forwards to the same port of another host."""
    p = free_port()
    got, _ = settings(f"127.0.0.1:{p}", f"127.0.0.1:{p + 1}", "--rule", f"127.0.0.1:{p + 1}=127.0.0.1:9",
                      "--rule", f":{p + 2}=backend.example:{p + 2}", "--rule", f"127.0.0.2:{p + 3}=127.0.0.1:{p + 3}")
    assert len(got.rules) == 4


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_after_other_rules_bound_releases_them(tmp_path, workers):
    """Rules bind in order: when a later one finds its port taken, exit 3 in one line, and the
    listeners already bound are closed (their port and abstract name free again, the socket
    file removed); nothing was accepted on them, so nothing is lost."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # Picked while `taken` holds its port: picked before, the kernel gave `taken` the port
        # just closed (1 CI run in 4), and the rules clashed (exit 2) instead.
        free, name, sock_path = free_port(), f"zcrelay-test-{os.getpid()}-{free_port()}", tmp_path / "first.sock"
        done = run_zcrelay("forward", "-w", workers, f"unix:{sock_path}", "127.0.0.1:9",
                           "--rule", f"127.0.0.1:{free}=127.0.0.1:9", "--rule", f"unix:@{name}=127.0.0.1:9",
                           "--rule", f"127.0.0.1:{taken.getsockname()[1]}=127.0.0.1:9", timeout=30)
        one_line(done, ExitCode.ADDRESS_IN_USE, "address already in use", str(taken.getsockname()[1]))
    assert not sock_path.exists()
    with socket.socket() as again:
        again.bind(("127.0.0.1", free))
    with socket.socket(socket.AF_UNIX) as again:
        again.bind("\0" + name)


def test_the_command_line_can_turn_back_on_what_the_file_turned_off(tmp_path, settings):
    """"Options on the command line win over the file": --no-splice and --no-nodelay could only
    turn off, so a file's splice = false or nodelay = false had no command-line answer."""
    config = tmp_path / "zcrelay.toml"
    config.write_text("splice = false\nnodelay = false\n")
    got, _ = settings("-c", str(config), "0", "127.0.0.1:9", "--splice", "--nodelay")
    assert got.splice is True and got.nodelay is True
    got, _ = settings("-c", str(config), "0", "127.0.0.1:9")
    assert got.splice is False and got.nodelay is False


# --rule LISTEN=TARGET where a Unix path holds '=' (a file name may hold any byte but NUL and '/').

RULE_READINGS = {
    "listen-path": ("unix:{d}/a=b.sock=127.0.0.1:80", ("unix:{d}/a=b.sock", "127.0.0.1:80")),
    "target-path": ("127.0.0.1:0=unix:{d}/x=y.sock", ("127.0.0.1:0", "unix:{d}/x=y.sock")),
    "both-paths-one-way": ("unix:@a=b=unix:@c", ("unix:@a=b", "unix:@c")),  # 'b=unix:@c' is no target
    "bare-port-to-path": ("8080=unix:{d}/=.sock", ("127.0.0.1:8080", "unix:{d}/=.sock")),
    "path-then-bare-port": ("unix:{d}/a=1=2", ("unix:{d}/a=1", "127.0.0.1:2")),  # '1=2' is no target
    # Paths of nothing but '=', each as long as a path goes (107 bytes): every '=' is tried.
    "longest-paths-of-equals-signs": ("unix:" + "=" * 107 + "=unix:@" + "=" * 106,
                                      ("unix:" + "=" * 107, "unix:@" + "=" * 106)),
}


@pytest.mark.parametrize("text, want", RULE_READINGS.values(), ids=RULE_READINGS.keys())
def test_a_rule_is_split_at_the_equals_sign_that_leaves_two_addresses(tmp_path, settings, text, want):
    """--rule was split at its first '=', so a Unix listen path holding one could not be given
    on the command line ('unix:/tmp/a=b.sock=127.0.0.1:80' said "'b.sock=127.0.0.1' is not a
    host name"). The rule is the one split whose both sides are addresses, and it is the rule a
    config file's [[rule]] table with the same two strings gives."""
    d = str(tmp_path)
    listen, target = (side.format(d=d) for side in want)
    got, _ = settings("--rule", text.format(d=d))
    assert [(str(r.listen), str(r.target)) for r in got.rules] == [(listen, target)]
    config = tmp_path / "zcrelay.toml"
    config.write_text(f'[[rule]]\nlisten = "{listen}"\ntarget = "{target}"\n')
    from_file, _ = settings("-c", str(config))
    assert from_file.rules == got.rules


async def test_a_unix_listener_with_an_equals_sign_in_its_path_forwards(zcrelay, tmp_path):
    """The real command, end to end: `--rule unix:DIR/a=b.sock=127.0.0.1:PORT` listens on the
    path with the '=' in it, relays to the TCP target, and removes the socket file at exit."""
    sock_path = str(tmp_path / "a=b.sock")
    relay = await _forwards_from_unix(zcrelay, sock_path, "--rule", f"unix:{sock_path}={{target}}")
    assert relay.addresses == [f"unix:{sock_path}"]


def test_a_rule_that_splits_two_ways_is_one_usage_line_pointing_to_the_config_file(tmp_path, settings):
    """Both sides Unix sockets with '=' in them: 'unix:@a=unix:@b=unix:@c' is a=(b=c) and
    (a=b)=c alike. Neither is guessed: one usage line names both readings and says how to
    write the rule unambiguously (a [[rule]] table, where listen and target are two strings),
    and such a file is taken."""
    a, b, c = (f"unix:@zcrelay-{os.getpid()}-{name}" for name in "abc")  # abstract: no file left
    err = one_line(run_zcrelay("forward", "--rule", f"{a}={b}={c}", timeout=20), ExitCode.USAGE, "--rule",
                   "more than one '='", "--config", "[[rule]]")
    assert f"listen {a}, target {b}={c}" in err and f"listen {a}={b}, target {c}" in err, err
    config = tmp_path / "zcrelay.toml"
    config.write_text(f'[[rule]]\nlisten = "{a}={b}"\ntarget = "{c}"\n')
    got, _ = settings("-c", str(config))
    assert [(str(r.listen), str(r.target)) for r in got.rules] == [(f"{a}={b}", c)]


def test_a_rule_that_splits_no_way_says_what_it_said_before(settings):
    """No split leaves two addresses: the message is still the one for the split at the first
    '=' (and a rule without '=' still says what a rule is)."""
    result = settings("--rule", "unix:/tmp/a=b.sock=nope")
    assert result.exit_code == ExitCode.USAGE
    assert "'b.sock=nope': no port" in result.output, result.output
    result = settings("--rule", "127.0.0.1:0")
    assert result.exit_code == ExitCode.USAGE and "a rule is LISTEN=TARGET" in result.output, result.output
