#!/usr/bin/env python3
"""One iperf3 stream through each relay: what the relay's CPU does per GB, counted by perf.

`run.py` counts syscalls under `strace -c`, which slows the relay several-fold and so changes
how it batches. Here `perf stat` counts them on the relay's PID from kernel tracepoints, at a
cost too small to change the traffic, during ordinary iperf3 runs: per GB moved, the splices,
the epoll waits, the epoll_ctl calls and the context switches, beside the relay's user and
system CPU (from /proc/PID/stat). Rounds are interleaved and rotated (forward_bench.rotated);
each run is printed as it ends, then the medians per relay and direction.

    PYTHONPATH=. .venv/bin/python benchmarks/stream_syscalls.py [--rounds 4] [--seconds 3]
        [--relays zcrelay haproxy-splice ...]

Relays are run.py's names. Needs iperf3 and perf (linux-perf), and root or
kernel.perf_event_paranoid <= 1 for the tracepoints. A benchmark, not a test: exit 0 whatever
the figures.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forward_bench as fb  # noqa: E402
import run  # noqa: E402

EVENTS = {  # column: perf event
    "splice": "syscalls:sys_enter_splice",
    "epoll_wait": "syscalls:sys_enter_epoll_wait",
    "epoll_ctl": "syscalls:sys_enter_epoll_ctl",
    "cswitch": "context-switches",
}


def counted(pid: int, out: Path, work) -> dict[str, int]:
    """Run `work()` while perf counts EVENTS on `pid`; the counts by column."""
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", ",".join(EVENTS.values()),
                             "-p", str(pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.2)  # perf attaches; the counts then cover the whole iperf3 run
        work()
    finally:
        perf.send_signal(2)
        perf.wait(timeout=10)
    by_event = {}
    for line in out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            by_event[parts[2]] = int(parts[0])
    return {column: by_event.get(event, 0) for column, event in EVENTS.items()}


def one_run(relay: fb.RunningRelay, direction: str, seconds: float, server: fb.IperfServer,
            workdir: Path) -> dict | str:
    """forward_bench.measure under perf: the row, or why the run failed."""
    pid = relay.proc.pid
    measured: list[fb.Measurement] = []
    try:
        user0, sys0 = fb.user_system_seconds(pid)
        counts = counted(pid, workdir / "perf.txt",
                         lambda: measured.append(fb.measure(relay, direction, seconds, server)))
        user1, sys1 = fb.user_system_seconds(pid)
    except fb.RelayUnavailable as exc:
        return str(exc)
    [m] = measured
    if not m.ok:
        return m.error
    gb = m.bytes_moved / 1e9
    row = {"Gbit/s": m.bits_per_second / 1e9, "user/GB": (user1 - user0) / gb, "sys/GB": (sys1 - sys0) / gb}
    row.update({f"{k}/GB": v / gb for k, v in counts.items()})
    return row


def line(name: str, direction: str, row: dict) -> str:
    return (f"{fb.direction_label(direction):10} {name:18} {row['Gbit/s']:6.2f} Gbit/s  CPU-s/GB user "
            f"{row['user/GB']:.3f} sys {row['sys/GB']:.3f}  per GB: " +
            "  ".join(f"{k} {row[f'{k}/GB']:,.0f}" for k in EVENTS))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--relays", nargs="+", default=["zcrelay", fb.HAPROXY_SPLICE],
                        choices=[r.name for r in run.RELAYS if r.launch is not None])
    args = parser.parse_args()
    for program in ("iperf3", "perf"):
        if not shutil.which(program):
            print(f"{program} not found (apt-get install iperf3 linux-perf)", file=sys.stderr)
            return 0
    by_name = {r.name: r for r in run.RELAYS}
    specs = [fb.RelaySpec(n, by_name[n].needs, by_name[n].launch) for n in args.relays]
    try:
        rows, names = fb.interleaved_rounds(
            specs, args.rounds,
            lambda relay, direction, server, workdir: one_run(relay, direction, args.seconds, server, workdir),
            line)
    except KeyboardInterrupt:
        return 130
    fb.print_medians(rows, names, line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
