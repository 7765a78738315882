"""The progress display on stderr, and when to show it. Light to import (rich is imported only
when a display is shown, typer never): `zcrelay tee` loads it, and its start-up is part of every
run. The --progress/--no-progress option itself is zcrelay.cli.app.PROGRESS."""

from __future__ import annotations

import os
import stat
import sys
import threading
from contextlib import contextmanager
from collections.abc import Iterator

from zcrelay.stats import Flow


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
        self._progress = None
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
        self._progress = Progress(*columns, console=Console(file=sys.stderr), auto_refresh=False)
        with self._progress:
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
