"""One task that moves every relay stream: one epoll, stepped synchronously.

Why: with a trio task per direction, every message costs a trip through trio's scheduler
(wait_readable, epoll_ctl, reschedule, resume the coroutine) and that trip cost more CPU than
the splices it waited for: on HTTP keep-alive through the relay, 46 µs of relay CPU per request
against 25 µs with this reactor (HAProxy: 13-17 µs). Here one epoll fd holds every stream's
sockets; when it is readable, the ready streams are stepped by plain function calls until their
next EAGAIN. A connection costs no task switch per message. Who waits on that epoll fd: under
trio.run a trio task (`run`); under zcrelay.hosting the main thread itself (`host_run`), with
trio as its guest, so a wake-up skips trio's scheduler altogether.

Same rules as zcrelay.mover (shared/SPLICE.md), kept as one state machine per direction:
- try the syscall first, wait only on EAGAIN; at the top of each turn the stream holds no pipe
  or an empty one, so EAGAIN on the drain means "source empty" and on the pump "destination
  full" (`held` counts the bytes in the pipe). After a bulk drain the stream drains again
  into the same pipe before pumping; EAGAIN there is ambiguous and is never waited on: the
  stream pumps, and waits only on an unambiguous EAGAIN. After a small drain (a request, a
  reply: under _CHASE_FROM) has been delivered the stream waits without draining again, since
  that drain would almost always meet EAGAIN (see Readiness below); after a larger one it
  drains again at once;
- an idle stream holds no pipe and no buffer; a pipe that still holds bytes is destroyed;
- a stream that never meets EAGAIN gives way after mover.YIELD_EVERY bytes;
- user-space copying only when splice is off or refused the fd pair before the first byte
  (then the bytes already drained are written out first, so nothing is lost or reordered),
  counted in `Flow.copied` and `fallbacks`; and for a TCP urgent byte, which splice cannot
  pass (`_pass_urgent_byte`): one byte, read inline, in its place in the stream.

Readiness. A stream's sockets are level-triggered, each asked only for what a stream waits
on: EPOLLIN while the stream reading it waits for it (not while that stream waits for its
destination, nor once it has ended), EPOLLOUT while a stream waits to write to it. So after a
small message a stream waits at once, with no syscall: whatever is left, or comes, is
reported on the next turn. That saved an epoll_ctl per request/response pair, the re-arm
that edge-triggered readiness needed after a reply (a drain of as many bytes as the pipe has
slots may have filled it and left bytes behind, which raise no new edge). EPOLLHUP and
EPOLLERR cannot be masked: when one is reported and no stream waits on that fd (the other
direction still has bytes to deliver), level-triggered it would be reported on every turn,
so the fd turns edge-triggered for good (`_to_edge`). Its streams then wait as on an
edge-triggered fd: only after EAGAIN, or after a small drain that took fewer bytes than the
pipe has slots on a wake-up without a hang-up (the socket had nothing more; every later
arrival raises a new edge), or after a re-arm (`_rearm`: an epoll_ctl that polls the fd, so
nothing already there is missed). The watches' fds are edge-triggered too. Registering an
fd reports its current state, so a new stream is woken for data already there. Spurious
wake-ups cost one EAGAIN.

The reactor owns no fds: callers open streams on fds they own, and close them only after
`stop`. Each stream ends once, through its `on_end(stream, error)` callback (error None at
EOF), called from the reactor task; the callback must not raise.

Beside streams, the reactor runs what a connection needs before and around its streams, with
no task per connection: `watch(fd, callback)` calls back on an fd's events (a listener that
can accept, a socket whose connect completed) and `call_at(when, callback)` on a deadline
(connect timeout, linger, idle, accept back-off). Deadlines wait in a heap served by a second
system task, so a wake-up for bytes never pays for them. Callbacks must not raise.
"""

from __future__ import annotations

import heapq
import math
import mmap
import os
import select
from collections import Counter
from typing import Callable

import trio
from trio.lowlevel import checkpoint, wait_readable

from zcrelay import syscalls
from zcrelay.errors import OutOfResources, SpliceRefused, StreamError, translate
from zcrelay.mover import COPY_BUFSIZE, DESTINATION, SOURCE, URGENT_BYTE, YIELD_EVERY, urgent_into_pipe
from zcrelay.pipes import Pipe, PipePool
from zcrelay.stats import Flow

# EPOLLPRI: TCP urgent data, which splice cannot move (see _pass_urgent_byte).
_MASK = select.EPOLLIN | select.EPOLLPRI | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
# A stream's socket, level-triggered: asked for EPOLLOUT only while a stream waits to write to it.
_LEVEL = select.EPOLLIN | select.EPOLLPRI | select.EPOLLRDHUP
_READABLE = select.EPOLLIN | select.EPOLLPRI | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WANT_IN = select.EPOLLIN | select.EPOLLPRI | select.EPOLLRDHUP  # EPOLLHUP, EPOLLERR come anyway
_WANT_OUT = select.EPOLLOUT
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_HANGUPS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR | select.EPOLLPRI
_FIN_IN = select.EPOLLRDHUP | select.EPOLLHUP  # the peer's FIN has come (or the socket is closed)
_PRI = select.EPOLLPRI
_NEW, _FILE = -1, -2  # in Reactor._take's undo list: registered there; refused (a regular file)
_MAX_EVENTS = 1024
PAGE_SIZE = mmap.PAGESIZE  # a pipe holds size // PAGE_SIZE buffers (slots)
_TURNS = 8  # batches stepped per wake-up at most
# A drain at least this large marks a bulk transfer: drain again before pumping (see _step_splice).
# Smaller ones (requests, replies, interactive traffic) are pumped at once, in 3 splices a burst.
_FILL_FROM = 64 << 10
# A drain at least this large (half a loopback segment of 65,483 bytes, half a GRO packet),
# once delivered, is followed by another drain at once rather than a wait: a sender that
# streams faster than a segment per wake-up has most likely sent more meanwhile. Smaller ones
# wait, since their next drain would almost always meet EAGAIN.
_CHASE_FROM = 32 << 10

SPLICE, COPY = "splice", "copy"


def _stopped(_stream: "Stream", _error: BaseException | None) -> None:
    """The on_end of a stream taken out by Reactor.stop: never called."""


class Stream:
    """One direction, src → dst, and where it stands. Read-only outside the reactor."""

    __slots__ = ("src", "dst", "flow", "on_end", "mode", "pipe", "held", "pending", "done", "deferred", "woke")

    def __init__(self, src: int, dst: int, flow: Flow, on_end: Callable[["Stream", BaseException | None], None],
                 mode: str) -> None:
        self.src = src
        self.dst = dst
        self.flow = flow
        self.on_end = on_end
        self.mode = mode
        self.pipe: Pipe | None = None
        self.held = 0  # bytes in self.pipe
        self.pending: memoryview | None = None  # copy mode: read, not yet written
        self.done = False
        self.deferred: OSError | None = None  # a source error met while the pipe held bytes
        self.woke = 0  # the epoll events that woke it from a wait on its source (0: not that)

    def __repr__(self) -> str:
        return f"Stream({self.src}->{self.dst}, {self.mode}, held={self.held}, done={self.done})"


class Timer:
    """A callback due at `when` (trio's clock). `cancel()` is idempotent and safe after it ran."""

    __slots__ = ("when", "callback", "_reactor")

    def __init__(self, when: float, callback: Callable[[], None], reactor: "Reactor") -> None:
        self.when = when
        self.callback: Callable[[], None] | None = callback
        self._reactor = reactor

    def __lt__(self, other: "Timer") -> bool:
        return self.when < other.when

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self._reactor._cancelled_timers += 1


class Reactor:
    """Moves the streams of one trio run. Start `run` and `run_timers` in tasks (Engine does,
    as system tasks), or let a zcrelay.hosting.Host call `host_run`."""

    def __init__(self, pool: PipePool, *, splice: bool = True, max_chunk: int = syscalls.MAX_SPLICE_AT_ONCE,
                 copy_bufsize: int = COPY_BUFSIZE, fallbacks: Counter | None = None) -> None:
        self.pool = pool
        self._spare = pool.spare  # the pool's empty pipes: PipePool.get's common case, inline
        self.splice = splice
        self.max_chunk = min(max_chunk, syscalls.MAX_SPLICE_AT_ONCE)
        self.fallbacks = fallbacks if fallbacks is not None else Counter()
        self._epoll = select.epoll()
        self._readers: dict[int, Stream] = {}  # fd → the stream waiting for it to be readable
        self._writers: dict[int, Stream] = {}  # fd → the stream waiting for it to be writable
        self._ready: list[Stream] = []  # streams to step on the next turn
        self._unpollable: set[int] = set()  # fds epoll refuses (regular files): always ready
        self._scratch = bytearray(copy_bufsize)  # copy mode reads here; leftovers are copied out
        self._watchers: dict[int, tuple[Callable[[int], None], int]] = {}  # fd → (callback, turn)
        self._masks: dict[int, int] = {}  # fd → the events it is registered for
        self._level: set[int] = set()  # stream fds registered level-triggered (see _turn)
        # fds unwatched with keep=True: registered (edge-triggered, by their watch), not yet started
        self._handed: set[int] = set()
        self._no_mark: set[int] = set()  # source fds with no urgent mark (not TCP sockets)
        self._turns = 0  # counts _turn calls: an event polled before a watch is not for it
        self._timers: list[Timer] = []  # a heap; cancelled ones stay until popped or compacted
        self._cancelled_timers = 0
        self._timer_scope: trio.CancelScope | None = None  # run_timers' sleep, re-deadlined
        self._stepping = False  # inside the reactor task's turn: no wake-up needed
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wakeup, select.EPOLLIN | select.EPOLLET)

    # -- streams -----------------------------------------------------------------------------

    def start(self, pairs: list[tuple[int, int, Flow]], on_end) -> list[Stream]:
        """Open a stream per (src, dst, flow), all ending through `on_end`. Their fds join the
        epoll set; each stream is then stepped when its source has data. All or nothing: if
        epoll refuses an fd, the error is raised and the reactor is as it was (see _take)."""
        known = self._take({fd for src, dst, _ in pairs for fd in (src, dst)})
        streams = []
        for src, dst, flow in pairs:
            mode = SPLICE
            if not self.splice:
                mode = COPY
                self._fall_back(flow, "splice disabled")
            s = Stream(src, dst, flow, on_end, mode)
            streams.append(s)
            if mode is COPY:
                syscalls.set_urgent_inline(src)
            if src in self._unpollable or src in known:
                # No fresh registration will report what is already there: step it once.
                self._ready.append(s)
                self._wake()
            else:
                # Level-triggered: the next poll reports what is there already.
                self._readers[src] = s
        return streams

    def _take(self, fds: set[int]) -> set[int]:
        """Put streams' fds in the epoll set, level-triggered; return those some other
        registration already holds (edge-triggered, their streams are stepped once). If epoll
        refuses one (a closed fd, ENOMEM, ENOSPC past fs.epoll.max_user_watches), the fds
        taken so far are given back as they were and the error is raised: no fd stays
        registered, or marked, for streams that never started."""
        known: set[int] = set()
        taken: list[tuple[int, int]] = []  # (fd, _NEW, _FILE, or a handed fd's mask before)
        try:
            for fd in fds:
                try:
                    if fd in self._handed:  # a watch's (edge-triggered) registration, taken over
                        self._epoll.modify(fd, _LEVEL)
                        self._handed.remove(fd)
                        taken.append((fd, self._masks.get(fd, _MASK)))
                    else:
                        self._epoll.register(fd, _LEVEL)
                        taken.append((fd, _NEW))
                    self._masks[fd] = _LEVEL
                    self._level.add(fd)
                except PermissionError:  # a regular file is always ready
                    self._unpollable.add(fd)
                    taken.append((fd, _FILE))
                except FileExistsError:
                    known.add(fd)
        except OSError:
            for fd, mask in taken:
                self._level.discard(fd)
                if mask == _FILE:
                    self._unpollable.discard(fd)
                elif mask == _NEW:
                    self._masks.pop(fd, None)
                    self._unregister(fd)
                else:  # back to its watch's registration, for the caller to unwatch or start
                    self._masks[fd] = mask
                    self._handed.add(fd)
                    try:
                        self._epoll.modify(fd, mask)
                    except OSError:
                        pass  # closed meanwhile: nothing left to restore
            raise
        return known

    def stop(self, streams: list[Stream], *, closing: bool = False) -> None:
        """Take streams out (ended or not): forget their waits, give back or destroy their pipes,
        drop their fds from the epoll set. Call before closing the fds. With `closing` the caller
        closes them right after (and holds no duplicate): closing drops them from the epoll set,
        so the two epoll_ctl calls are skipped."""
        for s in streams:
            self._halt(s)
            # A stopped stream never ends through its callback. Dropping it breaks the cycle
            # owner -> stream -> bound method -> owner (Pair.streams), so a connection's
            # objects are freed by their reference counts as it ends, not by the garbage
            # collector, whose passes cost a short connection about 8% of its CPU.
            s.on_end = _stopped
        for fd in {fd for s in streams for fd in (s.src, s.dst)}:
            self._unpollable.discard(fd)
            self._level.discard(fd)
            self._handed.discard(fd)
            self._no_mark.discard(fd)
            self._masks.pop(fd, None)
            if not closing:
                self._unregister(fd)

    def halt(self, s: Stream) -> None:
        """End `s` now, without its on_end, leaving its fds registered for the stream that still
        uses them (the other direction of its connection, which `stop` takes out later). Its
        source stops asking for EPOLLIN: nobody reads it any more."""
        if not s.done:
            self._halt(s)
            self._deafen(s.src, _WANT_IN)

    def stalled(self, s: Stream) -> bool:
        """Whether `s` waits for its destination to take what it holds."""
        return not s.done and self._writers.get(s.dst) is s

    def _halt(self, s: Stream) -> None:
        s.done = True
        if self._readers.get(s.src) is s:
            del self._readers[s.src]
        if self._writers.get(s.dst) is s:
            del self._writers[s.dst]
        self._release(s)
        s.pending = None

    # -- fds and deadlines of the layers above -------------------------------------------------

    def watch(self, fd: int, callback: Callable[[int], None]) -> None:
        """Call `callback(events)` from the reactor task on the fd's epoll events. Edge-triggered:
        the callback must drive the fd to EAGAIN (accept until EAGAIN) or expect no new call
        until something new happens. Registration reports the fd's current state."""
        self._watchers[fd] = (callback, self._turns)
        self._level.discard(fd)
        try:
            self._epoll.register(fd, _MASK)
        except FileExistsError:
            pass
        self._masks[fd] = _MASK

    def unwatch(self, fd: int, *, keep: bool = False, closing: bool = False) -> None:
        """Forget `fd`'s callback. With `keep` it stays in the epoll set, for `start` to take
        over (a connected socket becoming a stream), level-triggered from then on, so what
        came before is reported; otherwise call before closing it. With `closing` the caller
        closes it right after, which drops it from the epoll set: no epoll_ctl (as
        `stop(closing=True)`)."""
        self._watchers.pop(fd, None)
        if keep:
            self._handed.add(fd)
        else:
            self._handed.discard(fd)
            self._masks.pop(fd, None)
            self._level.discard(fd)
            if not closing:
                self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # never registered (unpollable), or already closed

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run `callback()` once trio's clock reaches `when` (from the timer task)."""
        timer = Timer(when, callback, self)
        heapq.heappush(self._timers, timer)
        scope = self._timer_scope
        if scope is not None and when < scope.deadline:
            scope.deadline = when
        return timer

    def call_soon(self, callback: Callable[[], None]) -> Timer:
        return self.call_at(-math.inf, callback)

    async def run_timers(self) -> None:
        """Run callbacks as their deadlines pass, until the reactor is closed."""
        while not self._epoll.closed:
            with trio.CancelScope(deadline=self._next_deadline()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            self._run_due_timers(trio.current_time())

    def _next_deadline(self) -> float:
        """When the earliest live timer is due (inf: none). Cancelled ones ahead of it are
        dropped, so a cancelled deadline never causes a wake-up."""
        timers = self._timers
        while timers and timers[0].callback is None:
            heapq.heappop(timers)
            self._cancelled_timers -= 1
        return timers[0].when if timers else math.inf

    def _run_due_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            callback = timer.callback
            if callback is None:
                self._cancelled_timers -= 1
                continue
            timer.callback = None
            callback()
        if self._cancelled_timers > 256 and 2 * self._cancelled_timers > len(timers):
            # Linger and idle timers are set and cancelled on most connections: compact,
            # as asyncio does, rather than keep thousands of dead entries.
            timers[:] = [t for t in timers if t.callback is not None]
            heapq.heapify(timers)
            self._cancelled_timers = 0

    def _wake(self) -> None:
        """Make the reactor task take a turn: work was queued from another task."""
        if not self._stepping and not self._epoll.closed:
            os.eventfd_write(self._wakeup, 1)

    def add_wakeup(self, fd: int) -> None:
        """Wake this reactor's epoll_wait whenever `fd` (an eventfd the caller writes) is
        written to. Its events are ignored: the wait only has to end."""
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)

    @property
    def closed(self) -> bool:
        return self._epoll.closed

    @property
    def waiting(self) -> int:
        """Streams waiting for readiness or queued to run (0 when every stream is stopped)."""
        return len(self._readers) + len(self._writers) + sum(not s.done for s in self._ready)

    def close(self) -> None:
        if self._epoll.closed:
            return
        try:
            trio.lowlevel.notify_closing(self._epoll.fileno())
        except RuntimeError:
            pass  # outside a trio run: nobody can be waiting on it
        self._epoll.close()
        os.close(self._wakeup)
        if self._timer_scope is not None:
            self._timer_scope.cancel()
        self._timers.clear()
        self._watchers.clear()

    # -- the task ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for readiness and step ready streams, until cancelled or closed (at once if
        it is closed already)."""
        if self._epoll.closed:
            return
        epfd = self._epoll.fileno()
        while True:
            try:
                if self._ready:
                    await checkpoint()  # a stream hit its byte budget: let others run first
                else:
                    await wait_readable(epfd)
            except trio.ClosedResourceError:
                return
            if self._epoll.closed:
                return
            # Events that arrive while a batch is stepped are taken at once, without a trip
            # through trio's scheduler (its epoll_wait, a re-arming epoll_ctl, a task switch):
            # on a busy stream that trip cost more than the splices. Bounded, so the other
            # tasks (accepts, timers) still run at least every _TURNS batches.
            self._stepping = True
            try:
                for _ in range(_TURNS):
                    if not self._turn() or self._ready:
                        break
            finally:
                self._stepping = False

    def host_run(self, queue) -> None:
        """Run as the host loop (zcrelay.hosting): wait in epoll until an fd is ready or the
        next deadline, step what is ready, run the timers that are due; return as soon as
        `queue` (the host's other callbacks: trio's ticks) holds work, after one turn at least,
        or when the reactor is closed."""
        timers = self._timers
        now = trio.lowlevel.current_clock().current_time  # trio's clock, without its wrapper
        turn = self._turn
        self._stepping = True
        try:
            while True:
                if queue or self._ready:
                    timeout = 0.0
                elif not timers:
                    timeout = -1
                else:
                    deadline = self._next_deadline()
                    # epoll_wait(2) takes an int of milliseconds (24.8 days at most), and Python
                    # raised OverflowError past it: a --connect-timeout of 30 days crashed the
                    # relay at its first connection. Wake a day later at most, as trio's own
                    # run loop does (_MAX_TIMEOUT), and look again.
                    timeout = -1 if deadline == math.inf else min(max(0.0, deadline - now()), 86400.0)
                turn(timeout)
                if timers:
                    t = now()
                    if timers[0].when <= t:
                        self._run_due_timers(t)
                if queue or self._epoll.closed:
                    return
        finally:
            self._stepping = False

    def _turn(self, timeout: float = 0) -> bool:
        """Step whatever is ready now (or within `timeout` seconds); return whether anything was."""
        batch = self._ready
        self._ready = []
        readers, writers = self._readers, self._writers
        self._turns = turn = self._turns + 1
        for fd, events in self._epoll.poll(timeout, _MAX_EVENTS):
            watcher = self._watchers.get(fd)
            if watcher is not None:
                # An fd number closed and reused by a watch earlier in this batch: the event
                # was the old file's. The new registration reports its own state later.
                if watcher[1] != turn:
                    watcher[0](events)
                continue
            reader = None
            if events & _READABLE:
                reader = readers.pop(fd, None)
                if reader is not None:
                    reader.woke = events
                    batch.append(reader)
            if events & _WRITABLE:
                s = writers.pop(fd, None)
                if s is not None:
                    batch.append(s)
                    continue
                if not events & _READABLE or fd in self._level:
                    # Writable, and nobody waits to write: stop asking (see _deafen). On an
                    # edge-triggered watch's fd, not on every event that reports EPOLLOUT
                    # beside EPOLLIN, which would cost a short connection an epoll_ctl for
                    # each of its sockets; a level-triggered fd would report it every turn.
                    self._deafen(fd, select.EPOLLOUT)
            if reader is None and events & _READABLE and fd in self._level:
                # Readable (a hang-up, an error: those cannot be masked) and no stream waits
                # for it: a level-triggered fd would report it on every turn until then. Not
                # when its stream is queued to run anyway (it gave way after its budget).
                if not any(r.src == fd for r in batch):
                    self._to_edge(fd)
        step_splice = self._step_splice
        for s in batch:
            if not s.done:
                try:
                    if s.mode is SPLICE:
                        step_splice(s)
                    else:
                        self._step_copy(s)
                except Exception as exc:  # a StreamError, or a bug: it ends this stream only
                    if s.done:
                        raise  # on_end itself raised: a bug in the caller, not a stream to end
                    self._end(s, exc)
        return bool(batch)

    def _end(self, s: Stream, error: BaseException | None) -> None:
        s.done = True
        self._release(s)
        s.on_end(s, error)
        if s.src in self._level:  # not stopped by on_end: its EOF would be reported every turn
            self._deafen(s.src, _WANT_IN)

    def _to_edge(self, fd: int) -> None:
        """Turn a stream fd edge-triggered: it reports something no stream waits for, which
        level-triggered it would report on every turn. Its streams then wait as on a watch's
        fd: after a drain to EAGAIN, or after a re-arm (see _rearm)."""
        self._level.discard(fd)
        mask = self._masks.get(fd)
        if mask is not None:
            self._masks[fd] = mask = mask | select.EPOLLET
            self._epoll.modify(fd, mask)

    def _release(self, s: Stream) -> None:
        pipe = s.pipe
        if pipe is not None:
            s.pipe = None
            pipe.held = s.held  # bytes still inside: the pool destroys it
            s.held = 0
            self.pool.put(pipe)

    def _wait(self, table: dict[int, Stream], fd: int, s: Stream) -> None:
        if fd in self._unpollable:
            self._ready.append(s)
            return
        table[fd] = s
        # A waiting stream's fds ask epoll only for what some stream waits on. While a stream
        # waits for its destination to drain, every segment reaching its source would wake the
        # reactor for nothing (40-50% of all wake-ups on a bulk transfer): the source stops
        # asking for EPOLLIN until the stream waits on it again. epoll_ctl MOD polls the fd,
        # so data that came meanwhile is reported and no edge is lost. Request/response
        # traffic only ever waits on sources, whose masks then never change: no epoll_ctl.
        if table is self._writers:
            self._deafen(s.src, _WANT_IN)
            self._hear(fd, _WANT_OUT)
        else:  # the hot path of small messages: _hear inlined
            mask = self._masks.get(fd)
            if mask is not None and not mask & select.EPOLLIN:
                self._masks[fd] = mask = mask | _WANT_IN
                self._epoll.modify(fd, mask)

    def _rearm(self, s: Stream) -> None:
        """Wait for `s.src` without first draining it to EAGAIN. Used after a small drain was
        delivered: the drain that would follow almost always meets EAGAIN, and that costs a
        syscall and a Python exception per message (a third of the splices on request/response
        traffic). A level-triggered fd needs nothing more. On an edge-triggered one, epoll_ctl
        MOD polls the fd and queues an event if it is ready now, so bytes or an EOF that are
        already there (a drain cut short by a full pipe, a FIN that came with the data) wake
        the stream on the next turn, and later arrivals raise new edges: no wake-up is lost."""
        fd = s.src
        if fd in self._level:  # what is there is reported on the next turn: no poll needed
            self._wait(self._readers, fd, s)
            return
        self._readers[fd] = s
        mask = self._masks[fd] | _WANT_IN
        if fd not in self._writers:
            # Nobody waits to write to it: asking for EPOLLOUT would only report it writable
            # on the next turn, and cost a wake-up and a second epoll_ctl to deafen it.
            mask &= ~_WANT_OUT
        self._masks[fd] = mask
        self._epoll.modify(fd, mask)

    def _hear(self, fd: int, events: int) -> None:
        """Ask `fd` for `events` again (a stream now waits for them)."""
        mask = self._masks.get(fd)
        if mask is not None and mask & events != events:
            self._masks[fd] = mask = mask | events
            self._epoll.modify(fd, mask)

    def _deafen(self, fd: int, events: int) -> None:
        """Stop asking `fd` for `events` (until a stream waits for them again): a destination's
        EPOLLOUT goes on firing as acks free its buffer after the stream went back to its source,
        each a wake-up for nothing (a third of all on one iperf3 direction). Dropped on the first
        such wake-up, so traffic that never fills a buffer never pays the epoll_ctl."""
        mask = self._masks.get(fd)
        if mask is not None and mask & events:
            self._masks[fd] = mask = mask & ~events
            self._epoll.modify(fd, mask)

    def _fall_back(self, flow: Flow, reason: str) -> None:
        flow.fallback = reason
        self.fallbacks[reason] += 1

    # -- splice mode: src → pipe → dst ---------------------------------------------------------

    def _step_splice(self, s: Stream) -> None:
        # The hot loop, run once per chunk: locals over attribute lookups (see mover.splice_stream).
        splice = syscalls.splice_unchecked
        flags = syscalls.SPLICE_F_NONBLOCK
        # What the wake-up reported, which vouches for the whole step (tested only where used):
        # - no EPOLLPRI: no urgent mark was there, and one that comes later raises a new edge;
        #   so EAGAIN is not a mark (`_pass_urgent_byte` is asked only if `not woke or woke &
        #   _PRI`);
        # - the FIN and no mark (`woke & _FIN_IN and not woke & _PRI`): all that is left comes
        #   before the FIN and holds no mark, and a drain never meets EAGAIN. So a zero is
        #   EOF, and after a small drain the stream drains again rather than re-arm;
        # - no hang-up of any kind (_HANGUPS): a drain that emptied the socket can wait with
        #   no syscall, as every later arrival, FIN or mark raises a new edge.
        woke = s.woke
        s.woke = 0
        budget = YIELD_EVERY
        pipe: Pipe | None  # in the loop below, s.pipe: None while the stream holds none
        if woke and not woke & _HANGUPS and s.pipe is None and self._spare:
            # A message, straight through: the common step of request/response traffic (a
            # request, a reply), in half the bytecodes of the loop below. Woken on its source
            # with no hang-up or mark, the stream drains once into a spare pipe and delivers
            # it all. Whatever else comes (EAGAIN, an error, EOF, a bulk drain, a partial
            # delivery) is left to the loop below, in the state this step left it in.
            src = s.src
            pipe = self._spare.pop()  # PipePool.get, its common case inline
            try:
                n = splice(src, pipe.w, self.max_chunk, None, None, flags)
            except BlockingIOError:  # woken for nothing: no mark (see woke), nothing there
                self._spare.append(pipe)  # empty, and taken from there: PipePool.put's case
                self._wait(self._readers, src, s)
                return
            except OSError as exc:
                self._spare.append(pipe)
                self._drain_failed(s, exc)  # raises, unless no byte has moved yet
                return self._step_copy(s)
            if n >= _FILL_FROM:  # bulk: fill the pipe further, then the loop below pumps
                s.pipe = pipe
                pipe.held = n
                budget -= n
                s.held = pipe.held = self._fill(s, pipe, budget)
                budget -= s.held - n
            elif n and src in self._masks:
                s.pipe = pipe  # in case the pump raises: the stream's end destroys the pipe
                s.held = pipe.held = n
                flow = s.flow
                try:
                    m = splice(pipe.r, s.dst, n, None, None, flags)
                except BlockingIOError:
                    self._wait(self._writers, s.dst, s)
                    return
                except OSError as exc:
                    self._pump_failed(s, pipe, n, exc)  # raises, unless no byte has moved yet
                    return self._step_copy(s)
                flow.spliced += m
                if flow.on_bytes is not None:
                    flow.on_bytes(m)
                if m < n:
                    s.held = pipe.held = n - m  # the loop below delivers the rest, then drains
                elif n >= _CHASE_FROM:  # all delivered; the loop below drains again at once
                    s.held = pipe.held = 0
                    budget -= n
                else:
                    s.pipe = None
                    s.held = pipe.held = 0
                    self._spare.append(pipe)
                    # Level-triggered, whatever is left is reported on the next turn. Edge-
                    # triggered, fewer bytes than the pipe has slots mean the drain emptied the
                    # socket (see the loop below) and every later arrival raises a new edge;
                    # else the stream re-arms (see _rearm).
                    if src in self._level or n < pipe.size // PAGE_SIZE:
                        self._readers[src] = s
                    else:
                        self._rearm(s)
                    return
            else:  # EOF, or an urgent mark, or a file: the loop below drains again and sees it
                self._spare.append(pipe)
        src, dst = s.src, s.dst
        flow = s.flow
        on_bytes = flow.on_bytes  # Flow.add_spliced, inlined
        pipe = s.pipe
        held = s.held
        rearm: bool | int = False  # the last drain was small: once it is delivered, re-arm instead of draining
        quiet: bool | int = False  # ... and it took everything that had woken the stream: wait, no re-arm
        try:
            while True:
                if held:
                    assert pipe is not None  # held bytes are in the stream's pipe
                    try:
                        m = splice(pipe.r, dst, held, None, None, flags)
                    except BlockingIOError:
                        self._wait(self._writers, dst, s)
                        return
                    except OSError as exc:
                        self._pump_failed(s, pipe, held, exc)  # raises, unless no byte has moved
                        held = 0
                        return self._step_copy(s)
                    if m == 0:  # held says bytes are there: a zero means someone else took them
                        raise RuntimeError(f"{pipe!r} was emptied behind the reactor's back")
                    held -= m
                    flow.spliced += m
                    if on_bytes is not None:
                        on_bytes(m)
                    if rearm and not held:
                        # A small drain, all delivered: wait for the source without the
                        # drain that would only meet EAGAIN (see _rearm).
                        s.pipe = None
                        pipe.held = 0
                        self.pool.put(pipe)
                        pipe = None
                        if quiet:
                            self._readers[src] = s
                        else:
                            self._rearm(s)
                        return
                    continue
                if s.deferred is not None:  # every byte read before it has been delivered
                    raise translate(s.deferred, SOURCE, "splice") from s.deferred
                if budget <= 0:
                    self._ready.append(s)
                    return
                if pipe is None:
                    if self._spare:
                        pipe = s.pipe = self._spare.pop()  # PipePool.get, its common case inline
                    else:
                        try:
                            pipe = s.pipe = self.pool.get()
                        except OSError as exc:
                            self._no_pipe(s, exc)  # raises, unless no byte has moved yet
                            return self._step_copy(s)  # no pipe before the first byte: copy
                try:
                    n = splice(src, pipe.w, self.max_chunk, None, None, flags)
                except BlockingIOError:
                    if (not woke or woke & _PRI) and self._pass_urgent_byte(s, pipe):
                        held = 1
                        continue
                    # The pipe is empty, so the source is: an idle stream holds no pipe.
                    s.pipe = None
                    pipe.held = 0
                    self.pool.put(pipe)
                    pipe = None
                    self._wait(self._readers, src, s)
                    return
                except OSError as exc:
                    s.pipe = None
                    pipe.held = 0
                    self.pool.put(pipe)
                    self._drain_failed(s, exc)  # raises, unless no byte has moved yet
                    return self._step_copy(s)
                if n == 0:
                    if (not woke & _FIN_IN or woke & _PRI) and self._pass_urgent_byte(s, pipe):
                        held = 1
                        continue
                    s.held = pipe.held = 0
                    self._end(s, None)
                    return
                held = n
                budget -= n
                if n >= _FILL_FROM:
                    pipe.held = held
                    held = self._fill(s, pipe, budget)
                    budget -= held - n
                elif n < _CHASE_FROM:  # else: pumped, then drained again (see _CHASE_FROM)
                    rearm = src in self._masks and (not woke & _FIN_IN or woke & _PRI)
                    # Fewer bytes than the pipe has slots (each slot holds at least one byte):
                    # the pipe did not fill, so the drain stopped because the socket had no
                    # more. Woken with no hang-up, nothing is left behind that would not raise
                    # a new edge: the stream can wait as it is (see _rearm).
                    quiet = woke and not woke & _HANGUPS and n < pipe.size // PAGE_SIZE
                pipe.held = held
        finally:
            s.held = held
            if s.pipe is not None:
                s.pipe.held = held

    def _fill(self, s: Stream, pipe: Pipe, budget: int) -> int:
        """A bulk stream (its drain took at least _FILL_FROM bytes into `pipe`) fills the pipe
        further before pumping, so each send is larger and there are fewer of them (and fewer
        wake-ups of the receiver). EAGAIN here is ambiguous (source empty or pipe full): either
        way, the stream pumps next. Returns the bytes the pipe now holds."""
        splice = syscalls.splice_unchecked
        flags = syscalls.SPLICE_F_NONBLOCK
        src, w, chunk = s.src, pipe.w, self.max_chunk
        held = pipe.held
        while budget > 0:
            try:
                n = splice(src, w, chunk, None, None, flags)
            except BlockingIOError:
                break
            except OSError as exc:
                s.deferred = exc  # raised once the bytes before it are delivered
                break
            if n == 0:
                break  # EOF: the next drain, once the pipe is empty, sees it again
            held += n
            budget -= n
        return held

    def _drain_failed(self, s: Stream, exc: OSError) -> None:
        """The drain failed with `exc` (not EAGAIN), its pipe already given back. A source that
        refuses splice before any byte moved turns the stream to copying; else the stream ends
        (raises)."""
        if s.flow.bytes == 0 and exc.errno in syscalls.SPLICE_REFUSED:
            self._fall_back(s.flow, SpliceRefused(exc.errno, SOURCE).reason)
            self._to_copy(s)
            return
        raise translate(exc, SOURCE, "splice") from exc

    def _pump_failed(self, s: Stream, pipe: Pipe, held: int, exc: OSError) -> None:
        """The pump of `held` bytes from `pipe` failed with `exc` (not EAGAIN). A destination
        that refuses splice before any byte left turns the stream to copying: the bytes are
        taken out of the pipe and go first, in order. Else the stream ends (raises)."""
        if s.flow.bytes == 0 and held == pipe.held and exc.errno in syscalls.SPLICE_REFUSED:
            s.pending = memoryview(_read_exactly(pipe.r, held))
            s.held = pipe.held = 0
            s.pipe = None
            self.pool.put(pipe)
            self._fall_back(s.flow, SpliceRefused(exc.errno, DESTINATION).reason)
            self._to_copy(s)
            return
        raise translate(exc, DESTINATION, "splice") from exc

    def _pass_urgent_byte(self, s: Stream, pipe: Pipe) -> bool:
        """A TCP source stopped at an urgent mark (MSG_OOB): splice stops there, answering
        EAGAIN, or 0 once a FIN has come, and would never pass it, so the rest of the stream
        would be stalled or cut off as if at EOF. The byte is read inline (SO_OOBINLINE, set
        here) and written into the stream's empty pipe, in order, as one copied byte, counted
        as a fallback; splice goes on after it. True if a byte was passed."""
        if s.src in self._no_mark:
            return False
        _, urgent, marks = urgent_into_pipe(s.src, pipe, 0)
        if not marks:
            self._no_mark.add(s.src)  # not a TCP socket: no urgent data, ask no more
        if not urgent:
            return False
        pipe.held = 1
        s.flow.copied += 1
        s.flow.spliced -= 1  # the pump counts the byte as spliced when it moves it on
        self._fall_back(s.flow, URGENT_BYTE)
        return True

    def _to_copy(self, s: Stream) -> None:
        s.mode = COPY
        syscalls.set_urgent_inline(s.src)

    def _no_pipe(self, s: Stream, exc: OSError) -> None:
        """The pool could not give `s` a pipe (EMFILE, ENFILE...): before the first byte the
        stream falls back to copying; after it, the stream ends."""
        if s.flow.bytes:
            raise OutOfResources("pipe", exc.errno or 0, "pipe2") from exc
        self._to_copy(s)
        self._fall_back(s.flow, SpliceRefused(exc.errno or 0, "pipe").reason)

    # -- copy mode: src → user space → dst -----------------------------------------------------

    def _step_copy(self, s: Stream) -> None:
        src, dst = s.src, s.dst
        add = s.flow.add_copied
        scratch = self._scratch
        budget = YIELD_EVERY
        while True:
            pending = s.pending
            if pending is not None:
                try:
                    m = os.write(dst, pending)
                except BlockingIOError:
                    self._wait(self._writers, dst, s)
                    return
                except OSError as exc:
                    raise translate(exc, DESTINATION, "write") from exc
                add(m)
                s.pending = pending[m:] if m < len(pending) else None
                continue
            if budget <= 0:
                self._ready.append(s)
                return
            try:
                n = os.readv(src, [scratch])
            except BlockingIOError:
                self._wait(self._readers, src, s)
                return
            except OSError as exc:
                raise translate(exc, SOURCE, "read") from exc
            if n == 0:
                self._end(s, None)
                return
            budget -= n
            # Write straight from the shared scratch buffer; only a leftover is copied out,
            # so an idle or flowing stream holds no buffer of its own.
            try:
                m = os.write(dst, memoryview(scratch)[:n])
            except BlockingIOError:
                m = 0
            except OSError as exc:
                raise translate(exc, DESTINATION, "write") from exc
            if m:
                add(m)
            if m < n:
                s.pending = memoryview(bytes(memoryview(scratch)[m:n]))


def _read_exactly(fd: int, n: int) -> bytes:
    parts = []
    while n:
        data = os.read(fd, n)
        if not data:
            raise StreamError("pipe", 0, "read")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)
