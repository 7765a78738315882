"""Byte counters for one direction of a stream, and totals over many. No trio here."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from collections.abc import Callable


@dataclass(slots=True)
class Flow:
    """What crossed one direction of a stream, and how.

    `spliced` counts bytes moved by splice/tee/sendfile, `copied` bytes that went through user
    space (only after a fallback, which `fallback` names). `on_bytes`, if set, is called after
    every chunk with the byte count (activity tracking, progress).
    """

    spliced: int = 0
    copied: int = 0
    fallback: str | None = None
    end: str | None = None
    on_bytes: Callable[[int], None] | None = None

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


@dataclass
class Totals:
    """Running totals over every finished stream of a relay."""

    connections: int = 0
    active: int = 0
    up: int = 0
    down: int = 0
    spliced: int = 0
    copied: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    closes: Counter = field(default_factory=Counter)

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
        return {f.name: dict(v) if isinstance(v := getattr(self, f.name), Counter) else v
                for f in fields(self)}

    def merge(self, record: dict) -> None:
        """Add another relay's `record()` to these totals."""
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, Counter):
                mine.update(record[f.name])
            else:
                setattr(self, f.name, mine + record[f.name])

    @property
    def spliced_ratio(self) -> float:
        moved = self.spliced + self.copied
        return self.spliced / moved if moved else 1.0
