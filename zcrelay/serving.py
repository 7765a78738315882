"""`zcrelay serve`: one file to every client of a listener, concurrently (policy layer).

Each client gets files.transfer in its own trio task, with one log line when it ends. A client
whose transfer fails on our side (the file cannot be opened or shrinks, no fd is left) or is
cut short by the server stopping gets a reset, never a clean end of a truncated file.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import trio

from zcrelay import direct, net, syscalls
from zcrelay.addresses import Address
from zcrelay.errors import NO_RESOURCES, ConnectionLost, InputFailed
from zcrelay.files import IdleTimeout, SendConfig, abort_unless_sent, open_file, transfer
from zcrelay.logs import library_logger
from zcrelay.stats import Flow

log = library_logger()  # "zcrelay", with its NullHandler (zcrelay.logs)

_RECOVERED = 1.0  # seconds without a refused accept that end an fd shortage (its log line)


class FileServer:
    """Serves one file to every client of one listener, concurrently, opening it for each.
    One log line per client."""

    def __init__(self, path: str, address: Address, config: SendConfig) -> None:
        self.path = path
        self.address = address
        self.config = config
        # A client that got the whole file may keep its 4 fds (socket, file, pipe) no longer
        # than --idle-timeout either, waiting for it to close (files.transfer times the
        # sending only).
        linger = config.linger if config.linger is not None else math.inf
        idle = config.idle_timeout or math.inf
        self._transfer_config = replace(config, linger=min(linger, idle)) if idle < linger else config
        self.connections = 0
        self.sent = 0
        self.failed = 0  # clients that did not get the whole file, cut_short included
        self.cut_short = 0  # of those, clients reset by the server stopping mid-file
        # The clients sending, by number: (socket, flow, what _notice_taken saw last).
        self._sending: dict[int, list] = {}

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound address with task_status.started(str), serve until cancelled."""
        listener = await net.open_listener(self.address)
        with listener:
            task_status.started(net.local_name(listener))
            # Out of fds, said once per shortage, as forward does: a retry every 0.1 s logged a
            # line each time, ten a second for as long as it lasted. The shortage is over at an
            # accept _RECOVERED seconds after the last refusal (a client accepted with the last
            # free fd, then closed for want of a pipe, would otherwise end it every 0.1 s).
            short_at: float | None = None  # the last accept refused for want of an fd
            async with trio.open_nursery() as nursery:
                from zcrelay.relay import check_interval  # here: connect and listen import this module

                interval = check_interval(None, self.config.idle_timeout)
                if interval is not None:
                    nursery.start_soon(self._notice_taken, interval)
                while True:
                    try:
                        sock, peer = await listener.accept()
                    except OSError as exc:
                        if exc.errno in NO_RESOURCES:
                            if short_at is None:
                                log.warning("out of file descriptors: pausing accepts until some are freed")
                            short_at = trio.current_time()
                            await trio.sleep(0.1)
                        continue
                    if short_at is not None and trio.current_time() - short_at > _RECOVERED:
                        log.warning("accepting again on %s", self.address)
                        short_at = None
                    self.connections += 1
                    nursery.start_soon(self._handle, sock, net.peer_name(sock, peer), self.connections)

    async def _notice_taken(self, interval: float) -> None:
        """Every `interval`, count as a byte moved a byte a client took from its socket's send
        queue while serve sent it none (flow.on_bytes: the idle clock of files.transfer). A
        socket polls writable only once about half its send buffer is free, so a client that
        read the file steadily, but slower than half a buffer per --idle-timeout, looked idle
        and was reset. One sweep for every client, as forward's relays do (Pair.check)."""
        while True:
            await trio.sleep(interval)
            for entry in self._sending.values():
                sock, flow, before = entry
                entry[2], took = syscalls.look_at_queue(sock, flow.bytes, before)
                if took and flow.on_bytes is not None:
                    flow.on_bytes(0)

    async def _handle(self, sock: trio.socket.SocketType, peer: str, number: int) -> None:
        flow = Flow()
        started = trio.current_time()
        outcome = "ok"
        self._sending[number] = [sock, flow, None]
        try:
            # With --idle-timeout, a client that stops reading is let go (reset) once no byte
            # has moved for that long (files.transfer): each held 4 fds (socket, file, pipe)
            # for as long as it chose, and a few hundred of them ran serve out of fds.
            with sock, abort_unless_sent(sock, flow):  # a client cut short sees a reset
                # Opened for each client, as socat and nginx do: a file replaced since serve
                # started (an editor's save, a new build, a rotated log) is served as it is
                # now, not the inode serve opened first, forever.
                fd, size = open_file(self.path)
                try:
                    # A file that reports size 0 (procfs) is sent to its EOF: length None.
                    await transfer(fd, sock, 0, size or None, flow, self._transfer_config)
                finally:
                    os.close(fd)
        except trio.Cancelled:
            outcome = "shutdown"
            if flow.end != "eof":  # reset mid-file by abort_unless_sent: a failure for the client
                self.failed += 1
                self.cut_short += 1
            raise
        except IdleTimeout:
            outcome = f"idle ({self.config.idle_timeout:g}s without a byte moving)"
            self.failed += 1
        except (direct.FileShrank, InputFailed, ConnectionLost) as exc:
            outcome = f"error ({exc})"
            self.failed += 1
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in NO_RESOURCES:
                # No fd or memory for the file's pipe: the process's limit, not a bug.
                outcome = f"error (out of resources: {os.strerror(exc.errno)})"
            else:  # a bug must not take the other clients down
                outcome = f"internal-error ({type(exc).__name__}: {exc})"
            self.failed += 1
        finally:
            del self._sending[number]
            self.sent += flow.bytes
            elapsed = trio.current_time() - started
            rate = flow.bytes / elapsed / 1e6 if elapsed > 0 else 0.0
            log.info("conn=%d peer=%s sent=%d spliced=%d copied=%d duration=%.3fs rate=%.1fMB/s %s",
                     number, peer, flow.bytes, flow.spliced, flow.copied, elapsed, rate, outcome)
