"""`zcrelay forward --workers N`: N forked processes serve the same listeners, stop together,
and report one summary. Subprocesses, real sockets, both copy paths."""

from __future__ import annotations

import os
import select
import signal
import socket
import time

import trio

from tests import traffic
from tests.conftest import run_zcrelay
from tests.test_forward import MiB, check_summary, conn_lines, path_args, serve_traffic

def workers_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def wait_gone(pids: list[int], timeout: float = 20) -> None:
    """Block (in poll on pidfds, no sleeps) until every process in `pids` has exited."""
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            assert poller.poll(timeout * 1000), f"process {pid} is still running"
        finally:
            os.close(fd)


def finish(relay, sig: int | None = None) -> tuple[int, str]:
    """Signal the parent alone (not its group, as a terminal would), and collect its end."""
    if sig is not None:
        os.kill(relay.proc.pid, sig)
    _, rest = relay.proc.communicate(timeout=30)
    relay.stderr_lines.extend(rest.splitlines())
    return relay.proc.returncode, "\n".join(relay.stderr_lines)


async def test_workers_share_connections_and_every_byte_arrives(zcrelay, path):
    """48 connections, 2 MiB each way, through 2 workers: hashes match both ways, both workers
    served some (worker K numbers its connections K, K+2, ...), one summary adds them up."""
    async with trio.open_nursery() as nursery:
        server = await serve_traffic(nursery)
        relay = zcrelay("forward", "127.0.0.1:0", f"127.0.0.1:{server.port}", "--workers", "2", *path_args(path))
        assert len(workers_of(relay.proc.pid)) == 2
        results = await traffic.run_clients(("127.0.0.1", relay.port), 48, 2 * MiB, 2 * MiB)
        await traffic.check(results, server)
        nursery.cancel_scope.cancel()
    relay.wait_for_lines(" close=", 48)
    code, err = finish(relay, signal.SIGTERM)
    assert code == 0, err
    numbers = sorted(int(m.group(1)) for m in conn_lines(err))
    assert len(numbers) == 48 and len(set(numbers)) == 48
    assert {n % 2 for n in numbers} == {0, 1}, numbers  # both workers (all on one: p = 2**-47)
    check_summary(err, 48, 2 * MiB, 2 * MiB, path)
    assert err.count("listening on") == 1 and "Traceback" not in err


async def test_sigint_to_the_parent_alone_stops_every_worker(zcrelay):
    relay = zcrelay("forward", "127.0.0.1:0", "127.0.0.1:9", "--workers", "3")
    children = workers_of(relay.proc.pid)
    assert len(children) == 3
    code, err = finish(relay, signal.SIGINT)
    assert code == 0, err
    assert "stopped: 0 connections" in err and err.count("stopped:") == 1
    wait_gone(children)


async def test_workers_stop_when_their_parent_is_killed(zcrelay):
    """The stop pipe reads EOF when the parent dies, however it dies: no orphaned workers."""
    relay = zcrelay("forward", "127.0.0.1:0", "127.0.0.1:9", "--workers", "2")
    children = workers_of(relay.proc.pid)
    finish(relay, signal.SIGKILL)
    wait_gone(children)


async def test_a_worker_that_dies_stops_the_others_with_an_error(zcrelay, path):
    """16 connections, 1 MiB each way, through 2 workers; then worker 1 is killed. The others
    stop, the exit code is 1, and the summary still counts what the survivor relayed (it gave
    none at all before): exactly its connections (worker 2 numbers them 2, 4, ...), marked as
    short of the dead worker's."""
    async with trio.open_nursery() as nursery:
        server = await serve_traffic(nursery)
        relay = zcrelay("forward", "127.0.0.1:0", f"127.0.0.1:{server.port}", "--workers", "2", *path_args(path))
        first, second = workers_of(relay.proc.pid)
        results = await traffic.run_clients(("127.0.0.1", relay.port), 16, MiB, MiB)
        await traffic.check(results, server)
        nursery.cancel_scope.cancel()
    relay.wait_for_lines(" close=", 16)
    os.kill(first, signal.SIGKILL)
    code, err = finish(relay)
    assert code == 1, err
    assert f"worker 1 (pid {first}) was killed by signal 9; stopping the others" in err
    assert "Traceback" not in err
    survivors = [m for m in conn_lines(err) if int(m.group(1)) % 2 == 0]
    [line] = [line for line in err.splitlines() if "stopped:" in line]
    assert line.endswith("(counted by the workers that reported; a worker ended without)"), line
    check_summary(line, len(survivors), MiB, MiB, path)
    wait_gone([second])


async def test_workers_share_a_unix_listener(zcrelay, tmp_path, path):
    sock_path = tmp_path / "relay.sock"
    async with trio.open_nursery() as nursery:
        server = await serve_traffic(nursery)
        relay = zcrelay("forward", f"unix:{sock_path}", f"127.0.0.1:{server.port}", "--workers", "2",
                        *path_args(path))
        results = await traffic.run_clients(str(sock_path), 8, MiB, 3 * MiB, family=socket.AF_UNIX)
        await traffic.check(results, server)
        nursery.cancel_scope.cancel()
    relay.wait_for_lines(" close=", 8)
    code, err = finish(relay, signal.SIGTERM)
    assert code == 0, err
    assert "stopped: 8 connections" in err


def test_port_in_use_with_workers_is_one_line_and_its_exit_code():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = run_zcrelay("forward", f"127.0.0.1:{taken.getsockname()[1]}", "127.0.0.1:9", "--workers", "2")
    err = done.stderr.decode()
    assert done.returncode == 3, err
    assert "address already in use" in err and len(err.strip().splitlines()) == 1


def test_bad_worker_counts_are_usage_errors(tmp_path):
    config = tmp_path / "zero.toml"
    config.write_text("workers = 0\n")
    for argv in (["--workers", "0"], ["--workers", "many"], ["--config", str(config)]):
        done = run_zcrelay("forward", "127.0.0.1:0", "127.0.0.1:9", *argv)
        err = done.stderr.decode()
        assert done.returncode == 2, (argv, err)
        assert "Traceback" not in err and "workers" in err, (argv, err)


def test_a_refused_pipe_size_is_reported_once_not_once_per_worker(zcrelay):
    """Without CAP_SYS_RESOURCE a pipe above pipe-max-size is refused: the parent asks once,
    reports the clamp once, and the workers ask for what was granted."""
    limit = int(open("/proc/sys/fs/pipe-max-size").read())
    big = f"{4 * limit // 1024}K"
    prefix = ["setpriv", "--bounding-set", "-sys_resource", "--"] if os.geteuid() == 0 else []
    relay = zcrelay("forward", "127.0.0.1:0", "127.0.0.1:9", "--pipe-size", big, "--workers", "3", prefix=prefix)
    code, err = finish(relay, signal.SIGTERM)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "pipe size" in line]
    assert len(notes) == 1 and f"using {limit}" in notes[0], err


async def test_a_second_signal_does_not_wait_for_the_workers(zcrelay):
    """A worker that cannot finish (stopped here with SIGSTOP) holds up the first SIGINT; the
    second kills the workers and exits 130 at once, as a second Ctrl-C ends a single process."""
    relay = zcrelay("forward", "127.0.0.1:0", "127.0.0.1:9", "--workers", "2")
    first, second = workers_of(relay.proc.pid)
    os.kill(first, signal.SIGSTOP)
    os.kill(relay.proc.pid, signal.SIGINT)
    wait_gone([second])  # the other worker did stop at the first signal; the parent waits on
    assert relay.proc.poll() is None
    code, err = finish(relay, signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err and "stopped:" not in err
    wait_gone([first])


def test_two_quick_signals_never_end_in_an_error(zcrelay):
    """Two SIGINTs half a millisecond apart, as a terminal's double Ctrl-C or `timeout -s INT`
    to the group can send: the second used to land between closing the workers' stop pipe and
    forgetting it, closed it again, and ended in 'Bad file descriptor' and exit 1."""
    for _ in range(5):
        relay = zcrelay("forward", "127.0.0.1:0", "127.0.0.1:9", "--workers", "32")
        os.kill(relay.proc.pid, signal.SIGINT)
        time.sleep(0.0005)  # the gap is the case under test, not a wait for readiness
        os.kill(relay.proc.pid, signal.SIGINT)
        code, err = finish(relay)
        assert code in (0, 130), err
        assert "error" not in err and "Traceback" not in err, err


def test_workers_do_not_join_another_processes_port(zcrelay):
    """SO_REUSEPORT lets same-user sockets share a port. A second `forward --workers 2` on a
    port that a first one serves used to join its group, and the kernel split the connections
    between two different targets. Now it is 'address in use', exit 3, as with one worker."""
    first = zcrelay("forward", "127.0.0.1:0", "127.0.0.1:9", "--workers", "2")
    done = run_zcrelay("forward", f"127.0.0.1:{first.port}", "127.0.0.1:7", "--workers", "2")
    err = done.stderr.decode()
    assert done.returncode == 3, err
    assert "address already in use" in err and len(err.strip().splitlines()) == 1
    code, err = finish(first, signal.SIGTERM)
    assert code == 0, err


def test_a_signal_while_the_workers_start_stops_cleanly(monkeypatch):
    """A SIGTERM between two forks (zcrelay started with many workers, stopped at once) closed
    the stop pipe in the parent; the next worker closed its copy again (EBADF), exited 1, and
    zcrelay exited 1 without a word. In process: the first fork signals the parent, as a signal
    landing there would."""
    import threading

    from zcrelay.addresses import parse
    from zcrelay.cli import workers as pool
    from zcrelay.exitcodes import ExitCode
    from zcrelay.forward import ForwardConfig, Rule
    from zcrelay.stats import Totals

    real_fork = os.fork
    forked: list[int] = []

    def fork() -> int:
        pid = real_fork()
        if pid:
            forked.append(pid)
            if len(forked) == 1:  # to the main thread: pytest's other threads would take it at once
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        return pid

    def work(settings, socks, worker, stop_fd, ready):  # in the child: serve until told to stop
        ready([])
        select.select([stop_fd], [], [])
        return ExitCode.OK, Totals()

    monkeypatch.setattr(os, "fork", fork)
    rule = Rule(parse("127.0.0.1:0", listen=True), parse("127.0.0.1:9", listen=False))
    code = pool.serve(ForwardConfig(rules=(rule,)), 4, Totals(), lambda bound: None, work)
    assert code == ExitCode.OK
    assert len(forked) == 1  # told to stop: no more workers started


def _one_rule():
    from zcrelay.addresses import parse
    from zcrelay.forward import ForwardConfig, Rule

    return ForwardConfig(rules=(Rule(parse("127.0.0.1:0", listen=True), parse("127.0.0.1:9", listen=False)),))


def test_a_worker_that_crashes_says_why(capfd):
    """A bug in a worker (an exception the CLI's boundary does not map to an exit code) is a
    traceback in one process. In a worker it was swallowed by the os._exit that ends every
    worker: the parent said only 'worker 1 exited with code 1', and the cause was lost."""
    from zcrelay.cli import workers as pool
    from zcrelay.exitcodes import ExitCode
    from zcrelay.stats import Totals

    def work(settings, socks, worker, stop_fd, ready=lambda bound: None):  # in the child
        if worker[0] == 1:
            raise AssertionError("a bug in worker 1")
        select.select([stop_fd], [], [])
        return ExitCode.OK, Totals()

    code = pool.serve(_one_rule(), 2, Totals(), lambda bound: None, work)
    err = capfd.readouterr().err
    assert code == ExitCode.FAILURE
    assert "Traceback" in err and "AssertionError: a bug in worker 1" in err, err


def test_workers_that_fail_to_start_print_no_listening_line():
    """'listening on' was printed as soon as the workers were forked, before any of them
    served: workers that then failed to start (out of fds, say: exit 7) left a ready line that
    a supervisor or a script waiting for it took for a running relay. One process prints only
    its error then; so does a relay whose workers fail: the line comes once every worker
    serves, and not at all if one ended first."""
    from zcrelay.cli import workers as pool
    from zcrelay.exitcodes import ExitCode
    from zcrelay.stats import Totals

    def work(settings, socks, worker, stop_fd, ready=lambda bound: None):  # in the child
        if worker[0] == 2:
            return ExitCode.NO_RESOURCES, Totals()  # failed before it served (its error said why)
        ready([])
        select.select([stop_fd], [], [])
        return ExitCode.OK, Totals()

    readied = []
    code = pool.serve(_one_rule(), 3, Totals(), readied.append, work)
    assert code == ExitCode.NO_RESOURCES
    assert readied == []


def test_a_fork_that_fails_names_the_worker_and_leaks_nothing(monkeypatch):
    """fork(2) fails with EAGAIN at a process limit (a container's pids.max, RLIMIT_NPROC). It
    said only "error: Resource temporarily unavailable", not what could not be had, and the
    report pipe made for that worker stayed open. The workers already started are stopped."""
    import errno

    from zcrelay.cli import workers as pool
    from zcrelay.exitcodes import ExitCode
    from zcrelay.stats import Totals

    real_fork = os.fork
    forked: list[int] = []

    def fork() -> int:
        if forked:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid

    def work(settings, socks, worker, stop_fd, ready):  # in the child: serve until told to stop
        ready([])
        select.select([stop_fd], [], [])
        return ExitCode.OK, Totals()

    monkeypatch.setattr(os, "fork", fork)
    fds = sorted(os.listdir("/proc/self/fd"))
    try:
        pool.serve(_one_rule(), 3, Totals(), lambda bound: None, work)
    except OSError as exc:
        failure = exc
    assert failure.errno == errno.EAGAIN
    assert "worker 2 of 3" in failure.strerror and "Resource temporarily unavailable" in failure.strerror
    from zcrelay.cli.common import exit_code_for

    assert exit_code_for(failure) == (ExitCode.NO_RESOURCES, f"out of resources: {failure.strerror}")
    assert sorted(os.listdir("/proc/self/fd")) == fds
    wait_gone(forked)
