"""Policy for moving streams: one-way copy with a safe fallback, and the two-way relay.

What the relay promises:
- both directions run at once; bytes are never lost or reordered;
- at EOF on one side, the write side of the other is shut down and the reverse direction keeps
  flowing (half-close); the half-closed connection then ends once no byte has moved for
  `linger` seconds (a reply still flowing is never cut short);
- a reset or error on either side ends both directions promptly, except that what the relay
  already took from a side that is gone (reset, lost) still reaches the other side before
  that side is reset in turn (see _Relay.stream_ended);
- with `idle` set, a connection where no byte moved for that long is ended.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import trio

from zcrelay import capture as capturing, hosting, mover, syscalls
from zcrelay.errors import PeerGone, SpliceRefused, StreamError
from zcrelay.pipes import PipePool
from zcrelay.reactor import Reactor, Timer
from zcrelay.stats import Flow


class Endpoint(Protocol):
    """A connected stream: trio and stdlib sockets are endpoints."""

    def fileno(self) -> int: ...

    # Positional-only, as the stdlib socket's (typeshed) and trio's (whose parameter is named
    # `flag`) are: with a named `how`, neither met the protocol for a type checker.
    def shutdown(self, how: int, /) -> None: ...


@dataclass
class Engine:
    """What every stream of one relay shares: the pipe pool, the copy policy and the reactor.

    One engine serves any number of relays at once, and any number of trio runs one after the
    other: each run gets its own reactor, closed when that run ends. The pool's idle pipes
    outlive the runs; `close()` frees them (and the current run's reactor). An engine used
    again after close() starts a new reactor."""

    pool: PipePool = field(default_factory=PipePool)
    splice: bool = True
    max_chunk: int = syscalls.MAX_SPLICE_AT_ONCE
    copy_bufsize: int = mover.COPY_BUFSIZE
    fallbacks: Counter = field(default_factory=Counter)
    _reactor: Reactor | None = field(default=None, init=False, repr=False)
    _reactor_run: object = field(default=None, init=False, repr=False)
    _reactor_thread: int | None = field(default=None, init=False, repr=False)

    def reactor(self) -> Reactor:
        """The reactor of the current trio run, started on first use: adopted by the run's
        host loop (zcrelay.hosting) if it has one, otherwise run by two trio system tasks."""
        token = trio.lowlevel.current_trio_token()
        if self._reactor is None or self._reactor_run is not token or self._reactor.closed:
            if (self._reactor is not None and not self._reactor.closed
                    and self._reactor_thread != threading.get_ident()):
                # One thread runs one trio run at a time, so a reactor of this thread's is a
                # run's that has ended; another thread's, still open, is a run's still going
                # (under trio.run, _run_reactor closes it as its run ends). Closing it would
                # strand that run's relays.
                raise RuntimeError("this Engine serves another trio run that is still going (in "
                                   "another thread?): use one Engine per trio run")
            if self._reactor is not None:
                self._reactor.close()  # a previous run's (if not closed already)
            self._reactor = Reactor(self.pool, splice=self.splice, max_chunk=self.max_chunk,
                                    copy_bufsize=self.copy_bufsize, fallbacks=self.fallbacks)
            self._reactor_run = token
            self._reactor_thread = threading.get_ident()
            host = hosting.current()
            if host is None or not host.adopt(self._reactor):
                # Under trio.run (or a host that already has one): trio tasks run it.
                trio.lowlevel.spawn_system_task(_run_reactor, self._reactor, name="zcrelay reactor")
                trio.lowlevel.spawn_system_task(self._reactor.run_timers, name="zcrelay reactor timers")
        return self._reactor

    def close(self) -> None:
        if self._reactor is not None:
            self._reactor.close()
        self.pool.close()


async def _run_reactor(reactor: Reactor) -> None:
    """The reactor's trio task. trio cancels system tasks when the run's main task ends; the
    reactor (an epoll fd and an eventfd) is the run's, so it is closed then, not left open
    until Engine.close(). One closed before this task first ran (an engine closed at once,
    after a relay that failed before it started) returns at once."""
    try:
        await reactor.run()
    finally:
        reactor.close()


async def one_way(src: int, dst: int, engine: Engine, flow: Flow, capture=None) -> None:
    """Copy src → dst until EOF on src, with splice whenever the fd pair allows it.

    A user-space copy is used only when splice is turned off or refused the pair before the
    first byte moved; the reason goes to `flow.fallback` and is counted in `engine.fallbacks`.
    With `capture` (a zcrelay.capture.CaptureFile), every chunk is also written to its file:
    tee'd on the splice path, written from the buffer on the copy path.
    """
    if engine.splice:
        try:
            if capture is None:
                await mover.splice_stream(src, dst, engine.pool, flow, engine.max_chunk)
            else:
                await capturing.captured_splice_stream(src, dst, engine.pool, flow, capture, engine.max_chunk)
            return
        except SpliceRefused as exc:
            flow.fallback = exc.reason
    else:
        flow.fallback = "splice disabled"
    engine.fallbacks[flow.fallback] += 1
    await mover.copy_stream(src, dst, flow, engine.copy_bufsize,
                            on_read=capture.write_bytes if capture is not None else None)


@dataclass
class RelayEnd:
    """Why a relay ended. `side` is "a" or "b" for the side that failed, else None."""

    reason: str  # eof | linger | idle | reset | lost | out-of-fds | out-of-memory | another errno's name ("edestaddrreq")
    side: str | None = None
    detail: str = ""
    # The sides to reset (cut_sides): the relay ended (the linger or idle timeout ran out, a
    # shutdown) with bytes on their way, held by the relay (a stream's pipe or copy buffer) or
    # unread in a socket. A FIN would tell the side they were for that a stream cut short was
    # whole, and the side they came from that they were delivered; so the owner resets them
    # (zcrelay.forward). Found by the reactor (Pair.cut_short), or with `owes`.
    cut: tuple[str, ...] = ()

    def describe(self, a: str = "a", b: str = "b") -> str:
        if self.side is None:
            return self.reason
        who = a if self.side == "a" else b
        text = f"{self.reason} by {who}" if self.reason == "reset" else f"{self.reason} on {who}"
        return f"{text} ({self.detail})" if self.detail and self.reason != "reset" else text


def owes(flow: Flow, src: Endpoint) -> bool:
    """Whether the direction of `flow`, reading `src`, still had bytes on their way when it was
    stopped: held by a task's mover (Flow.owed), or still unread in `src` (FIONREAD). Its
    destination would take a FIN for a clean end of a stream that was cut short."""
    return bool(flow.owed) or _unread(src.fileno()) > 0


def cut_sides(up_owes: bool, down_owes: bool) -> tuple[str, ...]:
    """The sides a relay that ends with bytes on their way resets: the side they were for,
    which a FIN would tell that a stream cut short was whole, and the side they came from,
    whose bytes are thrown away (a kernel that closes a socket with bytes unread resets its
    peer for the same reason: a client that sent a request and its FIN took a FIN for a
    request delivered). Both, if a direction owes bytes; none otherwise."""
    return ("a", "b") if up_owes or down_owes else ()


def _unread(fd: int) -> int:
    try:
        return syscalls.fionread(fd)
    except OSError:
        return 0  # closed, or not a socket or pipe: nothing to read


def undelivered(flow: Flow, dst: Endpoint) -> None:
    """Take out of `flow`'s counts what its destination `dst` has not been sent, about to be
    reset (a reset throws it away). Call before `dst` is closed."""
    lost = syscalls.tcp_unsent(dst)
    if lost:
        spliced = min(lost, flow.spliced)
        flow.spliced -= spliced
        flow.copied -= min(lost - spliced, flow.copied)


class _Relay:
    """The policy shared by the two directions of one relay, whichever way they run."""

    closes = False  # whether the owner closes both ends as soon as the relay ends

    def __init__(self, a: Endpoint, b: Endpoint, linger: float | None) -> None:
        self.ends = {"a": a, "b": b}
        self.linger = linger
        self.finished = 0
        self.end: RelayEnd | None = None
        self.crash: BaseException | None = None  # a bug inside a direction, re-raised by relay()
        self.last_activity = trio.current_time()
        self.linger_at = float("inf")  # the half-close + linger (see _linger_deadline)
        self.flows: tuple[Flow, ...] = ()  # (up, down), set by the owner
        self.tracking = False  # the flows report their bytes to touch (_track_activity)
        self._own_on_bytes: list | tuple = ()  # (flow, its on_bytes before) while they report to touch
        self.live = {"a", "b"}  # the source sides of the streams still running
        self.gone: str | None = None  # a side reset or lost, while the other gets what it sent
        self.settled: set[str] = set()  # sides whose counts `settle` has settled
        self._queues: dict | None = None  # by side: (bytes into it, its send queue), at notice_taken

    def touch(self, _n: int) -> None:
        self.last_activity = trio.current_time()

    def _linger_deadline(self) -> float:
        """When a half-closed connection ends: `linger` seconds after the half-close or after
        the last byte moved since, whichever is later; inf before a half-close."""
        if self.linger_at == float("inf"):
            return self.linger_at
        assert self.linger is not None
        return max(self.linger_at, self.last_activity + self.linger)

    def _track_activity(self) -> None:
        """Have both directions report their bytes (touch), after a caller's own on_bytes (a
        progress display), which was overwritten: from the start with `idle`, else from the
        half-close on, so that --linger counts silence, not age (a reply that takes longer
        than `linger` but keeps flowing was cut short, with a FIN that made it look whole).
        Before then no byte pays for this. Once per relay."""
        if self.tracking:
            return
        self.tracking = True
        touch = self.touch
        own = []
        for flow in self.flows:
            previous = flow.on_bytes
            own.append((flow, previous))
            if previous is None:
                flow.on_bytes = touch
            else:
                flow.on_bytes = lambda n, previous=previous: (previous(n), touch(n))
        self._own_on_bytes = own

    def _untrack(self) -> None:
        """The relay is over: the flows get their own on_bytes back. A flow left calling touch
        would also hold the relay, and through it its owner, in a reference cycle that only the
        garbage collector frees (see Reactor.stop)."""
        for flow, own in self._own_on_bytes:
            flow.on_bytes = own
        self._own_on_bytes = ()

    def stream_ended(self, flow: Flow, src_side: str, dst_side: str, error: BaseException | None) -> None:
        """One direction ended, at EOF (error None) or with an error; never raises.

        A side that is gone (PeerGone: reset, or lost) ends the relay, but not before the
        other side has what the relay took from the gone one: a reply in our pipe, or in the
        gone socket's receive queue, which Linux keeps readable after a reset. Without a relay
        those bytes would have been in the other side's own receive queue, safe from the
        reset. So the stream into the gone side is halted, the stream out of it runs on to its
        end, and the relay waits until the other side has acknowledged every byte (an abort
        would throw away what it had not), bounded by the linger; then it ends, and the owner
        passes the reset on (zcrelay.forward)."""
        self.live.discard(src_side)
        if error is None and not self.finished and syscalls.tcp_closed(self.ends[src_side]):
            # An EOF from a TCP socket we have sent no FIN to, which is CLOSE: a reset, whose
            # ECONNRESET a splice into that socket took (syscalls.tcp_closed). Passed on as a
            # FIN, it told the other side that a stream cut short had ended cleanly.
            error = PeerGone(mover.SOURCE, errno.ECONNRESET, "splice")
        if error is None and self.gone is not None:  # what the gone side had sent, all read
            flow.end = "eof"
            if not self._hand_over(self.gone):
                self._stop()
            return
        if error is not None:
            if isinstance(error, StreamError):
                side = src_side if error.role in (mover.SOURCE, "pipe") else dst_side
                flow.end = error.reason
                if self.end is None:
                    self.end = RelayEnd(error.reason, side, str(error))
                if isinstance(error, PeerGone) and self.gone in (None, side) and self._hand_over(side):
                    return
            elif self.crash is None:
                self.crash = error
            self._stop()
            return
        flow.end = "eof"
        self.finished += 1
        if self.finished < 2 or not self.closes:
            try:
                self.ends[dst_side].shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is already gone; its own direction will report how
        # else: both sides are at EOF and the owner closes them at once; close sends the FIN.
        if self.finished == 2:
            self.end = RelayEnd("eof")
            self._stop()
        elif self.linger is not None:
            self.linger_at = trio.current_time() + self.linger
            self._track_activity()
            self._deadline_moved()

    def check(self) -> None:
        """What the owner calls every check_interval(linger, idle): notice_fins, notice_taken."""
        self.notice_fins()
        self.notice_taken()

    def notice_taken(self) -> None:
        """Count it as a byte moved when a peer took bytes from its socket's send queue since
        the last look while the relay sent it none: a peer that reads, slowly. A socket polls
        writable only once about half its send buffer is free, so to the relay's own calls a
        client reading a download steadily, but slower than half a buffer per --idle-timeout
        (or per --linger, after a half-close), looked idle and was cut off: at 800 KB/s
        against --idle-timeout 0.5, after 0.5 s. A peer that stopped reading is cut off as
        before, and one that stops later at most one check late. Only while something reads
        last_activity (tracking); two ioctls a look, never on the payload path."""
        if not self.tracking:
            return
        into = {"a": self.flows[1], "b": self.flows[0]}  # down flows into a, up into b
        before = self._queues or {}
        self._queues, took = {}, False
        for side, flow in into.items():
            self._queues[side], taken = syscalls.look_at_queue(self.ends[side], flow.bytes, before.get(side))
            took = took or taken
        if took:
            self.touch(0)

    def notice_fins(self) -> None:
        """Start the linger for a side whose FIN has come while its stream still waits to
        deliver what came before it, to a destination that stopped reading. The half-close
        (stream_ended) starts the linger only once the FIN is passed on, which such a
        destination never lets happen: the connection, and a pipe full of bytes, were held
        until --idle-timeout, and for ever without one (the default). Called by check(): by
        relay(), and for the Pairs of zcrelay.forward by the forwarder, in one sweep."""
        if self.linger is None or self.linger_at != float("inf"):
            return  # no linger, or one runs already (a half-close, a reset)
        if any(self._stalled(side) and syscalls.peer_done(self.ends[side]) for side in self.live):
            self._start_linger()

    def _start_linger(self) -> None:
        """Start the linger now, unless one runs already (set at a half-close)."""
        if self.linger is not None and self.linger_at == float("inf"):
            self.linger_at = trio.current_time() + self.linger  # and silence counts (as there)
            self._track_activity()
            self._deadline_moved()

    def _stalled(self, src_side: str) -> bool:
        """Whether the stream out of `src_side` waits for its destination (True when that
        cannot be told cheaply: the FIN check decides)."""
        return True

    def _hand_over(self, gone: str) -> bool:
        """`gone` is reset or lost: halt the stream into it and let what it sent reach the other
        side (see stream_ended). False when nothing is left to wait for: end now."""
        other = "b" if gone == "a" else "a"
        if self.gone is None:
            self.gone = gone
            if other in self.live:
                self.live.discard(other)
                self._halt(other)
            self._start_linger()
        if gone in self.live:
            # Its stream writes out what it had, then ends (stream_ended again). A reset
            # socket has nothing more to come; on one that is still up (an error sending to
            # a peer that went on sending, a test's fake), the read side's shutdown ends the
            # stream at the first empty queue, so the wait is bounded.
            try:
                self.ends[gone].shutdown(socket.SHUT_RD)
            except OSError:
                pass  # ENOTCONN: reset
            return True
        if not syscalls.tcp_unacked(self.ends[other]):
            return False
        self._await_delivery(other)
        return True

    def settle(self, up: Flow, down: Flow, sides) -> None:
        """Take out of the counts what `sides` have not been sent: the reset that tells them of
        the end throws it away. Call as the relay ends, before the sockets are closed; once a
        side."""
        for side in sides:
            if side in self.settled:
                continue
            self.settled.add(side)
            undelivered(down if side == "a" else up, self.ends[side])

    def _halt(self, src_side: str) -> None:
        raise NotImplementedError

    def _await_delivery(self, side: str) -> None:
        """Poll until `side` has acknowledged every byte sent to it, then _stop (the linger
        bounds the wait)."""
        raise NotImplementedError

    def _end_idle(self) -> None:
        if self.end is None:
            self.end = RelayEnd("idle")
        self._stop()

    def _stop(self) -> None:
        raise NotImplementedError

    def _deadline_moved(self) -> None:
        raise NotImplementedError

    def conclude(self, up: Flow, down: Flow) -> RelayEnd:
        if self.gone is not None:  # the other side is reset in turn (the linger ran out first)
            self.settle(up, down, ("b" if self.gone == "a" else "a",))
        if self.end is None:
            # Only the linger deadline ends a relay without setting an end.
            self.end = RelayEnd("linger")
        for flow in (up, down):
            if flow.end is None:
                flow.end = self.end.reason
        return self.end


def _not_done(_pair: "Pair") -> None:
    """The on_done of a closed Pair: never called."""


class Pair(_Relay):
    """A two-way relay run entirely by the reactor: two streams and one timer, no task.

    `on_done(pair)` is called once, from the reactor, when the relay ends by itself (both EOFs,
    a reset or error, linger, idle); `pair.end` then says why. `close()` ends it early without
    calling `on_done` (cancellation, shutdown). Closes no fd: the caller owns `a` and `b`. An
    owner that closes both as soon as the relay ends says `closes=True`: the reactor then skips
    the syscalls that closing makes redundant (the last shutdown, two epoll_ctl).
    """

    def __init__(self, reactor: Reactor, a: Endpoint, b: Endpoint, up: Flow, down: Flow, *,
                 idle: float | None = None, linger: float | None = None, on_done,
                 closes: bool = False) -> None:
        super().__init__(a, b, linger)
        self.closes = closes
        self.reactor = reactor
        self.up = up
        self.down = down
        self.flows = (up, down)
        self.idle = idle
        self.on_done = on_done
        self.closed = False
        self._timer = None
        self._poll: Timer | None = None  # the wait for delivery after a reset (_await_delivery)
        if idle:
            self._track_activity()
        # First the streams, which may raise (epoll refusing an fd) and then leave nothing
        # behind; a timer armed before them would fire later for a relay that never started.
        self.streams = reactor.start([(a.fileno(), b.fileno(), up), (b.fileno(), a.fileno(), down)],
                                     self._ended)
        if idle:
            self._timer = reactor.call_at(self.last_activity + idle, self._on_deadline)

    def _ended(self, stream, error: BaseException | None) -> None:
        self.stream_ended(stream.flow, *_SIDES[stream.flow is self.down], error)

    def _deadline(self) -> float:
        linger_at = self._linger_deadline()
        return min(linger_at, self.last_activity + self.idle) if self.idle else linger_at

    def _deadline_moved(self) -> None:
        when = self._deadline()
        if self._timer is None or when < self._timer.when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.reactor.call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        now = trio.current_time()
        if now >= self._linger_deadline():
            self._stop()  # ends as "linger"
        elif self.idle and now >= self.last_activity + self.idle:
            self._end_idle()
        else:  # bytes moved since: wait for the new deadline
            self._timer = self.reactor.call_at(self._deadline(), self._on_deadline)

    def _stop(self) -> None:
        if not self.closed:
            cut = self.cut_short()
            on_done = self.on_done
            self.close()
            self.conclude(self.up, self.down).cut = cut
            on_done(self)

    def cut_short(self) -> tuple[str, ...]:
        """The sides to reset as the relay ends now (see cut_sides): both, if a stream still
        has bytes on their way (in its pipe or copy buffer, or unread in its source). Their
        counts leave out what was never sent them, which that reset throws away."""
        up, down = self.streams  # written out: this runs as every connection ends
        cut = cut_sides(not up.done and bool(up.held or up.pending or _unread(up.src)),
                        not down.done and bool(down.held or down.pending or _unread(down.src)))
        if cut:
            self.settle(self.up, self.down, cut)
        return cut

    def _halt(self, src_side: str) -> None:
        self.reactor.halt(self.streams[src_side == "b"])

    def _stalled(self, src_side: str) -> bool:
        return self.reactor.stalled(self.streams[src_side == "b"])

    def _await_delivery(self, side: str, wait: float = 0.001) -> None:
        if self.closed:
            return
        if not syscalls.tcp_unacked(self.ends[side]) or trio.current_time() >= self._linger_deadline():
            self._stop()
            return
        # A reset is rare, and this runs only after one: a timer, doubling up to 50 ms, spares
        # the relay a way to be told of acknowledgements that epoll does not give.
        self._poll = self.reactor.call_at(trio.current_time() + wait,
                                          lambda: self._await_delivery(side, min(2 * wait, 0.05)))

    def close(self) -> bool:
        """Stop both streams and the timers; False if already closed."""
        if self.closed:
            return False
        self.closed = True
        self.reactor.stop(self.streams, closing=self.closes)
        for timer in (self._timer, self._poll):
            if timer is not None:
                timer.cancel()
        self._timer = self._poll = None
        # No cycle outlives the relay (see Reactor.stop): the owner's on_done (which the
        # owner's own reference to this pair would close) and the flows' touch.
        self.on_done = _not_done
        self._untrack()
        return True


class _TaskRelay(_Relay):
    """The relay with a task per direction (captures: their writers wait on files)."""

    def __init__(self, a: Endpoint, b: Endpoint, linger: float | None) -> None:
        super().__init__(a, b, linger)
        self.nursery: trio.Nursery | None = None  # its scope is cancelled when the relay ends
        self.scopes = {"a": trio.CancelScope(), "b": trio.CancelScope()}  # each direction's, by source
        self.lingering = False  # watch_linger runs

    def _stop(self) -> None:
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def _halt(self, src_side: str) -> None:
        self.scopes[src_side].cancel()

    def _await_delivery(self, side: str) -> None:
        async def poll() -> None:
            wait = 0.001
            while syscalls.tcp_unacked(self.ends[side]):
                await trio.sleep(wait)  # watch_linger bounds it
                wait = min(2 * wait, 0.05)
            self._stop()

        assert self.nursery is not None
        self.nursery.start_soon(poll)

    def _deadline_moved(self) -> None:
        # Called when the linger starts: at a half-close, a reset (_hand_over) or a FIN that
        # cannot be passed on (notice_fins); the first time starts the watch, which follows
        # every later move of the deadline by itself.
        if self.nursery is not None and not self.lingering:
            self.lingering = True
            self.nursery.start_soon(self.watch_linger)

    async def watch(self, interval: float) -> None:
        while True:  # until the relay's nursery is cancelled
            await trio.sleep(interval)
            self.check()

    async def watch_linger(self) -> None:
        while True:
            await trio.sleep_until(self._linger_deadline())
            if trio.current_time() >= self._linger_deadline():
                self._stop()  # ends as "linger"
                return

    async def direction(self, src: Endpoint, dst: Endpoint, engine: Engine, flow: Flow,
                        src_side: str, dst_side: str, capture=None) -> None:
        """One direction as a task (the capture path: `capture` may be None for one of them)."""
        with self.scopes[src_side]:  # _halt cancels it
            try:
                await one_way(src.fileno(), dst.fileno(), engine, flow, capture)
            except StreamError as exc:
                self.stream_ended(flow, src_side, dst_side, exc)
                return
            self.stream_ended(flow, src_side, dst_side, None)

    async def watch_idle(self, idle: float) -> None:
        while True:
            await trio.sleep_until(self.last_activity + idle)
            if trio.current_time() >= self.last_activity + idle:
                self._end_idle()
                return


async def relay(a: Endpoint, b: Endpoint, engine: Engine, up: Flow, down: Flow, *,
                idle: float | None = None, linger: float | None = None,
                captures: tuple = (None, None)) -> RelayEnd:
    """Relay a → b (counted in `up`) and b → a (`down`) until both reach EOF, one side fails,
    or a timeout fires; return why it ended.

    `a` and `b` are two distinct, open, non-blocking sockets (trio sockets, or stdlib ones after
    setblocking(False)): anything else raises TypeError or ValueError before a byte moves.
    `captures` (up, down) are optional zcrelay.capture.CaptureFile recorders, one a direction.
    Closes nothing: the caller owns `a` and `b` and closes them afterwards (after a reset it may
    abort the other side too). Cancelling the caller's scope ends the relay at once; cancel it
    before closing either socket, never the other way round: a socket closed under a running
    relay leaves the reactor's epoll without a word, and the relay would wait for it until a
    linger or idle timeout.
    """
    _check_endpoints(a, b)
    if captures != (None, None):
        return await _relay_in_tasks(_TaskRelay(a, b, linger), a, b, engine, up, down, idle, captures)
    # Without captures the relay is a Pair of the engine's reactor: this task only waits for
    # it to end (and, with a linger or an idle timeout, wakes now and then for Pair.check), so
    # a message costs no task switch.
    done = trio.Event()
    pair = Pair(engine.reactor(), a, b, up, down, idle=idle, linger=linger, on_done=lambda _pair: done.set())
    try:
        interval = check_interval(linger, idle)
        if interval is not None:
            while not done.is_set():
                with trio.move_on_after(interval):
                    await done.wait()
                if not done.is_set():
                    pair.check()
        else:
            await done.wait()
    finally:
        if not pair.closed:  # cancelled: what the streams hold goes with their pipes (owes)
            for stream in pair.streams:
                if not stream.done:
                    stream.flow.owed = stream.held + (len(stream.pending) if stream.pending is not None else 0)
        pair.close()
    if pair.crash is not None:
        raise pair.crash
    assert pair.end is not None
    return pair.end


def check_interval(linger: float | None, idle: float | None) -> float | None:
    """How often a relay with a `linger` or an `idle` timeout looks for a FIN stuck behind a
    destination that does not read (_Relay.notice_fins) and for bytes a slow reader took
    (_Relay.notice_taken): such a FIN ends its connection, and a reader that stops reading
    has it cut off, at most this much later than the timeout. A quarter of the shorter
    timeout, within 50 ms and 5 s; None with neither."""
    spans = ([] if linger is None else [linger]) + ([idle] if idle else [])
    return min(max(min(spans) / 4, 0.05), 5.0) if spans else None


def _check_endpoints(a: Endpoint, b: Endpoint) -> None:
    """Refuse, before anything starts, what the relay would hang or crash on: an end without
    fileno() and shutdown() (a trio.SocketStream rather than its .socket, a file, an int:
    shutdown() at EOF would raise inside the reactor and end the trio run), a closed one, a
    blocking one (splice on it blocks the thread, and every task of the run with it), and the
    same socket twice (it would be relayed to itself, and never end without a linger)."""
    fds = []
    for name, end in (("a", a), ("b", b)):
        if not (callable(getattr(end, "fileno", None)) and callable(getattr(end, "shutdown", None))):
            hint = " (pass its .socket)" if isinstance(end, trio.SocketStream) else ""
            raise TypeError(f"relay: {name} is not a socket, with fileno() and shutdown(): {end!r}{hint}")
        fd = end.fileno()
        if fd < 0:
            raise ValueError(f"relay: {name} is closed")
        if os.get_blocking(fd):
            raise ValueError(f"relay: {name} (fd {fd}) is blocking: a splice on it would block the whole "
                             f"trio run; call setblocking(False) on it first")
        kind = getattr(end, "type", socket.SOCK_STREAM)
        if kind != socket.SOCK_STREAM:
            raise ValueError(f"relay: {name} (fd {fd}) is not a stream socket ({kind!r}): "
                             f"relay moves byte streams (TCP, or Unix SOCK_STREAM)")
        if _listening(end):
            raise ValueError(f"relay: {name} (fd {fd}) is a listening socket: relay the connection "
                             f"that accept() returns")
        fds.append(fd)
    if fds[0] == fds[1]:
        raise ValueError(f"relay: a and b are the same socket (fd {fds[0]})")


def _listening(end: Endpoint) -> bool:
    """Whether `end` is a listening socket (SO_ACCEPTCONN): it never has a byte or an EOF to
    read, so a relay of it would wait for ever."""
    getsockopt = getattr(end, "getsockopt", None)
    if getsockopt is None:
        return False
    try:
        return bool(getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


_SIDES = {False: ("a", "b"), True: ("b", "a")}  # by "is this the down flow": (src side, dst side)


async def _relay_in_tasks(state: _TaskRelay, a: Endpoint, b: Endpoint, engine: Engine, up: Flow, down: Flow,
                          idle: float | None, captures: tuple) -> RelayEnd:
    """The relay with a task per direction, for captures (their writers wait on files)."""
    # The nursery's own scope is the relay's: cancelling it (reset, idle, linger, both EOFs)
    # ends both directions. The a → b direction runs in this task.
    state.flows = (up, down)
    if idle:
        state._track_activity()
    async with trio.open_nursery() as nursery:
        state.nursery = nursery
        if idle:
            nursery.start_soon(state.watch_idle, idle)
        interval = check_interval(state.linger, idle)
        if interval is not None:
            nursery.start_soon(state.watch, interval)
        nursery.start_soon(state.direction, b, a, engine, down, "b", "a", captures[1])
        await state.direction(a, b, engine, up, "a", "b", captures[0])
    state._untrack()
    cut = cut_sides(owes(up, a), owes(down, b))
    state.settle(up, down, cut)
    end = state.conclude(up, down)
    end.cut = cut
    return end
