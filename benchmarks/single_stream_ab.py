#!/usr/bin/env python3
"""Single-stream A/B: many short interleaved iperf3 rounds, each relay's ratio to HAProxy-splice
taken within each round, with a second HAProxy-splice as an A/A control.

`run.py` measures one stream 3 times per relay. On this project's 2-core VMs a relay's rate moves
by 20-40% from one 5 s round to the next, so 3 rounds cannot tell relays within 10% of each other
apart. This script runs N rounds (every relay, both directions, in turn, each round starting
at a different relay: forward_bench.rotated) and prints, per relay, the median of its
per-round ratios to HAProxy-splice and their range. The A/A row, an identical HAProxy-splice
in the same rounds, shows how far the measurement alone moves a ratio that is 1.0 by
construction. A benchmark, not a test: exit 0 whatever the ratios.

    PYTHONPATH=. .venv/bin/python benchmarks/single_stream_ab.py [--rounds 16] [--seconds 3]
        [--relays zcrelay splice-floor ...] [--no-control] [--candidate DIR]

Relays are run.py's names (zcrelay, zcrelay-nosplice, socat, splice-floor, ...). `--candidate
DIR` adds `zcrelay forward` run from another checkout (for example `git worktree add DIR
HEAD~1`), and a line per direction with this checkout's per-round ratio to it: an A/B of two
builds in the same rounds. Each median of per-round ratios comes with a 95% bootstrap interval
and the count of rounds above 1. Needs iperf3 and haproxy.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forward_bench as fb  # noqa: E402
import run  # noqa: E402

REFERENCE = "haproxy-splice"
CONTROL = "haproxy-splice-again"  # the A/A control: a second, identical HAProxy-splice


def specs(names: list[str], control: bool, candidate: Path | None = None) -> list[fb.RelaySpec]:
    by_name = {r.name: r for r in run.RELAYS}
    labelled = [(REFERENCE, REFERENCE)]  # (the row's label, run.py's relay it runs)
    if control:
        labelled.append((CONTROL, REFERENCE))
    labelled += [(name, name) for name in names]
    chosen = [fb.RelaySpec(label, by_name[name].needs, by_name[name].launch) for label, name in labelled]
    if candidate is not None:
        chosen.append(fb.RelaySpec(candidate_label(candidate), (),
                                   lambda launch: fb.launch_zcrelay(launch, root=candidate)))
    return chosen


def candidate_label(root: Path) -> str:
    return f"zcrelay@{root.name}"


def bootstrap_interval(ratios: list[float], draws: int = 4000) -> tuple[float, float]:
    """A 95% interval for the median of `ratios`, by resampling the rounds (seeded: the same
    ratios give the same interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(draws * 0.025)], medians[int(draws * 0.975) - 1]


def ratio_text(ratios: list[float]) -> str:
    low, high = bootstrap_interval(ratios)
    above = sum(r > 1 for r in ratios)
    return (f"median {statistics.median(ratios):.2f} (95% {low:.2f}-{high:.2f}), "
            f"range {min(ratios):.2f}-{max(ratios):.2f}, above 1 in {above}/{len(ratios)}")


def report(results: list[fb.Measurement], names: list[str], versus: str | None = None) -> list[str]:
    """Per relay and direction, its per-round ratios to REFERENCE; with `versus`, also
    zcrelay's per-round ratios to that relay (a candidate build)."""
    # run_all records every run, failed ones too, round by round: the k-th run of a relay and
    # direction ran in the same round as the k-th run of every other relay.
    by: dict[tuple[str, str], list[fb.Measurement]] = {}
    for m in results:
        by.setdefault((m.relay, m.direction), []).append(m)
    lines = []
    for direction in fb.DIRECTIONS:
        reference = by.get((REFERENCE, direction), [])
        for name in names:
            pairs = [(m, ref) for m, ref in zip(by.get((name, direction), []), reference)
                     if m.ok and ref.ok]
            label = f"{fb.direction_label(direction):10} {name:24}"
            if not pairs:
                lines.append(f"{label} no result")
                continue
            ratios = [m.bits_per_second / ref.bits_per_second for m, ref in pairs]
            gbits = statistics.median(m.bits_per_second for m, _ in pairs) / 1e9
            cpu = [m.cpu_per_gb for m, _ in pairs if m.cpu_per_gb is not None]
            cpu_text = f"{statistics.median(cpu):.3f}" if cpu else "-"
            lines.append(f"{label} {gbits:6.2f} Gbit/s  CPU-s/GB {cpu_text:>5}  per-round ratio to "
                         f"{REFERENCE}: {ratio_text(ratios)}")
        if versus is not None:
            pairs = [(m, other) for m, other in zip(by.get((fb.ZCRELAY, direction), []),
                                                    by.get((versus, direction), []))
                     if m.ok and other.ok]
            if pairs:
                ratios = [m.bits_per_second / o.bits_per_second for m, o in pairs]
                cpu = [m.cpu_per_gb / o.cpu_per_gb for m, o in pairs if m.cpu_per_gb and o.cpu_per_gb]
                cpu_text = f", CPU-s/GB ratio median {statistics.median(cpu):.3f}" if cpu else ""
                lines.append(f"{fb.direction_label(direction):10} {fb.ZCRELAY} / {versus}: per-round "
                             f"throughput ratio {ratio_text(ratios)}{cpu_text}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--relays", nargs="+", default=["zcrelay"],
                        choices=[r.name for r in run.RELAYS if r.launch is not None and r.name != REFERENCE])
    parser.add_argument("--no-control", action="store_true", help="leave out the A/A HAProxy")
    parser.add_argument("--candidate", type=Path, metavar="DIR",
                        help="also run zcrelay from the checkout in DIR, and compare this one to it")
    args = parser.parse_args()
    candidate = args.candidate.resolve() if args.candidate else None
    if candidate is not None and not (candidate / "zcrelay").is_dir():
        parser.error(f"--candidate: no zcrelay package in {candidate}")
    names = args.relays if candidate is None or fb.ZCRELAY in args.relays else [fb.ZCRELAY, *args.relays]
    chosen = specs(names, not args.no_control, candidate)
    skipped: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="zc-ab-") as workdir:
            results = fb.run_all(chosen, args.seconds, args.rounds, Path(workdir), skipped)
    except KeyboardInterrupt:
        return 130
    for line in skipped:
        print(f"skipped: {line}")
    versus = candidate_label(candidate) if candidate is not None else None
    print("\n".join(report(results, [s.name for s in chosen], versus)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
