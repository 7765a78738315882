#!/usr/bin/env python3
"""zcrelay benchmark suite: every relay, every workload, one run, ratios to direct.

Relays (all on 127.0.0.1, each in front of the same upstream):
    direct, zcrelay forward, zcrelay forward --no-splice, socat, socat -b 65536,
    HAProxy TCP mode without splice, HAProxy with splice-request/response and
    tune.pipesize 1048576, benchmarks/trio_relay.py (a hand-written trio relay),
    and benchmarks/splice_floor_relay.py (the barest Python splice loop: what no
    Python relay that splices can beat by much, and how far zcrelay is from it).
Workloads:
    iperf3 single stream each way, iperf3 -P 16, wrk keep-alive req/s against
    nginx serving a small file, wrk "Connection: close" req/s, a 1 GiB download
    with curl; the relay's CPU time (whole process tree) per GB or per request;
    and, in a separate short run under ``strace -c -f -p PID``, the relay's
    payload syscalls (read/write/recv/send families, splice, sendfile) per GB
    and per keep-alive request.
Then the other commands' workloads, as in their issues: ``send`` (a 1 GiB
file to a local sink with zcrelay send, socat, nc and pv | nc, and a 1 GiB
connect/listen pipeline; send_bench.py) and ``tee`` (1 and 4 GiB through
``pv -q FILE | X | pv -q >/dev/null`` with X zcrelay tee, GNU tee and cat,
OUT on a tmpfs and /dev/null; tee_bench.py).

Rounds are interleaved (round 1: every workload through every relay, then
round 2, ...; each round starts at a different relay, forward_bench.rotated)
and the tables show medians.  The suite installs nothing: it
checks for iperf3, socat, haproxy, wrk, nginx, strace and curl, prints what
is missing with the apt-get line and skips what needs it.  A benchmark, not
a test: it exits 0 whatever the numbers (130 if interrupted, 2 on bad usage).

Usage:  PYTHONPATH=. .venv/bin/python benchmarks/run.py
            [--repeat 3] [--seconds 5] [--quick] [--only NAME...]
            [--out DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import forward_bench as fb  # noqa: E402  (helpers: spawn/stop, /proc CPU, launchers)
import send_bench  # noqa: E402  (issue 3's file send workload)
import tee_bench  # noqa: E402  (issue 4's tee workload)

REPO = fb.REPO_ROOT
LOOP = fb.LOOPBACK
PEERS = ("iperf3", "socat", "haproxy", "wrk", "nginx", "strace", "curl")
APT_LINE = "apt-get update && apt-get install -y " + " ".join(PEERS)
SMALL_FILE_SIZE = 1024
PAYLOAD_SYSCALLS = {
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "recvfrom", "sendto", "recvmsg", "sendmsg", "recvmmsg",
    "sendmmsg", "splice", "vmsplice", "tee", "sendfile", "sendfile64",
    "copy_file_range",
}
SPLICE_FAMILY = {"splice", "vmsplice", "tee", "sendfile", "sendfile64", "copy_file_range"}


# --------------------------------------------------------------------------
# Relays
# --------------------------------------------------------------------------


def launch_port_printer(launch: fb.Launch, argv: Sequence[str]) -> fb.RunningRelay:
    """Start a relay that prints ``listening on 127.0.0.1:PORT`` on stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    log = launch.workdir / f"{launch.name}.log"
    proc = fb.spawn(argv, log, cwd=REPO, env=env)
    found: list[int] = []

    def bound() -> bool:
        match = fb.LISTEN_RE.search(log.read_text(errors="replace"))
        if match:
            found.append(int(match.group(1)))
        return bool(match)

    try:
        fb.wait_until(bound, proc, launch.name, log)
    except BaseException:
        fb.stop(proc)
        raise
    return fb.RunningRelay(launch.name, found[0], proc, log)


def launch_trio_relay(launch: fb.Launch) -> fb.RunningRelay:
    return launch_port_printer(launch, [
        sys.executable, str(HERE / "trio_relay.py"), "0",
        f"{LOOP}:{launch.upstream_port}"])


def launch_splice_floor(launch: fb.Launch) -> fb.RunningRelay:
    return launch_port_printer(launch, [
        sys.executable, str(HERE / "splice_floor_relay.py"), "0",
        f"{LOOP}:{launch.upstream_port}"])


@dataclass(frozen=True)
class Relay:
    name: str
    label: str
    needs: tuple[str, ...]
    launch: Optional[Callable[[fb.Launch], fb.RunningRelay]]  # None: direct
    only: Optional[tuple[str, ...]] = None  # the workloads it runs (None: all of them)


# The A/A control: a second HAProxy-splice, identical to the first, on the single-stream and
# keep-alive workloads, whose targets sit within this machine's noise. Its ratio to the first is 1 by
# construction; how far this run moves it shows how far the measurement alone moves a ratio.
CONTROL = "haproxy-splice-again"
CONTROLLED = "haproxy-splice"

RELAYS: tuple[Relay, ...] = (
    Relay("direct", "direct (no relay)", (), None),
    Relay("zcrelay", "zcrelay forward", (), fb.launch_zcrelay),
    Relay("zcrelay-nosplice", "zcrelay forward --no-splice", (),
          lambda l: fb.launch_zcrelay(l, "--no-splice")),
    Relay("zcrelay-w2", "zcrelay forward --workers 2", (),
          lambda l: fb.launch_zcrelay(l, "--workers", "2")),
    Relay("socat", "socat", ("socat",), fb.launch_socat),
    Relay("socat-b64k", "socat -b 65536", ("socat",),
          lambda l: fb.launch_socat(l, "-b", "65536")),
    Relay("haproxy-nosplice", "HAProxy tcp, no splice", ("haproxy",),
          lambda l: fb.launch_haproxy(l, False)),
    Relay("haproxy-splice", "HAProxy tcp, splice", ("haproxy",),
          lambda l: fb.launch_haproxy(l, True)),
    Relay(CONTROL, "HAProxy tcp, splice, again (A/A control)", ("haproxy",),
          lambda l: fb.launch_haproxy(l, True), only=("iperf1-fwd", "iperf1-rev", "http-keepalive")),
    Relay("trio-relay", "trio recv/send relay", (), launch_trio_relay),
    Relay("splice-floor", "splice floor (barest Python loop)", (), launch_splice_floor),
)
RELAY_NAMES = [r.name for r in RELAYS]


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    upstream: str  # "iperf" or "http"
    needs: tuple[str, ...]
    unit: str  # of the primary value; higher is better for all of them
    per: str   # "GB" (CPU-s per GB) or "req" (µs CPU per request)


WORKLOADS: tuple[Workload, ...] = (
    Workload("iperf1-fwd", "iperf3 1 stream c->s", "iperf", ("iperf3",), "Gbit/s", "GB"),
    Workload("iperf1-rev", "iperf3 1 stream s->c (-R)", "iperf", ("iperf3",), "Gbit/s", "GB"),
    Workload("iperf16", "iperf3 -P 16 c->s", "iperf", ("iperf3",), "Gbit/s", "GB"),
    Workload("http-keepalive", "wrk keep-alive", "http", ("wrk", "nginx"), "req/s", "req"),
    Workload("http-close", "wrk Connection: close", "http", ("wrk", "nginx"), "req/s", "req"),
    Workload("download", "1 GiB download (curl)", "http", ("curl", "nginx"), "Gbit/s", "GB"),
)
WORKLOAD_NAMES = [w.name for w in WORKLOADS]
STRACE_NAME = "strace"
# Workloads of the other commands, run after the relays (no relay in front of them):
# `zcrelay send` (send_bench.py, issue 3) and `zcrelay tee` (tee_bench.py, issue 4).
TOOL_NAMES = ["send", "tee"]
TOOL_PEERS = {"send": ("socat", "nc", "pv"), "tee": ("pv", "tee")}


@dataclass
class Run:
    relay: str
    workload: str
    value: Optional[float] = None      # Gbit/s or req/s
    amount: float = 0.0                # bytes moved or requests served
    cpu: Optional[float] = None        # relay CPU seconds (process tree)
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)
    round: int = 0                     # which interleaved round (pairs runs for ratios)

    @property
    def cpu_cost(self) -> Optional[float]:
        """CPU-s per GB, or µs CPU per request."""
        if self.cpu is None or self.amount <= 0:
            return None
        if self.workload.startswith("http-"):
            return self.cpu / self.amount * 1e6
        return self.cpu / (self.amount / 1e9)


# --------------------------------------------------------------------------
# Upstreams: iperf3 -s and nginx
# --------------------------------------------------------------------------


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {host}:{port} backlog=4096;
        root {d}/www;
    }}
}}
"""


class Nginx:
    """nginx on 127.0.0.1 with its own prefix, serving small.bin and big.bin."""

    def __init__(self, workdir: Path, big_size: int) -> None:
        self.dir = workdir / "nginx"
        (self.dir / "www").mkdir(parents=True)
        for path in (workdir, self.dir, self.dir / "www"):
            path.chmod(0o755)  # the workers run as nobody when we are root
        (self.dir / "www" / "small.bin").write_bytes(b"x" * SMALL_FILE_SIZE)
        with open(self.dir / "www" / "big.bin", "wb") as fh:
            fh.truncate(big_size)  # sparse: instant to create
        buf = bytearray(8 << 20)
        with open(self.dir / "www" / "big.bin", "rb") as fh:
            while fh.readinto(buf):  # pull it into the page cache before the first download
                pass
        for f in (self.dir / "www").iterdir():
            f.chmod(0o644)
        self.port = fb.free_port()
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(d=self.dir, host=LOOP, port=self.port))
        self.argv = ["nginx", "-p", f"{self.dir}/", "-c", str(self.conf),
                     "-e", str(self.dir / "error.log")]
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = self.dir / "stdout.log"
        self.proc = fb.spawn(self.argv, log)
        try:
            fb.wait_until(lambda: fb.is_listening(self.port), self.proc, "nginx",
                          self.dir / "error.log")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.proc is not None:
            fb.stop(self.proc)
            self.proc = None


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------


def iperf_cmd(port: int, seconds: float, reverse=False, parallel=1) -> list[str]:
    argv = ["iperf3", "-c", LOOP, "-p", str(port), "-t", f"{seconds:g}", "-J"]
    if reverse:
        argv.append("-R")
    if parallel > 1:
        argv += ["-P", str(parallel)]
    return argv


def run_iperf(port: int, seconds: float, reverse=False, parallel=1) -> tuple[float, int]:
    done = subprocess.run(iperf_cmd(port, seconds, reverse, parallel),
                          capture_output=True, text=True, timeout=seconds + 30,
                          stdin=subprocess.DEVNULL)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 rc={done.returncode}: {done.stderr.strip()[:200]}")
    if "error" in result:
        raise RuntimeError(f"iperf3: {result['error']}")
    received = result["end"]["sum_received"]
    return float(received["bits_per_second"]), int(received["bytes"])


def wrk_cmd(port: int, seconds: float, close: bool) -> list[str]:
    argv = ["wrk", "-t1", "-c16", f"-d{seconds:g}s"]
    if close:
        argv += ["-H", "Connection: close"]
    return argv + [f"http://{LOOP}:{port}/small.bin"]


def run_wrk(port: int, seconds: float, close: bool) -> tuple[float, int, str]:
    """(requests/s, requests, note) from wrk's text output."""
    done = subprocess.run(wrk_cmd(port, seconds, close), capture_output=True,
                          text=True, timeout=seconds + 30, stdin=subprocess.DEVNULL)
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise RuntimeError(f"wrk rc={done.returncode}: {(out + done.stderr).strip()[-200:]}")
    notes = []
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"wrk: {m.group(1)} non-2xx responses")
    if m := re.search(r"Socket errors: (.*)", out):
        notes.append("socket errors: " + m.group(1).strip())
    return float(rps.group(1)), int(total.group(1)), "; ".join(notes)


def curl_cmd(port: int) -> list[str]:
    return ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download}",
            f"http://{LOOP}:{port}/big.bin"]


def run_download(port: int, expect: int) -> tuple[float, int]:
    """(bits/s, bytes) for one curl download, wall clock measured here."""
    t0 = time.perf_counter()
    done = subprocess.run(curl_cmd(port), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    size = int(done.stdout.strip() or 0) if done.returncode == 0 else 0
    if done.returncode != 0 or size != expect:
        raise RuntimeError(f"curl rc={done.returncode}, {size} of {expect} bytes")
    return size * 8 / wall, size


# --------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------


@dataclass
class Instance:
    """One relay started twice: in front of iperf3 -s and in front of nginx."""

    relay: Relay
    iperf: Optional[fb.RunningRelay] = None
    http: Optional[fb.RunningRelay] = None

    def target(self, upstream: str) -> Optional[fb.RunningRelay]:
        return self.iperf if upstream == "iperf" else self.http


@dataclass
class Env:
    args: argparse.Namespace
    workdir: Path
    iperf: Optional[fb.IperfServer] = None
    nginx: Optional[Nginx] = None


def child_pids(pid: int) -> list[int]:
    """Child processes of ``pid`` (socat forks one per connection)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            st = fb.read_stat(int(p.name))
            if st is not None and st[0] == pid:
                out.append(int(p.name))
    return out


def settle(pid: int, baseline: int, timeout: float = 2.0) -> None:
    """Wait until a forking relay has exited and reaped its per-connection children.

    A child that exited but is not reaped yet may show no CPU time in
    /proc, while once reaped its time is in the parent's cutime/cstime; reading
    too early lost a socat child's whole CPU time (0.000 CPU-s/GB).
    """
    deadline = time.monotonic() + timeout
    while len(child_pids(pid)) > baseline and time.monotonic() < deadline:
        time.sleep(0.02)


def measure(inst: Instance, wl: Workload, env: Env) -> Run:
    target = inst.target(wl.upstream)
    run = Run(inst.relay.name, wl.name)
    if target is None:
        run.error = "not started"
        return run
    secs = env.args.seconds
    try:
        target.check_alive()
        pid = target.proc.pid if target.proc else None
        before = fb.tree_cpu_seconds(pid) if pid else None
        children_before = len(child_pids(pid)) if pid else 0
        if wl.name.startswith("iperf"):
            bps, nbytes = run_iperf(target.port, secs, reverse=wl.name == "iperf1-rev",
                                    parallel=16 if wl.name == "iperf16" else 1)
            run.value, run.amount = bps / 1e9, nbytes
        elif wl.name.startswith("http-"):
            rps, nreq, note = run_wrk(target.port, secs, close=wl.name == "http-close")
            run.value, run.amount = rps, nreq
            if note:
                run.extra["note"] = note
        else:
            bps, nbytes = run_download(target.port, env.args.big)
            run.value, run.amount = bps / 1e9, nbytes
        if pid:
            settle(pid, children_before)
            run.cpu = fb.tree_cpu_seconds(pid) - before
        target.check_alive()
    except (RuntimeError, fb.RelayUnavailable, subprocess.TimeoutExpired,
            KeyError, ValueError, OSError) as exc:
        run.value = None
        run.error = str(exc) or repr(exc)
        if wl.upstream == "iperf" and env.iperf is not None:
            env.iperf.restart()  # a failed run may leave iperf3 -s wedged
    return run


# --------------------------------------------------------------------------
# strace: payload syscalls per GB and per keep-alive request
# --------------------------------------------------------------------------


STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_strace(text: str) -> dict[str, int]:
    counts = {}
    for line in text.splitlines():
        m = STRACE_LINE.match(line)
        if m and m.group(2) != "total":
            counts[m.group(2)] = int(m.group(1))
    return counts


def traced(pid: int, out: Path, body: Callable[[], tuple[float, int]]) -> tuple[dict, float]:
    """Run ``body`` with ``strace -c -f`` attached to ``pid`` and its children (the workers
    of ``--workers``, which exist before the trace starts); (counts, amount)."""
    log = out.with_suffix(".log")
    pids = [pid, *child_pids(pid)]
    argv = ["strace", "-c", "-f", "-o", str(out)] + [a for p in pids for a in ("-p", str(p))]
    proc = fb.spawn(argv, log)
    try:
        def attached() -> bool:
            for p in pids:
                status = Path(f"/proc/{p}/status").read_text()
                if re.search(r"TracerPid:\s+(\d+)", status).group(1) == "0":
                    return False
            return True
        fb.wait_until(attached, proc, "strace", log)
        time.sleep(0.3)  # let -f reach every thread
        _, amount = body()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)  # detach and write the summary
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fb.stop(proc)
    return parse_strace(out.read_text() if out.exists() else ""), amount


def strace_relay(inst: Instance, env: Env) -> Run:
    run = Run(inst.relay.name, STRACE_NAME)
    secs = env.args.strace_seconds
    try:
        if inst.iperf is not None and env.iperf is not None:
            counts, nbytes = traced(
                inst.iperf.proc.pid, env.workdir / f"strace-{inst.relay.name}-iperf.txt",
                lambda: run_iperf(inst.iperf.port, secs))
            gb = nbytes / 1e9
            payload = sum(v for k, v in counts.items() if k in PAYLOAD_SYSCALLS)
            splice = sum(v for k, v in counts.items() if k in SPLICE_FAMILY)
            run.extra.update(
                bytes=nbytes,
                payload_per_gb=payload / gb if gb else None,
                splice_per_gb=splice / gb if gb else None,
                rw_per_gb=(payload - splice) / gb if gb else None,
                all_per_gb=sum(counts.values()) / gb if gb else None,
                top=sorted(counts.items(), key=lambda kv: -kv[1])[:6])
        if inst.http is not None and env.nginx is not None:
            def wrk_body() -> tuple[float, int]:
                rps, nreq, _ = run_wrk(inst.http.port, secs, close=False)
                return rps, nreq
            counts, nreq = traced(
                inst.http.proc.pid, env.workdir / f"strace-{inst.relay.name}-http.txt",
                wrk_body)
            payload = sum(v for k, v in counts.items() if k in PAYLOAD_SYSCALLS)
            run.extra.update(
                requests=nreq,
                payload_per_req=payload / nreq if nreq else None,
                all_per_req=sum(counts.values()) / nreq if nreq else None,
                top_http=sorted(counts.items(), key=lambda kv: -kv[1])[:6])
    except (RuntimeError, fb.RelayUnavailable, subprocess.TimeoutExpired,
            KeyError, ValueError, OSError, AttributeError) as exc:
        run.error = str(exc) or repr(exc)
    return run


# --------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def describe(run: Run, rnd: str) -> str:
    if run.error:
        return f"{rnd} {run.workload:15} {run.relay:17} FAILED: {run.error[:150]}"
    unit = "req/s" if run.workload.startswith("http-") else "Gbit/s"
    cost = run.cpu_cost
    cost_txt = ""
    if cost is not None:
        cost_txt = (f"  {cost:8.1f} us CPU/req" if unit == "req/s"
                    else f"  {cost:7.3f} CPU-s/GB")
    value = f"{run.value:10.0f}" if unit == "req/s" else f"{run.value:10.2f}"
    return f"{rnd} {run.workload:15} {run.relay:17} {value} {unit}{cost_txt}"


def start_instances(relays: Sequence[Relay], env: Env, skipped: list[str],
                    stack: contextlib.ExitStack) -> list[Instance]:
    out = []
    for relay in relays:
        missing = [p for p in relay.needs if shutil.which(p) is None]
        if missing:
            skipped.append(f"{relay.name}: {' '.join(missing)} not installed")
            continue
        inst = Instance(relay)
        upstreams = {w.upstream for w in WORKLOADS if relay.only is None or w.name in relay.only}
        for upstream, server in (("iperf", env.iperf), ("http", env.nginx)):
            if server is None or upstream not in upstreams:
                continue
            if relay.launch is None:
                running = fb.RunningRelay(relay.name, server.port)
            else:
                try:
                    running = relay.launch(fb.Launch(
                        server.port, env.workdir, f"{relay.name}-{upstream}"))
                except fb.RelayUnavailable as exc:
                    skipped.append(f"{relay.name} (-> {upstream}): failed to start: {exc}")
                    continue
                stack.callback(fb.stop, running.proc)
            setattr(inst, upstream, running)
        if inst.iperf or inst.http:
            out.append(inst)
    return out


@dataclass
class Results:
    runs: list[Run] = field(default_factory=list)
    straces: list[Run] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    load_before: str = ""
    load_after: str = ""
    tee_rows: list = field(default_factory=list)  # tee_bench.measure's rows
    send: Optional[tuple] = None  # send_bench.measure's (startup, send runs, pipeline runs)
    send_size: int = 0


def run_suite(args, relays: list[Relay], workloads: list[Workload],
              do_strace: bool) -> Results:
    res = Results(started=time.time(), load_before=loadavg())
    missing = [p for p in PEERS if shutil.which(p) is None]
    if missing:
        res.skipped.append(f"not installed: {' '.join(missing)} (install: {APT_LINE})")
    usable = []
    for wl in workloads:
        lacks = [p for p in wl.needs if shutil.which(p) is None]
        if lacks:
            res.skipped.append(f"workload {wl.name}: needs {' '.join(lacks)}")
        else:
            usable.append(wl)
    if do_strace and shutil.which("strace") is None:
        res.skipped.append("strace counts: strace not installed")
        do_strace = False
    with tempfile.TemporaryDirectory(prefix="zcrelay-suite-") as tmp, \
            contextlib.ExitStack() as stack:
        env = Env(args, Path(tmp))
        need_iperf = any(w.upstream == "iperf" for w in usable) or \
            (do_strace and shutil.which("iperf3"))
        need_http = any(w.upstream == "http" for w in usable) or \
            (do_strace and shutil.which("wrk") and shutil.which("nginx"))
        if need_iperf and shutil.which("iperf3"):
            env.iperf = fb.IperfServer(env.workdir)
            stack.callback(env.iperf.close)
            env.iperf.start()
        if need_http and shutil.which("nginx"):
            nginx = Nginx(env.workdir, args.big)
            stack.callback(nginx.close)
            try:
                nginx.start()
                env.nginx = nginx
                res.configs["nginx.conf"] = nginx.conf.read_text()
            except fb.RelayUnavailable as exc:
                res.skipped.append(f"nginx failed to start: {exc}")
                usable = [w for w in usable if w.upstream != "http"]
        usable = [w for w in usable if (env.iperf if w.upstream == "iperf" else env.nginx)]
        instances = start_instances(relays, env, res.skipped, stack)
        record_commands(res, instances, env, args)
        progress(f"started {len(instances)} relays; {len(usable)} workloads x "
                 f"{args.repeat} rounds" + (" + strace" if do_strace else ""))
        for rnd in range(args.repeat):
            for wl in usable:
                for inst in fb.rotated(instances, rnd, args.repeat):
                    if inst.relay.only is not None and wl.name not in inst.relay.only:
                        continue
                    run = measure(inst, wl, env)
                    run.round = rnd
                    res.runs.append(run)
                    progress(describe(run, f"[{rnd + 1}/{args.repeat}]"))
        if do_strace:
            for inst in instances:
                if inst.relay.launch is None or inst.relay.only is not None:
                    continue
                run = strace_relay(inst, env)
                res.straces.append(run)
                progress(f"strace {inst.relay.name}: "
                         + (f"FAILED {run.error}" if run.error else
                            f"{fmt(run.extra.get('payload_per_gb'), 0)} payload syscalls/GB, "
                            f"{fmt(run.extra.get('payload_per_req'), 1)} per request"))
    res.finished = time.time()
    res.load_after = loadavg()
    return res


def run_tools(args, tools: Sequence[str], res: Results) -> None:
    """The send and tee workloads, after the relays: each as its own bench script measures it."""
    for tool in tools:
        lacks = [p for p in TOOL_PEERS[tool] if shutil.which(p) is None]
        if tool == "tee" and "pv" in lacks:
            res.skipped.append("workload tee: needs pv (apt-get install -y pv)")
            continue
        if lacks:  # send: the rows that need them are skipped, the others run
            res.skipped.append(f"workload {tool}: rows needing {' '.join(lacks)} skipped "
                               "(apt-get install -y socat netcat-openbsd pv)")
        progress(f"{tool}: {args.repeat} rounds")
        if tool == "tee":
            res.tee_rows = tee_bench.measure(args.tee_sizes, args.repeat, log=progress)
            res.commands["tee"] = ("pv -q $SRC | X | pv -q >/dev/null, X = `python -m zcrelay tee OUT`, "
                                   "`tee OUT` or `cat`; SRC: random bytes on /dev/shm; OUT: a file on a "
                                   "tmpfs mounted for the run (/dev/shm when not root), or /dev/null")
        else:
            res.send_size = args.send_size
            res.send = send_bench.measure(args.send_size, args.repeat, log=progress)
            rows = send_bench.send_rows(Path("$FILE"), 0).items()
            res.commands["send"] = " ; ".join(f"{cmd}" for _, cmd in rows if cmd).replace(
                "127.0.0.1:0", "127.0.0.1:SINK_PORT").replace("127.0.0.1 0", "127.0.0.1 SINK_PORT")
            res.commands["send pipelines"] = " ; ".join(
                f"{rcv} < /dev/null | cat > /dev/null, then cat $FILE | {snd}"
                for rcv, snd in send_bench.PIPELINES.values()).replace("{port}", "PORT").replace(
                "{zc}", "python -m zcrelay")


def tool_targets(res: Results) -> list[Target]:
    """Issue 3's targets for send and issue 4's for tee, from the same run."""
    found = []
    if res.send:
        found += send_bench.targets(res.send[1], res.send_size)
    if res.tee_rows:
        found += tee_bench.targets(res.tee_rows)
    return [Target(label, value, f"{op} {bound:g}", met) for label, value, op, bound, met in found]


def tool_tables(res: Results) -> list[tuple[str, str]]:
    out = []
    if res.send:
        startup, send_runs, pipe_runs = res.send
        gib = res.send_size / (1 << 30)
        intro = (f"zcrelay's start-up (a send of an empty file): {startup[0]:.2f} s wall, "
                 f"{startup[1]:.2f} s CPU; the last column takes it out.")
        body = send_bench.table(send_runs, res.send_size, True,
                                f"{gib:g} GiB file to a local sink (sink's CPU not counted)", startup, 1)
        body += send_bench.table(pipe_runs, res.send_size, True,
                                 f"{gib:g} GiB pipeline: cat FILE | sender → receiver | cat > /dev/null "
                                 "(all CPU counted)", startup, 2)
        out.append(("zcrelay send (issue 3): median of the rounds",
                    "\n".join([intro, ""] + [line.replace("### ", "#### ") for line in body]).rstrip()))
    if res.tee_rows:
        out.append(("zcrelay tee (issue 4): `pv -q FILE | X | pv -q >/dev/null`, median of the rounds",
                    "CPU is X's own (user+system, bash's `times` after X); throughput is the pipeline's wall "
                    "time, zcrelay's start-up included.\n\n" + tee_bench.render(res.tee_rows, True)))
    return out


def record_commands(res: Results, instances: list[Instance], env: Env, args) -> None:
    """The exact command lines, with the random ports named."""
    ports = {}
    if env.iperf:
        ports[env.iperf.port] = "IPERF_PORT"
    if env.nginx:
        ports[env.nginx.port] = "NGINX_PORT"
    for inst in instances:
        for r in (inst.iperf, inst.http):
            if r is not None and r.proc is not None:
                ports.setdefault(r.port, "RELAY_PORT")

    def clean(argv: Sequence[str]) -> str:
        text = shlex.join(str(a) for a in argv)
        text = text.replace(str(env.workdir), "$TMP").replace(sys.executable, "python")
        text = text.replace(str(REPO) + "/", "")
        for port, name in ports.items():
            text = re.sub(rf"(?<=[:=]){port}\b", name, text)
            text = re.sub(rf"(?<= ){port}\b", name, text)
        return text

    for inst in instances:
        r = inst.iperf or inst.http
        if r is not None and r.proc is not None:
            res.commands[inst.relay.name] = clean(r.proc.args)
            if inst.relay.name.startswith("haproxy"):
                cfg = env.workdir / f"{r.name}.cfg"
                res.configs[f"{inst.relay.name}.cfg"] = clean_text(cfg.read_text(), ports)
    if env.iperf:
        res.commands["iperf3 server"] = clean(["iperf3", "-s", "-B", LOOP, "-p", env.iperf.port])
    if env.nginx:
        res.commands["nginx"] = clean(env.nginx.argv)
        res.configs["nginx.conf"] = clean_text(
            env.nginx.conf.read_text().replace(str(env.workdir), "$TMP"), ports)
    s = args.seconds
    res.commands["iperf1-fwd"] = clean(iperf_cmd(0, s)).replace(" 0 ", " RELAY_PORT ")
    res.commands["iperf1-rev"] = clean(iperf_cmd(0, s, reverse=True)).replace(" 0 ", " RELAY_PORT ")
    res.commands["iperf16"] = clean(iperf_cmd(0, s, parallel=16)).replace(" 0 ", " RELAY_PORT ")
    res.commands["http-keepalive"] = clean(wrk_cmd(0, s, False)).replace(":0/", ":RELAY_PORT/")
    res.commands["http-close"] = clean(wrk_cmd(0, s, True)).replace(":0/", ":RELAY_PORT/")
    res.commands["download"] = clean(curl_cmd(0)).replace(":0/", ":RELAY_PORT/") + \
        f"   (big.bin: {args.big} bytes, sparse; wall time measured around curl)"
    res.commands["strace"] = (
        "strace -c -f -o OUT -p RELAY_PID   while running  "
        + clean(iperf_cmd(0, args.strace_seconds)).replace(" 0 ", " RELAY_PORT ")
        + "   and then  " + clean(wrk_cmd(0, args.strace_seconds, False)).replace(":0/", ":RELAY_PORT/"))


def clean_text(text: str, ports: dict[int, str]) -> str:
    for port, name in ports.items():
        text = re.sub(rf":{port}\b", f":{name}", text)
    return text


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# --------------------------------------------------------------------------
# Summaries, targets
# --------------------------------------------------------------------------


def fmt(v: Optional[float], digits: int = 2) -> str:
    return f"{v:,.{digits}f}" if v is not None else "-"


@dataclass
class Cell:
    value: Optional[float]
    cost: Optional[float]
    ratio: Optional[float]
    spread: tuple[Optional[float], Optional[float]]
    runs: int
    errors: list[str]


def summarise(res: Results) -> dict[tuple[str, str], Cell]:
    keys = list(dict.fromkeys((r.relay, r.workload) for r in res.runs))
    med = {}
    for key in keys:
        vals = [r.value for r in res.runs if (r.relay, r.workload) == key and r.value is not None]
        med[key] = statistics.median(vals) if vals else None
    cells = {}
    for key in keys:
        runs = [r for r in res.runs if (r.relay, r.workload) == key]
        vals = [r.value for r in runs if r.value is not None]
        costs = [r.cpu_cost for r in runs if r.value is not None and r.cpu_cost is not None]
        direct = med.get(("direct", key[1]))
        cells[key] = Cell(
            value=med[key],
            cost=statistics.median(costs) if costs else None,
            ratio=med[key] / direct if med[key] is not None and direct else None,
            spread=(min(vals), max(vals)) if vals else (None, None),
            runs=len(vals),
            errors=[r.error for r in runs if r.error],
        )
    return cells


@dataclass(frozen=True)
class Target:
    label: str
    value: Optional[float]
    target: str
    met: Optional[bool]
    paired: Optional[float] = None  # the median of the same ratio taken round by round
    control: Optional[float] = None  # the same ratio for the A/A control (see CONTROL)


HAPROXIES = ("haproxy-splice", "haproxy-nosplice")


def targets(cells: dict[tuple[str, str], Cell], runs: Sequence[Run] = ()) -> list[Target]:
    """The issue's targets, each a ratio of medians. Beside it, the median of the ratios
    taken within each round: runs of one round are minutes apart at most, so a machine that
    slows down or speeds up during the run moves both sides of those ratios together."""
    def val(relay, wl, attr="value"):
        c = cells.get((relay, wl))
        return getattr(c, attr) if c else None

    def r(a, b):
        return a / b if a is not None and b else None

    def best_haproxy(wl):
        vals = [v for v in (val(h, wl) for h in HAPROXIES) if v]
        return max(vals) if vals else None

    def per_round(wl: str, attr: str) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for run in runs:
            v = run.cpu_cost if attr == "cost" else run.value
            if run.workload == wl and run.value is not None and v is not None:
                out.setdefault(run.round, {})[run.relay] = v
        return out

    def paired(wl: str, other: str, attr: str = "value") -> Optional[float]:
        ratios = []
        for by_relay in per_round(wl, attr).values():
            if other == "best-haproxy":
                b = max((by_relay[h] for h in HAPROXIES if h in by_relay), default=None)
            else:
                b = by_relay.get(other)
            if "zcrelay" in by_relay and b:
                ratios.append(by_relay["zcrelay"] / b)
        return statistics.median(ratios) if ratios else None

    out = []

    def add(label, value, op, bound, pair=None, control=None):
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append(Target(label, value, f"{op} {bound:g}", met, pair, control))

    for wl, d in (("iperf1-fwd", "c->s"), ("iperf1-rev", "s->c")):
        zc = val("zcrelay", wl)
        add(f"single stream {d}: zcrelay / haproxy-splice throughput",
            r(zc, val("haproxy-splice", wl)), ">=", 1.05, paired(wl, "haproxy-splice"),
            r(val(CONTROL, wl), val(CONTROLLED, wl)))
        add(f"single stream {d}: zcrelay / socat throughput", r(zc, val("socat", wl)), ">=", 2.0,
            paired(wl, "socat"))
        add(f"single stream {d}: zcrelay / trio-relay throughput",
            r(zc, val("trio-relay", wl)), ">=", 1.5, paired(wl, "trio-relay"))
        add(f"single stream {d}: zcrelay / haproxy-splice CPU-s per GB",
            r(val("zcrelay", wl, "cost"), val("haproxy-splice", wl, "cost")), "<=", 1.0,
            paired(wl, "haproxy-splice", "cost"), r(val(CONTROL, wl, "cost"), val(CONTROLLED, wl, "cost")))
    for wl, name, hb, sb in (("http-keepalive", "keep-alive", 0.9, 1.2),
                              ("http-close", "Connection: close", 0.5, 2.0)):
        zc = val("zcrelay", wl)
        add(f"{name} req/s: zcrelay / best HAProxy", r(zc, best_haproxy(wl)), ">=", hb,
            paired(wl, "best-haproxy"), r(val(CONTROL, wl), val(CONTROLLED, wl)))
        add(f"{name} req/s: zcrelay / socat", r(zc, val("socat", wl)), ">=", sb, paired(wl, "socat"))
    return out


def verdict(t: Target) -> str:
    return {True: "MET", False: "NOT MET", None: "n/a"}[t.met]


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    line = lambda r: "| " + " | ".join(r) + " |"  # noqa: E731
    seps = ["---:" if a == "r" else "---" for a in align]
    return "\n".join([line(headers), line(seps), *(line(r) for r in rows)])


def relay_order(res: Results) -> list[str]:
    seen = dict.fromkeys(r.relay for r in res.runs)
    seen.update(dict.fromkeys(r.relay for r in res.straces))
    return [n for n in RELAY_NAMES if n in seen]


def label_of(name: str) -> str:
    return next((r.label for r in RELAYS if r.name == name), name)


def value_cell(c: Optional[Cell], digits: int) -> str:
    if c is None:
        return "-"
    if c.value is None:
        return "failed" if c.errors else "-"
    text = fmt(c.value, digits)
    if c.ratio is not None:
        text += f" ({c.ratio:.2f}x)"
    return text


def tables(res: Results, cells) -> list[tuple[str, str]]:
    relays = relay_order(res)
    wls = [w for w in WORKLOADS if any(k[1] == w.name for k in cells)]
    thr = [w for w in wls if w.per == "GB"]
    http = [w for w in wls if w.per == "req"]
    out = []
    if thr:
        rows = [[label_of(n)] + [value_cell(cells.get((n, w.name)), 2) for w in thr]
                for n in relays]
        out.append(("Throughput, Gbit/s (ratio to direct)", md_table(
            ["relay"] + [w.label for w in thr], rows, "l" + "r" * len(thr))))
        rows = [[label_of(n)] + [fmt(cells[(n, w.name)].cost, 3) if (n, w.name) in cells
                                 else "-" for w in thr] for n in relays if n != "direct"]
        out.append(("Relay CPU seconds per GB moved (user+system, whole process tree)",
                    md_table(["relay"] + [w.label for w in thr], rows, "l" + "r" * len(thr))))
    if http:
        heads, rows = ["relay"], []
        for w in http:
            heads += [f"{w.label} req/s (ratio)", f"{w.label} µs CPU/req"]
        for n in relays:
            if not any((n, w.name) in cells for w in http):
                continue  # a relay that runs no HTTP workload (the A/A control, limited by --only)
            row = [label_of(n)]
            for w in http:
                c = cells.get((n, w.name))
                row += [value_cell(c, 0), fmt(c.cost, 1) if c else "-"]
            rows.append(row)
        out.append(("HTTP requests/s against nginx (small file), relay CPU per request",
                    md_table(heads, rows, "l" + "r" * (len(heads) - 1))))
    if res.straces:
        rows = []
        for s in res.straces:
            e = s.extra
            if s.error and not e:
                rows.append([label_of(s.relay), "failed: " + s.error[:60]] + ["-"] * 5)
                continue
            rows.append([label_of(s.relay), fmt(e.get("payload_per_gb"), 0),
                         fmt(e.get("splice_per_gb"), 0), fmt(e.get("rw_per_gb"), 0),
                         fmt(e.get("all_per_gb"), 0), fmt(e.get("payload_per_req"), 2),
                         fmt(e.get("all_per_req"), 2)])
        out.append(("Syscalls under `strace -c -f` (separate short run; strace slows the relay, "
                    "so only the counts mean something)", md_table(
                        ["relay", "payload syscalls/GB", "of which splice/sendfile",
                         "of which read/write/recv/send", "all syscalls/GB",
                         "payload syscalls per keep-alive request", "all syscalls per request"],
                        rows, "lrrrrrr")))
        rows = [[label_of(s.relay),
                 ", ".join(f"{k} {v}" for k, v in s.extra.get("top", [])),
                 ", ".join(f"{k} {v}" for k, v in s.extra.get("top_http", []))]
                for s in res.straces]
        out.append(("Most frequent syscalls in the strace runs (raw counts)",
                    md_table(["relay", "iperf3 run", "wrk keep-alive run"], rows, "lll")))
    return out


def spread_table(res: Results, cells) -> str:
    relays = relay_order(res)
    wls = [w for w in WORKLOADS if any(k[1] == w.name for k in cells)]
    rows = []
    for n in relays:
        row = [label_of(n)]
        for w in wls:
            c = cells.get((n, w.name))
            if c is None or c.value is None:
                row.append("-" if c is None else f"failed ({len(c.errors)})")
                continue
            d = 0 if w.per == "req" else 2
            text = f"{fmt(c.spread[0], d)} – {fmt(c.spread[1], d)} (n={c.runs})"
            if c.errors:
                text += f", {len(c.errors)} failed"
            row.append(text)
        rows.append(row)
    return md_table(["relay"] + [f"{w.label} [{w.unit}]" for w in wls], rows,
                    "l" + "r" * len(wls))


def machine_info() -> list[tuple[str, str]]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    return [("nproc", str(os.cpu_count())), ("kernel", platform.release()),
            ("CPU", cpu), ("memory", mem), ("OS", os_release())]


def os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return "?"


def versions() -> list[tuple[str, str]]:
    def first(argv, pattern=None):
        if shutil.which(argv[0]) is None:
            return "not installed"
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"? ({exc})"
        text = (done.stdout + done.stderr).strip()
        if pattern and (m := re.search(pattern, text)):
            return m.group(0)
        return text.splitlines()[0] if text else "?"

    try:
        import trio
        trio_v = trio.__version__
    except ImportError:
        trio_v = "not importable"
    return [
        ("python", platform.python_version() + f" ({sys.executable})"),
        ("trio", trio_v),
        ("zcrelay", git_rev()),
        ("haproxy", first(["haproxy", "-v"], r"HAProxy version \S+")),
        ("socat", first(["socat", "-V"], r"socat version \S+")),
        ("nginx", first(["nginx", "-v"])),
        ("wrk", first(["wrk", "-v"], r"wrk \S+")),
        ("iperf3", first(["iperf3", "--version"])),
        ("curl", first(["curl", "--version"], r"curl \S+")),
        ("strace", first(["strace", "-V"])),
        ("pv (send, tee)", first(["pv", "--version"], r"pv \S+")),
        ("GNU tee (tee)", first(["tee", "--version"])),
        ("nc (send)", first(["dpkg-query", "-W", "-f", "${Package} ${Version}", "netcat-openbsd"])
         if shutil.which("nc") else "not installed"),
    ]


def git_rev() -> str:
    """The commit measured, "-dirty" if the code differs from it. This run's own outputs
    (RESULTS.md and the plot, written before this is asked) do not count as changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)benchmarks/RESULTS.md", ":(exclude)benchmarks/results.png")
        rev = git("describe", "--always") + ("-dirty" if changed else "")
        return f"{rev} (branch {git('rev-parse', '--abbrev-ref', 'HEAD')}, working tree)"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def render_targets(tg: list[Target]) -> str:
    return md_table(["target", "measured", "round by round", "A/A control", "wanted", "verdict"],
                    [[t.label, fmt(t.value), fmt(t.paired), fmt(t.control) if t.control else "",
                      t.target, f"**{verdict(t)}**"] for t in tg],
                    "lrrrrl")


def render_markdown(res: Results, cells, tg: list[Target], args, plot: Optional[str],
                    tg_tools: Sequence[Target] = ()) -> str:
    start = datetime.datetime.fromtimestamp(res.started).strftime("%Y-%m-%d %H:%M")
    minutes = (res.finished - res.started) / 60
    parts = [
        "# zcrelay benchmark results",
        "",
        f"Generated by `benchmarks/run.py` on {start} (run took {minutes:.1f} min; "
        f"{args.repeat} interleaved round(s), medians shown; {args.seconds:g} s per iperf3/wrk "
        f"measurement; {args.big / 2**30:g} GiB download). Everything on 127.0.0.1. "
        f"Ratios are to the direct connection (no relay) in the same run. Load average before/after: "
        f"{res.load_before} / {res.load_after} — other jobs shared these cores, so expect noise.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine_info()),
        "",
        "## Versions",
        "",
        *(f"- {k}: {v}" for k, v in versions()),
        "",
    ]
    if tg:
        parts += [
            "## Targets (issue 6)",
            "",
            render_targets(tg),
            "",
            "\"best HAProxy\" is the faster of the two HAProxy rows for that workload; "
            "\"socat\" is socat with its default 8 KiB buffer. \"measured\" is the ratio of the "
            "medians, on which the verdict rests; \"round by round\" is the median of the same "
            "ratio taken within each round, where both sides ran minutes apart at most. "
            "\"A/A control\" is the same ratio of medians for a second HAProxy-splice, identical "
            "to the first, run in the same rounds: 1 by construction, so how far it lands from 1 "
            "is how far this run's measurement alone moves a ratio (a verdict nearer to its bound "
            "than that says nothing about the relays).",
            "",
        ]
    if tg_tools:
        parts += ["## Targets of the send and tee workloads (issues 3 and 4)", "",
                  md_table(["target", "measured", "wanted", "verdict"],
                           [[t.label, fmt(t.value), t.target, f"**{verdict(t)}**"] for t in tg_tools],
                           "lrrl"),
                  "", "Ratios of medians from the same run (zcrelay's start-up included).", ""]
    for title, table in tables(res, cells):
        parts += [f"## {title}", "", table, ""]
    if res.runs:
        parts += ["## Spread (min – max over rounds)", "", spread_table(res, cells), ""]
    for title, table in tool_tables(res):
        parts += [f"## {title}", "", table, ""]
    if plot:
        parts += ["## Plot", "", f"![ratios to direct]({plot})", ""]
    failures = [r for r in res.runs + res.straces if r.error]
    notes = [r for r in res.runs if r.extra.get("note")]
    if res.skipped or failures or notes:
        parts += ["## Skipped, failed and noted runs", ""]
        parts += [f"- skipped: {s}" for s in res.skipped]
        parts += [f"- {r.relay} / {r.workload}: FAILED: {r.error}" for r in failures]
        parts += [f"- {r.relay} / {r.workload}: {r.extra['note']}" for r in notes]
        parts.append("")
    parts += ["## Exact commands", "",
              "Ports are picked free at start-up; `RELAY_PORT` is the relay's listening port "
              "(or the upstream's for `direct`), `$TMP` the run's temporary directory. Every relay "
              "runs twice, once in front of iperf3 -s (shown) and once in front of nginx "
              "(same command with NGINX_PORT). zcrelay and trio_relay.py run with cwd and "
              "PYTHONPATH set to the repository root.", "",
              "```"]
    parts += [f"{k}: {v}" for k, v in res.commands.items()]
    parts += ["```", ""]
    for name, text in res.configs.items():
        parts += [f"`{name}`:", "", "```", text.rstrip(), "```", ""]
    parts += ["Suite command line: `" + " ".join(
        ["PYTHONPATH=. .venv/bin/python benchmarks/run.py"]
        + [shlex.quote(a) for a in args.argv]) + "`", ""]
    return "\n".join(parts)


def render_text(res: Results, cells, tg: list[Target], tg_tools: Sequence[Target] = ()) -> str:
    parts = []
    for title, table in tables(res, cells) + tool_tables(res):
        parts += [title, table, ""]
    parts += ["Targets:"]
    parts += [f"  {verdict(t):8} {t.label}: {fmt(t.value)} (round by round {fmt(t.paired)}; "
              + (f"A/A control {fmt(t.control)}; " if t.control else "")
              + f"want {t.target})" for t in tg]
    parts += [f"  {verdict(t):8} {t.label}: {fmt(t.value)} (want {t.target})" for t in tg_tools]
    if res.skipped:
        parts += ["", "Skipped:"] + [f"  {s}" for s in res.skipped]
    return "\n".join(parts)


def tool_ratios(res: Results) -> list[tuple[str, float]]:
    """The send and tee workloads as (label, zcrelay's throughput over its reference's)."""
    out = []
    for row in res.tee_rows:
        out.append((f"tee {row[0]}\nOUT={row[1]}\n/ GNU tee", row[tee_bench.HEAD.index("throughput zc/GNU")]))
    if res.send:
        _, send_runs, pipe_runs = res.send

        def wall(runs, name):
            ok = [r[0] for r in runs.get(name, []) if r[2] == 0]
            return statistics.median(ok) if ok else None
        for runs, zc, ref, label in ((send_runs, send_bench.SEND_ROW, send_bench.SOCAT_ROW, "send FILE\n/ socat"),
                                     (pipe_runs, "zcrelay connect/listen", "socat STDIO TCP",
                                      "connect/listen\npipeline / socat")):
            z, o = wall(runs, zc), wall(runs, ref)
            if z and o:
                out.append((label, o / z))
    return out


def make_plot(res: Results, cells, path: Path) -> Optional[str]:
    """Grouped bars of ratios to direct, and zcrelay send and tee against their references;
    None (with a message) if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    relays = [n for n in relay_order(res) if n not in ("direct", CONTROL)]
    wls = [w for w in WORKLOADS if any(k[1] == w.name for k in cells)]
    tools = tool_ratios(res)
    panels = bool(relays and wls) + bool(tools)
    if not panels:
        return None
    fig, axes = plt.subplots(panels, 1, figsize=(13, 5.5 * panels), squeeze=False)
    axes = list(axes[:, 0])
    if relays and wls:
        ax = axes.pop(0)
        width = 0.8 / len(relays)
        for i, name in enumerate(relays):
            ys = [(cells.get((name, w.name)) or Cell(None, None, None, (None, None), 0, [])).ratio
                  or 0 for w in wls]
            xs = [j + (i - (len(relays) - 1) / 2) * width for j in range(len(wls))]
            bars = ax.bar(xs, ys, width, label=label_of(name))
            for b, y in zip(bars, ys):
                if y:
                    ax.text(b.get_x() + b.get_width() / 2, y + 0.01, f"{y:.2f}",
                            ha="center", va="bottom", fontsize=6, rotation=90)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(wls)), [w.label for w in wls], fontsize=8)
        ax.set_ylabel("ratio to direct connection (higher is better)")
        ax.set_title("zcrelay vs other relays on loopback: throughput and requests/s, "
                     "median ratio to direct")
        ax.legend(fontsize=7, ncol=5, loc="upper right")
        # Headroom above the tallest bar and its label for the legend, which would cover them.
        ax.set_ylim(0, max(1.25, ax.get_ylim()[1] * 1.1) + 0.3)
    if tools:
        ax = axes.pop(0)
        bars = ax.bar(range(len(tools)), [v for _, v in tools], 0.6, color="tab:blue")
        for b, (_, v) in zip(bars, tools):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(tools)), [label for label, _ in tools], fontsize=8)
        ax.set_ylabel("zcrelay's throughput / the reference's")
        ax.set_title("zcrelay send, connect/listen and tee against socat and GNU tee "
                     "(wall time, zcrelay's start-up included; median of the rounds)")
        ax.set_ylim(0, max(1.25, ax.get_ylim()[1] * 1.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    raw = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=None,
                   help="interleaved rounds, median reported (default 3; 1 with --quick)")
    p.add_argument("--seconds", type=float, default=None,
                   help="duration of each iperf3 and wrk run (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 2 s runs, 256 MiB download, 1 s strace runs; "
                        "writes nothing unless --out is given")
    p.add_argument("--only", nargs="+", metavar="NAME", default=[],
                   choices=RELAY_NAMES + WORKLOAD_NAMES + [STRACE_NAME] + TOOL_NAMES,
                   help="relays and/or workloads to run (direct is always included); "
                        f"relays: {', '.join(RELAY_NAMES)}; workloads: "
                        f"{', '.join(WORKLOAD_NAMES + [STRACE_NAME] + TOOL_NAMES)}")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for RESULTS.md and results.png (default benchmarks/)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(raw)
    args.argv = raw
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.big = (256 << 20) if args.quick else (1 << 30)
    args.strace_seconds = 1.0 if args.quick else 2.0
    args.send_size = (256 << 20) if args.quick else (1 << 30)
    args.tee_sizes = [0.25] if args.quick else [1, 4]
    if args.seconds <= 0 or args.repeat < 1:
        p.error("--seconds must be > 0 and --repeat >= 1")
    if args.out is None and not args.quick:
        args.out = HERE
    if args.no_write:
        args.out = None
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, fb.raise_keyboard_interrupt)
    missing = [p for p in PEERS if shutil.which(p) is None]
    if missing:
        print(f"missing peer programs: {' '.join(missing)}\n  install with: {APT_LINE}\n"
              "  (the rows and workloads that need them are skipped)", file=sys.stderr)
    only_relays = [n for n in args.only if n in RELAY_NAMES]
    picked = [n for n in args.only if n in WORKLOAD_NAMES + [STRACE_NAME] + TOOL_NAMES]
    relays = [r for r in RELAYS if not only_relays or r.name == "direct"
              or r.name in only_relays]
    workloads = [w for w in WORKLOADS if not picked or w.name in picked]
    do_strace = not picked or STRACE_NAME in picked
    # The send and tee workloads involve no relay: asking for relays alone leaves them out.
    tools = [t for t in TOOL_NAMES if t in picked or not (picked or only_relays)]
    try:
        if workloads or do_strace:
            res = run_suite(args, relays, workloads, do_strace)
        else:
            res = Results(started=time.time(), load_before=loadavg())
        run_tools(args, tools, res)
        res.finished = time.time()
        res.load_after = loadavg()
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    cells = summarise(res)
    tg = targets(cells, res.runs) if res.runs else []
    tg_tools = tool_targets(res)
    print(render_text(res, cells, tg, tg_tools))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        plot = make_plot(res, cells, args.out / "results.png")
        md = args.out / "RESULTS.md"
        md.write_text(render_markdown(res, cells, tg, args, plot, tg_tools))
        print(f"\nwrote {md}" + (f" and {args.out / plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
