"""`zcrelay forward LISTEN TARGET`: the port forwarder's command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from zcrelay.cli.app import app
from zcrelay.cli.common import address, failed, parse_size, run, say, serve_until_signal, setup_logging
from zcrelay.exitcodes import ExitCode
from zcrelay.forward import ForwardConfig, Forwarder, Rule
from zcrelay.stats import Totals

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Keys a config file may set; each is the option of the same name with dashes.
CONFIG_KEYS = {"pipe-size", "max-conns", "max-idle-pipes", "connect-timeout", "idle-timeout",
               "linger", "resolve-ttl", "splice", "nodelay", "backlog", "workers", "rule"}


def _rule(text: str) -> Rule:
    listen, sep, target = text.partition("=")
    if not sep:
        raise typer.BadParameter(f"{text!r}: a rule is LISTEN=TARGET")
    return Rule(address(listen, listen=True), address(target, listen=False))


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config file; unknown keys are an error, not silently ignored."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint="--config") from None
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="--config") from None
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise typer.BadParameter(f"{path}: unknown key(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(sorted(CONFIG_KEYS))}", param_hint="--config")
    return data


def _config_rules(data: dict[str, Any]) -> list[Rule]:
    rules = []
    for entry in data.get("rule", []):
        if not isinstance(entry, dict) or set(entry) != {"listen", "target"}:
            raise typer.BadParameter("each [[rule]] needs exactly listen = \"...\" and target = \"...\"",
                                     param_hint="--config")
        rules.append(Rule(address(str(entry["listen"]), listen=True), address(str(entry["target"]), listen=False)))
    return rules


def _pick(cli: Any, data: dict[str, Any], key: str, default: Any) -> Any:
    """Command line first, then the config file, then the default."""
    if cli is not None:
        return cli
    return data.get(key, default)


def _seconds(value: float | None) -> float | None:
    """0 turns a timeout off."""
    return None if not value else float(value)


@app.command()
def forward(
    listen: Optional[str] = typer.Argument(None, metavar="LISTEN", help="Where to listen: PORT (binds 127.0.0.1), HOST:PORT, [IPV6]:PORT, :PORT (all interfaces), unix:PATH.", show_default=False),
    target: Optional[str] = typer.Argument(None, metavar="TARGET", help="Where to connect: HOST:PORT, [IPV6]:PORT, unix:PATH.", show_default=False),
    rule: list[str] = typer.Option([], "--rule", "-r", metavar="LISTEN=TARGET", help="Another LISTEN=TARGET pair, each with its own listener (repeatable).", show_default=False),
    config: Optional[Path] = typer.Option(None, "--config", "-c", metavar="FILE", help=r"TOML file with options and \[\[rule]] tables; the command line wins.", dir_okay=False),
    pipe_size: Optional[str] = typer.Option(None, "--pipe-size", metavar="SIZE", help="Pipe buffer per stream in flight, e.g. 64K, 1M; clamped to what the kernel allows.  [default: 1M]", show_default=False),
    max_conns: Optional[int] = typer.Option(None, "--max-conns", min=0, metavar="N", help="Most connections at once; more wait in the backlog (0: no limit).  [default: 0]", show_default=False),
    max_idle_pipes: Optional[int] = typer.Option(None, "--max-idle-pipes", min=0, metavar="N", help="Empty pipes kept for reuse.  [default: 16]", show_default=False),
    connect_timeout: Optional[float] = typer.Option(None, "--connect-timeout", min=0, metavar="SECONDS", help="Seconds to reach the target (0: none).  [default: 10]", show_default=False),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", min=0, metavar="SECONDS", help="Close a connection after this many seconds without a byte (0: never).  [default: 0]", show_default=False),
    linger: Optional[float] = typer.Option(None, "--linger", min=0, metavar="SECONDS", help="Seconds a half-closed connection may live (0: no limit).  [default: 60]", show_default=False),
    resolve_ttl: Optional[float] = typer.Option(None, "--resolve-ttl", min=0, metavar="SECONDS", help="Reuse the addresses a TARGET name resolved to for this long (0: resolve on every connection).  [default: 5]", show_default=False),
    no_splice: bool = typer.Option(False, "--no-splice", help="Copy through user space instead of splicing (for comparison, odd kernels)."),
    no_nodelay: bool = typer.Option(False, "--no-nodelay", help="Leave Nagle's algorithm on (TCP_NODELAY is set on both sides by default)."),
    backlog: Optional[int] = typer.Option(None, "--backlog", min=1, metavar="N", help="Listen backlog.  [default: 4096]", show_default=False),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, max=256, metavar="N", help="Serve with N processes; each TCP listener is bound N times with SO_REUSEPORT so the kernel spreads connections over them (limits such as --max-conns are per worker).  [default: 1]", show_default=False),
    capture_dir: Optional[str] = typer.Option(None, "--capture-dir", metavar="DIR", help="Also record each direction of each connection to its own file in DIR (mode 0600): {time}-{conn}-{peer}-{up|down}.bin, with a {time}-{conn}-{peer}.json sidecar; a failing disk stops only that capture.", show_default=False),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More detail on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr (no per-connection lines)."),
) -> ExitCode:
    """Forward connections from LISTEN to TARGET, splicing payloads through pipes."""
    data = load_config(config) if config else {}
    rules = _config_rules(data) + [_rule(text) for text in rule]
    if (listen is None) != (target is None):
        raise typer.BadParameter("give both LISTEN and TARGET, or neither (with --rule or --config)")
    if listen is not None and target is not None:
        rules.insert(0, Rule(address(listen, listen=True), address(target, listen=False)))
    if not rules:
        raise typer.BadParameter("nothing to forward: give LISTEN TARGET, --rule or --config")
    size = pipe_size if pipe_size is not None else str(data.get("pipe-size", "1M"))
    settings = ForwardConfig(
        rules=tuple(rules),
        pipe_size=parse_size(size),
        max_idle_pipes=int(_pick(max_idle_pipes, data, "max-idle-pipes", 16)),
        max_conns=int(_pick(max_conns, data, "max-conns", 0)),
        connect_timeout=_seconds(_pick(connect_timeout, data, "connect-timeout", 10.0)),
        idle_timeout=_seconds(_pick(idle_timeout, data, "idle-timeout", 0)),
        linger=_seconds(_pick(linger, data, "linger", 60.0)),
        splice=not no_splice and bool(data.get("splice", True)),
        nodelay=not no_nodelay and bool(data.get("nodelay", True)),
        backlog=int(_pick(backlog, data, "backlog", 4096)),
        capture_dir=capture_directory(capture_dir),
        resolve_ttl=float(_pick(resolve_ttl, data, "resolve-ttl", 5.0)),
    )
    if settings.resolve_ttl < 0:
        raise typer.BadParameter(f"{settings.resolve_ttl:g} is not a number of seconds (0 or more)",
                                 param_hint="--resolve-ttl")
    if settings.pipe_size < 4096:
        raise typer.BadParameter("the pipe size must be at least one page (4K)", param_hint="--pipe-size")
    count = int(_pick(workers, data, "workers", 1))
    if count < 1:
        raise typer.BadParameter(f"{count} is not a number of workers (1 or more)", param_hint="--workers")
    setup_logging(verbose, quiet)
    return run_forwarder(settings, workers=count)


def run_forwarder(settings: ForwardConfig, note: str = "", workers: int = 1) -> ExitCode:
    """Serve `settings` until SIGINT/SIGTERM, in this process or in `workers` forked ones: a
    "listening on" line per rule (with `note`), then the summary line; returns the exit code."""

    def ready(bound) -> None:
        for item in bound:
            say(f"listening on {item.address} -> {item.rule.target}{note}")

    if workers > 1:
        from zcrelay.cli import workers as pool

        totals = Totals()
        try:
            code = pool.serve(settings, workers, totals, ready, _work)
        except BaseException as exc:
            code = failed(exc)
    else:
        code, totals = _work(settings, None, (1, 1), None, ready)
    if code == ExitCode.OK:
        say(summary(totals))
    return code


def _work(settings: ForwardConfig, listeners: list | None, worker: tuple[int, int], stop_fd: int | None,
          ready=lambda bound: None) -> tuple[ExitCode, Totals]:
    """Serve in this process until a signal, or, in a worker, until `stop_fd` is readable."""
    forwarder = Forwarder(settings, listeners=listeners, worker=worker)

    async def main() -> None:
        await serve_until_signal(forwarder.serve, ready, stop_fd=stop_fd)

    # The reactor moves the bytes: let it own the loop, unless captures (tasks) do the work.
    return run(main, hosted=settings.capture_dir is None), forwarder.totals


def capture_directory(path: str | None) -> str | None:
    if path is not None and not os.path.isdir(path):
        raise typer.BadParameter(f"{path!r} is not a directory", param_hint="--capture-dir")
    return path


def summary(totals: Totals) -> str:
    fallbacks = sum(totals.fallbacks.values())
    text = (f"stopped: {totals.connections} connections, up {totals.up} bytes, down {totals.down} "
            f"bytes, {100 * totals.spliced_ratio:.2f}% spliced, {fallbacks} fallbacks")
    if fallbacks:
        text += " (" + ", ".join(f"{reason}: {n}" for reason, n in totals.fallbacks.items()) + ")"
    return text
