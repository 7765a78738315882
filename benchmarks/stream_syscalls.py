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
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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
CLK_TCK = os.sysconf("SC_CLK_TCK")


def user_system(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


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


def one_run(relay: fb.RunningRelay, direction: str, seconds: float, workdir: Path) -> dict:
    pid = relay.proc.pid
    result: dict = {}
    user0, sys0 = user_system(pid)

    def work() -> None:
        result["bps"], result["bytes"] = fb.run_iperf(relay.port, seconds, direction == "rev")

    counts = counted(pid, workdir / "perf.txt", work)
    user1, sys1 = user_system(pid)
    gb = result["bytes"] / 1e9
    row = {"Gbit/s": result["bps"] / 1e9, "user/GB": (user1 - user0) / gb, "sys/GB": (sys1 - sys0) / gb}
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
    rows: dict[tuple[str, str], list[dict]] = {}
    skipped: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="zc-perf-") as tmp:
            workdir = Path(tmp)
            server = fb.IperfServer(workdir)
            server.start()
            try:
                with fb.started_relays(specs, server.port, workdir, skipped) as running:
                    for rnd in range(args.rounds):
                        for relay in fb.rotated(running, rnd, args.rounds):
                            for direction in fb.DIRECTIONS:
                                try:
                                    relay.check_alive()
                                    row = one_run(relay, direction, args.seconds, workdir)
                                except (RuntimeError, fb.RelayUnavailable, subprocess.TimeoutExpired,
                                        KeyError, ValueError) as exc:  # as forward_bench.measure
                                    print(f"{fb.direction_label(direction):10} {relay.name:18} failed: "
                                          f"{exc}", flush=True)
                                    server.restart()  # a failed run may leave iperf3 -s wedged
                                    continue
                                rows.setdefault((relay.name, direction), []).append(row)
                                print(line(relay.name, direction, row), flush=True)
            finally:
                server.close()
    except KeyboardInterrupt:
        return 130
    for reason in skipped:
        print(f"skipped: {reason}")
    print("\nmedians:")
    for direction in fb.DIRECTIONS:
        for name in args.relays:
            runs = rows.get((name, direction))
            if runs:
                print(line(name, direction, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
