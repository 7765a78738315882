"""Pipes that know what they hold, and a bounded pool of empty ones.

No trio here. A pipe is the only buffer on the splice path, so two rules keep the byte stream
intact (shared/SPLICE.md, HAProxy's put_pipe in src/pipe.c, Go's putPipe):
- `held` counts bytes spliced in and not yet spliced out; it is what tells "pipe full" from
  "source empty" when splice answers EAGAIN.
- a pipe that still holds bytes is destroyed, never handed to another stream.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from zcrelay import syscalls


class Pipe:
    """Owns the two ends of one pipe. Whoever holds the Pipe closes it (or returns it to a pool)."""

    __slots__ = ("r", "w", "size", "held")

    def __init__(self, r: int, w: int, size: int) -> None:
        self.r = r
        self.w = w
        self.size = size
        self.held = 0

    @classmethod
    def open(cls, size: int | None = None, limits: syscalls.PipeLimits | None = None) -> "Pipe":
        r, w, granted = syscalls.open_pipe(size, limits)
        return cls(r, w, granted)

    def close(self) -> None:
        """Close both ends. The stored fds become -1, so a later use fails loudly (EBADF)
        instead of touching whatever reused the numbers."""
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1
        self.held = 0

    @property
    def closed(self) -> bool:
        return self.r < 0

    def __repr__(self) -> str:
        return f"Pipe(r={self.r}, w={self.w}, size={self.size}, held={self.held})"


class PoolStats:
    __slots__ = ("created", "destroyed_dirty")

    def __init__(self) -> None:
        self.created = 0
        self.destroyed_dirty = 0  # destroyed because they still held bytes

    def __repr__(self) -> str:
        return f"PoolStats(created={self.created}, destroyed_dirty={self.destroyed_dirty})"


class PipePool:
    """Hands out pipes of one requested size and keeps at most `max_idle` empty ones.

    An idle connection holds no pipe: streams take a pipe when bytes arrive and give it back as
    soon as it is empty, so the number of pipe fds a relay holds is bounded by the bytes in
    flight plus `max_idle`, not by the number of connections.

    The kernel may give less than asked (pipe-max-size, the per-user page budget). The first
    shortfall of each kind is passed to `on_notice` once, never silently. (Written out, not a
    dataclass: see zcrelay.stats.)
    """

    def __init__(self, size: int | None = 1 << 20, max_idle: int = 16,
                 on_notice: Callable[[str], None] | None = None,
                 limits: syscalls.PipeLimits | None = None) -> None:
        self.size = size
        self.max_idle = max_idle
        self.on_notice = on_notice
        self.limits = limits if limits is not None else syscalls.read_pipe_limits()
        self.stats = PoolStats()
        self.granted: int | None = None  # size of the last pipe the kernel gave
        # Empty pipes ready to be handed out. zcrelay.reactor pops from here itself (get's
        # common case, once per message); pipes come back through put, which alone decides
        # what is kept.
        self.spare: list[Pipe] = []
        self._noticed: set[str] = set()
        # Smaller pipes than this (the kernel's budget ran short) are not pooled.
        self._keep_from = min(size, self.limits.max_size) if size else 0

    def __repr__(self) -> str:
        return (f"PipePool(size={self.size}, max_idle={self.max_idle}, idle={len(self.spare)}, "
                f"granted={self.granted}, stats={self.stats!r})")

    def get(self) -> Pipe:
        """An empty pipe: a pooled one, or a new one (OSError such as EMFILE propagates)."""
        if self.spare:
            return self.spare.pop()
        pipe = Pipe.open(self.size, self.limits)
        self.stats.created += 1
        self.granted = pipe.size
        if self.size and pipe.size < self.size:
            self._notice_shortfall(pipe.size)
        return pipe

    def put(self, pipe: Pipe) -> None:
        """Take back a pipe. One that holds bytes, or one too many, is closed."""
        # Called once per message on request/response traffic: kept to plain attribute tests.
        if pipe.r < 0:  # closed
            return
        if pipe.held:
            self.stats.destroyed_dirty += 1
            pipe.close()
        elif len(self.spare) < self.max_idle and pipe.size >= self._keep_from:
            self.spare.append(pipe)
        else:
            pipe.close()

    @property
    def idle(self) -> int:
        return len(self.spare)

    def close(self) -> None:
        while self.spare:
            self.spare.pop().close()

    def _notice_shortfall(self, granted: int) -> None:
        assert self.size is not None
        if self.size > self.limits.max_size and granted >= self.limits.max_size:
            kind = "max"
            text = (f"pipe size {self.size} is above the kernel's limit "
                    f"(/proc/sys/fs/pipe-max-size = {self.limits.max_size}); using {granted}")
        else:
            kind = "budget"
            text = (f"the kernel gave a {granted}-byte pipe instead of {self.size}: the user's pipe "
                    f"page budget is spent (/proc/sys/fs/pipe-user-pages-soft = "
                    f"{self.limits.user_pages_soft}); throughput will drop")
        if kind not in self._noticed:
            self._noticed.add(kind)
            if self.on_notice:
                self.on_notice(text)
