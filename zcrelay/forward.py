"""`zcrelay forward`: listeners, the accept loop and one relay per connection.

Policy only: sockets come from zcrelay.net, bytes move through zcrelay.relay. Nothing here
prints or exits; it logs to the "zcrelay" logger, one line per finished connection, made from
the connection's `Finished` record, which an embedder can also have (Forwarder's on_finished).
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import select
import socket
import time
from collections.abc import Callable
from typing import NamedTuple
from dataclasses import dataclass, field

import trio

from zcrelay import capture, mover, net
from zcrelay.addresses import Address, format_sockname
from zcrelay.errors import NO_RESOURCES, ConnectError
from zcrelay.excgroups import first_error, split_cancelled
from zcrelay.logs import library_logger
from zcrelay.pipes import PipePool
from zcrelay.reactor import Reactor, Timer
from zcrelay.relay import Engine, Pair, RelayEnd, check_interval, cut_sides, owes, relay, undelivered
from zcrelay.stats import Flow, Totals

log = library_logger()  # "zcrelay", with the NullHandler a library's logger has

# accept() errors that concern one client that gave up, not the listener (accept(2)).
_ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
# Back-off while the process is out of fds: trio's serve_listeners sleeps 100 ms; grow to 1 s.
_ACCEPT_BACKOFF = (0.05, 1.0)
# epoll events that end a connect with an error (SO_ERROR says which).
_CONNECT_FAILED = select.EPOLLERR | select.EPOLLHUP
# Accepts per callback before the listener lets the streams have a turn.
_ACCEPT_BATCH = 64
# Connect failures that say a resolved name's addresses may be stale: resolve it again.
_TARGET_GONE = frozenset({"refused", "unreachable", "timeout", "no-socket"})
# A relay that ended so (PeerGone's reasons) passes a reset on to the other side.
_PEER_ENDS = frozenset({"reset", "lost"})


def _unreached(exc: ConnectError, client: net.AnySocket) -> str:
    """The close= of a connection whose target was not reached: the connect's one word; an
    errno with no word of its own, with its text (ENOTDIR on a unix: target was a bare
    "error"). Both paths (_handle, _Link). A target that accepted, then reset, before the
    connect was seen is relayed instead (its greeting, then the reset: _Link._check_connect,
    net.connect's keep_reset); "reset" is still said and passed on as a reset, should a
    connect report it."""
    if exc.reason == "reset":
        net.abort(client)
        return "reset by target"
    return f"error ({exc.detail})" if exc.reason == "error" else exc.reason


def _relay_ended(end: RelayEnd, client: net.AnySocket, target: net.AnySocket) -> str:
    """The close= of a relay that ran; a reset or a lost peer is passed on to the other side
    as a reset, as that peer would have seen it without a relay, and so is a stream cut short
    with bytes the relay held for it (RelayEnd.cut). Both paths (_handle, _Link)."""
    if end.reason in _PEER_ENDS:
        net.abort(target if end.side == "a" else client)
    for side in end.cut:
        net.abort(client if side == "a" else target)
    return end.describe("client", "target")


@dataclass(frozen=True)
class Rule:
    listen: Address
    target: Address


@dataclass(frozen=True)
class ForwardConfig:
    rules: tuple[Rule, ...]
    pipe_size: int = 1 << 20
    max_idle_pipes: int = 16
    max_conns: int = 0  # 0: no limit
    connect_timeout: float | None = 10.0
    idle_timeout: float | None = None
    linger: float | None = 60.0
    splice: bool = True
    nodelay: bool = True
    backlog: int = net.BACKLOG
    capture_dir: str | None = None  # record each direction there (zcrelay.capture)
    resolve_ttl: float = 5.0  # seconds a target name's addresses are reused (0: resolve each time)


class Finished(NamedTuple):
    """What became of one connection, once it is over: the source of its log line, and what a
    Forwarder's `on_finished` gets. Byte counts are those that reached the other side.
    Immutable; a NamedTuple rather than a frozen dataclass, whose __init__ (a setattr a field)
    cost a Connection: close request a microsecond more."""

    number: int  # conn=: unique in the process (with workers, in the whole relay)
    rule: int  # rule=: the rule's place in ForwardConfig.rules, from 1
    peer: str  # the client's address as accept() gave it: "127.0.0.1:PORT", "unix:PATH"...
    target: Address  # the rule's target (a name as written, not what it resolved to)
    up: int  # bytes from the client to the target
    down: int  # bytes from the target to the client
    spliced: int  # of up + down, the bytes spliced (through a pipe, not user space)
    copied: int  # of up + down, the bytes copied through user space (after a fallback)
    duration: float  # seconds from accept to the end (trio's clock)
    close: str  # why it ended, as close= says: "eof", "reset by client", "refused", "timeout",
    # "idle", "shutdown"... (the man page lists them); its first word is the key of Totals.closes
    fallbacks: tuple[str, ...] = ()  # why a direction fell back to copying, each reason once

    def log_line(self) -> str:
        """The one line `zcrelay forward` logs for the connection (INFO)."""
        line = (f"conn={self.number} rule={self.rule} peer={self.peer} target={self.target} "
                f"up={self.up} down={self.down} spliced={self.spliced} copied={self.copied} "
                f"duration={self.duration:.3f}s close={self.close}")
        if self.fallbacks:
            line += " fallback=" + ",".join(f'"{f}"' for f in self.fallbacks)
        return line


@dataclass
class Connection:
    """One client connection while it lasts; `finished` is what became of it."""

    number: int
    rule: int
    peer_addr: object  # as accept() returned it; formatted only when a line needs it
    target: Address
    started: float
    up: Flow = field(default_factory=Flow)
    down: Flow = field(default_factory=Flow)
    close: str = "?"

    @functools.cached_property
    def peer(self) -> str:
        return format_sockname(self.peer_addr)

    def finished(self, now: float) -> Finished:
        up, down = self.up, self.down
        return Finished(self.number, self.rule, self.peer, self.target, up.bytes, down.bytes,
                        up.spliced + down.spliced, up.copied + down.copied, now - self.started,
                        self.close, tuple(sorted({f.fallback for f in (up, down) if f.fallback})))


@dataclass(frozen=True)
class Bound:
    rule: Rule
    address: str  # the real address, with the port the kernel chose for port 0


class Forwarder:
    """Runs the rules of one ForwardConfig. `totals` stays readable after cancellation.

    Accepting runs in the engine's reactor (a callback per listener, no task). A connection to
    a literal address (IP or Unix path), or to a name resolved recently, without capture is
    connected and relayed by the reactor too (`_Link`), so it costs no task, nursery or cancel
    scope: that machinery was most of a short connection's cost. A connection whose target
    name must be resolved (at most once per --resolve-ttl, see _Listener) and a captured
    connection take a task each (`_handle`).
    """

    def __init__(self, config: ForwardConfig, *, listeners: list[socket.socket] | None = None,
                 worker: tuple[int, int] = (1, 1),
                 on_finished: Callable[[Finished], None] | None = None) -> None:
        """`listeners`: one bound socket per rule, already listening (zcrelay.cli.workers), instead
        of binding in `serve`. `worker`: (K, N) for worker K of N, which numbers its
        connections K, K+N, K+2N... so numbers (and capture file names) stay unique.

        `on_finished(record)` is called once for each connection that ends, with its Finished
        record (the one its log line is made from), after `totals` count it: a connection ended
        by the target's refusal or by a cancelled `serve` ("shutdown") included. It is called in
        the trio thread, from inside the forwarder (a reactor callback, or the connection's
        task), so it must return at once: to act on a record in a task, hand it over with
        trio.MemoryChannel's send_nowait. An Exception it raises is logged at ERROR on the
        "zcrelay" logger and goes no further: the forwarder serves on."""
        self.config = config
        self.on_finished = on_finished
        self._given = listeners
        self.totals = Totals()
        pool = PipePool(size=config.pipe_size, max_idle=config.max_idle_pipes, on_notice=log.warning)
        self.engine = Engine(pool=pool, splice=config.splice)
        self._numbers = worker[0] - worker[1]
        self._step = worker[1]
        self._links: set[_Link] = set()
        # Links still connecting, oldest first. One connect timeout for all, so their deadlines
        # come in this order, and one timer (_sweep) serves them all instead of a timer each.
        self._connecting: dict[_Link, None] = {}
        self._sweeper: Timer | None = None
        self._check_sweeper: Timer | None = None  # _check_sweep's next run
        self._listeners: list[_Listener] = []
        self._nursery: trio.Nursery | None = None
        self._said_full = False  # the --max-conns warning is given once

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind every rule's listener, report them with task_status.started(list[Bound]),
        then serve until cancelled. A bind failure raises BindError before anything is served.
        Once it has returned, it may be called again (its totals go on adding up)."""
        self._listeners = []  # a previous serve's are closed: connections find theirs by rule
        if self.config.splice:
            # Ask for one pipe now so a size the kernel refuses is reported at start-up, once.
            self.engine.pool.put(self.engine.pool.get())
        reactor = self.engine.reactor()  # its epoll fd belongs to the start-up, not to a connection
        socks: list[net.AnySocket] = []
        try:
            if self._given is not None:
                socks, self._given = list(self._given), None  # ours to close from here on
            for rule in self.config.rules[len(socks):]:
                socks.append(await net.open_listener(rule.listen, self.config.backlog))
            bound = [Bound(rule, net.local_name(sock)) for rule, sock in zip(self.config.rules, socks)]
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for index, (rule, sock) in enumerate(zip(self.config.rules, socks), 1):
                    raw = socket.socket(fileno=sock.detach())
                    raw.setblocking(False)
                    if self.config.nodelay:
                        net.set_nodelay(raw)  # accepted sockets inherit it (Linux): one call for all
                    socks[index - 1] = raw
                    listener = _Listener(self, reactor, raw, index, rule)
                    self._listeners.append(listener)
                    reactor.watch(raw.fileno(), listener.ready)
                task_status.started(bound)
                await trio.sleep_forever()
        finally:
            for listener in self._listeners:
                listener.close()
            for link in list(self._links):
                link.abandon("shutdown")
            for timer in (self._sweeper, self._check_sweeper):
                if timer is not None:
                    timer.cancel()
            self._sweeper = self._check_sweeper = None  # else a later serve would never arm its own
            for sock in socks:
                sock.close()
            self.engine.close()

    def _accepted(self, client: socket.socket, peer: object, listener: "_Listener") -> None:
        self._numbers += self._step
        conn = Connection(self._numbers, listener.index, peer, listener.rule.target, trio.current_time())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("conn=%d rule=%d accepted from %s", conn.number, listener.index, conn.peer)
        self.totals.active += 1
        targets = listener.targets
        if targets is None and conn.started < listener.resolved_until:
            targets = listener.resolved  # a name resolved less than --resolve-ttl ago
        if targets is None or self.config.capture_dir:
            assert self._nursery is not None
            self._nursery.start_soon(self._handle, trio.socket.from_stdlib_socket(client), conn)
            return
        link = _Link(self, listener.reactor, client, conn, targets)
        self._links.add(link)
        link.begin()

    def _arm_sweep(self) -> None:
        timeout = self.config.connect_timeout
        if timeout and self._sweeper is None and self._connecting:
            oldest = next(iter(self._connecting))
            self._sweeper = self.engine.reactor().call_at(oldest.conn.started + timeout, self._sweep)

    def _sweep(self) -> None:
        """End the links whose connect timeout has passed (the oldest first), then re-arm."""
        self._sweeper = None
        timeout = self.config.connect_timeout
        assert timeout
        now = trio.current_time()
        while self._connecting:
            oldest = next(iter(self._connecting))
            if oldest.conn.started + timeout > now:
                break
            del self._connecting[oldest]
            oldest.timed_out()
        self._arm_sweep()

    def _arm_check_sweep(self) -> None:
        interval = check_interval(self.config.linger, self.config.idle_timeout)
        if interval is not None and self._check_sweeper is None:
            self._check_sweeper = self.engine.reactor().call_at(trio.current_time() + interval, self._check_sweep)

    def _check_sweep(self) -> None:
        """Look for FINs stuck behind a target or client that does not read, and for bytes a
        slow reader took (Pair.check), in every relaying link at once: one timer for all
        rather than one a connection, which a short connection would pay for. Re-armed while
        links are left."""
        self._check_sweeper = None
        for link in self._links:
            pair = link.pair
            if pair is not None and not pair.closed:
                pair.check()
        if self._links:
            self._arm_check_sweep()

    @property
    def _full(self) -> bool:
        return bool(self.config.max_conns) and self.totals.active >= self.config.max_conns

    def _at_limit(self) -> None:
        """Accepting stops at --max-conns: say so, once, so that clients left waiting in the
        backlog are not a silent mystery, and a relay that runs at its limit logs no flood."""
        if not self._said_full:
            self._said_full = True
            log.warning("--max-conns %d reached: further clients wait in the listen backlog until "
                        "a connection ends (said once)", self.config.max_conns)

    def _finished(self, conn: Connection) -> None:
        """Count, log and report (on_finished) a connection that ended (either path); never raises."""
        if conn.close == "out-of-fds":
            # No fd for its target socket: accepting more would only drop them the same way.
            self._listeners[conn.rule - 1]._back_off(OSError(errno.EMFILE, "no fd for the target socket"))
        self.totals.active -= 1
        reason = conn.close.split(" ")[0]
        self.totals.add(conn.up, conn.down, reason)
        if reason in _TARGET_GONE:
            self._listeners[conn.rule - 1].forget()
        report = self.on_finished
        logged = log.isEnabledFor(logging.INFO)
        if report is None and not logged:
            record = None  # -q and no hook: build no record, format no line
        else:
            record = conn.finished(trio.current_time())
            if logged:
                log.info("%s", record.log_line())
        if self.config.max_conns and self.totals.active == self.config.max_conns - 1:
            for listener in self._listeners:  # a slot is free: take the next from the backlog
                listener.resume()
        if report is not None:
            assert record is not None  # built whenever there is a report
            try:
                report(record)
            except Exception as exc:  # the embedder's bug: the other connections go on
                log.error("conn=%d: on_finished raised %s: %s", conn.number, type(exc).__name__, exc,
                          exc_info=True)

    async def _handle(self, client, conn: Connection) -> None:
        """A connection with a task: a target by name (resolved now), or a capture."""
        config = self.config
        session = None
        try:
            with client:  # TCP_NODELAY came from the listener
                listener = self._listeners[conn.rule - 1]
                try:
                    target = await net.connect(conn.target, config.connect_timeout, listener.remember,
                                               keep_reset=True)  # a greeting, then a reset: see _Link
                except ConnectError as exc:
                    conn.close = _unreached(exc, client)
                    return
                with target:
                    if config.nodelay:
                        net.set_nodelay(target)
                    if config.capture_dir:
                        session = capture.open_session(config.capture_dir, conn.number, conn.peer,
                                                       str(conn.target))
                    try:
                        end = await relay(client, target, self.engine, conn.up, conn.down,
                                          idle=config.idle_timeout, linger=config.linger,
                                          captures=session.captures if session else (None, None))
                    except BaseException:  # cancelled (a shutdown): as _Link._finish does
                        if cut_sides(owes(conn.up, client), owes(conn.down, target)):
                            undelivered(conn.up, target)  # bytes on their way: resets, not FINs
                            undelivered(conn.down, client)
                            net.abort(client)
                            net.abort(target)
                        raise
                    conn.close = _relay_ended(end, client, target)
        except Exception as exc:  # a bug must not take the other connections down
            conn.close = f"internal-error ({type(exc).__name__}: {exc})"
            log.debug("connection %d failed", conn.number, exc_info=True)
        except BaseException as exc:
            # Cancelled arrives bare or, through a nursery (the capture's), in a group; there
            # beside, perhaps, a bug that met the cancellation (in a cleanup, say).
            cancelled, rest = split_cancelled(exc)
            if cancelled is not None and isinstance(rest, Exception):
                # The bug is this connection's, as above; the cancellation alone goes on, so a
                # shutdown stays clean (the whole group would reach the CLI as a traceback).
                bug = first_error(rest)
                conn.close = f"internal-error ({type(bug).__name__}: {bug})"
                log.debug("connection %d failed", conn.number, exc_info=rest)
                raise cancelled from None
            conn.close = "shutdown" if rest is None else "interrupted"
            raise
        finally:
            if session is not None:
                session.write_sidecar(conn.up, conn.down, conn.close, time.time())
                session.close()
            self._finished(conn)


class _Listener:
    """One rule's listening socket, accepted from by reactor callbacks."""

    def __init__(self, forwarder: Forwarder, reactor: Reactor, sock: socket.socket, index: int, rule: Rule) -> None:
        self.forwarder = forwarder
        self.reactor = reactor
        self.sock = sock
        self.family = int(sock.family)
        self.index = index
        self.rule = rule
        self.paused = False  # waiting for the back-off timer
        self.starved = False  # warned about running out of fds, not yet accepting again
        self.delay = _ACCEPT_BACKOFF[0]
        self.timer: Timer | None = None
        self.closed = False
        # Where its connections go when no resolver is needed (None: a name).
        self.targets = net.literal_targets(rule.target)
        # A name's addresses, reused until resolved_until (--resolve-ttl): a connection then
        # takes the reactor's path (_Link) instead of a task that resolves (3x the cost).
        self.resolved: list | None = None
        self.resolved_until = -math.inf
        self.ttl = forwarder.config.resolve_ttl

    def remember(self, targets: list) -> None:
        if self.ttl:
            self.resolved, self.resolved_until = targets, trio.current_time() + self.ttl

    def forget(self) -> None:
        """A connection could not reach the addresses found: the next one resolves again."""
        self.resolved, self.resolved_until = None, -math.inf

    def ready(self, _events: int) -> None:
        if not self.paused:
            self.accept()

    def resume(self) -> None:
        if not self.paused and self.timer is None and not self.closed:
            self.timer = self.reactor.call_soon(self._resumed)

    def _resumed(self) -> None:
        self.timer = None
        self.accept()

    def accept(self) -> None:
        """Accept until EAGAIN (the listener is edge-triggered), --max-conns, or a batch."""
        forwarder = self.forwarder
        # socket.socket._accept is CPython's private method, absent from typeshed's stubs.
        accept, family = self.sock._accept, self.family  # type: ignore[attr-defined]
        for _ in range(_ACCEPT_BATCH):
            if self.paused:
                return  # the rest wait in the backlog; the timer resumes us
            if forwarder._full:
                forwarder._at_limit()
                return  # the rest wait in the backlog; _finished resumes us
            try:
                # The C-level accept: socket.accept() would also turn the listener's family and
                # type into enums on every call, a measurable share of a short connection.
                fd, peer = accept()
            except BlockingIOError:
                if self.starved:  # the backlog is served: the shortage is over
                    log.warning("accepting again on %s", self.rule.listen)
                    self.starved, self.delay = False, _ACCEPT_BACKOFF[0]
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_TRANSIENT:
                    continue
                self._back_off(exc)
                return
            client = None
            try:
                client = socket.socket(family, socket.SOCK_STREAM, 0, fd)
                # accept(2) does not pass O_NONBLOCK on, and splice needs it on the socket side.
                client.setblocking(False)
                forwarder._accepted(client, peer, self)
            except Exception as exc:  # a bug must not stop the listener
                log.error("conn=%d: internal error: %s: %s", forwarder._numbers, type(exc).__name__, exc)
                log.debug("internal error", exc_info=True)
                if client is None:
                    os.close(fd)
                else:
                    client.close()
        self.resume()  # more may be waiting: go on after the others had a turn

    def _back_off(self, exc: OSError) -> None:
        """Stop accepting for a while: out of fds (for the client or its target socket), or an
        accept error that is not the client's. Clients wait in the backlog meanwhile."""
        if self.paused or self.closed:
            return
        if not self.starved:
            why = "out of file descriptors" if exc.errno in NO_RESOURCES else os.strerror(exc.errno or 0).lower()
            log.warning("%s accepting on %s (%s): pausing accepts until some are freed",
                        why, self.rule.listen, errno.errorcode.get(exc.errno or 0, exc.errno))
            self.starved = True
        self.paused = True
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.reactor.call_at(trio.current_time() + self.delay, self._retry)
        self.delay = min(self.delay * 2, _ACCEPT_BACKOFF[1])

    def _retry(self) -> None:
        self.timer = None
        self.paused = False
        self.accept()

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.reactor.unwatch(self.sock.fileno())


class _Link:
    """One connection to a literal target, connected and relayed by the reactor: a state
    machine (connecting → relaying → finished) driven by callbacks that never raise."""

    __slots__ = ("forwarder", "reactor", "client", "target", "conn", "targets", "pair",
                 "last_error", "retry", "finished", "attempt")

    def __init__(self, forwarder: Forwarder, reactor: Reactor, client: socket.socket, conn: Connection,
                 targets: list) -> None:
        self.forwarder = forwarder
        self.reactor = reactor
        self.client = client
        self.target: socket.socket | None = None
        self.conn = conn
        self.targets = list(targets)
        self.pair: Pair | None = None
        self.last_error = 0
        self.retry = 0.0  # Unix target with a full backlog: the next back-off
        self.finished = False
        self.attempt: Timer | None = None  # one of several addresses: its share of the timeout

    def begin(self) -> None:
        self.forwarder._connecting[self] = None  # until connected or finished: see _sweep
        self.forwarder._arm_sweep()
        self._guard(self._next_target)

    def _guard(self, step, *args) -> None:
        try:
            step(*args)
        except Exception as exc:  # a bug must not take the other connections down
            log.debug("connection %d failed", self.conn.number, exc_info=True)
            self._finish(f"internal-error ({type(exc).__name__}: {exc})")

    def _next_target(self) -> None:
        while self.targets:
            family, sockaddr = self.targets[0]
            try:
                sock = net.stream_socket(family)
            except OSError as exc:
                self._fail(exc.errno or 0)  # out of fds or memory: another address will not help
                return
            self.target = sock
            if self._try_connect(sockaddr):
                return
        self._fail(self.last_error)

    def _try_connect(self, sockaddr) -> bool:
        """Start connecting self.target; False if it failed at once (the next address is due)."""
        sock = self.target
        assert sock is not None
        err = sock.connect_ex(sockaddr)
        if err == errno.EINPROGRESS:
            self.reactor.watch(sock.fileno(), self._connect_ready)
            timeout = self.forwarder.config.connect_timeout
            if timeout and len(self.targets) > 1:  # the others need time too (net.attempt_time)
                now = trio.current_time()
                share = net.attempt_time(self.conn.started + timeout - now, len(self.targets))
                self.attempt = self.reactor.call_at(now + share, lambda: self._guard(self._attempt_spent, sock))
            return True
        if err == errno.EAGAIN and sock.family == socket.AF_UNIX:
            # A Unix listener with a full backlog answers EAGAIN and offers nothing to wait on:
            # retry with back-off, within the connect timeout (as mover.connect does).
            self.retry = mover.unix_retry_delay(self.retry)
            self.reactor.call_at(trio.current_time() + self.retry, lambda: self._retry_unix(sock, sockaddr))
            return True
        if err == 0:
            self._connected()
            return True
        self._drop_target(err)
        return False

    def _retry_unix(self, sock: socket.socket, sockaddr) -> None:
        if self.target is sock and not self.finished:
            self._guard(lambda: None if self._try_connect(sockaddr) else self._next_target())

    def _attempt_spent(self, sock: socket.socket) -> None:
        """An address that is not the last used up its share of the connect timeout."""
        self.attempt = None
        if self.target is sock and not self.finished and self.pair is None:
            self._drop_target(errno.ETIMEDOUT)
            self._next_target()

    def _cancel_attempt(self) -> None:
        if self.attempt is not None:
            self.attempt.cancel()
            self.attempt = None

    def _drop_target(self, err: int) -> None:
        self._cancel_attempt()
        self.last_error = err
        self.targets.pop(0)
        if self.target is not None:
            self.reactor.unwatch(self.target.fileno())
            self.target.close()
            self.target = None

    def _connect_ready(self, events: int) -> None:
        self._guard(self._check_connect, events)

    def _check_connect(self, events: int) -> None:
        sock = self.target
        assert sock is not None
        if not events & _CONNECT_FAILED:
            if events & select.EPOLLOUT:  # connected: writable, no error (saves a getsockopt)
                # The streams take it over (level-triggered: what it sent is reported).
                self.reactor.unwatch(sock.fileno(), keep=True)
                self._connected()
            return  # not an outcome yet: the real event will come
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED
        if err == errno.ECONNRESET:
            # The target accepted, then reset, before the connect was seen: the connection
            # existed (a SYN answered by a reset is ECONNREFUSED), and Linux keeps a reset
            # socket's received bytes readable. So it is relayed like any connection the
            # target reset: what it sent first (a greeting) reaches the client, then the
            # reset does (Pair: tcp_closed), as net.connect's keep_reset does on the task path.
            self.reactor.unwatch(sock.fileno(), keep=True)
            self._connected()
            return
        self._drop_target(err)
        self._next_target()

    def _connected(self) -> None:
        self._cancel_attempt()
        self.forwarder._connecting.pop(self, None)
        config = self.forwarder.config
        assert self.target is not None
        if config.nodelay and self.targets[0][0] != socket.AF_UNIX:  # the client's came from the listener
            self.target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pair = Pair(self.reactor, self.client, self.target, self.conn.up, self.conn.down,
                         idle=config.idle_timeout, linger=config.linger, on_done=self._relayed,
                         closes=True)
        self.forwarder._arm_check_sweep()

    def _relayed(self, pair: Pair) -> None:
        end = pair.end
        assert end is not None and self.target is not None
        if pair.crash is not None:
            exc = pair.crash
            log.debug("connection %d failed", self.conn.number, exc_info=exc)
            self._finish(f"internal-error ({type(exc).__name__}: {exc})")
            return
        self._finish(_relay_ended(end, self.client, self.target))

    def timed_out(self) -> None:
        self._finish("timeout")

    def _fail(self, err: int) -> None:
        self._finish(_unreached(net.connect_error(self.conn.target, err), self.client))

    def abandon(self, why: str) -> None:
        """End now (the forwarder is shutting down)."""
        self._finish(why)

    def _finish(self, close: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.conn.close = close
        self._cancel_attempt()
        self.forwarder._connecting.pop(self, None)
        pair = self.pair
        if pair is not None and not pair.closed:  # ended from outside (shutdown), not by itself
            assert self.target is not None  # a pair relays a connected target (_connected)
            for side in pair.cut_short():  # bytes owed: a reset, as in _relay_ended
                net.abort(self.client if side == "a" else self.target)
            pair.close()
        if self.target is not None:
            self.reactor.unwatch(self.target.fileno(), closing=True)
            self.target.close()
        self.client.close()
        self.forwarder._links.discard(self)
        self.forwarder._finished(self.conn)
