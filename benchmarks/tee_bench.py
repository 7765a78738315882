#!/usr/bin/env python3
"""Benchmark `zcrelay tee` against GNU tee and cat in a pipeline.

    pv -q FILE | X | pv -q >/dev/null

X is `zcrelay tee OUT`, `tee OUT` (GNU) or `cat`; OUT on a tmpfs and /dev/null; input sizes
1 GiB and 4 GiB (input on /dev/shm, random bytes). Throughput is the pipeline's wall time; CPU is X's own
user+system time (bash's `times` after X, in a bash wrapper), per GB moved. A benchmark, not
a test: it prints and exits 0 whatever the ratios are (130 if interrupted).

Usage: python benchmarks/tee_bench.py [--sizes 1,4] [--repeat 3] [--markdown]
Needs pv. As root it mounts a tmpfs for OUT; otherwise OUT goes to /dev/shm (or --out-dir).
benchmarks/run.py runs the same measurement as its `tee` workload (`measure`, `targets`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Runs X, then writes the CPU time X used to fd 3: bash's `times` (its second line: user and
# system time of the shell's waited-for children, to the millisecond). bash, not a Python
# wrapper calling wait4: the wrapper's start-up lies on the timed pipeline's path, and
# Python's (about 10 ms) was a tenth of what zcrelay tee takes for 1 GiB into /dev/null.
WRAP = '"$@"; status=$?; times >&3; exit $status'


def _cpu_seconds(times_output: str) -> float:
    """User + system seconds from the children's line of bash's `times` ("0m0.052s 0m0.041s")."""
    total = 0.0
    for field in times_output.splitlines()[1].split():
        minutes, seconds = field.rstrip("s").split("m")
        total += 60 * int(minutes) + float(seconds)
    return total


def run_one(x: list[str], src: str, cwd: str) -> tuple[float, float]:
    cpu_r, cpu_w = os.pipe()
    wrapped = " ".join(shlex.quote(a) for a in ["bash", "-c", WRAP, "wrap", *x])
    script = f"set -o pipefail; pv -q {shlex.quote(src)} | {wrapped} 3>&{cpu_w} | pv -q >/dev/null"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", script], pass_fds=(cpu_w,), env=env, cwd=cwd)
    wall = time.perf_counter() - start
    os.close(cpu_w)
    cpu = _cpu_seconds(os.read(cpu_r, 200).decode())
    os.close(cpu_r)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {script}")
    return wall, cpu


HEAD = ("size", "OUT", "zcrelay GB/s", "GNU tee GB/s", "cat GB/s", "zcrelay CPU-s/GB",
        "GNU tee CPU-s/GB", "cat CPU-s/GB", "throughput zc/GNU", "CPU/GB zc/GNU")
# Issue 4's targets: (OUT, ratio, op, bound) — zcrelay against GNU tee, in the same run.
TARGETS = (("tmpfs", "throughput zc/GNU", ">=", 2.0), ("tmpfs", "CPU/GB zc/GNU", "<=", 0.5),
           ("/dev/null", "throughput zc/GNU", ">=", 5.0))


def write_input(path: str, size: int) -> None:
    """`size` bytes of random data (a 64 MiB random block, repeated: nothing here compresses)."""
    block = os.urandom(min(size, 64 << 20)) or b"\0"
    with open(path, "wb") as f:
        left = size
        while left:
            left -= f.write(block[:left])


@contextlib.contextmanager
def out_dir(size: int, given: str | None = None):
    """A tmpfs for OUT: `given`, else one mounted for the run (root), else a directory in
    /dev/shm (a tmpfs too)."""
    if given:
        yield given
        return
    mounted = tempfile.mkdtemp(prefix="tee-bench-")
    try:
        if os.geteuid() == 0 and subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size + (1 << 30)}", "tmpfs", mounted]).returncode == 0:
            try:
                yield mounted
            finally:
                subprocess.run(["umount", mounted], check=False)
            return
    finally:
        os.rmdir(mounted)
    print("tee bench: no tmpfs mounted (needs root), OUT goes to /dev/shm", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tee-bench-", dir="/dev/shm") as shm:
        yield shm


def measure(sizes: list[float], repeat: int, out: str | None = None, log=None) -> list[tuple]:
    """Run every X on every size (GiB) and OUT, rounds interleaved; one row per (size, OUT)
    with the medians, in HEAD's order (numbers unformatted)."""
    log = log or (lambda text: print(text, file=sys.stderr))
    # An installed zcrelay has its bytecode compiled (pip does it); a source tree run with
    # PYTHONDONTWRITEBYTECODE set would compile ours at every start, about 20-40 ms of a run
    # that moves a gigabyte in about 0.15 s. Measure the tool as installed.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "zcrelay")], check=True)
    zc = [sys.executable, "-m", "zcrelay", "tee"]
    rows = []
    with out_dir(int(max(sizes) * (1 << 30)), out) as where:
        for gib in sizes:
            size = int(gib * (1 << 30))
            src = f"/dev/shm/tee-bench-{gib:g}g"
            write_input(src, size)
            try:
                for out_name, dest in (("tmpfs", f"{where}/out"), ("/dev/null", "/dev/null")):
                    xs = {"zcrelay tee": zc + [dest], "GNU tee": ["tee", dest], "cat": ["cat"]}
                    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in xs}
                    if dest != "/dev/null":
                        # OUT is written once, untimed, and then overwritten in place by each
                        # run (both tees open it with O_TRUNC), never removed between runs: the
                        # pages a run frees at its open are the ones it writes into at once.
                        # These VMs hand free guest memory back to the host about 2 s after it
                        # is freed (virtio-balloon free page reporting), and the next write into
                        # it can cost a host fault per page: in one test 4 GiB into a tmpfs took
                        # 5.0-5.4 s that way against 1.7 s into memory just freed (TEE.md,
                        # eleventh session). When OUT was removed after each run, the tool that ran
                        # after cat always wrote into memory freed seconds before, and in the
                        # rotation below that tool was always zcrelay.
                        shutil.copyfile(src, dest)
                    for r in range(repeat):
                        # Each round starts with the next tool, so no tool always goes first.
                        names = list(xs)[r % len(xs):] + list(xs)[:r % len(xs)]
                        for name in names:
                            samples[name].append(run_one(xs[name], src, ROOT))
                            log(f"tee {gib:g} GiB OUT={out_name} {name} round {r + 1}: {samples[name][-1][0]:.2f} s")
                    if dest != "/dev/null":
                        Path(dest).unlink()
                    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
                           for k, v in samples.items()}
                    gb = size / 1e9
                    zw, zcpu = med["zcrelay tee"]
                    gw, gcpu = med["GNU tee"]
                    cw, ccpu = med["cat"]
                    rows.append((f"{gib:g} GiB", out_name, gb / zw, gb / gw, gb / cw, zcpu / gb, gcpu / gb,
                                 ccpu / gb, gw / zw, (zcpu / gb) / (gcpu / gb)))
            finally:
                os.unlink(src)
    return rows


def targets(rows: list[tuple]) -> list[tuple[str, float, str, float, bool]]:
    """(label, measured, op, bound, met) for each of issue 4's targets that `rows` covers."""
    out = []
    for row in rows:
        for out_name, ratio, op, bound in TARGETS:
            if row[1] == out_name:
                value = row[HEAD.index(ratio)]
                met = value >= bound if op == ">=" else value <= bound
                out.append((f"tee {row[0]}, OUT={out_name}: {ratio}", value, op, bound, met))
    return out


def render(rows: list[tuple], markdown: bool) -> str:
    fmt = lambda row: [row[0], row[1]] + [f"{v:.2f}" for v in row[2:]]  # noqa: E731
    if markdown:
        lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * 2 + "---:|" * (len(HEAD) - 2)]
        return "\n".join(lines + ["| " + " | ".join(fmt(row)) + " |" for row in rows])
    widths = [max(len(h), 8) for h in HEAD]
    lines = ["  ".join(h.rjust(w) for h, w in zip(HEAD, widths))]
    return "\n".join(lines + ["  ".join(v.rjust(w) for v, w in zip(fmt(row), widths)) for row in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4", help="input sizes in GiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (interleaved); the median is shown")
    ap.add_argument("--out-dir", help="an existing tmpfs for OUT (default: mount one as root, else /dev/shm)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    try:
        rows = measure([float(s) for s in args.sizes.split(",")], args.repeat, args.out_dir)
    except KeyboardInterrupt:
        return 130
    print(render(rows, args.markdown))
    for label, value, op, bound, met in targets(rows):
        print(f"target: {label}: {value:.2f} (want {op} {bound:g}) -> {'MET' if met else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
