"""`zcrelay forward`: listeners, the accept loop and one relay per connection.

Policy only: sockets come from zcrelay.net, bytes move through zcrelay.relay. Nothing here
prints or exits; it logs to the "zcrelay" logger, one line per finished connection.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field

import trio

from zcrelay import capture, net
from zcrelay.addresses import Address
from zcrelay.errors import NO_RESOURCES
from zcrelay.excgroups import first_error
from zcrelay.pipes import PipePool
from zcrelay.relay import Engine, relay
from zcrelay.stats import Flow, Totals

log = logging.getLogger("zcrelay")

# accept() errors that concern one client that gave up, not the listener (accept(2)).
_ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
# Back-off while the process is out of fds: trio's serve_listeners sleeps 100 ms; grow to 1 s.
_ACCEPT_BACKOFF = (0.05, 1.0)


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


@dataclass
class Connection:
    """One client connection and what became of it."""

    number: int
    rule: int
    peer: str
    target: Address
    started: float
    up: Flow = field(default_factory=Flow)
    down: Flow = field(default_factory=Flow)
    close: str = "?"

    def log_line(self, now: float) -> str:
        spliced = self.up.spliced + self.down.spliced
        copied = self.up.copied + self.down.copied
        line = (f"conn={self.number} rule={self.rule} peer={self.peer} target={self.target} "
                f"up={self.up.bytes} down={self.down.bytes} spliced={spliced} copied={copied} "
                f"duration={now - self.started:.3f}s close={self.close}")
        fallbacks = sorted({f.fallback for f in (self.up, self.down) if f.fallback})
        if fallbacks:
            line += " fallback=" + ",".join(f'"{f}"' for f in fallbacks)
        return line


@dataclass(frozen=True)
class Bound:
    rule: Rule
    address: str  # the real address, with the port the kernel chose for port 0


class Forwarder:
    """Runs the rules of one ForwardConfig. `totals` stays readable after cancellation."""

    def __init__(self, config: ForwardConfig) -> None:
        self.config = config
        self.totals = Totals()
        pool = PipePool(size=config.pipe_size, max_idle=config.max_idle_pipes, on_notice=log.warning)
        self.engine = Engine(pool=pool, splice=config.splice)
        self._slots = trio.Semaphore(config.max_conns) if config.max_conns else None
        self._numbers = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind every rule's listener, report them with task_status.started(list[Bound]),
        then serve until cancelled. A bind failure raises BindError before anything is served."""
        if self.config.splice:
            # Ask for one pipe now so a size the kernel refuses is reported at start-up, once.
            self.engine.pool.put(self.engine.pool.get())
        self.engine.reactor()  # its epoll fd belongs to the relay's start-up, not to a connection
        listeners = []
        try:
            for rule in self.config.rules:
                listeners.append(await net.open_listener(rule.listen, self.config.backlog))
            bound = [Bound(rule, net.local_name(sock)) for rule, sock in zip(self.config.rules, listeners)]
            async with trio.open_nursery() as nursery:
                for index, (rule, sock) in enumerate(zip(self.config.rules, listeners), 1):
                    nursery.start_soon(self._accept_loop, sock, index, rule, nursery)
                task_status.started(bound)
        finally:
            for sock in listeners:
                sock.close()
            self.engine.close()

    async def _accept_loop(self, listener, index: int, rule: Rule, nursery: trio.Nursery) -> None:
        paused = False
        delay = _ACCEPT_BACKOFF[0]
        while True:
            if self._slots is not None:
                await self._slots.acquire()  # at --max-conns, clients wait in the backlog
            try:
                sock, peer = await listener.accept()
            except OSError as exc:
                self._release()
                if exc.errno in NO_RESOURCES:
                    if not paused:
                        log.warning("out of file descriptors accepting on %s (%s): pausing accepts "
                                    "until some are freed", rule.listen, errno.errorcode[exc.errno])
                        paused = True
                    await trio.sleep(delay)
                    delay = min(delay * 2, _ACCEPT_BACKOFF[1])
                    continue
                if exc.errno in _ACCEPT_TRANSIENT:
                    continue
                raise
            if paused:
                log.warning("accepting again on %s", rule.listen)
                paused, delay = False, _ACCEPT_BACKOFF[0]
            self._numbers += 1
            conn = Connection(self._numbers, index, net.peer_name(sock, peer), rule.target, trio.current_time())
            log.debug("conn=%d rule=%d accepted from %s", conn.number, index, conn.peer)
            nursery.start_soon(self._handle, sock, conn)

    def _release(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def _handle(self, client, conn: Connection) -> None:
        config = self.config
        self.totals.active += 1
        session = None
        try:
            with client:
                if config.nodelay:
                    net.set_nodelay(client)
                try:
                    target = await net.connect(conn.target, config.connect_timeout)
                except net.ConnectError as exc:
                    conn.close = exc.reason
                    return
                with target:
                    if config.nodelay:
                        net.set_nodelay(target)
                    if config.capture_dir:
                        session = capture.open_session(config.capture_dir, conn.number, conn.peer,
                                                       str(conn.target))
                    end = await relay(client, target, self.engine, conn.up, conn.down,
                                      idle=config.idle_timeout, linger=config.linger,
                                      captures=session.captures if session else (None, None))
                    conn.close = end.describe("client", "target")
                    if end.reason == "reset":
                        # Pass the reset on, as the peer would have seen it without a relay.
                        net.abort(target if end.side == "a" else client)
        except Exception as exc:  # a bug must not take the other connections down
            conn.close = f"internal-error ({type(exc).__name__}: {exc})"
            log.debug("connection %d failed", conn.number, exc_info=True)
        except BaseException as exc:
            # Cancelled arrives bare or, through a nursery (the capture's), in a group.
            conn.close = "shutdown" if isinstance(first_error(exc), trio.Cancelled) else "interrupted"
            raise
        finally:
            self.totals.active -= 1
            self.totals.add(conn.up, conn.down, conn.close.split(" ")[0])
            self._release()
            if session is not None:
                session.write_sidecar(conn.up, conn.down, conn.close, time.time())
                session.close()
            if log.isEnabledFor(logging.INFO):  # -q: skip formatting the line at all
                log.info("%s", conn.log_line(trio.current_time()))
