"""How the async layer waits for an fd: through trio, or by blocking in poll(2).

The movers are coroutines that try the syscall first and wait only on EAGAIN. Inside a trio
run they wait through trio. A command with a single stream and nothing else to schedule
(`zcrelay send`, a `zcrelay tee` whose standard input is a pipe) runs them with `run_blocking`
instead: the waits then block in poll(2), sleeps in time.sleep, deadlines (`move_on_after`)
bound the polls, and the process never imports trio, whose import alone cost more start-up CPU
(about 0.15 s here) than splicing a gigabyte.

No trio import here (trio is imported on the first trio wait).
"""

from __future__ import annotations

import contextvars
import math
import select
import time
from contextlib import contextmanager
from collections.abc import Callable, Coroutine, Iterator
from types import ModuleType

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:  # for annotations only
    from typing import TypeVar

    import trio

    T = TypeVar("T")

_BLOCKING = contextvars.ContextVar("zcrelay_blocking", default=False)
_DEADLINE = contextvars.ContextVar("zcrelay_deadline", default=math.inf)  # time.monotonic()
_trio_module: ModuleType | None = None  # trio, once a trio wait has been made


def _trio() -> ModuleType:
    global _trio_module
    if _trio_module is None:
        import trio

        _trio_module = trio
    return _trio_module


class _Expired(Exception):
    """A blocking wait reached the innermost move_on_after deadline (caught there)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline


def _left() -> float:
    deadline = _DEADLINE.get()
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Expired(deadline)
    return left


def _block(fd: int, events: int) -> None:
    poller = select.poll()
    poller.register(fd, events)
    while True:
        left = _left()
        # POLLERR/POLLHUP also end the wait: the next syscall reports them.
        if poller.poll(None if left == math.inf else max(1, math.ceil(left * 1000))):
            return


async def wait_readable(fd: int) -> None:
    if _BLOCKING.get():
        _block(fd, select.POLLIN)
    else:
        await _trio().lowlevel.wait_readable(fd)


async def wait_writable(fd: int) -> None:
    if _BLOCKING.get():
        _block(fd, select.POLLOUT)
    else:
        await _trio().lowlevel.wait_writable(fd)


async def until_readable(fd: int) -> None:
    """Until `fd` is readable, nothing read. How a worker hears its parent say stop
    (zcrelay.cli.workers): a byte in the stop pipe, or EOF once the parent is gone."""
    await wait_readable(fd)


async def checkpoint() -> None:
    if not _BLOCKING.get():
        await _trio().lowlevel.checkpoint()


def current_time() -> float:
    return time.monotonic() if _BLOCKING.get() else _trio().current_time()


async def sleep_until(when: float) -> None:
    """Sleep until `when` (current_time's clock)."""
    if not _BLOCKING.get():
        await _trio().sleep_until(when)
        return
    while True:
        now = time.monotonic()
        if now >= when:
            return
        deadline = _DEADLINE.get()
        if deadline <= when:
            time.sleep(max(0.0, deadline - now))
            _left()  # raises: the deadline came first
        time.sleep(when - now)


class Scope:
    """What move_on_after yields in blocking mode; `cancelled_caught` as trio's scopes."""

    cancelled_caught = False


@contextmanager
def move_on_after(seconds: float) -> Iterator[trio.CancelScope | Scope]:
    """trio.move_on_after in a trio run; in blocking mode, a deadline for the waits inside.
    Check `scope.cancelled_caught` after the block."""
    if not _BLOCKING.get():
        with _trio().move_on_after(seconds) as scope:
            yield scope
        return
    scope = Scope()
    mine = time.monotonic() + seconds
    token = _DEADLINE.set(min(_DEADLINE.get(), mine))
    try:
        yield scope
    except _Expired as exc:
        if exc.deadline < mine:
            raise  # an outer scope's deadline, earlier than this one's
        scope.cancelled_caught = True
    finally:
        _DEADLINE.reset(token)


def blocking() -> bool:
    """Whether the caller runs under run_blocking (no trio run to hand work to)."""
    return _BLOCKING.get()


def run_blocking(fn: Callable[..., Coroutine[object, None, T]], *args: object) -> T:
    """Run the coroutine function `fn(*args)` to completion without an event loop: every wait
    blocks. `fn` must await nothing but the waits above (a trio call would suspend, which
    raises RuntimeError here rather than hang)."""
    token = _BLOCKING.set(True)
    try:
        coro = fn(*args)
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} tried to suspend outside a trio run")
    finally:
        _BLOCKING.reset(token)
