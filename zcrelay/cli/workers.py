"""`zcrelay forward --workers N`: N processes serving the same listeners.

The parent binds every rule's listener (`net.bind_listeners`: for TCP one SO_REUSEPORT socket
per worker, so the kernel spreads new connections over the workers without waking them all;
a Unix socket is shared), forks the workers, prints the "listening on" lines and then only
waits. It forks before any thread or trio run exists in it.

It says stop with a byte in a pipe that every worker watches (nobody reads it, so it stays
readable for all), then closes its end. A worker also sees that pipe readable (EOF) if the
parent dies, so no worker outlives its parent, and no signal can reach a worker between its
handlers (workers ignore SIGINT and SIGTERM: a Ctrl-C on the terminal reaches the parent,
which stops them all; a second one kills them).
Each worker writes READY on its own report pipe once it serves (its listeners are in its
loop), and its totals as JSON before it exits; the parent prints the "listening on" lines once
every worker has said it serves (none if one ended first: a worker that failed to start, out
of fds say, is an error and no ready line, as in one process), and one summary line.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import traceback
from dataclasses import dataclass, replace
from typing import Callable

from zcrelay import net
from zcrelay.cli.common import log
from zcrelay.exitcodes import ExitCode
from zcrelay.forward import Bound, ForwardConfig
from zcrelay.pipes import PipePool
from zcrelay.stats import Totals


@dataclass
class Worker:
    index: int
    pid: int
    report: int  # read end of its report pipe
    status: int | None = None  # os.waitstatus_to_exitcode: an exit code, or -signal
    head: bytes = b""  # the first byte of its report, if _wait_ready read it instead of READY


def bind_all(settings: ForwardConfig, count: int) -> list[list]:
    """For each rule, `count` listening sockets (one per worker); raises BindError, having
    closed every socket already bound."""
    bound: list[list] = []
    try:
        for rule in settings.rules:
            bound.append(net.bind_listeners(rule.listen, count, settings.backlog))
    except BaseException:
        close_all(bound)
        raise
    return bound


def close_all(bound: list[list]) -> None:
    for socks in bound:
        for sock in socks:
            sock.close()


def probe_pipe_size(settings: ForwardConfig) -> ForwardConfig:
    """Ask for one pipe in the parent, so a size the kernel refuses is reported once, not once
    per worker; the workers then ask for what the kernel granted."""
    if not settings.splice:
        return settings
    pool = PipePool(size=settings.pipe_size, max_idle=1, on_notice=log.warning)
    try:
        pool.put(pool.get())
    finally:
        pool.close()
    return replace(settings, pipe_size=pool.granted or settings.pipe_size)


def serve(settings: ForwardConfig, count: int, totals: Totals,
          on_ready: Callable[[list[Bound]], None],
          work: Callable[..., tuple[ExitCode, Totals]]) -> ExitCode:
    """Bind, run `work(settings, sockets, (K, N), stop_fd, ready)` in N forked workers (each
    calls `ready(bound)` once it serves), call `on_ready` once all of them have, serve until
    SIGINT/SIGTERM, add the workers' totals to `totals`; return the exit code."""
    settings = probe_pipe_size(settings)
    bound = bind_all(settings, count)
    names = [Bound(rule, net.local_name(socks[0])) for rule, socks in zip(settings.rules, bound)]
    stop_r, stop_w = os.pipe()
    state = _State()
    workers: list[Worker] = []

    def stop() -> None:
        nonlocal stop_w
        state.stopping = True
        # Called by the signal handler too: a second signal between the close and the `-1`
        # re-entered here and closed the fd again (EBADF, exit 1 where 130 was due). The
        # signals wait until the fd is closed and forgotten.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            if stop_w >= 0:
                # A byte, not only the close: a worker that has not yet closed its inherited
                # copy of this end (stopped right after the fork, say) would keep EOF from
                # the others.
                with contextlib.suppress(OSError):
                    os.write(stop_w, b"x")
                os.close(stop_w)
                stop_w = -1
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def on_signal(signum: int, _frame: object) -> None:
        if state.signals and signum == signal.SIGTERM:
            return  # repeated by tools (timeout(1) signals its child and the group): no hurry
        state.signals += 1
        if state.signals > 1:  # asked twice: do not wait for the workers to finish
            for worker in workers:
                if worker.status is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
        stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
    try:
        for index in range(1, count + 1):
            # The stop signals wait while a worker is forked. A stop in the parent just before
            # the fork left the child closing the closed stop_w: that worker ended at once with
            # status 1 and no message, and so did zcrelay for a SIGTERM during start-up. And
            # the parent's handler must not run in the child before it ignores them.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            pid = -1
            try:
                if not state.stopping:  # else a signal came during start-up: start no more
                    report_r, report_w = os.pipe()
                    sys.stderr.flush()  # nothing buffered may be written twice
                    try:
                        pid = _fork(index, count)
                    except BaseException:
                        os.close(report_r)
                        os.close(report_w)
                        raise
            finally:
                if pid != 0:  # the parent; the child lets them through once it ignores them
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if pid < 0:
                break
            if pid == 0:  # the worker: never returns into the parent's code
                code = ExitCode.FAILURE
                try:
                    for sig in previous:
                        signal.signal(sig, signal.SIG_IGN)
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    os.close(stop_w)
                    os.close(report_r)
                    for other in workers:
                        os.close(other.report)
                    socks = [s[index - 1] for s in bound]
                    for s in bound:  # a Unix socket is the same object in every slot
                        for sock in s:
                            if all(sock is not mine for mine in socks):
                                sock.close()

                    def ready(_bound: object, fd: int = report_w) -> None:
                        os.write(fd, READY)

                    code, mine = work(settings, socks, (index, count), stop_r, ready)
                except BaseException:
                    # A bug (an exception the CLI boundary does not map to a code): its
                    # traceback, as one process prints it. os._exit swallowed it, and the
                    # parent could say only "exited with code 1".
                    with contextlib.suppress(BaseException):
                        traceback.print_exc()
                else:
                    with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
                        os.write(report_w, json.dumps(mine.record()).encode())
                finally:
                    with contextlib.suppress(BaseException):
                        sys.stderr.flush()
                    os._exit(code)
            os.close(report_w)
            workers.append(Worker(index, pid, report_r))
        close_all(bound)  # the workers hold them now
        os.close(stop_r)
        stop_r = -1
        if _wait_ready(workers):  # else one ended first: _wait says which, and its code is ours
            on_ready(names)
        code = _wait(workers, stop, state, totals)
    finally:
        close_all(bound)  # again, if a fork failed half-way (closing twice is harmless)
        if stop_r >= 0:
            os.close(stop_r)
        stop()
        for worker in workers:
            if worker.status is None:  # a fork or the wait failed: the closed pipe stops it
                os.waitpid(worker.pid, 0)
            os.close(worker.report)
        if state.signals:  # stopped by a signal: a SIGTERM repeated from here on is ignored too
            previous[signal.SIGTERM] = signal.SIG_IGN
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _fork(index: int, count: int) -> int:
    """os.fork, with an error that says what could not be had: EAGAIN at a process limit (a
    container's pids.max, RLIMIT_NPROC) read "error: Resource temporarily unavailable"."""
    try:
        return os.fork()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot start worker {index} of {count} (fork: {exc.strerror})") from None


@dataclass
class _State:
    stopping: bool = False  # the workers were told to stop
    signals: int = 0  # SIGINT/SIGTERM received; the second kills the workers


def _wait(workers: list[Worker], stop: Callable[[], None], state: _State, totals: Totals) -> ExitCode:
    """Reap every worker; the first that ends before it was told to stops the others, and
    its failure is the exit code. After a second signal: INTERRUPTED, as a second Ctrl-C
    gives a single process."""
    code = ExitCode.OK
    by_pid = {w.pid: w for w in workers}
    while any(w.status is None for w in workers):
        pid, status = os.waitpid(-1, 0)  # a signal runs its handler and the wait resumes (PEP 475)
        worker = by_pid.get(pid)
        if worker is None:
            continue
        worker.status = os.waitstatus_to_exitcode(status)
        if state.signals > 1:
            code = ExitCode.INTERRUPTED
            continue
        report = _read_report(worker.report, worker.head)
        if report is not None:
            totals.merge(report)
        if worker.status != 0 or report is None:
            if code == ExitCode.OK:
                code = ExitCode(worker.status) if worker.status in _CODES else ExitCode.FAILURE
            if worker.status < 0:
                log.error("worker %d (pid %d) was killed by signal %d; stopping the others",
                          worker.index, worker.pid, -worker.status)
            elif not state.stopping:
                log.error("worker %d (pid %d) exited with code %d; stopping the others",
                          worker.index, worker.pid, worker.status)
            stop()
        elif not state.stopping:
            log.error("worker %d (pid %d) stopped on its own; stopping the others", worker.index, worker.pid)
            code = ExitCode.FAILURE
            stop()
    return code


_CODES = {int(c) for c in ExitCode}
READY = b"+"  # a worker's first byte on its report pipe once it serves; JSON starts with "{"


def _wait_ready(workers: list[Worker]) -> bool:
    """Block until every worker has written READY, or one has ended without it (EOF, or its
    report first); whether all did. Only the first byte of each report pipe is read."""
    poller = select.poll()
    waiting = {worker.report: worker for worker in workers}
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    while waiting:
        for fd, _ in poller.poll():  # a signal runs its handler and the poll resumes (PEP 475)
            first = os.read(fd, 1)
            if first != READY:
                waiting[fd].head = first  # its report's first byte ("{"), or b"" at EOF
                return False
            poller.unregister(fd)
            del waiting[fd]
    return True


def _read_report(fd: int, head: bytes = b"") -> dict | None:
    chunks = [head]
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    data = b"".join(chunks).removeprefix(READY)  # not read when another worker failed to start
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None
