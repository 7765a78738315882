#!/usr/bin/env python3
"""One iperf3 stream through each relay: what the whole machine spends per GB, not only the relay.

On one stream three busy processes (iperf3's sender, the relay, iperf3's receiver) share the
machine's CPUs, so a relay's own CPU is only part of what sets the rate, and a relay can make
the endpoints' work dearer or cheaper (how often it wakes them, how much it hands over at once).
Per GB moved, in rotated rounds (forward_bench.rotated), this prints the relay's CPU (its
process tree), `iperf3 -s`'s, the `iperf3 -c` client's (from RUSAGE_CHILDREN), the whole
system's busy time (/proc/stat) and the context switches of the relay (all its threads),
the server and the client. Then the medians, and per round each relay's ratio to the first
relay named for the rate and the system's CPU per GB.

    PYTHONPATH=. .venv/bin/python benchmarks/system_cpu.py [--rounds 10] [--seconds 3]
        [--relays haproxy-splice zcrelay ...] [--candidate DIR] [--script "FILE.py [ARG...]"]

Relays are run.py's names. `--candidate DIR` adds `zcrelay forward` run from another checkout;
`--script "FILE.py [ARG...]"` a relay script that takes `LISTEN_PORT HOST:PORT [ARG...]` and
prints `listening on 127.0.0.1:PORT` on stderr (as splice_floor_relay.py does), to try a
variant of the floor: `--script "benchmarks/splice_floor_relay.py 262144"` is the floor with
SO_RCVLOWAT. Needs iperf3. A benchmark, not a test: exit 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import glob
import resource
import shlex
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forward_bench as fb  # noqa: E402
import run  # noqa: E402

COLUMNS = ("Gbit/s", "relay", "iperf3 -s", "iperf3 -c", "system", "kcs relay", "kcs -s", "kcs -c")


def system_busy_seconds() -> float:
    """CPU seconds all CPUs have spent on anything but idle and iowait since boot."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / fb.CLK_TCK


def switches(pid: int | None) -> int:
    """Voluntary and involuntary context switches of every thread of `pid`."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status") if pid else ():
        try:
            with open(status) as fh:
                total += sum(int(line.split()[1]) for line in fh if "ctxt_switches" in line)
        except OSError:  # a thread that ended meanwhile
            pass
    return total


def children() -> tuple[float, int]:
    """(CPU seconds, context switches) of the reaped children: the iperf3 clients."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime, ru.ru_nvcsw + ru.ru_nivcsw


def one_run(relay: fb.RunningRelay, direction: str, seconds: float, server: fb.IperfServer) -> dict | str:
    pid = relay.proc.pid if relay.proc else None
    try:
        relay.check_alive()
        server_pid = server.proc.pid
        before = (fb.tree_cpu_seconds(pid) if pid else 0.0, sum(fb.user_system_seconds(server_pid)),
                  children(), system_busy_seconds(), switches(pid), switches(server_pid))
        bps, nbytes = fb.run_iperf(relay.port, seconds, reverse=direction == "rev")
        after = (fb.tree_cpu_seconds(pid) if pid else 0.0, sum(fb.user_system_seconds(server_pid)),
                 children(), system_busy_seconds(), switches(pid), switches(server_pid))
    except (RuntimeError, fb.RelayUnavailable, OSError, ValueError, KeyError) as exc:
        server.restart()
        return str(exc) or repr(exc)
    gb = nbytes / 1e9
    return {
        "Gbit/s": bps / 1e9,
        "relay": (after[0] - before[0]) / gb,
        "iperf3 -s": (after[1] - before[1]) / gb,
        "iperf3 -c": (after[2][0] - before[2][0]) / gb,
        "system": (after[3] - before[3]) / gb,
        "kcs relay": (after[4] - before[4]) / gb / 1e3,
        "kcs -s": (after[5] - before[5]) / gb / 1e3,
        "kcs -c": (after[2][1] - before[2][1]) / gb / 1e3,
    }


def line(name: str, direction: str, row: dict) -> str:
    return (f"{fb.direction_label(direction):10} {name:20} {row['Gbit/s']:6.2f} Gbit/s  CPU-s/GB: "
            + "  ".join(f"{k} {row[k]:.3f}" for k in COLUMNS[1:5])
            + "  kilo-switches/GB: " + "  ".join(f"{k[4:]} {row[k]:.1f}" for k in COLUMNS[5:]))


def specs(args: argparse.Namespace) -> list[fb.RelaySpec]:
    by_name = {r.name: r for r in run.RELAYS}
    out = [fb.RelaySpec(n, by_name[n].needs, by_name[n].launch) for n in args.relays]
    for root in args.candidate:
        out.append(fb.RelaySpec(f"zcrelay@{root.name}", (),
                                lambda launch, root=root: fb.launch_zcrelay(launch, root=root)))
    for command in args.script:
        script, *extra = shlex.split(command)
        name = "-".join([Path(script).stem, *extra])
        out.append(fb.RelaySpec(name, (), lambda launch, script=script, extra=extra: run.launch_port_printer(
            launch, [sys.executable, str(Path(script).resolve()), "0",
                     f"{fb.LOOPBACK}:{launch.upstream_port}", *extra])))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--relays", nargs="+", default=[fb.HAPROXY_SPLICE, "zcrelay"],
                        choices=[r.name for r in run.RELAYS if r.launch is not None])
    parser.add_argument("--candidate", type=Path, action="append", default=[], metavar="DIR")
    parser.add_argument("--script", action="append", default=[], metavar='"FILE [ARG...]"')
    args = parser.parse_args()
    if not shutil.which("iperf3"):
        print("iperf3 not found (apt-get install iperf3)", file=sys.stderr)
        return 0
    try:
        rows, names = fb.interleaved_rounds(
            specs(args), args.rounds,
            lambda relay, direction, server, _workdir: one_run(relay, direction, args.seconds, server),
            line)
    except KeyboardInterrupt:
        return 130
    fb.print_medians(rows, names, line)
    if len(names) > 1:
        print(f"\nper round, to {names[0]} (median, range):")
        for direction in fb.DIRECTIONS:
            ref = rows.get((names[0], direction), [])
            for name in names[1:]:
                pairs = [(a, b) for a, b in zip(rows.get((name, direction), []), ref) if a and b]
                if not pairs:
                    continue
                parts = []
                for key, label in (("Gbit/s", "rate"), ("system", "system CPU per GB")):
                    ratios = sorted(a[key] / b[key] for a, b in pairs)
                    parts.append(f"{label} {statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})")
                print(f"{fb.direction_label(direction):10} {name:20} " + ", ".join(parts)
                      + f"  [{len(pairs)} rounds]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
