"""The "zcrelay" logger, with `logging` imported when the first message is logged.

Why: `zcrelay tee FILE...` runs inside shell pipelines, where its start-up is part of every run,
and a tee that meets no error logs nothing. Importing logging (with traceback, string, weakref
and threading) was about 7 ms of a 48 ms start-up (benchmarks/TEE.md, eleventh session). The
modules on that path log through `log` here. Every other module may get the logger itself
(the same one, set up by `configure`), best from `library_logger`, which gives it the
NullHandler a library's logger has.

No trio here, and nothing that prints: the handler writes to stderr, as set up by the CLI.
"""

from __future__ import annotations

import sys

NAME = "zcrelay"
# The level `configure` asked for while logging was not imported yet (None: nothing pending).
_pending: int | None = None
_null_added = False  # library_logger has given the logger its NullHandler


def configure(verbose: int, quiet: bool, *, lazy: bool = False) -> None:
    """Log to stderr as 'zcrelay: message' (stdout stays clean for data): WARNING and above
    with `quiet`, DEBUG with `verbose`, else INFO. With `lazy`, logging is imported and set up
    on the first message rather than now (unless something imported it already)."""
    global _pending
    _pending = 30 if quiet else 10 if verbose else 20  # logging.WARNING, DEBUG, INFO
    if not lazy or "logging" in sys.modules:
        logger()


def library_logger():
    """logging.getLogger("zcrelay") with a logging.NullHandler, added the first time: without a
    handler of its own, a program that embeds zcrelay and sets no logging up had zcrelay's
    warnings printed on stderr by logging's last resort handler (the logging HOWTO, "Configuring
    Logging for a Library"). A handler the program sets up (basicConfig, on the root) still gets
    every record, and so does the CLI's (`configure`, which replaces this one). Modules that
    import logging anyway (zcrelay.forward...) take their logger from here; the tee's start-up
    path does not call it until something is logged."""
    global _null_added
    import logging

    log = logging.getLogger(NAME)
    if not _null_added:
        _null_added = True
        log.addHandler(logging.NullHandler())
    return log


def logger():
    """logging.getLogger("zcrelay"), set up as `configure` asked."""
    global _pending

    log = library_logger()
    if _pending is not None:
        import logging

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
