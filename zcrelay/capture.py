"""Relay capture: per connection, one file per direction plus a JSON sidecar.

File names (documented in `zcrelay forward --help` and the man page):

    {time}-{conn}-{peer}-{direction}.bin     the bytes of one direction, exactly as relayed
    {time}-{conn}-{peer}.json                the sidecar

  time       UTC start of the connection, 20250102T030405.123456Z
  conn       the connection number, as in the per-connection log line
  peer       the client's address with every character outside [A-Za-z0-9.-] turned into '_'
             (127.0.0.1:5000 → 127.0.0.1_5000)
  direction  "up" (client → target) or "down" (target → client)

Files are created with mode 0600 and O_EXCL | O_NOFOLLOW | O_CLOEXEC: an existing file or a
planted symlink is never written through. The sidecar is written when the connection starts
("end": null, "complete": false) and rewritten when it ends; a direction is complete when its
capture never failed and holds every byte the relay moved in that direction.

Policy only: nothing here prints; failures are logged on the "zcrelay" logger and never stop
the relay.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

from zcrelay.stats import Flow
from zcrelay.teeing import CaptureFile

log = logging.getLogger("zcrelay")

TEMPLATE = "{time}-{conn}-{peer}-{direction}.bin"
SIDECAR = "{time}-{conn}-{peer}.json"
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MODE = 0o600
DIRECTIONS = ("up", "down")


def safe_peer(peer: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", peer) or "_"


def stamp(wall: float) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(wall)) + f".{int(wall % 1 * 1e6):06d}Z"


@dataclass
class CaptureSession:
    """The capture of one connection. Owns the file fds and the sidecar; `close` closes them."""

    directory: str
    conn: int
    peer: str
    target: str
    started: float  # wall clock
    names: dict[str, str] = field(default_factory=dict)
    files: dict[str, CaptureFile | None] = field(default_factory=dict)
    sidecar: str = ""
    notes: dict[str, str] = field(default_factory=dict)  # direction → why it never started

    @property
    def captures(self) -> tuple[CaptureFile | None, CaptureFile | None]:
        return self.files.get("up"), self.files.get("down")

    def _on_fail(self, capture: CaptureFile) -> None:
        direction = next((d for d, c in self.files.items() if c is capture), "?")
        log.warning("conn=%d capture %s stopped after %d bytes: %s; the relay goes on without it "
                    "(capture marked incomplete)", self.conn, direction, capture.captured, capture.error)

    def record(self, up: Flow, down: Flow, close: str | None, ended: float | None) -> dict:
        flows = {"up": up, "down": down}
        entry: dict = {
            "conn": self.conn, "peer": self.peer, "target": self.target,
            "start": _iso(self.started), "end": _iso(ended) if ended else None, "close": close,
        }
        complete = ended is not None
        for direction in DIRECTIONS:
            capture = self.files.get(direction)
            relayed = flows[direction].bytes
            info = {
                "file": self.names.get(direction),
                "relayed_bytes": relayed,
                "captured_bytes": capture.captured if capture else 0,
                "error": (capture.error if capture else self.notes.get(direction)),
            }
            if capture is not None and capture.fallback:
                info["fallback"] = capture.fallback
            info["complete"] = bool(capture and capture.error is None and capture.captured == relayed
                                    and ended is not None)
            complete = complete and info["complete"]
            entry[direction] = info
        entry["complete"] = complete
        return entry

    def write_sidecar(self, up: Flow, down: Flow, close: str | None = None, ended: float | None = None) -> None:
        if not self.sidecar:
            return
        data = (json.dumps(self.record(up, down, close, ended), indent=1) + "\n").encode()
        path = os.path.join(self.directory, self.sidecar)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_TRUNC)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("conn=%d capture sidecar %s not written: %s", self.conn, path, _why(exc))

    def close(self) -> None:
        for capture in self.files.values():
            if capture is not None:
                capture.close()
                if capture.fd >= 0:
                    os.close(capture.fd)
                    capture.fd = -1


def open_session(directory: str, conn: int, peer: str, target: str, wall: float | None = None) -> CaptureSession:
    """Create the files of one connection. Never raises: a direction whose file cannot be
    created is simply not captured (logged, and incomplete in the sidecar)."""
    wall = time.time() if wall is None else wall
    session = CaptureSession(directory, conn, peer, target, wall)
    fields = {"time": stamp(wall), "conn": conn, "peer": safe_peer(peer)}
    session.sidecar = SIDECAR.format(**fields)
    try:
        os.close(os.open(os.path.join(directory, session.sidecar), CREATE_FLAGS, MODE))
    except OSError as exc:
        log.warning("conn=%d capture sidecar not created in %s: %s", conn, directory, _why(exc))
        session.sidecar = ""
    for direction in DIRECTIONS:
        name = TEMPLATE.format(direction=direction, **fields)
        try:
            fd = os.open(os.path.join(directory, name), CREATE_FLAGS, MODE)
        except OSError as exc:
            note = f"create {name}: {_why(exc)}"
            log.warning("conn=%d capture %s not started: %s", conn, direction, note)
            session.notes[direction] = note
            session.files[direction] = None
            continue
        session.names[direction] = name
        session.files[direction] = CaptureFile(fd, name, session._on_fail)
    session.write_sidecar(Flow(), Flow())
    return session


def _why(exc: OSError) -> str:
    err = exc.errno or errno.EIO
    return f"{os.strerror(err)} ({errno.errorcode.get(err, err)})"


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1e6):06d}Z"
