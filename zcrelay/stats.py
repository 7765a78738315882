"""Byte counters for one direction of a stream, and totals over many. No trio here.

Why the classes here (and those of zcrelay.pipes, zcrelay.tee, zcrelay.teeing) are written out
rather than dataclasses: they are on `zcrelay tee`'s start-up path, and importing dataclasses
(which imports inspect, ast, dis and re) and building the classes cost 15 ms of CPU, over a
third of the tee's start-up in a shell pipeline (benchmarks/TEE.md, eleventh session).
tests/test_cli_startup.py checks that the plain tee does not import it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


class Flow:
    """What crossed one direction of a stream, and how.

    `spliced` counts bytes moved by splice/tee/sendfile, `copied` bytes that went through user
    space (only after a fallback, which `fallback` names). `on_bytes`, if set, is called after
    every chunk with the byte count (activity tracking, progress).
    """

    __slots__ = ("spliced", "copied", "fallback", "end", "on_bytes", "owed")

    def __init__(self, spliced: int = 0, copied: int = 0, fallback: str | None = None,
                 end: str | None = None, on_bytes: Callable[[int], object] | None = None) -> None:
        self.spliced = spliced
        self.copied = copied
        self.fallback = fallback
        self.end = end
        self.on_bytes = on_bytes
        # Bytes a task's mover held for the destination when it was cancelled (zcrelay.mover),
        # which the relay's owner must not let the destination take for a clean end.
        self.owed = 0

    def __repr__(self) -> str:
        return (f"Flow(spliced={self.spliced}, copied={self.copied}, fallback={self.fallback!r}, "
                f"end={self.end!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Flow):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in Flow.__slots__)

    # __hash__ is None (mutable, compared by value): Python sets it so for a class that defines
    # __eq__ alone.

    @property
    def bytes(self) -> int:
        return self.spliced + self.copied

    def add_spliced(self, n: int) -> None:
        self.spliced += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def add_copied(self, n: int) -> None:
        self.copied += n
        if self.on_bytes is not None:
            self.on_bytes(n)


class Totals:
    """Running totals over every finished stream of a relay."""

    FIELDS = ("connections", "active", "up", "down", "spliced", "copied", "fallbacks", "closes")

    def __init__(self) -> None:
        self.connections = 0
        self.active = 0
        self.up = 0
        self.down = 0
        self.spliced = 0
        self.copied = 0
        self.fallbacks: Counter = Counter()
        self.closes: Counter = Counter()

    def __repr__(self) -> str:
        return "Totals(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS) + ")"

    def add(self, up: Flow, down: Flow, close: str) -> None:
        self.connections += 1
        self.up += up.bytes
        self.down += down.bytes
        self.spliced += up.spliced + down.spliced
        self.copied += up.copied + down.copied
        for flow in (up, down):
            if flow.fallback:
                self.fallbacks[flow.fallback] += 1
        self.closes[close] += 1

    def record(self) -> dict:
        """Every field, as JSON takes it (zcrelay.cli.workers sends a worker's totals so)."""
        return {name: dict(v) if isinstance(v := getattr(self, name), Counter) else v
                for name in self.FIELDS}

    def merge(self, record: dict) -> None:
        """Add another relay's `record()` to these totals."""
        for name in self.FIELDS:
            mine = getattr(self, name)
            if isinstance(mine, Counter):
                mine.update(record[name])
            else:
                setattr(self, name, mine + record[name])
