#!/usr/bin/env python3
"""1 GiB from a file to a local sink, and through a pipeline: zcrelay vs socat, nc and pv | nc.

Part 1, "send": a 1 GiB file (in the page cache) goes to a discarding TCP sink on 127.0.0.1:
    zcrelay send FILE (splice, and --method sendfile), socat -u FILE TCP, nc -N < FILE,
    pv FILE | nc -N.
Part 2, "pipeline": `cat FILE | SENDER` → `RECEIVER | cat > /dev/null`, with the pairs
    zcrelay connect/listen, socat -u STDIN TCP / TCP-LISTEN STDOUT, nc -N / nc -l.

For each row: wall time from start to the sender's exit, throughput (GiB moved / wall), and
CPU seconds (user + system of every process of the row, the sink excluded in part 1) per GiB.
zcrelay's wall time includes Python's start-up (~0.3 s here), which the others do not pay.

A benchmark, not a test: it prints and exits 0 whatever the numbers. Missing programs are
reported and their rows skipped. benchmarks/run.py runs the same as its `send` workload. Usage:
    .venv/bin/python benchmarks/send_bench.py [--size 1G] [--repeat 3] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZC = f"{shlex.quote(sys.executable)} -m zcrelay"
SINK = r"""
import socket, sys
s = socket.create_server(("127.0.0.1", 0), backlog=64)
print(s.getsockname()[1], flush=True)
buf = bytearray(4 << 20)
while True:
    c, _ = s.accept()
    with c:
        while c.recv_into(buf):
            pass
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                return True
    return False


def run_timed(script: str, timeout: float = 300) -> tuple[float, float, int]:
    """Run a bash script; return (wall seconds, CPU seconds of its process tree, exit code)."""
    cpu0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.run(["bash", "-c", script], env=env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(f"  ! exit {proc.returncode}: {script}\n    {proc.stderr.decode()[-300:]}", file=sys.stderr)
    return wall, children_cpu() - cpu0, proc.returncode


def send_rows(file: Path, port: int) -> dict[str, str | None]:
    f = shlex.quote(str(file))
    rows: dict[str, str | None] = {
        "zcrelay send (splice)": f"{ZC} send {f} 127.0.0.1:{port}",
        "zcrelay send --method sendfile": f"{ZC} send {f} 127.0.0.1:{port} --method sendfile",
        "socat FILE TCP": f"socat -u FILE:{f} TCP:127.0.0.1:{port}",
        "socat -b 1M FILE TCP": f"socat -b 1048576 -u FILE:{f} TCP:127.0.0.1:{port}",
        "nc -N < file": f"nc -N 127.0.0.1 {port} < {f}",
        "pv file | nc -N": f"pv -q {f} | nc -N 127.0.0.1 {port}",
    }
    for name, cmd in rows.items():
        if cmd and shutil.which(cmd.split()[0] if not cmd.startswith(shlex.quote(sys.executable)) else sys.executable) is None:
            rows[name] = None
    return rows


PIPELINES = {
    "zcrelay connect/listen": ("{zc} listen 127.0.0.1:{port}", "{zc} connect 127.0.0.1:{port}"),
    "socat STDIO TCP": ("socat -u TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr STDOUT",
                        "socat -u STDIN TCP:127.0.0.1:{port}"),
    "socat -b 1M STDIO TCP": ("socat -b 1048576 -u TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr STDOUT",
                              "socat -b 1048576 -u STDIN TCP:127.0.0.1:{port}"),
    "nc -l / nc -N": ("nc -l 127.0.0.1 {port}", "nc -N 127.0.0.1 {port}"),
}


def run_pipeline(name: str, file: Path) -> tuple[float, float, int]:
    port = free_port()
    recv, send = (part.format(zc=ZC, port=port) for part in PIPELINES[name])
    cpu0, t0 = children_cpu(), time.perf_counter()
    receiver = subprocess.Popen(["bash", "-c", f"{recv} < /dev/null | cat > /dev/null"], env=env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_listening(port):
        if time.monotonic() > deadline or receiver.poll() is not None:
            receiver.kill()
            receiver.wait()
            return float("nan"), float("nan"), 1
        time.sleep(0.005)  # polling /proc for the listener, not sleeping for readiness
    proc = subprocess.run(["bash", "-c", f"cat {shlex.quote(str(file))} | {send}"], env=env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    receiver.wait(120)
    wall = time.perf_counter() - t0
    return wall, children_cpu() - cpu0, proc.returncode or receiver.returncode


def table(results: dict[str, list[tuple[float, float, int]]], size: int, markdown: bool, title: str,
          startup: tuple[float, float] = (0.0, 0.0), starts: int = 1) -> list[str]:
    gib = size / (1 << 30)
    out = [f"### {title}", ""]
    rows = []
    base = None
    for name, runs in results.items():
        ok = [r for r in runs if r[2] == 0]
        if not ok:
            rows.append((name, "failed", "", "", ""))
            continue
        wall = statistics.median(r[0] for r in ok)
        cpu = statistics.median(r[1] for r in ok)
        rate = gib / wall
        if name.startswith("socat") and "-b" not in name:
            base = rate
        net = ""
        if name.startswith("zcrelay"):
            w, c = wall - startup[0] * starts, cpu - startup[1] * starts
            net = f"{gib / w:.2f} GiB/s, {c / gib:.2f} CPU s/GiB"
        rows.append((name, f"{wall:.2f}", f"{rate:.2f}", f"{cpu / gib:.2f}", rate, net))
    header = ("row", "wall s", "GiB/s", "CPU s/GiB", "× socat", "zcrelay without its start-up")
    lines = []
    for name, wall, rate, cpu, r, net in rows:
        ratio = f"{r / base:.2f}" if base and isinstance(r, float) else ""
        lines.append((name.replace("|", "\\|") if markdown else name, wall, rate, cpu, ratio, net))
    if markdown:
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        out.append("  ".join(f"{h:>12}" if i else f"{h:<32}" for i, h in enumerate(header)))
        out += ["  ".join(f"{c:>12}" if i else f"{c:<32}" for i, c in enumerate(line)) for line in lines]
    return out + [""]


# Issue 3's targets for `zcrelay send` (its default, splice), against the rows of the same run.
SEND_ROW = "zcrelay send (splice)"
SOCAT_ROW = "socat FILE TCP"


def measure(size: int, repeat: int, log=None) -> tuple[tuple[float, float], dict, dict]:
    """Send a `size`-byte file (page-cached) with every row and through every pipeline, rounds
    interleaved. Returns zcrelay's start-up (wall, CPU: a send of an empty file) and the runs
    of each send row and each pipeline: lists of (wall s, CPU s, exit code)."""
    log = log or (lambda text: print(text, file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="send_bench.") as tmp:
        file = Path(tmp) / "payload"
        block = os.urandom(min(size, 64 << 20)) or b"\0"
        with open(file, "wb") as f:
            left = size
            while left:
                left -= f.write(block[:left])
        subprocess.run(["cat", str(file)], stdout=subprocess.DEVNULL)  # into the page cache
        sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
        port = int(sink.stdout.readline())
        try:
            rows = send_rows(file, port)
            for name, cmd in rows.items():
                if cmd is None:
                    log(f"skipped {name}: program missing (apt-get install -y socat netcat-openbsd pv)")
            send_results: dict[str, list] = {name: [] for name, cmd in rows.items() if cmd}
            pipe_results: dict[str, list] = {name: [] for name in PIPELINES
                                             if shutil.which(PIPELINES[name][1].split()[0].replace("{zc}", "bash"))}
            empty = file.with_name("empty")
            empty.write_bytes(b"")
            # Start-up as `send` pays it: its own imports (trio, typer), a connect, no payload.
            startups = [run_timed(f"{ZC} send {empty} 127.0.0.1:{port}") for _ in range(repeat)]
            startup = (statistics.median(r[0] for r in startups), statistics.median(r[1] for r in startups))
            for round_ in range(repeat):
                for name in send_results:
                    log(f"send round {round_ + 1}: {name}")
                    send_results[name].append(run_timed(rows[name]))
                for name in pipe_results:
                    log(f"send round {round_ + 1}: pipeline: {name}")
                    pipe_results[name].append(run_pipeline(name, file))
        finally:
            sink.kill()
            sink.wait()
    return startup, send_results, pipe_results


def targets(send_results: dict, size: int) -> list[tuple[str, float, str, float, bool]]:
    """(label, measured, op, bound, met) for issue 3's targets that the runs cover."""
    def median(name, i):
        ok = [r[i] for r in send_results.get(name, []) if r[2] == 0]
        return statistics.median(ok) if ok else None
    out = []
    zc_wall, zc_cpu = median(SEND_ROW, 0), median(SEND_ROW, 1)
    socat_wall = median(SOCAT_ROW, 0)
    if zc_wall and socat_wall:
        value = socat_wall / zc_wall
        out.append(("send: zcrelay send / socat FILE TCP throughput", value, ">=", 1.5, value >= 1.5))
    others = [c for c in (median(n, 1) for n in send_results if not n.startswith("zcrelay")) if c]
    if zc_cpu is not None and others:
        value = zc_cpu / min(others)
        out.append(("send: zcrelay send CPU per GiB / the lowest other row's", value, "<=", 1.0, value <= 1.0))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="file size (M or G suffix)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    size = int(float(args.size[:-1]) * (1 << 30 if args.size.endswith("G") else 1 << 20))
    startup, send_results, pipe_results = measure(size, args.repeat)
    cpu = os.cpu_count()
    print(f"{size / (1 << 30):g} GiB, median of {args.repeat}, {cpu} CPUs, Linux {os.uname().release}\n")
    print(f"zcrelay start-up (send of an empty file): {startup[0]:.2f} s wall, {startup[1]:.2f} s CPU\n")
    print("\n".join(table(send_results, size, args.markdown, "file to a local sink (sink's CPU not counted)",
                          startup, 1)))
    print("\n".join(table(pipe_results, size, args.markdown,
                          "pipeline: cat FILE | sender → receiver | cat > /dev/null (all CPU counted)",
                          startup, 2)))
    for label, value, op, bound, met in targets(send_results, size):
        print(f"target: {label}: {value:.2f} (want {op} {bound:g}) -> {'MET' if met else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
