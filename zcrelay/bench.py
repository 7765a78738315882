"""`zcrelay bench`: the zero-copy articles' table, measured (policy layer: no printing, no trio).

One file is moved to a loopback TCP sink with each of the four methods the articles compare
(shared/SPLICE.md, "The copy methods"): read+write, mmap+write, sendfile, and splice through a
pipe. For each run the sending thread's own getrusage(RUSAGE_THREAD) is read before and after,
and the sink's thread reads its own: the CPU time and context switches of each are its alone.
System calls are counted by the loops themselves.

The sink discards what it receives with recv(MSG_TRUNC): on a TCP socket Linux drops the bytes
without copying them to user space (tcp(7), tcp_recvmsg), so the receiving side adds no copy of
its own. It does not cost the same for every method: it frees the buffers the sender queued
(for sendfile and splice, references to the page cache's pages, one per page: 0.09-0.10
CPU-s/GB on this project's 2-core VM, where read+write's sink took 0.03-0.09), and it runs the
TCP receive path whenever the sender is blocked on a full buffer. Only the two together are the
whole cost of a transfer, and the table shows both.

Plain blocking sockets and threads, no event loop: the sender runs in the calling thread, so
Ctrl-C (KeyboardInterrupt) interrupts it and the callers' `finally` blocks clean up.
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from zcrelay import syscalls
from zcrelay.addresses import Address
from zcrelay.errors import ConnectError, ZcrelayError
from zcrelay.files import open_file
from zcrelay.net import connect_reason
from zcrelay.pipeline import InputFailed

METHODS = ("read+write", "mmap+write", "sendfile", "splice")

# 1 MiB for read+write's buffer and mmap+write's write size: smaller chunks charge the
# user-space methods per-call overhead that is not the copy itself.
CHUNK = 1 << 20
# The sink asks for this much per recv(MSG_TRUNC); nothing is ever written to the buffer.
SINK_CHUNK = 4 << 20
# The pipe splice moves the file through: 64 KiB, the kernel's default pipe and the size of the
# one sendfile(2) uses inside (splice_direct_to_actor). Measured on this project's 2-core VM,
# sender and sink on one CPU, 5 interleaved runs of 256 MiB each (sender + sink CPU-s/GB):
# 16 KiB 0.30, 32 KiB 0.21, 64 KiB 0.195-0.23, 128 KiB 0.27-0.29, 1 MiB 0.29-0.31, against
# read+write's 0.24-0.27 and sendfile's 0.18-0.19. Why larger pipes cost more is not known
# (nstat counted no receive-queue pruning or collapsing); with --spread the sizes change places.
SPLICE_PIPE = 64 << 10
DEFAULT_SIZE = 256 << 20


@dataclass(frozen=True)
class Claim:
    """What the articles count per transfer (shared/SPLICE.md): not measured here."""

    cpu_copies: int
    cpu_copies_text: str
    context_switches: str


# `cpu_copies` is the count for this bench's sink. Loopback is a scatter-gather device
# (NETIF_F_SG), so sendfile, like splice, queues the page cache's pages and copies nothing: the
# articles' "0 SG" (measured: sendfile's sender CPU is splice's, well under mmap+write's).
ARTICLES = {
    "read+write": Claim(2, "2", "4"),
    "mmap+write": Claim(1, "1", "4"),
    "sendfile": Claim(0, "1 (0 SG)", "2"),
    "splice": Claim(0, "0", "2/hop"),
}

CPU_SOURCE = "getrusage(RUSAGE_THREAD) of the sending thread (user + system)"
SINK_TEXT = "loopback TCP; the receiving thread discards with recv(MSG_TRUNC), no copy to user space"


class SinkFailed(ZcrelayError):
    """The sink did not receive exactly the bytes sent."""


class FileChangedDuringBench(ZcrelayError):
    """The file shrank while a method was reading it."""


class PayloadFailed(ZcrelayError):
    """The temporary file could not be written (a full disk, an unwritable TMPDIR): the CLI's
    OUTPUT_ERROR, with the path, where a bare "No space left on device" gave exit status 1."""


@dataclass(frozen=True)
class Run:
    """One transfer of the whole file by one method."""

    method: str
    bytes: int
    seconds: float
    user: float  # sender thread CPU seconds in user mode
    system: float  # ... and in the kernel
    syscalls: int
    voluntary: int  # sender thread's ru_nvcsw (it blocked: socket buffer full)
    involuntary: int  # ru_nivcsw (it was preempted)
    sink_cpu: float  # the sink thread's CPU seconds, for reference

    @property
    def cpu(self) -> float:
        return self.user + self.system


@dataclass(frozen=True)
class MethodResult:
    """The median over a method's runs, each metric on its own."""

    method: str
    runs: tuple[Run, ...]
    chunk: int  # bytes asked for per call (0: the whole remaining file)

    def _median(self, value: Callable[[Run], float]) -> float:
        return statistics.median(value(r) for r in self.runs)

    @property
    def throughput(self) -> float:
        """Bytes per second."""
        return self._median(lambda r: r.bytes / r.seconds if r.seconds else 0.0)

    @property
    def cpu_per_gb(self) -> float:
        """Sender CPU seconds per 10**9 bytes."""
        return self._median(lambda r: r.cpu / (r.bytes / 1e9))

    @property
    def user_per_gb(self) -> float:
        return self._median(lambda r: r.user / (r.bytes / 1e9))

    @property
    def system_per_gb(self) -> float:
        return self._median(lambda r: r.system / (r.bytes / 1e9))

    @property
    def sink_cpu_per_gb(self) -> float:
        return self._median(lambda r: r.sink_cpu / (r.bytes / 1e9))

    @property
    def syscalls(self) -> float:
        return self._median(lambda r: r.syscalls)

    @property
    def voluntary(self) -> float:
        return self._median(lambda r: r.voluntary)

    @property
    def involuntary(self) -> float:
        return self._median(lambda r: r.involuntary)

    @property
    def claim(self) -> Claim:
        return ARTICLES[self.method]


@dataclass(frozen=True)
class BenchResult:
    path: str
    temporary: bool  # the file was created for the run and is gone now
    size: int
    repeat: int
    pipe_size: int  # what the kernel granted for the splice pipe
    methods: tuple[MethodResult, ...]
    cpu: int | None = None  # the one CPU the sender and the sink ran on (None: not pinned)


# --------------------------------------------------------------------------------------------
# The file.

@contextmanager
def bench_file(path: str | None, size: int) -> Iterator[tuple[str, int, int]]:
    """Yield (path, fd, size) of the file to send; the fd is closed on exit.

    With `path` None a file of `size` bytes is written in a fresh directory under the temporary
    directory (TMPDIR) and the directory is removed on exit, whatever ends the run (Ctrl-C
    included). Raises pipeline.InputFailed for a missing, unreadable or irregular `path`.
    """
    tmpdir = None
    try:
        if path is None:
            with _signals_held():  # the directory is made and `tmpdir` set, or neither
                tmpdir = _make_tmpdir(size)
            path = os.path.join(tmpdir, "payload")
            _write_payload(path, size)
        fd, real_size = open_file(path)
        try:
            yield path, fd, real_size
        finally:
            os.close(fd)
    finally:
        if tmpdir is not None:
            with _signals_held():
                shutil.rmtree(tmpdir, ignore_errors=True)


# The signals that end a run: Ctrl-C, and the CLI's SIGTERM and SIGHUP (cli.bench).
_ENDING: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold the signals that end a run until the block is done, then raise them again.

    A Ctrl-C inside shutil.rmtree raised KeyboardInterrupt half-way through it, and the
    temporary file (256 MiB by default) stayed in TMPDIR with exit status 130. Only Python's
    handlers are replaced (signal.signal works in the main thread alone: elsewhere nothing is
    held); an ignored signal stays ignored, and one at its default action is raised again with
    that action, after the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {}
    for signum in _ENDING:
        handler = signal.getsignal(signum)
        if handler not in (signal.SIG_IGN, None):
            held[signum] = signal.signal(signum, lambda n, frame: caught.append(n))
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):  # each once, in the order they came
            signal.raise_signal(signum)


def _make_tmpdir(size: int) -> str:
    """A fresh directory under TMPDIR, once its file system is known to have room for `size`
    bytes: a --size larger than the free space filled /tmp (a tmpfs: memory) before failing."""
    try:
        parent = tempfile.gettempdir()
    except OSError as exc:  # no usable TMPDIR, /tmp, /var/tmp...
        raise PayloadFailed(f"no temporary directory to write the file in: {exc.strerror or exc}") from None
    try:
        fs = os.statvfs(parent)
    except OSError:
        fs = None
    if fs is not None and fs.f_bavail * fs.f_frsize < size:
        free = fs.f_bavail * fs.f_frsize
        raise PayloadFailed(f"{parent} has {_mib(free)} free, less than --size {_mib(size)}: "
                            f"give a smaller --size, or TMPDIR on a larger file system")
    try:
        return tempfile.mkdtemp(prefix="zcrelay-bench-", dir=parent)
    except OSError as exc:
        raise PayloadFailed(f"cannot create a directory in {parent}: "
                            f"{os.strerror(exc.errno) if exc.errno else exc}") from None


def _mib(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / 2**20:.1f} MiB"


def _write_payload(path: str, size: int) -> None:
    """Real bytes, not a sparse file: holes would be read as zero pages, not page cache."""
    block = os.urandom(min(size, CHUNK))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            done = 0
            while done < size:
                done += os.write(fd, block[: size - done])
        finally:
            os.close(fd)
    except OSError as exc:  # ENOSPC (the room or the inodes went after _make_tmpdir looked), EFBIG...
        raise PayloadFailed(f"writing {path}: {os.strerror(exc.errno) if exc.errno else exc}") from None


def warm(fd: int, size: int) -> None:
    """Read the file once so every method reads from the page cache (a warm cache for all)."""
    buf = bytearray(CHUNK)
    offset = 0
    while offset < size:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            if os.fstat(fd).st_size >= size:
                # Not shrunk: its size says more than it holds, as a sysfs file's page does.
                # "The file shrank" (exit 10) sent the user looking for a writer that was not there.
                raise InputFailed(f"the file reports {size} bytes but holds {offset} (a pseudo file, as "
                                  f"in sysfs?): nothing to measure")
            raise FileChangedDuringBench(f"the file shrank to {offset} bytes while being read")
        offset += n


# --------------------------------------------------------------------------------------------
# The four senders. Each moves bytes [0, size) of `fd` to the blocking socket `out` and returns
# the number of system calls it made. A 0 from the file before `size` means it shrank.

def _write_all(out: int, view: memoryview) -> int:
    """Write all of `view`, a slice the caller hands over: it is released here, with the slice
    of it still unwritten, even when a write raises (EPIPE, or Ctrl-C's KeyboardInterrupt). A
    traceback keeps this frame alive, and a live slice of a mapping makes mmap's close raise
    BufferError ("exported pointers exist"), which replaced the real error with a traceback."""
    calls = 0
    rest = view
    try:
        while rest:
            n = os.write(out, rest)
            calls += 1
            rest = rest[n:]
    finally:
        rest.release()
        view.release()
    return calls


def send_read_write(fd: int, out: int, size: int) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    calls = 0
    offset = 0
    while offset < size:
        n = os.preadv(fd, [buf], offset)  # copy 1: page cache -> buf
        calls += 1
        if n == 0:
            raise FileChangedDuringBench(f"the file shrank to {offset} bytes during read+write")
        calls += _write_all(out, view[:n])  # copy 2: buf -> socket buffer
        offset += n
    return calls


def send_mmap_write(fd: int, out: int, size: int) -> int:
    """write(2) straight from a shared mapping of the file: one copy (mapping -> socket).

    If another process truncates the file while it is mapped, touching a page past the new end
    raises SIGBUS and kills this process: the articles' remedy is a read lease (F_SETLEASE).
    """
    calls = 2  # mmap and munmap (Python's mmap also makes an fstat and a dup: not counted)
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped:
        with memoryview(mapped) as view:
            for offset in range(0, size, CHUNK):
                calls += _write_all(out, view[offset:offset + CHUNK])
    return calls


def send_sendfile(fd: int, out: int, size: int) -> int:
    """sendfile(2) asks for the whole rest of the file each call; the kernel decides how much."""
    calls = 0
    offset = 0
    while offset < size:
        n = syscalls.sendfile(out, fd, offset, size - offset)
        calls += 1
        if n == 0:
            raise FileChangedDuringBench(f"the file shrank to {offset} bytes during sendfile")
        offset += n
    return calls


def send_splice(fd: int, out: int, size: int, pipe: tuple[int, int, int]) -> int:
    """file -> pipe -> socket, the pipe emptied before it is filled again.

    Invariant: the pipe is empty at the top of the loop. The pipe is non-blocking but holds
    data whenever it is read; the socket is blocking, so the second splice waits for room.
    """
    r, w, capacity = pipe
    calls = 0
    offset = 0
    while offset < size:
        n = syscalls.splice(fd, w, min(capacity, size - offset), flags=0, offset_src=offset)
        calls += 1
        if n == 0:
            raise FileChangedDuringBench(f"the file shrank to {offset} bytes during splice")
        offset += n
        more = syscalls.SPLICE_F_MORE if offset < size else 0
        while n:
            n -= syscalls.splice(r, out, n, flags=more)
            calls += 1
    return calls


# --------------------------------------------------------------------------------------------
# The sink and one measured run.

def pick_cpu() -> int | None:
    """The CPU to pin the sender and the sink to: the lowest one this process may run on
    (None where sched_setaffinity is not available)."""
    try:
        return min(os.sched_getaffinity(0))
    except (AttributeError, OSError, ValueError):
        return None


def _pin(cpu: int | None) -> None:
    """Pin the calling thread (pid 0 is the thread on Linux) to `cpu`; None: leave it."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


class _Sink:
    """A thread that receives and discards one connection's bytes until EOF, on `cpu` if given.

    Owns `sock` until join() returns; the caller closes it after that.
    """

    def __init__(self, sock: socket.socket, cpu: int | None = None) -> None:
        self.sock = sock
        self.cpu_pin = cpu
        self.received = 0
        self.cpu = 0.0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="zcrelay-bench-sink", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        buf = bytearray(SINK_CHUNK)  # never written: MSG_TRUNC makes TCP discard instead of copy
        _pin(self.cpu_pin)
        before = resource.getrusage(resource.RUSAGE_THREAD)
        try:
            while True:
                n = self.sock.recv_into(buf, SINK_CHUNK, socket.MSG_TRUNC)
                if n == 0:
                    break
                self.received += n
        except BaseException as exc:  # reported by join() in the sending thread
            self.error = exc
        after = resource.getrusage(resource.RUSAGE_THREAD)
        self.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def _connect(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    host, port = listener.getsockname()
    try:
        client = socket.create_connection((host, port))
    except OSError as exc:
        # Alone, "Network is unreachable" said neither what was connected to nor why: in a
        # fresh network namespace, the loopback interface is down (and binding still works).
        err = exc.errno or errno.EIO
        raise ConnectError(Address(host, port), connect_reason(err),
                           f"{os.strerror(err).lower()} (the sink is on the loopback interface: "
                           f"is lo up?)") from None
    try:
        server, _ = listener.accept()
    except BaseException:
        client.close()
        raise
    return client, server


def measure(method: str, fd: int, size: int, listener: socket.socket,
            pipe: tuple[int, int, int], cpu: int | None = None) -> Run:
    """Move the whole file once with `method`; the calling thread is the measured sender (pinned
    to `cpu` by the caller, if given; the sink is pinned there too)."""
    client, server = _connect(listener)
    try:
        sink = _Sink(server, cpu)
        out = client.fileno()
        before = resource.getrusage(resource.RUSAGE_THREAD)
        start = time.perf_counter()
        if method == "read+write":
            calls = send_read_write(fd, out, size)
        elif method == "mmap+write":
            calls = send_mmap_write(fd, out, size)
        elif method == "sendfile":
            calls = send_sendfile(fd, out, size)
        elif method == "splice":
            calls = send_splice(fd, out, size, pipe)
        else:
            raise ValueError(f"unknown method {method!r}")
        client.shutdown(socket.SHUT_WR)
        calls += 1
        sink.join()  # the clock stops when the sink has everything, not when the buffer took it
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_THREAD)
    finally:
        client.close()  # on an interrupted run this gives the sink its EOF
    server.close()
    if sink.received != size:
        raise SinkFailed(f"{method}: the sink received {sink.received} of {size} bytes")
    return Run(method=method, bytes=size, seconds=seconds,
               user=after.ru_utime - before.ru_utime, system=after.ru_stime - before.ru_stime,
               syscalls=calls, voluntary=after.ru_nvcsw - before.ru_nvcsw,
               involuntary=after.ru_nivcsw - before.ru_nivcsw, sink_cpu=sink.cpu)


def run_bench(path: str | None, size: int = DEFAULT_SIZE, repeat: int = 3,
              on_file: Callable[[str, int], None] | None = None, spread: bool = False,
              pipe_size: int = SPLICE_PIPE) -> BenchResult:
    """Measure every method `repeat` times, interleaved (each round starts with the next method),
    on a warm cache. `on_file(path, size)` is called once the file is ready and warm.

    The sender and the sink share one CPU unless `spread`. On two CPUs each page a zero-copy
    method sends has its reference count taken on the sender's CPU and dropped on the sink's,
    and the wake-ups between them cross CPUs: on this project's 2-core VMs that made the
    sendfile and splice rows swing between 0.10 and 0.44 CPU-s/GB from run to run, mostly
    above read+write's, whose pages are its own. Pinned, 9 runs of each gave splice
    0.089-0.103, sendfile 0.096-0.100 and read+write 0.126-0.172. A real sink is another
    host, whose NIC takes those references and gives them back; the shared CPU is the closer
    model of the copies the table is about.

    `pipe_size` is the splice row's pipe (clamped as every pipe is: syscalls.open_pipe); the
    result's pipe_size is what the kernel granted."""
    cpu = None if spread else pick_cpu()
    previous = os.sched_getaffinity(0) if cpu is not None else None
    chunks = {"read+write": CHUNK, "mmap+write": CHUNK, "sendfile": 0, "splice": 0}
    runs: dict[str, list[Run]] = {m: [] for m in METHODS}
    with bench_file(path, size) as (real_path, fd, real_size):
        if real_size == 0:
            raise InputFailed(f"{real_path} reports size 0 (empty, or a procfs file): "
                              f"nothing to measure")
        warm(fd, real_size)
        if on_file:
            on_file(real_path, real_size)
        pipe = syscalls.open_pipe(pipe_size)
        chunks["splice"] = pipe[2]
        listener = None
        try:
            listener = socket.create_server(("127.0.0.1", 0))
            _pin(cpu)
            for round_ in range(repeat):
                order = METHODS[round_ % len(METHODS):] + METHODS[:round_ % len(METHODS)]
                for method in order:
                    runs[method].append(measure(method, fd, real_size, listener, pipe, cpu))
        finally:
            if previous is not None:
                os.sched_setaffinity(0, previous)
            if listener is not None:
                listener.close()
            os.close(pipe[0])
            os.close(pipe[1])
    return BenchResult(
        path=real_path, temporary=path is None, size=real_size, repeat=repeat, pipe_size=pipe[2],
        methods=tuple(MethodResult(m, tuple(runs[m]), chunks[m]) for m in METHODS), cpu=cpu)
