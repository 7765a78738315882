"""`zcrelay bench`: the zero-copy articles' table, measured on this machine.

Exit codes beyond the shared ones (zcrelay/exitcodes.py):
- --file missing, unreadable, a directory or not a regular file: INPUT_ERROR (8)
- the temporary file cannot be written, or --size exceeds the free space of its file system
  (TMPDIR): OUTPUT_ERROR (9), refused before a byte is written in the second case
- the file shrank while it was measured: FILE_CHANGED (10)
- Ctrl-C or SIGTERM: INTERRUPTED (130), after the temporary file is removed
- SIGHUP (the terminal closed): its default action, as for every command (129 in a shell),
  after the temporary file is removed
- the loopback sink cannot be reached (lo down): CONNECT_FAILED (6)
- stdout is closed at start (`>&-`): OUTPUT_ERROR (9), before anything is measured
- stdout's reader went away before the results were written (`| head -1`): BROKEN_PIPE (141),
  with no message
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Optional

import typer
from rich.table import Table

from zcrelay.bench import (CPU_SOURCE, DEFAULT_SIZE, SINK_TEXT, SPLICE_PIPE, BenchResult,
                           FileChangedDuringBench, PayloadFailed, run_bench)
from zcrelay.cli.app import app
from zcrelay.cli.common import (error, exit_code_for, parse_size, pipe_console, pipe_size_value, reader_gone,
                                say, terminated)
from zcrelay.exitcodes import ExitCode
from zcrelay.pipeline import InputFailed

_NOTES = (
    "Warm cache: the file is read once before the first run, so every method reads from the page "
    "cache and no run touches the disk.",
    f"CPU: {CPU_SOURCE}, and the sink's thread the same way. On loopback the receive path runs "
    "in whichever of the two is on the CPU when the bytes arrive (the sink when the sender is "
    "blocked on a full buffer), and the sink frees what the sender queued: for sendfile and "
    "splice, references to the page cache's pages. Only sender + sink is the whole cost of a "
    "transfer.",
    f"Sink: {SINK_TEXT}.",
    "*: CPU copies and context switches per chunk as the zero-copy articles count them, "
    "not measured; SG: with scatter-gather NICs, as loopback is, so sendfile copies nothing here "
    "(cpu_copies 0 in --json). syscalls and ctx sw vol/inv (the sender's ru_nvcsw/ru_nivcsw) are "
    "measured, per run of the whole file.",
    "mmap+write dies of SIGBUS if another process truncates the file while it is mapped (the "
    "articles' remedy: an F_SETLEASE read lease); sendfile and splice just return short.",
)


def _notes(r: BenchResult) -> list[str]:
    if r.cpu is None:
        where = ("The sender and the sink ran wherever the scheduler put them (--spread, or no "
                 "sched_setaffinity): on two CPUs every page a zero-copy method sends is "
                 "referenced on one and released on the other, which can cost sendfile and "
                 "splice more than the copies they save.")
    else:
        where = (f"The sender and the sink both ran on CPU {r.cpu}, so the rows differ by their "
                 "copies and calls, not by cross-CPU wake-ups and cache traffic (--spread lifts "
                 "that).")
    return [_NOTES[0], where, *_NOTES[1:]]


def _size(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    size = parse_size(value, "--size", exact=True)
    if size < 1:
        raise typer.BadParameter(f"{value!r} is less than one byte", param_hint="--size")
    return size


def _bytes(n: int) -> str:
    """A size for the ready line and the title: a file under 1 MiB was "0 MiB"."""
    return f"{n:,} bytes" if n < 1 << 20 else f"{n / 2**20:.0f} MiB"


@app.command()
def bench(
    size: Optional[str] = typer.Option(None, "--size", metavar="SIZE", show_default=False, callback=_size,
                                       help="Size of the temporary file to move, e.g. 16M.  \\[default: 256M]"),
    file: Optional[str] = typer.Option(None, "--file", metavar="PATH", show_default=False,
                                       help="Move this existing file instead of a temporary one."),
    repeat: int = typer.Option(3, "--repeat", "-r", min=1, max=100, metavar="N",
                               help="Runs per method (1 to 100), interleaved; the table shows the median."),
    spread: bool = typer.Option(False, "--spread",
                                help="Let the scheduler place the sender and the sink on any CPUs "
                                     "(by default both run on one CPU; see the notes)."),
    pipe_size: str = typer.Option(f"{SPLICE_PIPE >> 10}K", "--pipe-size", metavar="SIZE",
                                  help="The pipe the splice row moves the file through (K/M "
                                       "suffixes; clamped to what the kernel allows); 64K is the "
                                       "size of sendfile's own."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> ExitCode:
    """Measure read+write, mmap+write, sendfile and splice moving a file to a local socket."""
    if size is not None and file is not None:
        raise typer.BadParameter("give --size or --file, not both", param_hint="'--size'")
    total = DEFAULT_SIZE if size is None else int(size)  # _size parsed it
    pipe = pipe_size_value(pipe_size)
    if sys.stdout is None:  # `>&-`: fd 1 is closed, and the file or a socket would take it
        return error("stdout is closed", ExitCode.OUTPUT_ERROR)

    # SIGTERM and SIGHUP unwind like Ctrl-C, so that the temporary file is removed whatever ends
    # the run; SIGHUP's default action (main's handler) killed the process and left the file.
    # A signal ignored on purpose (nohup) stays ignored.
    caught: list[int] = []

    def unwind(signum, frame) -> None:
        caught.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, unwind) for signum in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(signum) != signal.SIG_IGN}
    try:
        result = run_bench(file, total, repeat, spread=spread, pipe_size=pipe, on_file=lambda path, n: None if as_json else say(
            f"moving {path} ({_bytes(n)}, page cache warm) to a loopback sink, "
            f"{repeat} run(s) per method..."))
    except KeyboardInterrupt:
        if signal.SIGHUP in caught:  # the file is gone: now end as every command ends on SIGHUP
            terminated(signal.SIGHUP, None)
        return ExitCode.INTERRUPTED
    except InputFailed as exc:
        return error(str(exc), ExitCode.INPUT_ERROR)
    except FileChangedDuringBench as exc:
        return error(str(exc), ExitCode.FILE_CHANGED)
    except PayloadFailed as exc:
        return error(str(exc), ExitCode.OUTPUT_ERROR)
    except Exception as exc:  # the CLI boundary: a code and one line
        code, message = exit_code_for(exc)
        return error(message, code)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    try:
        if as_json:
            json.dump(to_json(result), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            _table(result)
        sys.stdout.flush()  # here, not at exit, where an EPIPE could no longer be handled
    except BrokenPipeError:
        # As connect's stdout (zcrelay.cli.transfer): 141 and no message, where click made it
        # 1 and rich 1 (or Python's exit-time flush 120 and a message).
        return reader_gone(sys.stdout)
    return ExitCode.OK


def to_json(r: BenchResult) -> dict:
    return {
        "file": r.path,
        "temporary": r.temporary,
        "bytes": r.size,
        "repeat": r.repeat,
        "statistic": "median",
        "cache": "warm",
        "cpu_measured": CPU_SOURCE,
        "sink": SINK_TEXT,
        "cpu": r.cpu,
        "pipe_size": r.pipe_size,
        "methods": [{
            "method": m.method,
            "throughput_bytes_per_s": m.throughput,
            "throughput_gbit_per_s": m.throughput * 8 / 1e9,
            "cpu_seconds_per_gb": m.cpu_per_gb,
            "cpu_user_seconds_per_gb": m.user_per_gb,
            "cpu_system_seconds_per_gb": m.system_per_gb,
            "sink_cpu_seconds_per_gb": m.sink_cpu_per_gb,
            "syscalls": m.syscalls,
            "voluntary_context_switches": m.voluntary,
            "involuntary_context_switches": m.involuntary,
            "cpu_copies": m.claim.cpu_copies,
            "cpu_copies_articles": m.claim.cpu_copies_text,
            "context_switches_articles": m.claim.context_switches,
            "chunk_bytes": m.chunk,
            "runs": [{"seconds": run.seconds, "cpu_user": run.user, "cpu_system": run.system,
                      "syscalls": run.syscalls, "voluntary_context_switches": run.voluntary,
                      "involuntary_context_switches": run.involuntary, "sink_cpu": run.sink_cpu}
                     for run in m.runs],
        } for m in r.methods],
        "notes": _notes(r),
    }


def _chunk(n: int) -> str:
    return "rest" if n == 0 else f"{n >> 10} KiB" if n < 1 << 20 else f"{n >> 20} MiB"


def _table(r: BenchResult) -> None:
    what = "temporary file" if r.temporary else r.path
    table = Table(title=f"zcrelay bench: {_bytes(r.size)} {what} to a loopback TCP sink, "
                        f"median of {r.repeat}",
                  caption="\n".join(f"- {note}" for note in _notes(r)), caption_justify="left",
                  show_edge=False, pad_edge=False)  # nine columns in 80
    table.add_column("method", no_wrap=True)
    table.add_column("GB/s", justify="right", no_wrap=True)
    table.add_column("CPU\ns/GB\nsender", justify="right", no_wrap=True)
    table.add_column("CPU\ns/GB\nsink", justify="right", no_wrap=True)
    table.add_column("sys-\ncalls", justify="right", no_wrap=True)
    table.add_column("ctx sw\nvol/inv", justify="right", no_wrap=True)
    table.add_column("CPU\ncopies*", justify="right", no_wrap=True)
    table.add_column("ctx\nsw*", justify="right", no_wrap=True)
    table.add_column("chunk", justify="right", no_wrap=True)
    for m in r.methods:
        table.add_row(m.method, f"{m.throughput / 1e9:.2f}", f"{m.cpu_per_gb:.3f}",
                      f"{m.sink_cpu_per_gb:.3f}", f"{m.syscalls:,.0f}", f"{m.voluntary:.0f}/{m.involuntary:.0f}",
                      m.claim.cpu_copies_text, m.claim.context_switches, _chunk(m.chunk))
    pipe_console(soft_wrap=False).print(table)
