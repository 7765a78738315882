"""Input that once ended in a traceback, a hang or a silent misreading, found by an adversarial
review of the command line: each must be a one-line usage error (exit 2) or work as documented."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest

from zcrelay import addresses
from tests.conftest import run_zcrelay


def one_line_error(done: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    err = done.stderr.decode()
    assert done.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("text", ["127.0.0.1:²", "²", "127.0.0.1:١٢٣", "١٢٣", "[::1]:²"])
def test_a_port_is_ascii_digits_only(text):
    """str.isdigit() takes '²' (int() then raised ValueError) and '١٢٣' (read as port 123)."""
    with pytest.raises(addresses.AddressError):
        addresses.parse(text, listen=True)
    one_line_error(run_zcrelay("connect", text, stdin=subprocess.DEVNULL), 2)


@pytest.mark.parametrize("text, port", [("localhost:http", 80), ("[::1]:https", 443), (":ssh", 22),
                                        ("127.0.0.1:0080", 80)])
def test_a_port_may_be_a_service_name(text, port):
    """ssh -L, socat and nc take a service name for a port ("host:http"); zcrelay said "port
    'http' is not a number". (netbase's /etc/services, which .ci/run installs.)"""
    assert addresses.parse(text, listen=True).port == port


@pytest.mark.parametrize("text, says", [("localhost:no-such-service", "not a number or a TCP service"),
                                        ("localhost:8o", "is not a number")])
def test_a_port_that_is_no_number_and_no_service_is_a_usage_error(text, says):
    one_line_error(run_zcrelay("connect", text, stdin=subprocess.DEVNULL), 2, says, repr(text))


@pytest.mark.parametrize("text, says", [("[::1]", "no port after ']'"), ("[::1", "no closing ']'")])
def test_a_bracketed_address_says_what_is_missing(text, says):
    one_line_error(run_zcrelay("connect", text, stdin=subprocess.DEVNULL), 2, says)


@pytest.mark.parametrize("size, says", [("9" * 400, "too large"), ("99999999T", "too large"),
                                        ("١M", "not a size"), ("1.5.5M", "not a size")])
def test_a_size_too_large_or_not_ascii_is_a_usage_error(size, says):
    """400 digits made float() infinite, and int() raised OverflowError."""
    one_line_error(run_zcrelay("forward", "--pipe-size", size, "0", "127.0.0.1:9"), 2, says)


@pytest.mark.parametrize("argv", [
    ["forward", "--connect-timeout", "nan", "0", "127.0.0.1:9"],
    ["forward", "--idle-timeout", "NaN", "0", "127.0.0.1:9"],
    ["forward", "--linger", "nan", "0", "127.0.0.1:9"],
    ["connect", "--close-after", "nan", "127.0.0.1:9"],
    ["send", "--linger", "nan", "/etc/hostname", "127.0.0.1:9"],
])
def test_nan_is_refused_by_every_float_option(argv):
    """min=0 let NaN through (nan < 0 is false): a NaN connect timeout made every connection
    an internal error; a NaN linger or idle timeout meant none."""
    one_line_error(run_zcrelay(*argv, stdin=subprocess.DEVNULL), 2, "is not a number", argv[-3])


def test_a_backlog_beyond_an_int_is_as_large_as_the_kernel_allows(zcrelay):
    """listen(2) takes an int: 2**31 raised OverflowError inside the listener's nursery."""
    relay = zcrelay("forward", "127.0.0.1:0", "127.0.0.1:9", "--backlog", str(2**31))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10):
        pass
    code, err = relay.stop()
    assert code == 0, err


def _unix_listener(path: str, backlog: int = 8) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(backlog)
    return sock


def test_a_live_unix_listener_is_in_use_and_costs_it_no_connection(tmp_path):
    """Starting on a path a server listens on is exit 3. The check used to connect to the
    server, which cost it a connection: a one-shot listener (socat UNIX-LISTEN) ended on it."""
    path = str(tmp_path / "live.sock")
    with _unix_listener(path) as live:
        live.setblocking(False)
        for cwd, name in ((None, path), (str(tmp_path), "live.sock")):  # absolute, relative
            done = run_zcrelay("listen", f"unix:{name}", stdin=subprocess.DEVNULL, cwd=cwd)
            one_line_error(done, 3, "address already in use")
        with pytest.raises(BlockingIOError):
            live.accept()  # nobody knocked


def test_a_unix_listener_with_a_full_backlog_is_in_use_not_a_hang(tmp_path):
    """Bound in another network namespace, or under a spelling /proc/net/unix does not show, a
    live socket is found by connecting; a full backlog made that blocking connect hang. Here
    the listing is hidden by binding through a symlinked directory."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with _unix_listener(str(real / "full.sock"), backlog=0) as live:
        fillers = []
        try:
            for _ in range(4):  # a backlog of 0 takes one; the next connects would block
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                fillers.append(s)
                try:
                    s.connect(str(real / "full.sock"))
                except BlockingIOError:
                    break
            done = run_zcrelay("listen", f"unix:{tmp_path / 'link' / 'full.sock'}",
                               stdin=subprocess.DEVNULL, timeout=20)
            one_line_error(done, 3, "address already in use")
        finally:
            for s in fillers:
                s.close()


def test_a_stale_unix_socket_file_is_replaced(tmp_path, zcrelay):
    path = str(tmp_path / "stale.sock")
    _unix_listener(path).close()  # the file stays; nobody listens
    assert os.path.exists(path)
    relay = zcrelay("forward", f"unix:{path}", "127.0.0.1:9")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
    code, err = relay.stop()
    assert code == 0, err


def test_ctrl_c_during_start_up_is_130_and_no_traceback():
    """SIGINT while the interpreter imports typer, trio and the command's modules (50-150 ms)
    printed a KeyboardInterrupt traceback; the man page promises 130 and nothing printed.
    Signals are sent at stepped delays, the scenario itself, not a wait for readiness; one that
    lands in the interpreter's own start-up (its 'Fatal Python error', or runpy compiling
    __main__, before any zcrelay code runs) says nothing about zcrelay and is not counted."""
    import signal
    import time

    from tests.conftest import zcrelay_argv, zcrelay_env

    counted = 0
    for delay_ms in range(30, 260, 15):
        proc = subprocess.Popen(zcrelay_argv("listen", "-k", "127.0.0.1:0"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=zcrelay_env())
        time.sleep(delay_ms / 1000)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # the Ctrl-C was lost: a server came up and serves
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError((delay_ms, err.decode(errors="replace"))) from None
        text = err.decode(errors="replace")
        if "Fatal Python error" in text or ("Traceback" in text and "zcrelay" not in text):
            continue  # in the interpreter's start-up or runpy, before zcrelay's first line
        counted += 1
        assert "Traceback" not in text, (delay_ms, text)
        # 0: the server's clean stop; 130, or death by the signal itself (the shell's 130):
        # Ctrl-C before the server's handling was in place.
        assert proc.returncode in (0, 130, -signal.SIGINT), (delay_ms, proc.returncode, text)
    assert counted >= 5


@pytest.mark.parametrize("argv", [
    ["forward", "127.0.0.1:0", "127.0.0.1:9"], ["forward", "127.0.0.1:0", "127.0.0.1:9", "--workers", "2"],
    ["tee", "-l", "127.0.0.1:0", "-t", "127.0.0.1:9", "--capture-dir", "."],
    ["listen", "-k", "127.0.0.1:0"], ["serve", "-l", "127.0.0.1:0", "/etc/hostname"],
], ids=["forward", "workers", "tee", "listen-k", "serve"])
def test_a_second_sigterm_while_stopping_is_ignored(tmp_path, argv):
    """timeout(1) sends SIGTERM to its child and to the group, a service manager may repeat
    it: the second killed a stopping server by the default action (status 143), often before
    its summary. It is ignored now: exit 0 and the summary, whatever the gap."""
    import signal
    import time

    from tests.conftest import zcrelay_argv, zcrelay_env

    for gap_ms in (0.5, 5, 20):
        proc = subprocess.Popen(zcrelay_argv(*argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=zcrelay_env(), cwd=tmp_path)
        assert "listening on" in proc.stderr.readline().decode()  # ready
        proc.send_signal(signal.SIGTERM)
        time.sleep(gap_ms / 1000)  # the gap is the case under test, not a wait for readiness
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        text = err.decode(errors="replace")
        assert proc.returncode == 0, (gap_ms, proc.returncode, text)
        assert "stopped:" in text and "Traceback" not in text, (gap_ms, text)


def test_no_fd_for_the_socket_is_out_of_resources_not_a_failed_connect():
    """Under `ulimit -n 8` the socket(2) for the target fails with EMFILE: exit 7 (out of
    resources), where it used to be 6, which blames the target."""
    import resource

    def few_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))

    done = run_zcrelay("connect", "127.0.0.1:9", stdin=subprocess.DEVNULL, preexec_fn=few_fds)
    one_line_error(done, 7, "too many open files")


@pytest.mark.parametrize("argv, option", [
    (["forward", "--pipe-size", "-1", "0", "127.0.0.1:9"], "--pipe-size"),
    (["tee", "--pipe-size", "0", os.devnull], "--pipe-size"),
    (["demo", "--pipe-size", "0"], "--pipe-size"),
    (["connect", "--pipe-size", "1", "127.0.0.1:9"], "--pipe-size"),
    (["send", "--offset", "-1", "/etc/hostname", "127.0.0.1:9"], "--offset"),
    (["send", "--length", "x", "/etc/hostname", "127.0.0.1:9"], "--length"),
    (["send", "--rate-limit", "0.5", "/etc/hostname", "127.0.0.1:9"], "--rate-limit"),
    (["bench", "--size", "1.5.5"], "--size"),
    (["send", "--offset", "0.5", "/etc/hostname", "127.0.0.1:9"], "--offset"),
    (["send", "--length", "1.7", "/etc/hostname", "127.0.0.1:9"], "--length"),
    (["bench", "--size", "1.5"], "--size"),
    (["demo", "--size", "0.5K1"], "--size"),
    (["demo", "--size", "100.5"], "--size"),
])
def test_a_bad_size_names_its_option_and_every_pipe_is_a_page_at_least(argv, option):
    """Sizes are parsed in the commands' bodies, where click has no parameter to name: the
    message said "Invalid value: '-1' is not a size" without saying which. tee and demo took a
    --pipe-size of 0, which every other command refuses."""
    one_line_error(run_zcrelay(*argv, stdin=subprocess.DEVNULL), 2, f"Invalid value for {option}")


@pytest.mark.parametrize("argv, name", [
    (["tee", "-l", "0", "-t", "nope", "--capture-dir", "d"], "--target"),
    (["tee", "-l", "nope", "-t", "127.0.0.1:9", "--capture-dir", "d"], "--listen"),
    (["forward", "0", "nope"], "TARGET"),
    (["forward", "nope", "127.0.0.1:9"], "LISTEN"),
    (["forward", "--rule", "0=nope"], "--rule"),
    (["serve", "/etc/hostname", "-l", "nope"], "--listen"),
    (["connect", "nope"], "ADDR"),
])
def test_a_bad_address_names_which_one(argv, name):
    """`tee -l 0 -t nope` said "Invalid value: 'nope'", not which of its two addresses."""
    one_line_error(run_zcrelay(*argv, stdin=subprocess.DEVNULL), 2, f"Invalid value for {name}: 'nope'")


def test_tee_relay_capture_to_its_own_listener_is_refused(tmp_path):
    """As forward refuses a rule whose target is its own listener: every connection would
    connect to itself again, and be captured again, until the fds ran out."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_zcrelay("tee", "-l", f":{port}", "-t", f"localhost:{port}", "--capture-dir", str(tmp_path),
                       stdin=subprocess.DEVNULL)
    one_line_error(done, 2, "its own listener")


@pytest.mark.parametrize("make, said", [(None, "does not exist (create it first)"),
                                         ("file", "is not a directory")])
def test_a_capture_dir_that_is_missing_says_so(tmp_path, make, said):
    """A missing --capture-dir was called "not a directory", which sent the user looking for a
    file in its place; the README's example now creates it first."""
    path = tmp_path / "capture"
    if make:
        path.write_bytes(b"")
    for argv in (["tee", "-l", "0", "-t", "127.0.0.1:9"], ["forward", "0", "127.0.0.1:9"]):
        one_line_error(run_zcrelay(*argv, "--capture-dir", str(path), stdin=subprocess.DEVNULL), 2,
                       f"Invalid value for --capture-dir: '{path}' {said}")


def test_a_size_is_counted_in_whole_bytes_and_exactly():
    """A float took an --offset of '0.5' as 0 bytes and '1.7' as 1, silently, and rounded
    offsets past 2**53. An offset or a length must be a whole number of bytes; a pipe size or
    a rate may round down ('1.1M')."""
    import typer

    from zcrelay.cli.common import parse_size

    assert parse_size("9007199254740993", exact=True) == 2**53 + 1
    assert parse_size("1.5K", exact=True) == parse_size("00001.500kib", exact=True) == 1536
    assert parse_size("1.1M") == 1153433
    for text in ("0.5", "1.7", "1.1M"):
        with pytest.raises(typer.BadParameter, match="not a whole number of bytes"):
            parse_size(text, "--offset", exact=True)
    for text in ("9" * 30, "4194304T"):  # 2**62
        with pytest.raises(typer.BadParameter, match="too large"):
            parse_size(text)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_unix_listeners_socket_file_is_removed_at_exit(tmp_path, zcrelay, workers):
    """As socat's unlink-close: a socket file left behind made clients get ECONNREFUSED and
    misled ls. With --workers, the parent removes it once, after its workers."""
    path = tmp_path / "gone.sock"
    relay = zcrelay("forward", f"unix:{path}", "127.0.0.1:9", "--workers", workers)
    assert path.exists()
    code, err = relay.stop()
    assert code == 0, err
    assert not path.exists()


@pytest.mark.parametrize("argv, sig", [
    (["listen"], "SIGTERM"), (["listen"], "SIGHUP"), (["listen", "-k"], "SIGHUP"),
    (["serve", "/etc/hostname", "--listen"], "SIGHUP"),
])
def test_a_listener_killed_by_a_signal_removes_its_socket_file(tmp_path, zcrelay, argv, sig):
    """The man page: SIGTERM ends a one-shot `listen` by its default action, SIGHUP every
    command, and a socket file is removed at exit; dying of the signal left the file behind.
    Still 128 + signum."""
    import signal

    path = tmp_path / "gone.sock"
    # At its default action, whatever the test run inherited: under nohup (SIGHUP ignored, and
    # ignored stays ignored across exec) zcrelay rightly lived on, and was killed after 20 s.
    relay = zcrelay(*argv, f"unix:{path}",  # stdin: /dev/null
                    preexec_fn=lambda: signal.signal(getattr(signal, sig), signal.SIG_DFL))
    assert path.exists()
    code, err = relay.stop(getattr(signal, sig))
    assert code == -getattr(signal, sig), err  # died of the signal (a shell says 128 + signum)
    assert "Traceback" not in err
    assert not path.exists()


def test_a_socket_file_someone_else_put_there_since_is_left_alone(tmp_path, zcrelay):
    path = tmp_path / "theirs.sock"
    relay = zcrelay("forward", f"unix:{path}", "127.0.0.1:9")
    path.unlink()
    with _unix_listener(str(path)):  # another server took the path meanwhile
        code, err = relay.stop()
        assert code == 0, err
        assert path.exists()


def test_listen_keep_open_prints_a_servers_summary_when_stopped(zcrelay):
    """The man page's SIGNALS: servers print a summary when SIGINT or SIGTERM stops them;
    listen --keep-open printed none."""
    import signal

    relay = zcrelay("listen", "-k", "127.0.0.1:0")  # stdin: /dev/null
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as client:
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            assert client.recv(10) == b""  # stdin is /dev/null: EOF at once
    code, err = relay.stop(signal.SIGINT)
    assert code == 0, err
    assert "stopped: 2 connections, up 0 bytes, down 10 bytes" in err, err
