"""`zcrelay forward`'s configuration surface, as a user of config files and long command lines
meets it: values at the far edge of what TOML and the options take, addresses that name this
host in the forms getaddrinfo accepts, and a working directory that no longer exists. Each test
ran into a traceback, a crash at the first connection, a loop or a wrong message before."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading

import pytest

from tests.conftest import ROOT, run_zcrelay, start_zcrelay, zcrelay_argv, zcrelay_env
from tests.test_forward_config import free_port, one_line, settings  # noqa: F401 (a fixture)
from zcrelay.exitcodes import ExitCode


@pytest.mark.parametrize("key", ["connect-timeout", "idle-timeout", "linger", "resolve-ttl"])
def test_a_timeout_too_large_for_a_float_is_taken_as_the_command_line_takes_it(tmp_path, key):
    """TOML integers have no bound in tomllib: `linger = 1000...0` (400 digits) passed the range
    check and then float() raised OverflowError (a traceback, exit 1). The command line reads
    the same digits as inf ("never"), and so does the file now."""
    config = tmp_path / "zcrelay.toml"
    config.write_text(f"{key} = 1{'0' * 400}\n")
    relay = start_zcrelay("forward", "-c", str(config), "127.0.0.1:0", "127.0.0.1:9")
    code, err = relay.stop()
    assert code == ExitCode.OK and "Traceback" not in err, err


def test_a_huge_negative_timeout_in_the_file_is_out_of_range(tmp_path):
    config = tmp_path / "zcrelay.toml"
    config.write_text(f"linger = -1{'0' * 400}\n")
    one_line(run_zcrelay("forward", "-c", str(config), "127.0.0.1:0", "127.0.0.1:9", timeout=20),
             ExitCode.USAGE, f"{config}, line 1", "linger", "out of range")


def _echo_server() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        try:
            peer, _ = server.accept()
        except OSError:  # closed by the test
            return
        with peer:
            while data := peer.recv(65536):
                peer.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server


@pytest.mark.parametrize("where", ["option", "file"])
def test_a_connect_timeout_of_a_month_relays(tmp_path, where):
    """`--connect-timeout 2592000` (30 days, as one writes "no timeout, really"): the reactor
    armed a timer that far away and epoll_wait(2), which takes at most 2**31 - 1 ms (24.8 days),
    raised OverflowError: the first connection crashed the whole relay (TrioInternalError).
    The reactor now waits a day at most, and looks again."""
    config = tmp_path / "zcrelay.toml"
    config.write_text("connect-timeout = 2592000\n")
    args = ["--connect-timeout", "2592000"] if where == "option" else ["-c", str(config)]
    with _echo_server() as server:
        relay = start_zcrelay("forward", *args, "127.0.0.1:0", f"127.0.0.1:{server.getsockname()[1]}")
        try:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as client:
                client.sendall(b"ping")
                assert client.recv(4) == b"ping"
        finally:
            code, err = relay.stop()
    assert code == ExitCode.OK and "Traceback" not in err, err
    assert "stopped: 1 connections" in err, err


@pytest.mark.parametrize("port", ["http-alt", "ftp-data"])
def test_a_service_name_with_a_dash_works_after_an_ipv6_address(settings, port):
    """host:http-alt was taken, [::1]:http-alt said "no port after ']'": the bracketed form
    took only \\w characters for its port."""
    got, _ = settings("127.0.0.1:0", f"[::1]:{port}")
    assert got.rules[0].target.port == socket.getservbyname(port, "tcp")


def test_a_bad_port_after_an_ipv6_address_is_named():
    one_line(run_zcrelay("forward", "127.0.0.1:0", "[::1]:no-such-service", timeout=20), ExitCode.USAGE,
             "port 'no-such-service' is not a number or a TCP service")


# IPv4 addresses as getaddrinfo(3) reads them (inet_aton: fewer parts, octal, hex, one number),
# each the loopback address or 0.0.0.0, which a connect takes to this host.
THIS_HOST = ["127.1", "0", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "127.0.1", "0x7f000001"]


@pytest.mark.parametrize("host", THIS_HOST)
def test_a_loop_through_a_short_ipv4_form_is_refused(settings, host):
    """`forward 127.0.0.1:P 127.1:P` connected to itself until the fds ran out: only the forms
    ipaddress reads were compared, and getaddrinfo reads these too."""
    port = free_port()
    result = settings(f"127.0.0.1:{port}", f"{host}:{port}")
    assert not isinstance(result, tuple), f"served {host}:{port}"
    assert result.exit_code == ExitCode.USAGE and "its own listener" in result.output, result.output


def test_a_clash_through_a_short_ipv4_form_is_a_usage_error(settings):
    """`0:P` is 0.0.0.0:P: beside 127.0.0.1:P, bind(2) said "address already in use" (exit 3)."""
    port = free_port()
    result = settings(f"0:{port}", "127.0.0.1:9", "--rule", f"127.0.0.1:{port}=127.0.0.1:10")
    assert not isinstance(result, tuple) and result.exit_code == ExitCode.USAGE, result
    assert "listens on" in result.output, result.output


def test_names_that_only_look_numeric_are_still_names(settings):
    """Not every string of digits and dots is an address to getaddrinfo: '08.1.1.1' is no octal
    number, and a trailing dot makes a name. These are not this host, so no loop."""
    port = free_port()
    got, _ = settings(f"127.0.0.1:{port}", "127.0.0.1:9", "--rule", f"127.0.0.2:{port}=08.1.1.1:{port}",
                      "--rule", f"127.0.0.3:{port}=127.1.:{port}")
    assert len(got.rules) == 3


@pytest.fixture
def gone_cwd(tmp_path):
    """A directory to start zcrelay in and remove under it (a build directory cleaned from
    another shell); the child removes it."""
    gone = tmp_path / "gone"
    gone.mkdir()
    return gone


def _run_in_removed_dir(gone, *args: str) -> subprocess.CompletedProcess:
    """`zcrelay ARGS` started in `gone`, removed just before the exec; stopped by SIGTERM once it
    listens, or left to end by itself."""
    def enter_and_remove() -> None:
        os.chdir(gone)
        os.rmdir(gone)

    # No empty entry in PYTHONPATH (zcrelay_env's "ROOT:" when it was unset): Python makes each
    # absolute at start-up, and "" in a removed directory is a fatal "error evaluating path".
    env = dict(zcrelay_env(), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(zcrelay_argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=enter_and_remove,
                            start_new_session=True)
    lines = []
    try:
        while line := proc.stderr.readline():
            lines.append(line)
            if "listening on" in line:
                os.kill(proc.pid, signal.SIGTERM)
                break
        _, rest = proc.communicate(timeout=20)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", "".join(lines) + rest)


def test_an_absolute_unix_path_works_from_a_removed_directory(gone_cwd, tmp_path):
    """Comparing rules took os.getcwd() for every Unix path, absolute ones too: run from a
    directory removed meanwhile, `forward 0 unix:/run/app.sock` was a FileNotFoundError traceback."""
    done = _run_in_removed_dir(gone_cwd, "forward", "127.0.0.1:0", f"unix:{tmp_path}/app.sock")
    assert done.returncode == ExitCode.OK and "Traceback" not in done.stderr, done.stderr


def test_a_relative_unix_path_from_a_removed_directory_is_one_error_line(gone_cwd):
    """A relative path there cannot be bound (ENOENT): one line and an exit code, no traceback."""
    done = _run_in_removed_dir(gone_cwd, "forward", "unix:relay.sock", "127.0.0.1:9")
    assert done.returncode not in (ExitCode.OK, ExitCode.FAILURE), done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_config_file_with_a_utf8_byte_order_mark_is_read(tmp_path, settings):
    """Editors on Windows save UTF-8 with a BOM: it was "Invalid statement (at line 1, column 1)",
    about a character nobody can see."""
    config = tmp_path / "zcrelay.toml"
    config.write_bytes(b"\xef\xbb\xbflinger = 5\n")
    got, _ = settings("-c", str(config), "0", "127.0.0.1:9")
    assert got.linger == 5.0
