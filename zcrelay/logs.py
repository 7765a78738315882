"""The "zcrelay" logger, with `logging` imported when the first message is logged.

Why: `zcrelay tee FILE...` runs inside shell pipelines, where its start-up is part of every run,
and a tee that meets no error logs nothing. Importing logging (with traceback, string, weakref
and threading) was about 7 ms of a 48 ms start-up (benchmarks/TEE.md, eleventh session). The
modules on that path log through `log` here. Every other module may call
logging.getLogger("zcrelay") itself: it is the same logger, set up by `configure`.

No trio here, and nothing that prints: the handler writes to stderr, as set up by the CLI.
"""

from __future__ import annotations

import sys

NAME = "zcrelay"
# The level `configure` asked for while logging was not imported yet (None: nothing pending).
_pending: int | None = None


def configure(verbose: int, quiet: bool, *, lazy: bool = False) -> None:
    """Log to stderr as 'zcrelay: message' (stdout stays clean for data): WARNING and above
    with `quiet`, DEBUG with `verbose`, else INFO. With `lazy`, logging is imported and set up
    on the first message rather than now (unless something imported it already)."""
    global _pending
    _pending = 30 if quiet else 10 if verbose else 20  # logging.WARNING, DEBUG, INFO
    if not lazy or "logging" in sys.modules:
        logger()


def logger():
    """logging.getLogger("zcrelay"), set up as `configure` asked."""
    global _pending
    import logging

    log = logging.getLogger(NAME)
    if _pending is not None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{NAME}: %(message)s"))
        log.handlers[:] = [handler]
        log.propagate = False
        log.setLevel(_pending)
        _pending = None
    return log


class _Log:
    """Stands for the "zcrelay" logger: the first attribute looked up imports logging."""

    __slots__ = ()

    def __getattr__(self, name: str):
        return getattr(logger(), name)

    def debug(self, msg: str, *args) -> None:
        # The notes a run gathers for -v are logged at DEBUG on every run: below the level
        # asked for, they are dropped without importing logging.
        if _pending is not None and _pending > 10:
            return
        logger().debug(msg, *args)


log = _Log()
