"""`zcrelay demo`: the quick start. A forward to a built-in echo target, checked by SHA-256."""

from __future__ import annotations

import sys

import typer
from rich.table import Table

from zcrelay.cli.app import app
from zcrelay.cli.common import (error, parse_size, pipe_console, pipe_size_value, reader_gone, run, say,
                                 setup_logging, spliced_share)
from zcrelay.demo import DemoResult, run_demo
from zcrelay.exitcodes import ExitCode


@app.command()
def demo(
    size: str = typer.Option("64M", "--size", metavar="SIZE", help="Bytes each connection sends (and gets back)."),
    connections: int = typer.Option(4, "--connections", "-n", min=1, max=256, metavar="N", help="Connections at once (1 to 256)."),
    pipe_size: str = typer.Option("1M", "--pipe-size", metavar="SIZE", help="Pipe buffer per stream in flight."),
    no_splice: bool = typer.Option(False, "--no-splice", help="Copy through user space instead, for comparison."),
) -> ExitCode:
    """Run a forward to a local echo target and check every byte: no setup, loopback only."""
    total = parse_size(size, "--size", exact=True)
    if total < 1:  # a check of no bytes cannot fail: --size 0 said "1/1 intact" of nothing
        raise typer.BadParameter(f"{size!r} is less than one byte", param_hint="--size")
    pipe = pipe_size_value(pipe_size)
    # Warnings (a pipe size the kernel cut down) as every command gives them, "zcrelay: ...";
    # unset, logging printed them bare. Not the per-connection lines: the table says it all.
    setup_logging(0, quiet=True)

    async def main() -> ExitCode:
        result = await run_demo(total, connections, not no_splice, pipe,
                                lambda listen, target: say(f"listening on {listen} -> {target} (echo)"))
        try:
            _report(result)
        except BrokenPipeError:  # `zcrelay demo 2>&1 | head -1`: the report's reader is gone
            return reader_gone(sys.stderr)
        starved = sum(n for reason, n in result.closes.items() if reason in _STARVED)
        if not result.ok and starved:  # as when the demo's own sockets run out: NO_RESOURCES
            return error(f"the relay closed {starved} connection(s) for lack of file descriptors "
                         f"or memory (see ulimit -n)", ExitCode.NO_RESOURCES)
        return ExitCode.OK if result.ok else ExitCode.FAILURE

    return run(main)


# The relay's close reasons (relay.Connection.close) for a connection it had no resources for.
_STARVED = ("out-of-fds", "out-of-memory")


def _report(r: DemoResult) -> None:
    moved = 2 * r.connections * r.bytes_each_way
    table = Table(title="zcrelay demo: forward to a local echo target", show_header=False)
    table.add_row("connections", str(r.connections))
    table.add_row("bytes through the relay", f"{moved:,} ({moved / 2**30:.2f} GiB, both ways)")
    table.add_row("time", f"{r.seconds:.2f} s")
    table.add_row("throughput (hashing included)", f"{moved * 8 / r.seconds / 1e9:.2f} Gbit/s")
    table.add_row("zero-copy", f"{spliced_share(r.spliced, r.copied)} ({r.copied:,} bytes copied)")
    table.add_row("SHA-256 echo check", f"{r.intact}/{r.connections} intact" + ("" if r.ok else "  FAILED"))
    if set(r.closes) - {"eof"}:  # a connection the relay ended otherwise than at EOF: why
        table.add_row("relay closes", ", ".join(f"{reason} {n}" for reason, n in sorted(r.closes.items())))
    pipe_console(stderr=True).print(table)
    sys.stderr.flush()  # here, where an EPIPE can still be handled (see demo)
