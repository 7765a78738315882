"""Run trio as a guest of the reactor's own epoll loop, so a wake-up for bytes skips trio.

Why: a reactor that runs as a trio task wakes through trio's scheduler: trio's epoll_wait, the
task switch into the reactor, a re-arming epoll_ctl, then the reactor's own epoll_wait. On this
machine that trip costs about 17 µs of CPU per wake-up, more than the splices it wakes for
(benchmarks/README.md). A Host turns it around: the main thread blocks in the reactor's
epoll_wait and steps streams directly, and trio runs as its guest (the CLI starts it with
trio.lowlevel.start_guest_run): trio's ticks are callbacks of this loop, and trio's own I/O
waits happen in trio's helper thread, which hands each result back through `call_threadsafe`.

Everything still runs in the main thread (trio's ticks, the reactor's callbacks, the timers),
so nothing shared needs a lock. Code that runs under trio.run instead (the library, the
tests) gets a reactor run by trio tasks, as before: zcrelay.relay.Engine picks whichever the
current run offers.
"""

from __future__ import annotations

import collections
import os
import select
from typing import Callable

import trio

from zcrelay.reactor import Reactor

_current: "Host | None" = None


class Host:
    """The loop of one guest run: a queue of callbacks (trio's ticks, mostly) and, once an
    engine asks for one, the reactor whose epoll it waits in."""

    def __init__(self) -> None:
        self.reactor: Reactor | None = None
        self._queue: collections.deque[Callable[[], object]] = collections.deque()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._outcome = None

    def call_threadsafe(self, fn: Callable[[], object]) -> None:
        self._queue.append(fn)  # deque.append is atomic
        os.eventfd_write(self._wakeup, 1)

    def call_soon(self, fn: Callable[[], object]) -> None:
        self._queue.append(fn)

    def adopt(self, reactor: Reactor) -> bool:
        """Make `reactor` the one this loop waits in; False if it already has a live one."""
        if self.reactor is not None and not self.reactor.closed:
            return False
        self.reactor = reactor
        reactor.add_wakeup(self._wakeup)
        return True

    def done(self, outcome) -> None:
        """trio's done_callback: the guest run ended with this outcome."""
        self._outcome = outcome

    def __enter__(self) -> "Host":
        global _current
        if _current is not None:
            os.close(self._wakeup)
            raise RuntimeError("a host loop is already running")
        _current = self
        return self

    def __exit__(self, *exc_info) -> None:
        global _current
        _current = None
        if self._outcome is not None:
            os.close(self._wakeup)
        # else the guest run was abandoned (an exception out of the loop): trio's helper thread
        # may still post to the eventfd, so it stays open rather than risk a reused fd number.

    def loop(self):
        """Run until the guest run is done (see `done`); return its outcome. Inside `with self`,
        once trio's guest run was started with this host's call_threadsafe, call_soon and done."""
        queue = self._queue
        poll = select.poll()
        poll.register(self._wakeup, select.POLLIN)
        while self._outcome is None:
            for _ in range(len(queue)):  # what is queued now; what these queue waits a turn
                queue.popleft()()
            if self._outcome is not None:
                break
            reactor = self.reactor
            if reactor is not None and reactor.closed:
                reactor = self.reactor = None
            if reactor is None:
                if not queue:
                    poll.poll()
                    _drain(self._wakeup)
            else:
                try:
                    reactor.host_run(queue)
                except Exception as exc:
                    self._crash(reactor, exc)
        return self._outcome

    def _crash(self, reactor: Reactor, exc: Exception) -> None:
        """A reactor callback (a watch's, a timer's) raised: a bug, since the reactor ends a
        failing stream itself. Under trio.run the reactor's system task would crash the run:
        TrioInternalError, every task cancelled and cleaned up. Do the same here rather than
        let it out of the loop: that abandoned the guest run, so no task's cleanup ran (a
        forwarder's listeners and connections), and trio's run state stayed in this thread
        (no later trio.run could start). The reactor is closed, as its crashed task closes it,
        and the loop serves trio's ticks until the run has ended."""
        self.reactor = None
        reactor.close()
        # Thread-safe, so that it also wakes trio's I/O thread: a sync callback that raises
        # crashes the run as a system task's exception does (trio's entry queue).
        trio.lowlevel.current_trio_token().run_sync_soon(_reraise, exc)


def _reraise(exc: Exception) -> None:
    raise exc


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def current() -> Host | None:
    """The host loop in charge of the current thread's trio run, if it is a guest run."""
    return _current
