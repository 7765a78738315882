"""How the async layer waits for an fd: through trio, or by blocking in poll(2).

The movers are coroutines that try the syscall first and wait only on EAGAIN. Inside a trio
run they wait through trio. A command with a single stream and nothing else to schedule (a
`zcrelay tee` whose standard input is a pipe) runs them with `run_blocking` instead: the
waits then block in poll(2), and the process never imports trio, whose import alone cost
more start-up CPU (about 0.15 s here) than splicing a gigabyte to /dev/null.

No trio import here (trio is imported on the first trio wait).
"""

from __future__ import annotations

import contextvars
import select
from typing import Any, Awaitable, Callable

_BLOCKING = contextvars.ContextVar("zcrelay_blocking", default=False)
_lowlevel: Any = None  # trio.lowlevel, once a trio wait has been made


def _trio() -> Any:
    global _lowlevel
    if _lowlevel is None:
        import trio.lowlevel

        _lowlevel = trio.lowlevel
    return _lowlevel


def _block(fd: int, events: int) -> None:
    poller = select.poll()
    poller.register(fd, events)
    poller.poll()  # POLLERR/POLLHUP also end the wait: the next syscall reports them


async def wait_readable(fd: int) -> None:
    if _BLOCKING.get():
        _block(fd, select.POLLIN)
    else:
        await _trio().wait_readable(fd)


async def wait_writable(fd: int) -> None:
    if _BLOCKING.get():
        _block(fd, select.POLLOUT)
    else:
        await _trio().wait_writable(fd)


async def checkpoint() -> None:
    if not _BLOCKING.get():
        await _trio().checkpoint()


def blocking() -> bool:
    """Whether the caller runs under run_blocking (no trio run to hand work to)."""
    return _BLOCKING.get()


def run_blocking(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
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
