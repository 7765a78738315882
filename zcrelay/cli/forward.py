"""`zcrelay forward LISTEN TARGET`: the port forwarder's command line."""

from __future__ import annotations

import codecs
import inspect
import math
import os
import re
import reprlib
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer

from zcrelay.cli.app import LISTEN_FORMS, TARGET_FORMS, app
from zcrelay.addresses import AddressError, first_clash, forwarding_cycle, rule_readings
from zcrelay.cli.common import (address, error, failed, pipe_size_value, run, say, serve_until_signal,
                                 setup_logging, summary)
from zcrelay.exitcodes import ExitCode
from zcrelay.forward import ForwardConfig, Forwarder, Rule
from zcrelay.stats import Totals

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    # The backport: mypy checks this branch (python_version 3.10), an env on 3.11+ lacks it.
    import tomli as tomllib  # type: ignore[import-not-found]

# Keys a config file may set, each the option of the same name with dashes, and the TOML type
# its value must have. The bounds are that option's min/max (_bounds): one source for both.
CONFIG_TYPES: dict[str, Any] = {
    "pipe-size": "size", "max-conns": int, "max-idle-pipes": int, "connect-timeout": float,
    "idle-timeout": float, "linger": float, "resolve-ttl": float, "splice": bool, "nodelay": bool,
    "backlog": int, "workers": int, "rule": list,
}
CONFIG_KEYS = set(CONFIG_TYPES)


def _rule(text: str) -> Rule:
    """--rule LISTEN=TARGET, split at the '=' that leaves an address on both sides (a Unix path
    may hold '='). Two such '='s are a usage error that says how to write the rule without one:
    as a [[rule]] table in a --config file, where listen and target are strings of their own."""
    try:
        readings = rule_readings(text)
    except AddressError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rule") from None
    if len(readings) > 1:
        ways = "; or ".join(f"listen {listen}, target {target}" for listen, target in readings[:2])
        more = "; or more" if len(readings) > 2 else ""
        raise typer.BadParameter(
            f"{text!r} can be split at more than one '=' ({ways}{more}): give this rule in a --config "
            f"file, as a [[rule]] table with listen = \"...\" and target = \"...\"", param_hint="--rule")
    return Rule(*readings[0])


CONFIG_LIMIT = 1 << 20  # far more than any set of rules: /dev/zero was read until memory ran out


class ConfigUnreadable(Exception):
    """The config file is missing, unreadable or a directory: INPUT_ERROR, as for any file to
    read (man page, EXIT STATUS); what is in it being wrong is a usage error."""


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config file; unknown keys are an error, not silently ignored, and each value
    is checked as its option checks it (_checked). A fault in the text is a BadParameter naming
    the file (and the line, where it can be found); one reading it is ConfigUnreadable. The
    "rule" key holds (where, Rule) pairs, `where` naming the file and line for later errors."""
    try:
        with open(path, "rb") as f:
            raw = f.read(CONFIG_LIMIT + 1)
    except OSError as exc:
        raise ConfigUnreadable(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(raw) > CONFIG_LIMIT:
        raise typer.BadParameter(f"{path}: larger than {CONFIG_LIMIT >> 20} MiB: not a config file",
                                 param_hint="--config")
    # A UTF-8 byte order mark, as editors on Windows write one, is no statement: tomllib said
    # "Invalid statement (at line 1, column 1)" about a character nobody sees.
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode()
    except UnicodeDecodeError as exc:
        raise typer.BadParameter(f"{path}: not UTF-8 text (byte {bom + exc.start}: {exc.reason})",
                                 param_hint="--config") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="--config") from None
    except RecursionError:
        raise typer.BadParameter(f"{path}: arrays or tables nested too deeply", param_hint="--config") from None
    where = _locator(path, text)
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise typer.BadParameter(f"{where(unknown[0])}: unknown key(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(CONFIG_KEYS))}", param_hint="--config")
    return {key: _checked(where, key, value) for key, value in data.items()}


_HEADER = re.compile(r"\s*\[")
_RULE_HEADER = re.compile(r"\s*\[\[\s*(rule|\"rule\"|'rule')\s*\]\]")


def _key_line(lines: list[str], key: str, start: int = 0) -> int | None:
    """The index of the line from `start` that sets `key`, before the next table header."""
    pattern = re.compile(rf"\s*({re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=")
    for i in range(start, len(lines)):
        if _HEADER.match(lines[i]):
            return None
        if pattern.match(lines[i]):
            return i
    return None


def _locator(path: Path, text: str) -> Callable[..., str]:
    """where(key) or where(key, n): "FILE, line L" for the line that sets the top-level `key`,
    or `key` of the n-th [[rule]] table (its header for key ""), or "FILE" alone when it cannot
    be told (a dotted key...). tomllib gives positions for syntax errors only, not for values."""
    lines = text.splitlines()
    top = next((i for i, line in enumerate(lines) if _HEADER.match(line)), len(lines))
    headers = [i for i, line in enumerate(lines) if _RULE_HEADER.match(line)]

    def where(key: str, rule: int | None = None) -> str:
        if rule is None:
            found = _key_line(lines[:top], key)
        elif len(headers) < rule:  # rule = [{...}, ...]: the line the array starts on
            found = _key_line(lines[:top], "rule")
        else:
            found = (_key_line(lines, key, headers[rule - 1] + 1) if key else None)
            found = headers[rule - 1] if found is None else found
        return str(path) if found is None else f"{path}, line {found + 1}"

    return where


def _bounds(key: str) -> tuple[Any, Any]:
    """min and max of forward's option for `key`, so a file cannot set what the command line refuses."""
    option = inspect.signature(forward).parameters[key.replace("-", "_")].default
    return option.min, option.max


def _checked(where: Callable[..., str], key: str, value: Any) -> Any:
    """`value` if the option `key` would take it, else a BadParameter naming the file, line and
    key. No conversions: bool("no") is True, int(1.7) is 1, and int("ten") was a traceback."""

    def refuse(reason: str) -> NoReturn:
        raise typer.BadParameter(f"{where(key)}: {key} {reason}", param_hint="--config")

    kind = CONFIG_TYPES[key]
    if kind is list:
        return _config_rules(where, value)
    if kind == "size":
        if type(value) not in (int, str):
            refuse(f'must be a number of bytes or a size string like "64K", not {reprlib.repr(value)}')
        try:
            return pipe_size_value(str(value))  # the option's parser: the same limits and messages
        except typer.BadParameter as exc:
            refuse(f"= {value!r}: {exc.message}")
    if kind is bool:
        if type(value) is not bool:
            refuse(f"must be true or false, not {reprlib.repr(value)}")
        return value
    # type(), not isinstance(): a bool is an int, and a float is no integer here.
    if kind is int and type(value) is not int:
        refuse(f"must be an integer, not {reprlib.repr(value)}")
    # math.isnan(), like float(), raises OverflowError for an int past 1.8e308: tomllib reads
    # TOML integers of any length.
    if kind is float and (type(value) not in (int, float) or (type(value) is float and math.isnan(value))):
        refuse(f"must be a number of seconds, not {reprlib.repr(value)}")
    low, high = _bounds(key)
    if (low is not None and value < low) or (high is not None and value > high):
        refuse(f"= {reprlib.repr(value)} is out of range ({f'{low} to {high}' if high is not None else f'{low} or more'})")
    if kind is float:
        return _float(value)
    return value


def _float(value: int | float) -> float:
    """Seconds as a float; an integer too large for one is inf, as the command line reads the
    same digits (the bounds have refused a negative one)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _config_rules(where: Callable[..., str], entries: Any) -> list[tuple[str, Rule]]:
    """The [[rule]] tables, each exactly two address strings, parsed as LISTEN and TARGET are;
    each with where it was written ("FILE, line N"), for the checks of all rules together."""
    shape = "each [[rule]] needs exactly listen = \"...\" and target = \"...\""
    if type(entries) is not list:
        raise typer.BadParameter(f"{where('rule')}: {shape}", param_hint="--config")
    rules = []
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or set(entry) != {"listen", "target"}:
            raise typer.BadParameter(f"{where('', n)}: {shape} (rule {n})", param_hint="--config")
        ends = {}
        for key in ("listen", "target"):
            if type(entry[key]) is not str:  # str(5) would be taken as port 5
                raise typer.BadParameter(f"{where(key, n)}: rule {n}: {key} must be an address string, not "
                                         f"{reprlib.repr(entry[key])}", param_hint="--config")
            try:
                ends[key] = address(entry[key], listen=key == "listen")
            except typer.BadParameter as exc:
                raise typer.BadParameter(f"{where(key, n)}: rule {n}: {key}: {exc.message}",
                                         param_hint="--config") from None
        rules.append((where("", n), Rule(ends["listen"], ends["target"])))
    return rules


def check_rules(rules: list[tuple[str, Rule]]) -> None:
    """Refuse, as a usage error, rules that cannot work together whatever the network does:
    two listeners on one address (bind(2) said "address already in use", exit 3, as if another
    process held it), and targets that lead back to a listener of these rules in a cycle (every
    connection connected to itself again, until the file descriptors ran out). `rules` are
    (where the rule was given, rule), numbered from 1 as the logs number them."""
    clash = first_clash([rule.listen for _, rule in rules])
    if clash:
        (was, first), (where, rule) = rules[clash[0]], rules[clash[1]]
        raise typer.BadParameter(f"rule {clash[1] + 1} ({where}) listens on {rule.listen}, as rule "
                                 f"{clash[0] + 1} ({was}) does on {first.listen}")
    cycle = forwarding_cycle([(rule.listen, rule.target) for _, rule in rules])
    if cycle is None:
        return
    if len(cycle) == 1:
        where, rule = rules[cycle[0]]
        raise typer.BadParameter(
            f"rule {cycle[0] + 1} ({where}) forwards {rule.listen} to {rule.target}, its own listener: "
            "every connection would connect to itself again, until the file descriptors run out")
    steps = [f"rule {i + 1} ({rules[i][0]}: {rules[i][1].listen} -> {rules[i][1].target})" for i in cycle[:3]]
    if len(cycle) > 3:
        steps.append(f"{len(cycle) - 3} more")
    raise typer.BadParameter(f"rules forward to each other in a loop: {' -> '.join(steps)} -> rule {cycle[0] + 1}: "
                             "every connection would go round until the file descriptors run out")


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
    listen: Optional[str] = typer.Argument(None, metavar="LISTEN", help=f"Where to listen: {LISTEN_FORMS}.", show_default=False),
    target: Optional[str] = typer.Argument(None, metavar="TARGET", help=f"Where to connect: {TARGET_FORMS}.", show_default=False),
    rule: list[str] = typer.Option([], "--rule", "-r", metavar="RULE", help="Another LISTEN=TARGET pair, each with its own listener (repeatable); split at the '=' that leaves an address on each side.", show_default=False),
    config: Optional[Path] = typer.Option(None, "--config", "-c", metavar="FILE", readable=False, help=r"TOML file with options and \[\[rule]] tables; the command line wins.", show_default=False),
    pipe_size: Optional[str] = typer.Option(None, "--pipe-size", metavar="SIZE", help="Pipe buffer per stream in flight, e.g. 64K, 1M; clamped to what the kernel allows.  \\[default: 1M]", show_default=False),
    max_conns: Optional[int] = typer.Option(None, "--max-conns", min=0, metavar="N", help="Most connections at once; more wait in the backlog (0: no limit).  \\[default: 0]", show_default=False),
    max_idle_pipes: Optional[int] = typer.Option(None, "--max-idle-pipes", min=0, metavar="N", help="Empty pipes kept for reuse.  \\[default: 16]", show_default=False),
    connect_timeout: Optional[float] = typer.Option(None, "--connect-timeout", min=0, metavar="SECONDS", help="Seconds to reach the target (0: none).  \\[default: 10]", show_default=False),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", min=0, metavar="SECONDS", help="Close a connection after this many seconds without a byte (0: never).  \\[default: 0]", show_default=False),
    linger: Optional[float] = typer.Option(None, "--linger", min=0, metavar="SECONDS", help="Seconds a half-closed connection may go without a byte moving (0: no limit).  \\[default: 60]", show_default=False),
    resolve_ttl: Optional[float] = typer.Option(None, "--resolve-ttl", min=0, metavar="SECONDS", help="Reuse the addresses a TARGET name resolved to for this long (0: resolve on every connection).  \\[default: 5]", show_default=False),
    splice: Optional[bool] = typer.Option(None, "--splice/--no-splice", help="--no-splice copies through user space instead of splicing (for comparison, odd kernels); --splice undoes a config file's splice = false.", show_default=False),
    nodelay: Optional[bool] = typer.Option(None, "--nodelay/--no-nodelay", help="--no-nodelay leaves Nagle's algorithm on (TCP_NODELAY is set on both sides by default); --nodelay undoes a config file's nodelay = false.", show_default=False),
    backlog: Optional[int] = typer.Option(None, "--backlog", min=1, metavar="N", help="Listen backlog (at least 1).  \\[default: 4096]", show_default=False),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1, max=256, metavar="N", help="Serve with N processes (1 to 256); each TCP listener is bound N times with SO_REUSEPORT so the kernel spreads connections over them (limits such as --max-conns are per worker).  \\[default: 1]", show_default=False),
    capture_dir: Optional[str] = typer.Option(None, "--capture-dir", metavar="DIR", help="Also record each direction of each connection to its own file in DIR (mode 0600), {time}-{conn}-{peer}-up.bin and -down.bin, with a {time}-{conn}-{peer}.json sidecar; a failing disk stops only that capture.", show_default=False),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More detail on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-connection lines: only the listening lines, warnings, errors and the summary on stderr."),
) -> ExitCode:
    """Forward connections from LISTEN to TARGET, splicing payloads through pipes."""
    try:
        data = load_config(config) if config else {}
    except ConfigUnreadable as exc:
        return error(str(exc), ExitCode.INPUT_ERROR)
    rules = data.get("rule", []) + [(f"--rule {text!r}", _rule(text)) for text in rule]
    if (listen is None) != (target is None):
        raise typer.BadParameter("give both LISTEN and TARGET, or neither (with --rule or --config)")
    if listen is not None and target is not None:
        rules.insert(0, ("LISTEN TARGET", Rule(address(listen, listen=True, option="LISTEN"),
                                              address(target, listen=False, option="TARGET"))))
    if not rules:
        raise typer.BadParameter("nothing to forward: give LISTEN TARGET, --rule or --config")
    check_rules(rules)
    size = pipe_size_value(pipe_size) if pipe_size is not None else data.get("pipe-size", 1 << 20)
    # The file's values are checked (load_config); the options' by typer.
    settings = ForwardConfig(
        rules=tuple(pair[1] for pair in rules),
        pipe_size=size,
        max_idle_pipes=_pick(max_idle_pipes, data, "max-idle-pipes", 16),
        max_conns=_pick(max_conns, data, "max-conns", 0),
        connect_timeout=_seconds(_pick(connect_timeout, data, "connect-timeout", 10.0)),
        idle_timeout=_seconds(_pick(idle_timeout, data, "idle-timeout", 0)),
        linger=_seconds(_pick(linger, data, "linger", 60.0)),
        splice=_pick(splice, data, "splice", True),
        nodelay=_pick(nodelay, data, "nodelay", True),
        backlog=_pick(backlog, data, "backlog", 4096),
        capture_dir=capture_directory(capture_dir),
        resolve_ttl=float(_pick(resolve_ttl, data, "resolve-ttl", 5.0)),
    )
    count = _pick(workers, data, "workers", 1)
    setup_logging(verbose, quiet)
    return run_forwarder(settings, workers=count)


def run_forwarder(settings: ForwardConfig, note: str = "", workers: int = 1) -> ExitCode:
    """Serve `settings` until SIGINT/SIGTERM, in this process or in `workers` forked ones: a
    "listening on" line per rule (with `note`), then the summary line; returns the exit code."""

    served = []

    def ready(bound) -> None:
        served.append(True)
        for item in bound:
            say(f"listening on {item.address} -> {item.rule.target}{note}")

    if workers > 1:
        from zcrelay.cli import workers as pool

        totals = Totals()
        try:
            code = pool.serve(settings, workers, totals, ready, _work)
        except BaseException as exc:
            code = failed(exc)
        if code not in (ExitCode.OK, ExitCode.INTERRUPTED) and served:
            # A worker that died (SIGKILL, a crash) stopped the others after they had served:
            # what they relayed is still worth a line, marked as short of the dead one's part.
            # Not after a second Ctrl-C, which ends at once as it does in one process.
            say(summary(totals) + " (counted by the workers that reported; a worker ended without)")
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
    """--capture-dir must exist: zcrelay does not create it (a typo would capture elsewhere). It
    must be writable too: a read-only one was accepted, and then every connection logged a
    warning that its capture could not be created."""
    if path is not None and not os.path.isdir(path):
        why = "is not a directory" if os.path.exists(path) else "does not exist (create it first)"
        raise typer.BadParameter(f"{path!r} {why}", param_hint="--capture-dir")
    if path is not None and not os.access(path, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{path!r} is not writable (a read-only filesystem, or its permissions)",
                                 param_hint="--capture-dir")
    return path

