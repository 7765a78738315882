#!/usr/bin/env python3
"""Benchmark `zcrelay tee` against GNU tee and cat in a pipeline.

    pv -q FILE | X | pv -q >/dev/null

X is `zcrelay tee OUT`, `tee OUT` (GNU) or `cat`; OUT on a tmpfs and /dev/null; input sizes
1 GiB and 4 GiB (input on /dev/shm). Throughput is the pipeline's wall time; CPU is X's own
user+system time (from wait4 on X, measured by a tiny wrapper), per GB moved. A benchmark, not
a test: it prints and exits 0 whatever the ratios are (130 if interrupted).

Usage: python benchmarks/tee_bench.py [--sizes 1,4] [--repeat 3] [--markdown]
Needs pv, and root to mount a tmpfs (or --out-dir on an existing tmpfs).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Runs X, then prints X's rusage (user+sys seconds) to fd 3: CPU of X only, not of pv.
WRAP = ("import os,sys,resource; p=os.fork()\n"
        "if p==0: os.execvp(sys.argv[1], sys.argv[1:])\n"
        "_,st,ru=os.wait4(p,0); os.write(3, f'{ru.ru_utime+ru.ru_stime}'.encode()); "
        "sys.exit(os.waitstatus_to_exitcode(st))")


def run_one(x: list[str], src: str, cwd: str) -> tuple[float, float]:
    cpu_r, cpu_w = os.pipe()
    wrapped = " ".join(shlex.quote(a) for a in [sys.executable, "-c", WRAP, *x])
    script = f"set -o pipefail; pv -q {shlex.quote(src)} | {wrapped} 3>&{cpu_w} | pv -q >/dev/null"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", script], pass_fds=(cpu_w,), env=env, cwd=cwd)
    wall = time.perf_counter() - start
    os.close(cpu_w)
    cpu = float(os.read(cpu_r, 100) or b"nan")
    os.close(cpu_r)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {script}")
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4", help="input sizes in GiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (interleaved); the median is shown")
    ap.add_argument("--out-dir", help="an existing tmpfs for OUT (default: mount one, needs root)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    mounted = None
    out_dir = args.out_dir
    if out_dir is None:
        mounted = tempfile.mkdtemp(prefix="tee-bench-")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(sizes) + 1}g", "tmpfs", mounted], check=True)
        out_dir = mounted
    # An installed zcrelay has its bytecode compiled (pip does it); a source tree run with
    # PYTHONDONTWRITEBYTECODE set would compile ours at every start, about 20-40 ms of a run
    # that moves a gigabyte in about 0.15 s. Measure the tool as installed.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "zcrelay")], check=True)
    zc = [sys.executable, "-m", "zcrelay", "tee"]
    rows = []
    try:
        for gib in sizes:
            src = f"/dev/shm/tee-bench-{gib}g"
            subprocess.run(["bash", "-c", f"dd if=/dev/zero bs=1M count={gib * 1024} status=none | openssl enc "
                            f"-aes-128-ctr -pass pass:bench -nosalt -pbkdf2 -bufsize 1048576 > {src}"], check=True)
            try:
                for out_name, out in (("tmpfs", f"{out_dir}/out"), ("/dev/null", "/dev/null")):
                    xs = {"zcrelay tee": zc + [out], "GNU tee": ["tee", out], "cat": ["cat"]}
                    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in xs}
                    for r in range(args.repeat):
                        for name, x in xs.items():
                            samples[name].append(run_one(x, src, ROOT))
                            if out != "/dev/null":
                                Path(out).unlink(missing_ok=True)
                            print(f"  {gib} GiB OUT={out_name} {name} round {r + 1}: {samples[name][-1][0]:.2f} s",
                                  file=sys.stderr)
                    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
                           for k, v in samples.items()}
                    gb = gib * (1 << 30) / 1e9
                    zw, zcpu = med["zcrelay tee"]
                    gw, gcpu = med["GNU tee"]
                    cw, ccpu = med["cat"]
                    rows.append((f"{gib} GiB", out_name, gb / zw, gb / gw, gb / cw, zcpu / gb, gcpu / gb, ccpu / gb,
                                 gw / zw, (zcpu / gb) / (gcpu / gb)))
            finally:
                os.unlink(src)
    except KeyboardInterrupt:
        return 130
    finally:
        if mounted:
            subprocess.run(["umount", mounted], check=False)
            os.rmdir(mounted)
    head = ("size", "OUT", "zcrelay GB/s", "GNU tee GB/s", "cat GB/s", "zcrelay CPU-s/GB",
            "GNU tee CPU-s/GB", "cat CPU-s/GB", "throughput zc/GNU", "CPU/GB zc/GNU")
    fmt = lambda row: [row[0], row[1]] + [f"{v:.2f}" for v in row[2:]]  # noqa: E731
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(fmt(row)) + " |")
    else:
        widths = [max(len(h), 8) for h in head]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for row in rows:
            print("  ".join(v.rjust(w) for v, w in zip(fmt(row), widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
