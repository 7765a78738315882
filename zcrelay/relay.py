"""Policy for moving streams: one-way copy with a safe fallback, and the two-way relay.

What the relay promises:
- both directions run at once; bytes are never lost or reordered;
- at EOF on one side, the write side of the other is shut down and the reverse direction keeps
  flowing (half-close); the half-closed connection then lives at most `linger` seconds;
- a reset or error on either side ends both directions promptly;
- with `idle` set, a connection where no byte moved for that long is ended.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import trio

from zcrelay import mover, syscalls, teeing
from zcrelay.errors import SpliceRefused, StreamError
from zcrelay.pipes import PipePool
from zcrelay.stats import Flow


class Endpoint(Protocol):
    """A connected stream: trio sockets are endpoints."""

    def fileno(self) -> int: ...

    def shutdown(self, how: int) -> None: ...


@dataclass
class Engine:
    """What every stream of one relay shares: the pipe pool and the copy policy."""

    pool: PipePool = field(default_factory=PipePool)
    splice: bool = True
    max_chunk: int = syscalls.MAX_SPLICE_AT_ONCE
    copy_bufsize: int = mover.COPY_BUFSIZE
    fallbacks: Counter = field(default_factory=Counter)

    def close(self) -> None:
        self.pool.close()


async def one_way(src: int, dst: int, engine: Engine, flow: Flow, capture=None) -> None:
    """Copy src → dst until EOF on src, with splice whenever the fd pair allows it.

    A user-space copy is used only when splice is turned off or refused the pair before the
    first byte moved; the reason goes to `flow.fallback` and is counted in `engine.fallbacks`.
    With `capture` (a zcrelay.teeing.CaptureFile), every chunk is also tee'd to its file.
    """
    if capture is not None:
        return await teeing.captured_one_way(src, dst, engine, flow, capture)
    if engine.splice:
        try:
            await mover.splice_stream(src, dst, engine.pool, flow, engine.max_chunk)
            return
        except SpliceRefused as exc:
            flow.fallback = exc.reason
    else:
        flow.fallback = "splice disabled"
    engine.fallbacks[flow.fallback] += 1
    await mover.copy_stream(src, dst, flow, engine.copy_bufsize)


@dataclass
class RelayEnd:
    """Why a relay ended. `side` is "a" or "b" for the side that failed, else None."""

    reason: str  # eof | reset | idle | linger | error
    side: str | None = None
    detail: str = ""

    def describe(self, a: str = "a", b: str = "b") -> str:
        if self.side is None:
            return self.reason
        who = a if self.side == "a" else b
        text = f"{self.reason} by {who}" if self.reason == "reset" else f"{self.reason} on {who}"
        return f"{text} ({self.detail})" if self.detail and self.reason != "reset" else text


class _Relay:
    """State shared by the two directions of one relay."""

    def __init__(self, scope: trio.CancelScope, linger: float | None) -> None:
        self.scope = scope
        self.linger = linger
        self.finished = 0
        self.end: RelayEnd | None = None
        self.last_activity = trio.current_time()
        self.linger_at = float("inf")

    def touch(self, _n: int) -> None:
        self.last_activity = trio.current_time()

    async def direction(self, src: Endpoint, dst: Endpoint, engine: Engine, flow: Flow,
                        src_side: str, dst_side: str, capture=None) -> None:
        try:
            await one_way(src.fileno(), dst.fileno(), engine, flow, capture)
        except StreamError as exc:
            side = src_side if exc.role in (mover.SOURCE, "pipe") else dst_side
            flow.end = exc.reason
            if self.end is None:
                self.end = RelayEnd(exc.reason, side, str(exc))
            self.scope.cancel()
            return
        flow.end = "eof"
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is already gone; its own direction will report how
        self.finished += 1
        if self.finished == 2:
            self.end = RelayEnd("eof")
            self.scope.cancel()  # stops the idle watcher, if any
        elif self.linger is not None:
            self.linger_at = trio.current_time() + self.linger
            self.scope.deadline = min(self.scope.deadline, self.linger_at)

    async def watch_idle(self, idle: float) -> None:
        while True:
            await trio.sleep_until(self.last_activity + idle)
            if trio.current_time() >= self.last_activity + idle:
                if self.end is None:
                    self.end = RelayEnd("idle")
                self.scope.cancel()
                return


async def relay(a: Endpoint, b: Endpoint, engine: Engine, up: Flow, down: Flow, *,
                idle: float | None = None, linger: float | None = None,
                captures: tuple = (None, None)) -> RelayEnd:
    """Relay a → b (counted in `up`) and b → a (`down`) until both reach EOF, one side fails,
    or a timeout fires; return why it ended.

    `captures` (up, down) are optional zcrelay.teeing.CaptureFile recorders, one a direction.
    Closes nothing: the caller owns `a` and `b` and closes them afterwards (after a reset it may
    abort the other side too). Cancelling the caller's scope ends the relay at once.
    """
    # The nursery's own scope is the relay's: cancelling it (reset, idle, both EOFs) or its
    # deadline (linger) ends both directions. The a → b direction runs in this task, so a
    # connection costs one spawned task, not two: per-connection cost is Python's weak spot.
    async with trio.open_nursery() as nursery:
        state = _Relay(nursery.cancel_scope, linger)
        if idle:
            up.on_bytes = down.on_bytes = state.touch
            nursery.start_soon(state.watch_idle, idle)
        nursery.start_soon(state.direction, b, a, engine, down, "b", "a", captures[1])
        await state.direction(a, b, engine, up, "a", "b", captures[0])
    if state.end is None:
        # Only the linger deadline cancels the scope without setting an end.
        state.end = RelayEnd("linger")
    for flow in (up, down):
        if flow.end is None:
            flow.end = state.end.reason
    return state.end
