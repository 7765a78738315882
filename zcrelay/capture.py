"""Relay capture: per connection, one file per direction plus a JSON sidecar.

File names (documented in `zcrelay forward --help` and the man page):

    {time}-{conn}-{peer}-{direction}.bin     the bytes of one direction, in order, as the relay
                                             read them from their sender
    {time}-{conn}-{peer}.json                the sidecar

  time       UTC start of the connection, 20250102T030405.123456Z
  conn       the connection number, as in the per-connection log line
  peer       the client's address with every character outside [A-Za-z0-9.-] turned into '_'
             (127.0.0.1:5000 → 127.0.0.1_5000)
  direction  "up" (client → target) or "down" (target → client)

Files are created with mode 0600 and O_EXCL | O_NOFOLLOW | O_CLOEXEC: an existing file or a
planted symlink is never written through. The sidecar is written when the connection starts
("end": null, "complete": false) and rewritten in place when it ends; one that cannot be
written whole (a full disk) is removed, never left empty or cut short. A direction is complete
when its capture never failed and holds every byte the relay moved in that direction
(relayed_bytes).
It may hold more (captured_bytes > relayed_bytes): bytes read from the sender that never
reached the other side, because that side, or the other direction, failed first.

The captured stream itself (CaptureFile, captured_splice_stream) is here too: every chunk a
direction drains is tee'd into a private pipe that a writer splices to the file.

Policy only: nothing here prints; failures never stop the relay. Each is logged at debug level
on the "zcrelay" logger as it happens; when the connection's capture is closed, ONE warning line
names every part of it that was lost and why (CaptureSession.close, `_lost_line`): on a full
disk every connection meets the same error in each of its parts, and a warning per part was
three or four lines per connection (the sidecar fails at the start and again at the end).
That line comes when the connection ends, which for a long one can be hours after its capture
stopped: so the first loss of a kind in a directory is also a warning at once (`_alert`), and
again at most once a minute while that error goes on.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import trio
from trio.lowlevel import checkpoint

from zcrelay import syscalls
from zcrelay.excgroups import BaseExceptionGroup, single_error
from zcrelay.logs import library_logger
from zcrelay.mover import splice_stream
from zcrelay.pipes import Pipe, PipePool
from zcrelay.stats import Flow

log = library_logger()  # "zcrelay", with its NullHandler (zcrelay.logs)

TEMPLATE = "{time}-{conn}-{peer}-{direction}.bin"
SIDECAR = "{time}-{conn}-{peer}.json"
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MODE = 0o600
_REWRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_TRUNC
DIRECTIONS = ("up", "down")


# (directory, errno) -> monotonic time of its last alert (`_alert`), for the whole process.
_alerted: dict[tuple[str, int], float] = {}
ALERT_EVERY = 60.0  # seconds between two alerts of one error in one directory


def _alert(directory: str, err: int, conn: int, part: str) -> None:
    """A warning at once when a capture into `directory` loses a part to `err`, unless one
    was given for the same error there less than ALERT_EVERY seconds ago: a long connection's
    own line (CaptureSession.close) comes only when it ends."""
    now = time.monotonic()
    last = _alerted.get((directory, err))
    if last is not None and now - last < ALERT_EVERY:
        return
    _alerted[(directory, err)] = now
    log.warning("capture into %s failing: %s (conn=%d %s); each connection that loses capture is "
                "named when it ends", directory, _describe(err), conn, part)


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
    sidecar_state: str = "empty"  # empty (created, no record yet) | written | removed
    # Part ("up", "down", "sidecar") → the errno that lost it: a direction's file never
    # created, the sidecar never created or its last write failed (cleared when a later write
    # succeeds). A direction that stopped later holds its errno in its CaptureFile.
    refused: dict[str, int] = field(default_factory=dict)
    reported: bool = False  # close() logged the connection's one line (or had nothing to say)

    @property
    def captures(self) -> tuple[CaptureFile | None, CaptureFile | None]:
        return self.files.get("up"), self.files.get("down")

    def _on_fail(self, capture: CaptureFile) -> None:
        # Debug, and an alert: close() says it once for the whole connection, when all is known.
        direction = next((d for d, c in self.files.items() if c is capture), "?")
        log.debug("conn=%d capture %s stopped after %d bytes: %s; the relay goes on without it "
                  "(capture marked incomplete)", self.conn, direction, capture.captured, capture.error)
        _alert(self.directory, capture.errno or errno.EIO, self.conn,
               f"{direction} after {capture.captured} bytes")

    def _refuse(self, part: str, err: int, what: str) -> None:
        self.refused[part] = err
        _alert(self.directory, err, self.conn, f"{part} {what}")

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
            info["complete"] = bool(capture and capture.error is None and capture.captured >= relayed
                                    and ended is not None)
            complete = complete and bool(info["complete"])
            entry[direction] = info
        entry["complete"] = complete
        return entry

    def write_sidecar(self, up: Flow, down: Flow, close: str | None = None, ended: float | None = None) -> None:
        """Rewrite the sidecar in place. One that cannot be written whole (a full disk) is
        removed rather than left empty or cut short, which no JSON reader takes, and so is
        the empty file open_session created if no record ever reached it; a later write
        creates it again (O_EXCL, as open_session does)."""
        if not self.sidecar:
            return
        data = (json.dumps(self.record(up, down, close, ended), indent=1) + "\n").encode()
        path = os.path.join(self.directory, self.sidecar)
        flags = CREATE_FLAGS if self.sidecar_state == "removed" else _REWRITE_FLAGS
        try:
            fd = os.open(path, flags, MODE)
        except OSError as exc:
            log.debug("conn=%d capture sidecar %s not written: %s", self.conn, path, _why(exc))
            self._refuse("sidecar", _errno(exc), "not written")
            if ended is not None and self.sidecar_state == "empty":
                _unlink(path)
                self.sidecar_state = "removed"
            return
        try:
            view = memoryview(data)
            while view:  # a write may be short (a disk filling up): the rest, or its error
                view = view[os.write(fd, view):]
            self.sidecar_state = "written"
            self.refused.pop("sidecar", None)  # this record replaces any lost before it
        except OSError as exc:
            log.debug("conn=%d capture sidecar %s not written (removed): %s", self.conn, path, _why(exc))
            self._refuse("sidecar", _errno(exc), "not written")
            _unlink(path)  # truncated, perhaps half written: not JSON
            self.sidecar_state = "removed"
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the files, then log the one warning line of a capture that lost anything
        (call it after the last write_sidecar: what that write lost is on the line too)."""
        for capture in self.files.values():
            if capture is not None:
                capture.close()
                if capture.fd >= 0:
                    os.close(capture.fd)
                    capture.fd = -1
        if not self.reported:
            self.reported = True
            line = self._lost_line()
            if line:
                log.warning("conn=%d capture stopped: %s; the relay goes on without it", self.conn, line)

    def _lost_line(self) -> str:
        """Every part lost, grouped by why, in the order up, down, sidecar:
        "No space left on device (ENOSPC): up after 1048576 bytes, down after 0 bytes, sidecar
        not written". The failed step is named only where "after N bytes" or "not written"
        do not already say it (a private pipe, say); the debug lines give every detail."""
        lost: dict[str, list[str]] = {}
        for direction in DIRECTIONS:
            capture = self.files.get(direction)
            if capture is None and direction in self.refused:
                lost.setdefault(_describe(self.refused[direction]), []).append(f"{direction} not started")
            elif capture is not None and capture.errno is not None:
                step = "" if capture.step in _PLAIN_STEPS else f" ({capture.step})"
                lost.setdefault(_describe(capture.errno), []).append(
                    f"{direction} after {capture.captured} bytes{step}")
        if "sidecar" in self.refused:
            if not self.sidecar:
                what = "not created"
            elif self.sidecar_state == "written":
                what = "not updated (an earlier record stays)"
            else:
                what = "not written"
            lost.setdefault(_describe(self.refused["sidecar"]), []).append(f"sidecar {what}")
        return "; ".join(f"{why}: {', '.join(parts)}" for why, parts in lost.items())


def open_session(directory: str, conn: int, peer: str, target: str, wall: float | None = None) -> CaptureSession:
    """Create the files of one connection. Never raises: a direction whose file cannot be
    created is simply not captured (logged by close, and incomplete in the sidecar)."""
    wall = time.time() if wall is None else wall
    session = CaptureSession(directory, conn, peer, target, wall)
    fields = {"time": stamp(wall), "conn": conn, "peer": safe_peer(peer)}
    session.sidecar = SIDECAR.format(**fields)
    try:
        os.close(os.open(os.path.join(directory, session.sidecar), CREATE_FLAGS, MODE))
    except OSError as exc:
        log.debug("conn=%d capture sidecar not created in %s: %s", conn, directory, _why(exc))
        session._refuse("sidecar", _errno(exc), "not created")
        session.sidecar = ""
    for direction in DIRECTIONS:
        name = TEMPLATE.format(direction=direction, **fields)
        try:
            fd = os.open(os.path.join(directory, name), CREATE_FLAGS, MODE)
        except OSError as exc:
            note = f"create {name}: {_why(exc)}"
            log.debug("conn=%d capture %s not started: %s", conn, direction, note)
            session.notes[direction] = note
            session._refuse(direction, _errno(exc), "not started")
            session.files[direction] = None
            continue
        session.names[direction] = name
        session.files[direction] = CaptureFile(fd, name, session._on_fail)
    session.write_sidecar(Flow(), Flow())
    return session


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _errno(exc: OSError) -> int:
    return exc.errno or errno.EIO


def _describe(err: int) -> str:
    """ENOSPC → "No space left on device (ENOSPC)"."""
    return f"{os.strerror(err)} ({errno.errorcode.get(err, err)})"


def _why(exc: OSError) -> str:
    return _describe(_errno(exc))


# The steps (CaptureFile.step) that are the file write itself, which "up after N bytes"
# already says: the line names any other (tee, private pipe...).
_PLAIN_STEPS = frozenset({"splice", "write"})


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1e6):06d}Z"


# ---- relay capture: socket → pipe A → tee → pipe B → file, A → destination ----------------


class CaptureFile:
    """Where one direction of one connection is recorded.

    Owns its private pipe; the fd of the file is owned by whoever created this (the capture
    session closes it). The file is written at `offset`, tracked here (never O_APPEND).
    Once `error` is set the capture is off for good: bytes already tee'd are dropped with the
    private pipe, and the relay goes on untouched. `on_fail(capture)` is called once then.
    """

    def __init__(self, fd: int, path: str, on_fail: Callable[["CaptureFile"], None] | None = None) -> None:
        self.fd = fd
        self.path = path
        self.offset = 0
        self.captured = 0
        self.error: str | None = None  # "{step}: {strerror} ({code})", for the sidecar
        self.errno: int | None = None
        self.step: str | None = None  # what failed: splice, write, tee, private pipe...
        self.fallback: str | None = None
        self.pipe: Pipe | None = None
        self._on_fail = on_fail
        self._free = trio.Semaphore(1)  # held while the private pipe holds a chunk
        self._send, self._recv = trio.open_memory_channel(1)
        self._writer_gone = False

    @property
    def active(self) -> bool:
        return self.error is None and self.fd >= 0

    def fail(self, err: int, what: str) -> None:
        if self.error is None:
            self.errno = err
            self.step = what
            self.error = f"{what}: {_describe(err)}"
            if self.pipe is not None:
                self.pipe.close()
                self.pipe = None
            if self._on_fail is not None:
                self._on_fail(self)

    async def offer(self, src: Pipe) -> None:
        """Duplicate the chunk `src` holds into the private pipe and queue it for the disk.

        Waits first until the writer has emptied the private pipe (lossless back-pressure: a
        slow disk slows this direction of the relay, and only this one)."""
        if not self.active:
            return
        await self._free.acquire()
        if self._writer_gone:
            # The writer ends before close_input only when the connection is cancelled, here
            # perhaps during acquire's last checkpoint, which cannot be cancelled: take the
            # cancellation now, before the pump, so no byte is relayed that the file lacks.
            self._free.release()
            await checkpoint()
            self.fail(errno.EPIPE, "capture writer gone")  # unreachable: the cancel is there
            return
        if not self.active:
            self._free.release()
            return
        what = "tee"
        try:
            if self.pipe is not None and self.pipe.size < src.size:
                # The direction's pipe changed since the last chunk (an idle stream gives its
                # pipe back; under the pipe budget a new one is smaller than a pooled one):
                # tee(2) fills a pipe by page slots, so an empty private pipe takes the whole
                # chunk only if it is at least as large. It is empty here: replace it.
                self.pipe.close()
                self.pipe = None
            if self.pipe is None:
                what = "private pipe"  # pipe2(2): EMFILE, ENFILE; tee(2) never says those
                self.pipe = Pipe.open(src.size)
                what = "tee"
                if self.pipe.size < src.size:
                    self.fail(errno.ENOMEM, f"private pipe of {src.size} bytes (got {self.pipe.size})")
                    self._free.release()
                    return
            got = syscalls.tee(src.r, self.pipe.w, src.held)
        except OSError as exc:
            self.fail(exc.errno or errno.EIO, what)
            self._free.release()
            return
        if got != src.held:
            raise RuntimeError(f"tee(2) took {got} of {src.held} bytes into an empty private pipe")
        self.pipe.held = got
        self._send.send_nowait(got)

    async def write_bytes(self, data: bytes | memoryview) -> None:
        """The copy path's capture: write `data` at the offset (a worker thread: disks block)."""
        if not self.active:
            await checkpoint()
            return
        try:
            await trio.to_thread.run_sync(self._pwrite_all, bytes(data))
        except OSError as exc:
            self.fail(exc.errno or errno.EIO, "write")

    def _pwrite_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.offset)
            self.offset += n
            self.captured += n
            view = view[n:]

    async def writer(self) -> None:
        """Empty the private pipe into the file, chunk by chunk, in a worker thread (a splice
        into a regular file blocks in the kernel; in the event loop it would stall every
        connection). Ends when `close_input` is called and the last chunk is written.

        A chunk tee'd into the private pipe is written even if the connection is cancelled
        meanwhile (its other direction failed, a timeout, shutdown): it may have been relayed
        already, and a capture must hold every byte that was. That costs a cancellation at
        most one chunk's write, as a write in progress (a thread) cannot be cancelled anyway:
        the private pipe holds one chunk at a time."""
        async with self._recv:
            try:
                async for _n in self._recv:
                    await self._write_chunk()
            finally:
                if self.pipe is not None and self.pipe.held:  # cancelled before it was taken
                    await self._write_chunk()
                self._writer_gone = True

    async def _write_chunk(self) -> None:
        try:
            if self.active and self.pipe is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._splice_to_file)
        except OSError as exc:
            self.fail(exc.errno or errno.EIO, "splice")
        finally:
            if self.pipe is not None and self.pipe.held:
                self.pipe.close()  # never keep a pipe that still holds bytes
                self.pipe = None
            self._free.release()

    def _splice_to_file(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        while pipe.held:
            if self.fallback is not None:
                # Copy for good once splice was refused: it would refuse every later chunk too.
                data = os.read(pipe.r, pipe.held)
                pipe.held -= len(data)
                self._pwrite_all(data)
                continue
            try:
                m = syscalls.splice(pipe.r, self.fd, pipe.held, 0, offset_dst=self.offset)
            except OSError as exc:
                if self.captured == 0 and exc.errno in syscalls.SPLICE_REFUSED:
                    # The file system cannot splice: copy this capture (fallback, reported).
                    self.fallback = f"splice refused ({errno.errorcode.get(exc.errno, exc.errno)})"
                    continue
                raise
            pipe.held -= m
            self.offset += m
            self.captured += m

    def close_input(self) -> None:
        self._send.close()

    def close(self) -> None:
        """Close the private pipe (the file's fd belongs to the session)."""
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None


async def captured_splice_stream(src: int, dst: int, pool: PipePool, flow: Flow, capture: CaptureFile,
                                 max_chunk: int = syscalls.MAX_SPLICE_AT_ONCE) -> None:
    """splice_stream (zcrelay.mover) with a tee(2) of every chunk into `capture`.

    Invariant, as in splice_stream: at the top of each turn this stream holds no pipe, or an
    empty one; a chunk is drained, offered to the capture (tee: nothing is consumed), then
    pumped. The disk writer runs beside the pump, so the next chunk is drained while the last
    one is still being written; the next tee waits for it (lossless). Raises SpliceRefused,
    nothing lost, before the first byte; then the caller falls back to copy_stream.
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(capture.writer)
            try:
                await splice_stream(src, dst, pool, flow, max_chunk, on_drained=capture.offer)
            finally:
                capture.close_input()
    except BaseExceptionGroup as group:
        # The nursery wraps everything; the relay above catches PeerGone, SpliceRefused...
        # by type (a reset must reach the other side as a reset), so hand it the one error.
        leaf = single_error(group)
        if leaf is None:
            raise
        raise leaf from leaf.__cause__
