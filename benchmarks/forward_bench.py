#!/usr/bin/env python3
"""Loopback throughput / CPU benchmark: zcrelay forward vs. socat vs. HAProxy.

Runs iperf3 (single TCP stream, both directions) on 127.0.0.1 through:

* nothing (direct iperf3 client -> iperf3 server, the baseline),
* ``zcrelay forward`` (splice path) and ``zcrelay forward --no-splice``,
* socat (default 8 KiB buffer and ``-b 65536``),
* HAProxy in TCP mode with and without ``option splice-request/response``.

For every relay it reports throughput, the ratio to the direct connection and
the relay's own CPU time (user + system, whole process tree) per GB moved.

This is a benchmark, not a test: it always exits 0 whatever the numbers are
(it only exits non-zero on bad command-line usage).  Missing peer programs
(iperf3, socat, haproxy) are reported and their rows skipped.

Usage:  .venv/bin/python benchmarks/forward_bench.py [--seconds 5]
            [--repeat 1] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LISTEN_RE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
INSTALL_HINT = "apt-get update && apt-get install -y iperf3 socat haproxy"
STARTUP_TIMEOUT = 10.0
DIRECTIONS = ("fwd", "rev")  # fwd: client -> server;  rev: iperf3 -R
ZCRELAY = "zcrelay"
HAPROXY_SPLICE = "haproxy-splice"
SOCAT = "socat"


# --------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------


class RelayUnavailable(Exception):
    """The relay cannot be run (missing program, failed to start...)."""


@dataclass(frozen=True)
class RelaySpec:
    """How to start one relay in front of the iperf3 server."""

    name: str
    needs: tuple[str, ...]  # external programs required (besides iperf3)
    launch: Optional[Callable[["Launch"], "RunningRelay"]]  # None = direct


@dataclass(frozen=True)
class Launch:
    """Everything a launcher needs to start a relay."""

    upstream_port: int
    workdir: Path
    name: str


@dataclass
class RunningRelay:
    """A started relay: where to connect and which process to account."""

    name: str
    port: int
    proc: Optional[subprocess.Popen] = None
    log: Optional[Path] = None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RelayUnavailable(
                f"{self.name} exited with status {self.proc.returncode}"
                f"{log_tail(self.log)}"
            )


@dataclass(frozen=True)
class Measurement:
    """One iperf3 run through one relay in one direction."""

    relay: str
    direction: str
    bits_per_second: float = 0.0
    bytes_moved: int = 0
    cpu_seconds: Optional[float] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def cpu_per_gb(self) -> Optional[float]:
        if self.cpu_seconds is None or self.bytes_moved <= 0:
            return None
        return self.cpu_seconds / (self.bytes_moved / 1e9)


@dataclass(frozen=True)
class Summary:
    """Median over repeats for one (relay, direction) row of the table."""

    relay: str
    direction: str
    gbps: Optional[float]
    ratio_to_direct: Optional[float]
    cpu_per_gb: Optional[float]
    runs: int
    note: str = ""


@dataclass(frozen=True)
class TargetCheck:
    """One of the project's target ratios."""

    label: str
    direction: str
    value: Optional[float]
    target: str
    met: Optional[bool]


@dataclass
class Report:
    """All results of one benchmark invocation."""

    seconds: float
    repeat: int
    summaries: list[Summary] = field(default_factory=list)
    targets: list[TargetCheck] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (for programs that need one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def is_listening(port: int) -> bool:
    """True if something listens on 127.0.0.1:port (per /proc/net/tcp).

    Checking the kernel's socket table instead of connecting avoids feeding
    bogus connections to socat (which would fork) or iperf3 (which would log
    a protocol error).
    """
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as fh:
        next(fh)
        return any(
            cols[1] == wanted and cols[3] == "0A"
            for cols in (line.split() for line in fh)
        )


def log_tail(log: Optional[Path], lines: int = 5) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    return ("; log: " + " | ".join(text)) if text else ""


def spawn(argv: Sequence[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start a helper process in its own session, stderr+stdout to ``log``.

    Its own session means Ctrl-C does not reach it directly and that
    ``stop`` can kill its whole process group (socat's forked children).
    """
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )


def stop(proc: subprocess.Popen) -> None:
    """Terminate a process started by ``spawn`` and its process group."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen, what: str, log: Path
) -> None:
    """Poll ``ready`` until true; fail if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise RelayUnavailable(
                f"{what} exited with status {proc.returncode} during startup"
                f"{log_tail(log)}"
            )
        time.sleep(0.02)
    raise RelayUnavailable(f"{what} not ready after {STARTUP_TIMEOUT}s{log_tail(log)}")


def start_listening(
    argv: Sequence[str], port: int, launch: Launch, **kwargs
) -> RunningRelay:
    """Spawn a program that listens on a known port and wait for it."""
    log = launch.workdir / f"{launch.name}.log"
    proc = spawn(argv, log, **kwargs)
    try:
        wait_until(lambda: is_listening(port), proc, launch.name, log)
    except BaseException:
        stop(proc)
        raise
    return RunningRelay(launch.name, port, proc, log)


# --------------------------------------------------------------------------
# CPU accounting (/proc)
# --------------------------------------------------------------------------


def stat_fields(pid: int) -> Optional[list[str]]:
    """Fields 3.. of ``/proc/PID/stat`` (state, ppid, ...), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()  # after the comm, which may hold spaces


def read_stat(pid: int) -> Optional[tuple[int, int]]:
    """(ppid, utime+stime+cutime+cstime in ticks) of a process, or None.

    ``/proc/PID/stat`` already sums all threads of the process; cutime and
    cstime hold the times of children it has reaped.
    """
    rest = stat_fields(pid)
    if rest is None:
        return None
    ppid = int(rest[1])
    ticks = sum(int(x) for x in rest[11:15])  # utime stime cutime cstime
    return ppid, ticks


def user_system_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process, all its threads."""
    rest = stat_fields(pid)
    if rest is None:
        raise RelayUnavailable(f"process {pid} is gone")
    return int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` plus all its live descendants.

    Summing utime+stime+cutime+cstime over the live tree counts every
    process exactly once: a child's time moves into its parent's
    cutime/cstime at the moment it is reaped (and it leaves the tree).
    /proc/PID/task/*/children is not available on every kernel, so the
    tree is built from the ppid field of every /proc/*/stat.
    """
    stats = {
        pid: st
        for pid, st in ((int(p.name), read_stat(int(p.name)))
                        for p in Path("/proc").iterdir() if p.name.isdigit())
        if st is not None
    }
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(children.get(pid, ()))
    return total / CLK_TCK


# --------------------------------------------------------------------------
# iperf3
# --------------------------------------------------------------------------


class IperfServer:
    """An ``iperf3 -s`` on 127.0.0.1 that can be restarted after a failure."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = self.workdir / "iperf3-server.log"
        argv = ["iperf3", "-s", "-B", LOOPBACK, "-p", str(self.port)]
        self.proc = spawn(argv, log)
        wait_until(lambda: is_listening(self.port), self.proc, "iperf3 -s", log)

    def restart(self) -> None:
        self.close()
        self.start()

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def run_iperf(port: int, seconds: float, reverse: bool) -> tuple[float, int]:
    """Run one iperf3 client; return (bits/s, bytes) as received."""
    argv = ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", f"{seconds:g}", "-J"]
    if reverse:
        argv.append("-R")
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 30,
        stdin=subprocess.DEVNULL,
    )
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 rc={done.returncode}: {done.stderr.strip()[:200]}")
    if "error" in result:
        raise RuntimeError(f"iperf3: {result['error']}")
    received = result["end"]["sum_received"]
    return float(received["bits_per_second"]), int(received["bytes"])


def measure(
    relay: RunningRelay, direction: str, seconds: float, server: IperfServer
) -> Measurement:
    """One iperf3 run through ``relay``, with CPU accounting of the relay."""
    try:
        relay.check_alive()
        pid = relay.proc.pid if relay.proc else None
        cpu_before = tree_cpu_seconds(pid) if pid else None
        bps, nbytes = run_iperf(relay.port, seconds, reverse=direction == "rev")
        cpu = tree_cpu_seconds(pid) - cpu_before if pid else None
        return Measurement(relay.name, direction, bps, nbytes, cpu)
    except (RuntimeError, RelayUnavailable, subprocess.TimeoutExpired,
            KeyError, ValueError) as exc:
        server.restart()  # a failed run may leave iperf3 -s wedged
        return Measurement(relay.name, direction, error=str(exc) or repr(exc))


# --------------------------------------------------------------------------
# Relays
# --------------------------------------------------------------------------


def launch_zcrelay(launch: Launch, *extra: str, root: Path = REPO_ROOT) -> RunningRelay:
    """``python -m zcrelay forward 127.0.0.1:0 ...`` from the checkout at `root` (another one
    for an A/B of two builds); port parsed from stderr."""
    argv = [
        sys.executable, "-m", "zcrelay", "forward",
        f"{LOOPBACK}:0", f"{LOOPBACK}:{launch.upstream_port}",
        "--pipe-size", "1M", "-q", *extra,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    log = launch.workdir / f"{launch.name}.log"
    proc = spawn(argv, log, cwd=root, env=env)
    found: list[int] = []

    def bound() -> bool:
        match = LISTEN_RE.search(log.read_text(errors="replace"))
        if match:
            found.append(int(match.group(1)))
        return bool(match)

    try:
        wait_until(bound, proc, launch.name, log)
    except BaseException:
        stop(proc)
        raise
    return RunningRelay(launch.name, found[0], proc, log)


def launch_socat(launch: Launch, *extra: str) -> RunningRelay:
    port = free_port()
    argv = [
        "socat", *extra,
        f"TCP-LISTEN:{port},bind={LOOPBACK},reuseaddr,fork",
        f"TCP:{LOOPBACK}:{launch.upstream_port}",
    ]
    return start_listening(argv, port, launch)


def haproxy_config(listen_port: int, upstream_port: int, splice: bool) -> str:
    splice_opts = (
        "    option splice-request\n    option splice-response\n" if splice else ""
    )
    return (
        "global\n"
        "    tune.pipesize 1048576\n"
        "    maxconn 256\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 5s\n"
        "    timeout client 120s\n"
        "    timeout server 120s\n"
        f"{splice_opts}"
        "listen relay\n"
        f"    bind {LOOPBACK}:{listen_port}\n"
        f"    server upstream {LOOPBACK}:{upstream_port}\n"
    )


def launch_haproxy(launch: Launch, splice: bool) -> RunningRelay:
    port = free_port()
    cfg = launch.workdir / f"{launch.name}.cfg"
    cfg.write_text(haproxy_config(port, launch.upstream_port, splice))
    return start_listening(["haproxy", "-f", str(cfg), "-db"], port, launch)


RELAYS: tuple[RelaySpec, ...] = (
    RelaySpec("direct", (), None),
    RelaySpec(ZCRELAY, (), launch_zcrelay),
    RelaySpec("zcrelay-nosplice", (), lambda l: launch_zcrelay(l, "--no-splice")),
    RelaySpec(HAPROXY_SPLICE, ("haproxy",), lambda l: launch_haproxy(l, True)),
    RelaySpec("haproxy-nosplice", ("haproxy",), lambda l: launch_haproxy(l, False)),
    RelaySpec(SOCAT, ("socat",), launch_socat),
    RelaySpec("socat-b64k", ("socat",), lambda l: launch_socat(l, "-b", "65536")),
)


def missing_requirement(spec: RelaySpec) -> Optional[str]:
    missing = [prog for prog in spec.needs if shutil.which(prog) is None]
    if missing:
        return f"{' '.join(missing)} not installed (install: {INSTALL_HINT})"
    if spec.name.startswith(ZCRELAY) and not (REPO_ROOT / "zcrelay").is_dir():
        return f"zcrelay package not found in {REPO_ROOT} (pending)"
    return None


def start_relay(spec: RelaySpec, upstream_port: int, workdir: Path) -> RunningRelay:
    if spec.launch is None:  # direct: connect straight to the iperf3 server
        return RunningRelay(spec.name, upstream_port)
    return spec.launch(Launch(upstream_port, workdir, spec.name))


@contextlib.contextmanager
def started_relays(
    specs: Sequence[RelaySpec], upstream_port: int, workdir: Path,
    skipped: list[str],
) -> Iterator[list[RunningRelay]]:
    """Start every available relay; always stop them all on exit."""
    running: list[RunningRelay] = []
    try:
        for spec in specs:
            reason = missing_requirement(spec)
            if reason is None:
                try:
                    running.append(start_relay(spec, upstream_port, workdir))
                    continue
                except RelayUnavailable as exc:
                    reason = f"failed to start: {exc}"
            skipped.append(f"{spec.name}: {reason}")
        yield running
    finally:
        for relay in running:
            if relay.proc is not None:
                stop(relay.proc)


# --------------------------------------------------------------------------
# Running and summarising
# --------------------------------------------------------------------------


def run_all(
    relays: Sequence[RelaySpec], seconds: float, repeat: int, workdir: Path,
    skipped: list[str],
) -> list[Measurement]:
    """Interleave relays and directions ``repeat`` times; return all runs. Each round starts
    at a different relay (see rotated), so no relay always runs right after the same one."""
    server = IperfServer(workdir)
    results: list[Measurement] = []
    try:
        server.start()
        with started_relays(relays, server.port, workdir, skipped) as running:
            for rnd in range(repeat):
                for relay in rotated(running, rnd, repeat):
                    for direction in DIRECTIONS:
                        m = measure(relay, direction, seconds, server)
                        results.append(m)
                        progress(rnd, repeat, m)
    finally:
        server.close()
    return results


def rotated(items: Sequence, rnd: int, rounds: int) -> list:
    """`items` in round `rnd` of `rounds`, rotated so that the rounds start at relays spread
    evenly over the list. On these VMs a run's place in the round moves its rate: in 12
    rounds in a fixed order, a second HAProxy-splice identical to the first, run right after
    it, came out at 0.92 of it on one stream c->s (the twelfth session). Rotating spreads
    that over every relay instead of charging it to whichever comes later."""
    items = list(items)
    if not items:
        return items
    k = (rnd * len(items) // max(rounds, 1)) % len(items)
    return items[k:] + items[:k]


Row = dict  # one run's figures by column (per-GB rates, Gbit/s...)


def interleaved_rounds(
    specs: Sequence[RelaySpec], rounds: int,
    one_run: Callable[[RunningRelay, str, "IperfServer", Path], "Row | str"],
    line: Callable[[str, str, Row], str],
) -> tuple[dict[tuple[str, str], list[Optional[Row]]], list[str]]:
    """Every relay of `specs`, both directions, in `rounds` rotated rounds against one iperf3 -s
    (the loop of the narrower tools: stream_syscalls.py, system_cpu.py). `one_run(relay,
    direction, server, workdir)` gives a run's row or why it failed; each is printed as it ends
    (`line`), and at the end why any relay was skipped. Returns the rows by (relay, direction),
    None for a failed run so the rounds stay aligned, and the started relays' names."""
    rows: dict[tuple[str, str], list[Optional[Row]]] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="zc-rounds-") as tmp:
        workdir = Path(tmp)
        server = IperfServer(workdir)
        server.start()
        try:
            with started_relays(specs, server.port, workdir, skipped) as running:
                names = [r.name for r in running]
                for rnd in range(rounds):
                    for relay in rotated(running, rnd, rounds):
                        for direction in DIRECTIONS:
                            row = one_run(relay, direction, server, workdir)
                            runs = rows.setdefault((relay.name, direction), [])
                            if isinstance(row, str):
                                print(f"{direction_label(direction):10} {relay.name:20} failed: {row}", flush=True)
                                runs.append(None)
                                continue
                            runs.append(row)
                            print(line(relay.name, direction, row), flush=True)
        finally:
            server.close()
    for reason in skipped:
        print(f"skipped: {reason}")
    return rows, names


def print_medians(rows: dict[tuple[str, str], list[Optional[Row]]], names: Sequence[str],
                  line: Callable[[str, str, Row], str]) -> None:
    """interleaved_rounds' rows: each relay's median of every column, per direction."""
    print("\nmedians:")
    for direction in DIRECTIONS:
        for name in names:
            good = [r for r in rows.get((name, direction), []) if r]
            if good:
                print(line(name, direction, {k: statistics.median(r[k] for r in good) for k in good[0]}))


def progress(rnd: int, repeat: int, m: Measurement) -> None:
    if m.ok:
        cpu = f"{m.cpu_per_gb:.3f} CPU-s/GB" if m.cpu_per_gb is not None else ""
        text = f"{m.bits_per_second / 1e9:7.2f} Gbit/s {cpu}"
    else:
        text = f"FAILED: {m.error}"
    print(f"[{rnd + 1}/{repeat}] {m.relay:17} {m.direction}: {text}",
          file=sys.stderr, flush=True)


def median_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(results: Sequence[Measurement]) -> list[Summary]:
    keys = list(dict.fromkeys((m.relay, m.direction) for m in results))
    medians = {
        key: median_or_none([m.bits_per_second for m in results
                             if (m.relay, m.direction) == key and m.ok])
        for key in keys
    }
    summaries = []
    for relay, direction in keys:
        runs = [m for m in results if (m.relay, m.direction) == (relay, direction)]
        good = [m for m in runs if m.ok]
        bps = medians[(relay, direction)]
        direct = medians.get(("direct", direction))
        errors = [m.error for m in runs if not m.ok]
        summaries.append(Summary(
            relay=relay,
            direction=direction,
            gbps=bps / 1e9 if bps is not None else None,
            ratio_to_direct=bps / direct if bps and direct else None,
            cpu_per_gb=median_or_none([m.cpu_per_gb for m in good]),
            runs=len(good),
            note=f"{len(errors)} failed: {errors[0]}" if errors else "",
        ))
    return summaries


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def target_checks(summaries: Sequence[Summary]) -> list[TargetCheck]:
    by_key = {(s.relay, s.direction): s for s in summaries}
    checks = []
    for direction in DIRECTIONS:
        zc = by_key.get((ZCRELAY, direction))
        hp = by_key.get((HAPROXY_SPLICE, direction))
        so = by_key.get((SOCAT, direction))
        get = lambda s, attr: getattr(s, attr) if s else None  # noqa: E731
        specs = (
            ("zcrelay / haproxy-splice throughput",
             ratio(get(zc, "gbps"), get(hp, "gbps")), ">= 1.0", lambda v: v >= 1.0),
            ("zcrelay / haproxy-splice CPU-s/GB",
             ratio(get(zc, "cpu_per_gb"), get(hp, "cpu_per_gb")), "<= 1.2",
             lambda v: v <= 1.2),
            ("zcrelay / socat throughput",
             ratio(get(zc, "gbps"), get(so, "gbps")), ">= 2.0", lambda v: v >= 2.0),
        )
        checks.extend(
            TargetCheck(label, direction, value, target,
                        ok(value) if value is not None else None)
            for label, value, target, ok in specs
        )
    return checks


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


HEADERS = ("relay", "direction", "Gbit/s", "ratio to direct", "CPU-s/GB", "runs", "note")


def fmt(value: Optional[float], digits: int = 2) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def table_rows(summaries: Sequence[Summary]) -> list[tuple[str, ...]]:
    return [
        (s.relay, direction_label(s.direction), fmt(s.gbps), fmt(s.ratio_to_direct),
         fmt(s.cpu_per_gb, 3), str(s.runs), s.note[:70])
        for s in summaries
    ]


def direction_label(direction: str) -> str:
    return {"fwd": "c->s", "rev": "s->c (-R)"}[direction]


def render_text(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in (HEADERS, *rows)) for i in range(len(HEADERS))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(HEADERS), line(["-" * w for w in widths]),
                      *(line(r) for r in rows)])


def render_markdown(rows: Sequence[Sequence[str]]) -> str:
    line = lambda r: "| " + " | ".join(r) + " |"  # noqa: E731
    align = ["---", "---", "---:", "---:", "---:", "---:", "---"]
    return "\n".join([line(HEADERS), line(align), *(line(r) for r in rows)])


def render_targets(checks: Sequence[TargetCheck], markdown: bool) -> str:
    lines = []
    for c in checks:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[c.met]
        text = (f"{c.label} [{direction_label(c.direction)}]: "
                f"{fmt(c.value)} (target {c.target}) -> {verdict}")
        lines.append(f"- {text}" if markdown else f"target: {text}")
    return "\n".join(lines)


def render(report: Report, markdown: bool) -> str:
    rows = table_rows(report.summaries)
    header = (f"zcrelay forward benchmark: {time.strftime('%Y-%m-%d %H:%M %Z')}, "
              f"kernel {platform.release()}, {os.cpu_count()} CPUs, "
              f"{report.seconds:g} s per run, median of {report.repeat}")
    parts = [header, "", render_markdown(rows) if markdown else render_text(rows),
             "", render_targets(report.targets, markdown)]
    if report.skipped:
        parts += ["", "skipped:", *(f"- {s}" for s in report.skipped)]
    return "\n".join(parts)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="iperf3 duration per measurement (default 5)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="interleaved rounds; the median is reported (default 1)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as markdown")
    parser.add_argument("--only", nargs="+", metavar="RELAY",
                        choices=[s.name for s in RELAYS],
                        help="run only these relays (direct is always included)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeat < 1:
        parser.error("--seconds must be > 0 and --repeat >= 1")
    return args


def selected_relays(only: Optional[Sequence[str]]) -> list[RelaySpec]:
    if not only:
        return list(RELAYS)
    return [s for s in RELAYS if s.name == "direct" or s.name in only]


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    # Ctrl-C / SIGTERM -> KeyboardInterrupt -> every finally stops its
    # processes.  SIGINT is re-armed explicitly because Python leaves it
    # ignored when started in the background by a non-interactive shell.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    if shutil.which("iperf3") is None:
        print(f"iperf3 not installed; nothing to measure (install: {INSTALL_HINT})")
        return 0
    report = Report(args.seconds, args.repeat)
    try:
        with tempfile.TemporaryDirectory(prefix="zcrelay-bench-") as tmp:
            results = run_all(selected_relays(args.only), args.seconds,
                              args.repeat, Path(tmp), report.skipped)
    except KeyboardInterrupt:
        print("interrupted; all helper processes stopped", file=sys.stderr)
        return 130
    report.summaries = summarise(results)
    report.targets = target_checks(report.summaries)
    print(render(report, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
