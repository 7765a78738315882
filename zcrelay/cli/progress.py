"""The progress display on stderr, and when to show it. Light to import (rich is imported only
when a display is shown, typer never): `zcrelay tee` loads it, and its start-up is part of every
run. The --progress/--no-progress option itself is zcrelay.cli.app.PROGRESS."""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
from contextlib import contextmanager
from collections.abc import Iterator

from zcrelay.stats import Flow

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    from rich.progress import Progress


def show_progress(option: bool | None, data_fds: tuple[int, ...] = ()) -> bool:
    """--progress/--no-progress if given; else on when stderr is a terminal and none of
    `data_fds` (the stdio a command moves data on) is one: a display redrawn over received
    data or typed input would garble both (`zcrelay connect HOST:PORT` in a terminal)."""
    if option is not None:
        return option
    if sys.stderr is None or not sys.stderr.isatty():  # None: fd 2 was closed at start-up
        return False
    return not any(_isatty(fd) for fd in data_fds)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def stdin_size(fd: int = 0) -> int | None:
    """What is left to read of `fd` when it is a regular file (a progress total), else None."""
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return max(0, st.st_size - os.lseek(fd, 0, os.SEEK_CUR))
    except OSError:
        pass
    return None


class Display:
    """The rich progress display on stderr (never stdout): refreshed by a trio task (`refresh`)
    in a trio run, or by a thread (`ticking`) while a command without trio blocks. Each row's
    label is shown as plain text; the caller makes it printable (files.shown)."""

    def __init__(self, enabled: bool, rows: list[tuple[str, Flow, int | None]]) -> None:
        self.enabled = enabled
        self.rows = rows
        self._progress: Progress | None = None
        self._ids: list = []

    @contextmanager
    def shown(self) -> Iterator["Display"]:
        if not self.enabled:
            yield self
            return
        from rich.console import Console  # imported only when shown: rich costs ~0.1 s to import
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        # Labels are text, not rich markup: a file named "[red]x" is shown as it is.
        columns = [TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeRemainingColumn()]
        console = Console(file=sys.stderr)
        self._progress = Progress(*columns, console=console, auto_refresh=False)
        with self._progress, _cursor_shown_at_death(console):
            self._ids = [self._progress.add_task(label, total=total) for label, _, total in self.rows]
            try:
                yield self
            finally:
                self.update()

    def update(self) -> None:
        if self._progress is None:
            return
        for task, (_, flow, _) in zip(self._ids, self.rows):
            self._progress.update(task, completed=flow.bytes)
        self._progress.refresh()

    async def refresh(self) -> None:
        import trio

        while True:
            await trio.sleep(0.1)
            self.update()

    @contextmanager
    def ticking(self) -> Iterator["Display"]:
        """Show the display and refresh it every 0.1 s from a thread (no trio run)."""
        with self.shown():
            if not self.enabled:
                yield self
                return
            stop = threading.Event()

            def tick() -> None:
                while not stop.wait(0.1):
                    self.update()

            ticker = threading.Thread(target=tick, name="zcrelay progress", daemon=True)
            ticker.start()
            try:
                yield self
            finally:
                stop.set()
                ticker.join()


# Signals whose handling ends the process by the signal itself (the CLI's common.terminated, or
# the default action), where rich's own clean-up never runs.
_DEADLY: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)
_SHOW_CURSOR = b"\n\x1b[?25h"  # what rich's Live.stop ends with on a terminal: a newline, then DECTCEM


@contextmanager
def _cursor_shown_at_death(console) -> Iterator[None]:
    """While the display is shown, a SIGTERM or SIGHUP that ends the process first shows the
    terminal's cursor again and ends the display's line.

    rich hides the cursor on a terminal until the display stops; SIGTERM (`timeout`, `kill`)
    killed zcrelay by the signal's default action first, so the shell prompt came back on the
    display's line with the cursor hidden. Only a handler that ends the process is wrapped
    (the default action, or the CLI's `terminated`, which takes it after its own clean-up); an
    ignored signal, or one a command handles and lives on, is left alone. signal.signal works
    in the main thread only: elsewhere nothing changes.
    """
    if not console.is_terminal or threading.current_thread() is not threading.main_thread():
        yield
        return
    common = sys.modules.get("zcrelay.cli.common")
    deadly = (signal.SIG_DFL, getattr(common, "terminated", signal.SIG_DFL))
    fd = console.file.fileno()
    previous: dict[int, Callable[[int, FrameType | None], object] | int | signal.Handlers | None] = {}

    def show_cursor_then(signum: int, frame) -> None:
        try:
            os.write(fd, _SHOW_CURSOR)
        except OSError:  # the terminal is gone (SIGHUP): nothing to show it on
            pass
        handler = previous[signum]
        signal.signal(signum, handler)
        if callable(handler):
            handler(signum, frame)
        else:  # SIG_DFL: the default action, now that it is back
            os.kill(os.getpid(), signum)

    for signum in _DEADLY:
        if signal.getsignal(signum) in deadly:
            previous[signum] = signal.signal(signum, show_cursor_then)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is show_cursor_then:  # not one a command set since
                signal.signal(signum, handler)
