"""Policy for `zcrelay tee FILE...`: which outputs, how they are opened, what an output error
does (GNU tee's --output-error modes). Bytes move in zcrelay.teeing; nothing here prints or
exits: diagnostics go to the "zcrelay" logger and the outcome is returned.
"""

from __future__ import annotations

import errno
import os
from collections import namedtuple

from zcrelay import syscalls, teeing
from zcrelay.errors import StreamError, ZcrelayError
from zcrelay.excgroups import BaseExceptionGroup, first_error
from zcrelay.logs import log
from zcrelay.mover import SOURCE
from zcrelay.pipes import Pipe
from zcrelay.stats import Flow

# GNU tee's modes (coreutils tee.c). DEFAULT is GNU's behaviour without --output-error: an
# error writing to a pipe ends the command at once, as SIGPIPE would; errors on other outputs
# are diagnosed and the rest go on.
DEFAULT = "default"
MODES = ("warn", "warn-nopipe", "exit", "exit-nopipe")


# What `zcrelay tee` was asked: FILEs, -a, --output-error, --pipe-size. A named tuple, not a
# frozen dataclass, as the classes below are written out: see zcrelay.stats.
TeeConfig = namedtuple("TeeConfig", ("files", "append", "output_error", "pipe_size"),
                       defaults=(False, DEFAULT, 1 << 20))


class BrokenPipeExit(ZcrelayError):
    """An output pipe closed in the default mode: the CLI ends as SIGPIPE would have ended it."""


class OutputErrorExit(ZcrelayError):
    """An output failed in an exit mode."""


class InputError(ZcrelayError):
    """Reading standard input failed (EIO, EISDIR...): the CLI exits with INPUT_ERROR."""


class TeeOutcome:
    __slots__ = ("bytes", "failed", "notes")

    def __init__(self) -> None:
        self.bytes = 0
        self.failed: list[str] = []  # diagnosed output errors
        self.notes: list[str] = []  # how stdin/outputs were handled (for -v)

    def __repr__(self) -> str:
        return f"TeeOutcome(bytes={self.bytes}, failed={self.failed!r}, notes={self.notes!r})"


def _is_pipe_error(sink: teeing.Sink, exc: StreamError) -> bool:
    """EPIPE on any output, as GNU tee decides (coreutils tee.c tests errno, not the fd's type):
    a socket whose reader went away is "a pipe" to its modes as well. -p diagnosed it and
    exited 9 where GNU tee -p is silent and exits 0, and the default went on without it where
    GNU tee dies of SIGPIPE."""
    return exc.errno == errno.EPIPE


def _message(name: str, err: int) -> str:
    return f"{name}: {os.strerror(err)}"


def open_output(path: str, append: bool) -> teeing.Sink:
    """Open FILE like GNU tee (create, 0666 & ~umask, truncate unless -a) but never O_APPEND:
    splice(2) refuses O_APPEND files, so -a starts at the file's size and keeps its own offset."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (0 if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o666)
    kind = teeing.classify(fd)
    offset = None
    if kind == teeing.FILE:
        offset = os.lseek(fd, 0, os.SEEK_END) if append else 0
    return teeing.Sink(fd, path, kind, offset=offset)


def grow_pipe(fd: int, size: int) -> int:
    """Grow an inherited pipe towards `size`, never shrink it: a pipe shared with others may
    hold more than `size` already (F_SETPIPE_SZ would fail with EBUSY), and its size is theirs
    too. Returns the size the pipe has."""
    current = syscalls.pipe_size(fd)
    if current >= size:
        return current
    return syscalls.set_pipe_size(fd, size)


def stdout_sink(fd: int, pipe_size: int, outcome: TeeOutcome) -> teeing.Sink:
    kind = teeing.classify(fd)
    sink = teeing.Sink(fd, "standard output", kind)
    if kind == teeing.PIPE:
        granted = grow_pipe(fd, pipe_size)
        outcome.notes.append(f"standard output is a pipe of {granted} bytes")
    elif kind == teeing.FILE and teeing.is_append(fd):
        # Shared open file description: clearing O_APPEND would change it for others too.
        sink.copy = True
        sink.fallback = "standard output is in append mode (splice refuses O_APPEND)"
    return sink


async def run_tee(config: TeeConfig, stdin: int = 0, stdout: int = 1, flow: Flow | None = None) -> TeeOutcome:
    """Copy `stdin` to `stdout` and every FILE. Raises BrokenPipeExit or OutputErrorExit when
    the mode says to stop; otherwise returns, with `failed` listing the diagnosed outputs.
    `flow` (optional) counts the bytes taken from stdin as they go, for a progress display."""
    outcome = TeeOutcome()
    mode = config.output_error

    def on_error(sink: teeing.Sink, exc: StreamError) -> None:
        pipe_error = _is_pipe_error(sink, exc)
        if pipe_error and mode == DEFAULT:
            raise BrokenPipeExit(_message(sink.name, exc.errno))
        if pipe_error and mode in ("warn-nopipe", "exit-nopipe"):
            log.debug("%s closed; going on without it", sink.name)
            return
        message = _message(sink.name, exc.errno)
        if mode in ("exit", "exit-nopipe"):
            raise OutputErrorExit(message)
        log.error("%s", message)
        outcome.failed.append(message)

    sinks = [stdout_sink(stdout, config.pipe_size, outcome)]
    # The tee's own fds before the FILEs: at the fd limit (many FILEs, a low `ulimit -n`) a
    # FILE is refused and said, as GNU tee does, where the tee failed after truncating them all
    # (exit 7 for its /dev/null fd, or an ImportError when the message's `import logging` found
    # no fd: `reserve` is given back for it).
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for path in config.files:
            try:
                sinks.append(open_output(path, config.append))
            except OSError as exc:
                if reserve >= 0 and exc.errno in (errno.EMFILE, errno.ENFILE):
                    os.close(reserve)
                    reserve = -1
                message = _message(path, exc.errno or errno.EIO)
                if mode in ("exit", "exit-nopipe"):
                    raise OutputErrorExit(message) from None
                log.error("%s", message)
                outcome.failed.append(message)
        if reserve >= 0:
            os.close(reserve)  # the tee's private pipes may have it now (teeing._give_pipes)
            reserve = -1
        src, feed = _source(stdin, config.pipe_size, outcome)
        feed_flow = Flow()
        try:
            if feed is None:  # stdin is the pipe: one loop, no task (runs without trio too)
                outcome.bytes = (await teeing.tee_pipeline(src, sinks, on_error, flow, devnull,
                                                           take=True)).bytes
            else:
                outcome.bytes = await _tee_fed(stdin, src, feed, feed_flow, sinks, on_error, flow, devnull)
        except (BaseExceptionGroup, StreamError) as exc:
            # A nursery wraps what on_error raised; the CLI wants the decision itself.
            leaf = first_error(exc)
            if isinstance(leaf, (BrokenPipeExit, OutputErrorExit)):
                raise leaf from None
            if isinstance(leaf, StreamError) and leaf.role == SOURCE:
                raise InputError(_message("standard input", leaf.errno)) from leaf
            raise
        finally:
            if feed is not None:
                feed.close()
        if feed_flow.fallback:
            outcome.notes.append(f"standard input: {feed_flow.fallback}, read through user space")
        for sink in sinks:
            if sink.fallback:
                outcome.notes.append(f"{sink.name}: {sink.fallback}, copied through user space")
    finally:
        for sink in sinks[1:]:
            os.close(sink.fd)
        os.close(devnull)
        if reserve >= 0:
            os.close(reserve)
    return outcome


def needs_trio(stdin: int = 0) -> bool:
    """Whether run_tee needs a trio run: only to feed a stdin that is not a pipe."""
    return teeing.classify(stdin) != teeing.PIPE


async def _tee_fed(stdin: int, src: int, feed: Pipe, feed_flow: Flow, sinks: list[teeing.Sink],
                   on_error, flow: Flow | None, devnull: int | None = None) -> int:
    """The tee with a task filling our pipe from a stdin that is not a pipe."""
    import trio  # only here: with a pipe on stdin the tee runs without trio (zcrelay.waits)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(teeing.feed_pipe, stdin, feed, feed_flow)
        result = await teeing.tee_pipeline(src, sinks, on_error, flow, devnull)
        nursery.cancel_scope.cancel()  # no output left: stop reading (GNU tee does)
    return result.bytes


def _source(stdin: int, pipe_size: int, outcome: TeeOutcome) -> tuple[int, Pipe | None]:
    """The pipe to tee from: stdin itself when it is a pipe (grown to `pipe_size`), else a
    pipe of ours that feed_pipe fills (a regular file by splice, a terminal by copying)."""
    kind = teeing.classify(stdin)
    if kind == teeing.PIPE:
        granted = grow_pipe(stdin, pipe_size)
        outcome.notes.append(f"standard input is a pipe of {granted} bytes")
        return stdin, None
    pipe = Pipe.open(pipe_size)
    if kind == teeing.FILE:
        outcome.notes.append("standard input is a regular file: spliced into a pipe first")
    else:
        outcome.notes.append("standard input is not a pipe or a file (a terminal?): read through "
                             "user space into a pipe (fallback before the first byte)")
    return pipe.r, pipe
