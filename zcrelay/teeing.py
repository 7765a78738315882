"""tee(2) on the payload path: one input, several outputs, no byte in user space.

The async mover for `zcrelay tee` (pipeline mode) and for relay capture. Like zcrelay.mover it
tries every syscall first and waits only on EAGAIN; errnos become stream errors through
zcrelay.errors.translate, once.

Why the loops look the way they do: tee(2) always duplicates from the *front* of its source
pipe and never consumes. So every output of one source must take exactly the same bytes in
each round, after which the round is consumed from the source by one splice. So the source
must be ours alone: stdin, which another process may read too, is first moved with splice(2)
into a pipe of our own, which is the source (step 0, when that one is empty; see _take).
A round is:

1. the *lead* output (a pipe we do not own, e.g. stdout) takes what it can with tee(2): that
   count `n` is the round;
2. every other output gets the same `n` bytes tee'd into its own private pipe, which is empty
   and at least as large as the source pipe, so tee(2) takes all `n` (a pipe's capacity is
   counted in page slots, and `n` bytes of the source use at most the source's slots); an
   output that is /dev/null gets nothing and is only counted;
3. the *consumer* (a regular file, or else our own /dev/null fd) splices the `n` bytes out
   of the source;
4. each private pipe is spliced to its output.

An output the kernel leaves without a large enough private pipe (past pipe-user-pages-soft a
pipe cannot grow; past RLIMIT_NOFILE none can be made) is *pipeless*: in its rounds step 3 reads
the round into user space and writes it to the consumer and to every pipeless output (a
fallback, reported).
"""

from __future__ import annotations

import errno
import os
import select
import stat
from collections.abc import Callable

from zcrelay import syscalls
from zcrelay.errors import StreamError, translate
from zcrelay.mover import COPY_BUFSIZE, DESTINATION, SOURCE, write_all
from zcrelay.pipes import Pipe
from zcrelay.stats import Flow
from zcrelay.waits import checkpoint, wait_readable, wait_writable

PIPE = "pipe"  # a FIFO: can be the lead of a round
FILE = "file"  # a regular file: written at an offset, can be the consumer
NULL = "null"  # /dev/null: takes no part in a round (what the source gives up goes nowhere anyway)
OTHER = "other"  # a character device, socket...: gets a private pipe and a splice pump
_DEVNULL = os.makedev(1, 3)  # Linux's /dev/null (Documentation/admin-guide/devices.txt)


class Sink:
    """One output of a pipeline tee. The caller opened `fd` and closes it; `pipe` (the private
    pipe, if any) is owned by the tee loop and closed by it. (Written out, not a dataclass:
    see zcrelay.stats.)"""

    __slots__ = ("fd", "name", "kind", "offset", "copy", "fallback", "written", "error", "pipe",
                 "pipeless")

    def __init__(self, fd: int, name: str, kind: str, offset: int | None = None) -> None:
        self.fd = fd
        self.name = name
        self.kind = kind
        self.offset = offset  # explicit file offset kept by us (no O_APPEND); None: the fd's own
        self.copy = False  # splice refused: write through user space (reported as a fallback)
        self.fallback: str | None = None
        self.written = 0
        self.error: StreamError | None = None
        self.pipe: Pipe | None = None
        self.pipeless = False  # no private pipe could be had: fed from user space (see above)

    def __repr__(self) -> str:
        return (f"Sink(fd={self.fd}, name={self.name!r}, kind={self.kind!r}, written={self.written}, "
                f"copy={self.copy}, error={self.error!r})")

    @property
    def live(self) -> bool:
        return self.error is None

    def drop_pipe(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None


def classify(fd: int) -> str:
    """PIPE, FILE, NULL or OTHER for an open fd (fstat)."""
    st = os.fstat(fd)
    mode = st.st_mode
    if stat.S_ISFIFO(mode):
        return PIPE
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISCHR(mode) and st.st_rdev == _DEVNULL:
        return NULL
    return OTHER


def is_append(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)


# An output error is handed to this callback, which returns normally to go on without that
# output or raises to stop everything (the --output-error policy lives in the caller).
OnError = Callable[[Sink, StreamError], None]


class TeeResult:
    __slots__ = ("bytes", "rounds", "stopped")

    def __init__(self) -> None:
        self.bytes = 0  # read from the source
        self.rounds = 0
        self.stopped = "eof"  # eof | no-outputs

    def __repr__(self) -> str:
        return f"TeeResult(bytes={self.bytes}, rounds={self.rounds}, stopped={self.stopped!r})"


async def tee_pipeline(src: int, sinks: list[Sink], on_error: OnError, flow: Flow | None = None,
                       devnull: int | None = None, take: bool = False) -> TeeResult:
    """Copy the pipe `src` to every sink until EOF or until no sink is left. `flow`, if given,
    counts each round as it is taken (a progress display reads it from another thread).
    `devnull`: an fd open on /dev/null for writing, which the caller owns and closes (one is
    opened here otherwise): a caller that opens it before the outputs keeps that fd from
    them under RLIMIT_NOFILE. `take`: `src` is a pipe that others may read too (stdin): see
    _take.

    Invariant: at the top of each round every private pipe is empty. `src` must be a pipe
    (stdin, or the feed pipe filled by `feed_pipe`). Non-blocking behaviour on `src` and on
    inherited pipes comes from SPLICE_F_NONBLOCK, so stdio need not be made O_NONBLOCK.
    """
    result = TeeResult()
    own = _own_pipe(src) if take else None
    given, src = src, (own.r if own is not None else src)  # the rounds are tee'd from `src`
    src_size = syscalls.pipe_size(src)
    starved: str | None = None  # why no private pipe can be made (the fd limit), once met
    undersized = False  # a private pipe kept, mid-round, a size the source has outgrown
    own_devnull = devnull is None
    if devnull is None:
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        while True:
            live = [s for s in sinks if s.live]
            if not live:
                result.stopped = "no-outputs"
                await checkpoint()
                return result
            lead = _lead(live)
            consumer = _consumer(live, lead)
            # A /dev/null output needs no copy of the round: the round leaves the source into
            # the consumer or into our own /dev/null fd anyway. Tee'ing it into a private
            # pipe only to splice it away doubled the work of `tee /dev/null` (benchmarks/TEE.md).
            others = [s for s in live if s is not lead and s is not consumer and s.kind != NULL
                      and not s.pipeless]
            # The source pipe can grow under us (an upstream F_SETPIPE_SZ on a shared pipe);
            # a private pipe smaller than it could not take a whole round. The private pipes
            # are empty here, so they can be replaced. Without private pipes the size does not
            # matter, and the fcntl is skipped.
            size = syscalls.pipe_size(src) if others else src_size
            if size > src_size:
                src_size = size
                undersized = True
            if undersized:  # grown now, or mid-round where the pipe that held the round stayed
                for sink in sinks:
                    if sink.pipe is not None and sink.pipe.size < src_size:
                        sink.drop_pipe()
                undersized = False
            starved = _give_pipes(others, src_size, starved)
            others = [s for s in others if not s.pipeless]
            readers = [s for s in live if s.pipeless]
            waited = False
            if own is not None and not own.held:
                # 0. take the next bytes from the given pipe: the round's bytes are ours alone
                taken, waited = await _take(given, own)
                if not taken:
                    await checkpoint()
                    return result
            # 1. the round's size
            if lead is not None:
                try:
                    n, waited = await _tee_lead(src, lead)
                except OSError as exc:
                    _fail(lead, translate(exc, DESTINATION, "tee"), on_error)
                    continue
            else:
                first = others[0].pipe if others else None  # each of `others` has one (_give_pipes)
                target = first.w if first is not None else None
                n, waited = await _round_size(src, target)
                if first is not None:
                    first.held = n
            if n == 0:
                await checkpoint()
                return result
            result.bytes += n
            result.rounds += 1
            if flow is not None:
                flow.add_spliced(n)
            # 2. the same n bytes into every other private pipe
            size = syscalls.pipe_size(src) if others else src_size
            if size > src_size:  # grew since the top of the round: the round may be larger
                src_size = size
                for sink in others:
                    assert sink.pipe is not None  # _give_pipes gave every one of `others` a pipe
                    if not sink.pipe.held:
                        sink.drop_pipe()
                    else:  # it holds the round (it bounded it: no larger than its pipe)
                        undersized = True  # replaced at the top of the next round
                starved = _give_pipes(others, src_size, starved)
                readers += [s for s in others if s.pipeless]
                others = [s for s in others if not s.pipeless]
            for sink in others:
                assert sink.pipe is not None  # _give_pipes gave every one of `others` a pipe
                if sink.pipe.held:
                    continue  # took the round in _round_size
                got = syscalls.tee(src, sink.pipe.w, n)
                if got != n:
                    raise ShortTee(got, n, sink.pipe.size, src_size)
                sink.pipe.held = n
            # 3. consume the round from the source
            if readers:
                await _copy_to_readers(src, n, consumer, readers, on_error)
            else:
                await _consume(src, n, consumer, devnull, on_error)
            if own is not None:
                own.held -= n
            for sink in live:
                if sink.kind == NULL:
                    sink.written += n
            # 4. empty the private pipes into their outputs
            for sink in others:
                if sink.live:
                    try:
                        if await _pump_sink(sink):
                            waited = True
                    except StreamError as exc:
                        _fail(sink, exc, on_error)
                sink_pipe_done(sink)
            if not waited:
                await checkpoint()
    finally:
        if own_devnull:
            os.close(devnull)
        if own is not None:
            own.close()
        for sink in sinks:
            sink.drop_pipe()


def _own_pipe(src: int) -> Pipe | None:
    """The pipe the rounds are tee'd from in take mode, as large as `src` if the pipe budget
    allows (smaller only makes rounds smaller); None past the fd limit: the rounds are then
    tee'd from `src` itself, which is right unless another process reads it too."""
    try:
        return Pipe.open(syscalls.pipe_size(src))
    except OSError as exc:
        if exc.errno not in _NO_PIPE:
            raise
        return None


async def _take(src: int, own: Pipe) -> tuple[int, bool]:
    """Move what `src` holds, up to `own`'s capacity, into `own`, which is empty; return
    (bytes, whether it waited), 0 at EOF.

    Why: tee(2) only peeks at a pipe. Tee'd straight from a stdin that another process reads
    too (a FIFO with several readers, a pipe two background jobs inherited), stdout got the
    front of it and the splice that took the round for the FILEs found other bytes, or none:
    the outputs differed. splice(2) takes bytes as read(2) does, once, and costs no copy
    (a pipe to pipe splice moves page references: about 2 us a MiB here). `own` is empty,
    so EAGAIN means that `src` is.
    """
    waited = False
    while True:
        try:
            n = syscalls.splice(src, own.w, own.size)
        except BlockingIOError:
            waited = True
            await wait_readable(src)
            continue
        except OSError as exc:
            raise translate(exc, SOURCE, "splice") from exc
        own.held += n
        return n, waited


def sink_pipe_done(sink: Sink) -> None:
    """A private pipe that still holds bytes (its output failed) is destroyed, never reused."""
    if sink.pipe is not None and (sink.pipe.held or not sink.live):
        sink.drop_pipe()


def _lead(live: list[Sink]) -> Sink | None:
    for sink in live:
        if sink.kind == PIPE and not sink.copy:
            return sink
    return None


def _consumer(live: list[Sink], lead: Sink | None) -> Sink | None:
    """The last regular file that splices well takes the round straight from the source."""
    for sink in reversed(live):
        if sink is not lead and sink.kind == FILE and not sink.copy:
            return sink
    return None


def _private_pipe(src_size: int) -> Pipe | None:
    """An empty pipe at least as large as the source, or None when the kernel's pipe budget
    (pipe-user-pages-soft) leaves it smaller: it could not take a whole round. Raises
    OSError when no pipe can be made at all (EMFILE, ENFILE)."""
    pipe = Pipe.open(src_size)
    if pipe.size < src_size:
        pipe.close()
        return None
    return pipe


# pipe2(2) errors that mean "no pipe for now", not a broken tee: the fd limits. A private pipe
# costs two fds an output that GNU tee does not spend: `tee` with 340 FILEs under the usual
# `ulimit -n 1024` exited 7 before writing a byte.
_NO_PIPE = (errno.EMFILE, errno.ENFILE)


def _give_pipes(sinks: list[Sink], src_size: int, starved: str | None) -> str | None:
    """A private pipe for each of `sinks` that has none; one left without is pipeless from
    now on (a fallback). Returns `starved`: why no pipe can be made, once the fd limit was met.

    Past the fd limit every later sink is pipeless without a try, and so is one that got a
    pipe (empty: this runs at the top of a round, or for the empty pipes mid-round): its two
    fds are given back, for what the process itself opens later (the import behind a log
    line), and pipe2 is not tried again, or it would take them."""
    for sink in sinks:
        if sink.pipe is not None or sink.pipeless:
            continue
        if starved is None:
            try:
                sink.pipe = _private_pipe(src_size)
            except OSError as exc:
                if exc.errno not in _NO_PIPE:
                    raise
                name = errno.errorcode[exc.errno]
                starved = f"no private pipe to be had: {os.strerror(exc.errno)} ({name})"
                spare = next((s for s in sinks if s.pipe is not None and not s.pipe.held), None)
                if spare is not None:
                    spare.drop_pipe()
                    _pipeless(spare, starved)
            else:
                if sink.pipe is None:
                    _pipeless(sink, f"no private pipe of {src_size} bytes to be had (the pipe budget, "
                                    "pipe-user-pages-soft)")
                continue
        _pipeless(sink, starved)
    return starved


def _pipeless(sink: Sink, why: str) -> None:
    sink.pipeless = sink.copy = True
    sink.fallback = why


class ShortTee(StreamError):
    """tee(2) took less than a round into an empty private pipe: the outputs would diverge."""

    def __init__(self, got: int, n: int, private: int, source: int) -> None:
        super().__init__("pipe", errno.EIO, f"tee(2) took {got} of {n} bytes into an empty private "
                                            f"pipe of {private} bytes (source pipe {source})")


def _fail(sink: Sink, exc: StreamError, on_error: OnError) -> None:
    sink.error = exc
    sink.drop_pipe()
    on_error(sink, exc)


async def _tee_lead(src: int, lead: Sink) -> tuple[int, bool]:
    """tee(2) from `src` into the lead output; (bytes, whether it waited). 0 at EOF.

    EAGAIN is ambiguous (source empty or lead full): FIONREAD on the source tells which.
    """
    waited = False
    while True:
        try:
            n = syscalls.tee(src, lead.fd, syscalls.MAX_SPLICE_AT_ONCE)
        except BlockingIOError:
            waited = True
            if syscalls.fionread(src) == 0:
                await wait_readable(src)
            else:
                await wait_writable(lead.fd)
            continue
        lead.written += n
        return n, waited


async def _round_size(src: int, target: int | None) -> tuple[int, bool]:
    """Without a lead: tee into the first private pipe (empty, so EAGAIN means the source is
    empty), or, with no private pipe at all, take what FIONREAD says the source holds."""
    waited = False
    while True:
        if target is not None:
            try:
                return syscalls.tee(src, target, syscalls.MAX_SPLICE_AT_ONCE), waited
            except BlockingIOError:
                pass
        else:
            n = _available(src)
            if n is not None:
                return n, waited
        waited = True
        await wait_readable(src)


def _available(src: int) -> int | None:
    """Bytes in the pipe `src`; 0 at EOF (empty and no writer left); None if empty but open."""
    n = syscalls.fionread(src)
    if n:
        return n
    poller = select.poll()
    poller.register(src, select.POLLIN)
    events = poller.poll(0)
    if events and events[0][1] & select.POLLHUP:
        return syscalls.fionread(src)  # bytes written just before the last writer closed
    return None


async def _consume(src: int, n: int, consumer: Sink | None, devnull: int, on_error: OnError) -> None:
    """Take `n` bytes off the source: into the consumer file at its offset, else /dev/null.

    A consumer that fails part-way (ENOSPC, EIO) is dropped and the rest goes to /dev/null, so
    the other outputs still get the whole stream. A consumer whose first splice is refused
    (a file system without splice_write) takes this round by copy and is copied from then on
    (it is no longer a consumer, it gets a private pipe like any output).
    """
    left = n
    while left and consumer is not None and consumer.live:
        try:
            m = syscalls.splice(src, consumer.fd, left, offset_dst=consumer.offset)
        except OSError as exc:
            if consumer.written == 0 and exc.errno in syscalls.SPLICE_REFUSED:
                consumer.copy = True
                consumer.fallback = f"splice refused ({errno.errorcode.get(exc.errno, exc.errno)})"
                left = await _copy_round(src, left, consumer, on_error)
                break
            _fail(consumer, translate(exc, DESTINATION, "splice"), on_error)
            break
        if m == 0:
            raise RuntimeError("the source pipe gave 0 bytes while holding a round")
        left -= m
        consumer.written += m
        if consumer.offset is not None:
            consumer.offset += m
    while left:
        left -= syscalls.splice(src, devnull, left)
    await checkpoint()


async def _copy_to_readers(src: int, n: int, consumer: Sink | None, readers: list[Sink],
                           on_error: OnError) -> None:
    """Step 3 when some outputs are pipeless: read the round off the source (it holds the `n`
    bytes: os.read does not block) and write it to the consumer, if any, and to each of them."""
    outputs = [s for s in (consumer, *readers) if s is not None and s.live]
    left = n
    while left:
        data = os.read(src, min(left, COPY_BUFSIZE))
        left -= len(data)
        for sink in outputs:
            if sink.live:
                try:
                    await _write_copy(sink, data)
                except StreamError as exc:
                    _fail(sink, exc, on_error)
    await checkpoint()


async def _write_copy(sink: Sink, data: bytes) -> None:
    """Write `data` to `sink` at its offset (a regular file: pwrite, as the splices before
    went there and not to the fd's position) or through its fd (write_all waits on EAGAIN)."""
    if sink.offset is None:
        await write_all(sink.fd, memoryview(data), Flow())
        sink.written += len(data)
        return
    view = memoryview(data)
    while view:
        try:
            m = os.pwrite(sink.fd, view, sink.offset)
        except OSError as exc:
            raise translate(exc, DESTINATION, "write") from exc
        view = view[m:]
        sink.offset += m
        sink.written += m


async def _copy_round(src: int, left: int, sink: Sink, on_error: OnError) -> int:
    """Read `left` bytes of the round off the source (it holds them: os.read does not block)
    and write them to `sink` through user space; return what is still to be consumed (0,
    or the rest when the sink failed). Nothing has been written to `sink` yet, so its fd's own
    position is its offset: copies go through it, as _pump_sink's do."""
    while left:
        data = os.read(src, min(left, COPY_BUFSIZE))
        left -= len(data)
        try:
            await write_all(sink.fd, memoryview(data), Flow())
        except StreamError as exc:
            _fail(sink, exc, on_error)
            return left
        sink.written += len(data)
        if sink.offset is not None:
            sink.offset += len(data)
    return left


async def _pump_sink(sink: Sink) -> bool:
    """Empty the sink's private pipe into it; return whether it waited. Splice is tried first;
    refused before the sink's first byte, the sink switches to user-space copies for good."""
    pipe = sink.pipe
    assert pipe is not None
    waited = False
    while pipe.held:
        if sink.copy:
            data = os.read(pipe.r, pipe.held)
            pipe.held -= len(data)
            flow = Flow()
            if await write_all(sink.fd, memoryview(data), flow):
                waited = True
            sink.written += len(data)
            if sink.offset is not None:  # the fd's position, which the copies advance too
                sink.offset += len(data)
            continue
        try:
            m = syscalls.splice(pipe.r, sink.fd, pipe.held, offset_dst=sink.offset)
        except BlockingIOError:
            await wait_writable(sink.fd)
            waited = True
            continue
        except OSError as exc:
            if sink.written == 0 and exc.errno in syscalls.SPLICE_REFUSED:
                sink.copy = True
                sink.fallback = f"splice refused ({errno.errorcode.get(exc.errno, exc.errno)})"
                continue
            raise translate(exc, DESTINATION, "splice") from exc
        pipe.held -= m
        sink.written += m
        if sink.offset is not None:
            sink.offset += m
    return waited


async def feed_pipe(src: int, pipe: Pipe, flow: Flow) -> None:
    """Fill our own pipe from a source that is not a pipe, then close its write end (EOF).

    A regular file is spliced (zero-copy, its pages are referenced); anything else (a
    terminal, a socket, a character device) is read through user space in a worker thread,
    because such an fd is usually blocking and would stall the event loop. A file whose first
    splice is refused (procfs files without splice_read: EINVAL) is read the same way, and
    `flow.fallback` says why. Who calls this owns `pipe`; this closes only `pipe.w`.
    """
    try:
        if classify(src) == FILE and await _splice_file(src, pipe, flow):
            return
        nonblocking = not os.get_blocking(src)
        while True:
            try:
                if nonblocking:  # try, then wait: no thread needed
                    data = os.read(src, COPY_BUFSIZE)
                    await checkpoint()
                else:
                    import trio  # only here: a pipe on stdin needs no trio (zcrelay.waits)

                    # A blocking read cannot be interrupted: on cancel (no output left) the
                    # thread is abandoned, still blocked in read(2), so the tee can end.
                    data = await trio.to_thread.run_sync(os.read, src, COPY_BUFSIZE,
                                                         abandon_on_cancel=True)
            except BlockingIOError:  # O_NONBLOCK set by someone else since we looked
                nonblocking = True
                await wait_readable(src)
                continue
            except OSError as exc:
                raise translate(exc, SOURCE, "read") from exc
            if not data:
                break
            await write_all(pipe.w, memoryview(data), flow)
    finally:
        os.close(pipe.w)
        pipe.w = -1


async def _splice_file(src: int, pipe: Pipe, flow: Flow) -> bool:
    """Splice the regular file `src` into `pipe` until EOF; True if handled. False, nothing
    moved, when splice refuses the file before its first byte (the caller copies instead)."""
    moved = False
    while True:
        try:
            n = syscalls.splice(src, pipe.w, syscalls.MAX_SPLICE_AT_ONCE)
        except BlockingIOError:
            await wait_writable(pipe.w)
            continue
        except OSError as exc:
            if not moved and exc.errno in syscalls.SPLICE_REFUSED:
                flow.fallback = f"splice refused ({errno.errorcode.get(exc.errno, exc.errno)})"
                return False
            raise translate(exc, SOURCE, "splice") from exc
        if n == 0:
            return True
        moved = True
        flow.add_spliced(n)
        await checkpoint()
