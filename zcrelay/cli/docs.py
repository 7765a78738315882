"""Generate the man page and the shell completions from the live typer app.

    python -m zcrelay.cli.docs            # rewrite man/zcrelay.1 and completions/*
    python -m zcrelay.cli.docs --check    # exit 1 if the committed files are out of date

Commands, options, arguments and exit codes come from the app and from zcrelay.exitcodes, so a
new command or option is documented by re-running this module; only the prose (DESCRIPTION,
ADDRESSES, SIGNALS, EXAMPLES, ...) is written here by hand. One source, as in ripgrep and fd: the
tests fail when the committed files drift from what this module would write.
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path

import typer

if typing.TYPE_CHECKING:
    from typer._click import Command as ClickCommand, Context, Parameter
    from typer.core import TyperGroup

PROG = "zcrelay"
# The date in the man page's title line. Fixed, not today's, so that --check is reproducible;
# bump it when the page changes in substance (a release).
MANUAL_DATE = "2026-11-21"
ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = {
    "man": Path("man/zcrelay.1"),
    "bash": Path("completions/zcrelay.bash"),
    "zsh": Path("completions/_zcrelay"),
    "fish": Path("completions/zcrelay.fish"),
}

# Option or argument names (lower case, without dashes) and metavars that take a path even when
# their type is plain str.
_FILE_WORDS = {"file", "files", "path", "config", "output", "input"}
_DIR_WORDS = {"dir", "directory", "capture-dir", "capture_dir"}


# --------------------------------------------------------------------------------------------
# The model: what the app says, in plain data.

@dataclass(frozen=True)
class Param:
    """One option or positional argument of a command."""

    names: tuple[str, ...]  # option strings ('-c', '--config'); empty for an argument
    metavar: str  # 'FILE', 'SIZE'; '' for a flag
    help: str
    takes_value: bool
    repeatable: bool  # multiple=True or count=True (options); nargs=-1 (arguments)
    complete: str  # 'file', 'dir', 'choice' or '' (no completion)
    choices: tuple[str, ...] = ()
    required: bool = False
    envvar: str = ""

    @property
    def is_option(self) -> bool:
        return bool(self.names)

    @property
    def long_first(self) -> tuple[str, ...]:
        return tuple(sorted(self.names, key=lambda n: (not n.startswith("--"), n)))


@dataclass(frozen=True)
class Command:
    name: str  # '' for the root
    summary: str
    help: str
    usage: tuple[str, ...]  # ('[OPTIONS]', '[LISTEN]', ...)
    options: tuple[Param, ...]
    arguments: tuple[Param, ...]


def _unescape(text: str | None) -> str:
    """Help texts are written for rich markup: '\\[' is a literal '['."""
    return (text or "").replace("\\[", "[").replace("\b", "").split("\f")[0].strip()


def _unwrap(annotation: object) -> object:
    """Path from Optional[Path], list[Path], tuple[Path, ...]."""
    while typing.get_origin(annotation) is not None:
        args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
        if not args:
            break
        annotation = args[0]
    return annotation


def _kind(param: object, names: list[str], metavar: str) -> tuple[str, tuple[str, ...]]:
    """How a shell should complete this parameter's value: ('file'|'dir'|'choice'|'', choices)."""
    info = None
    annotation = None
    descriptor = getattr(param, "type_descriptor", None)  # typer >= 0.2x with vendored click
    if descriptor is not None:
        annotation = _unwrap(descriptor.annotation)
        info = descriptor.parameter_info
    click_type = getattr(param, "type", None)  # typer on top of the click package
    choices = getattr(click_type, "choices", None)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "choice", tuple(str(m.value) for m in annotation)
    if choices:
        return "choice", tuple(str(c) for c in choices)
    is_path = (isinstance(annotation, type) and issubclass(annotation, Path)) or (
        type(click_type).__name__ in ("Path", "File"))
    if is_path:
        source = info if info is not None else click_type
        if getattr(source, "file_okay", True) is False:
            return "dir", ()
        return "file", ()
    words = {n.lstrip("-").lower() for n in names} | {metavar.lower()}
    if words & _DIR_WORDS or any(w.endswith("-dir") or w.endswith("_dir") for w in words):
        return "dir", ()
    if words & _FILE_WORDS:
        return "file", ()
    return "", ()


def _param(param: Parameter) -> Param:
    is_option = getattr(param, "param_type_name", "") == "option"
    names = list(param.opts) + list(param.secondary_opts) if is_option else []
    # Short names first, then long ones: a fixed order, because click builds the help option's
    # names from a set and its order changes with the hash seed (the files must not).
    names.sort(key=lambda n: (n.startswith("--"), n))
    is_flag = bool(getattr(param, "is_flag", False)) or bool(getattr(param, "count", False))
    takes_value = not is_flag
    metavar = param.metavar or ""
    if takes_value and not metavar:
        metavar = (param.name or "value").upper()
    kind, choices = _kind(param, names or [param.name or ""], metavar) if takes_value else ("", ())
    help_text = _unescape(getattr(param, "help", ""))
    default = getattr(param, "default", None)
    if (is_option and takes_value and "[default:" not in help_text and getattr(param, "show_default", False)
            and default not in (None, (), []) and not callable(default)):
        shown = default.value if isinstance(default, enum.Enum) else default
        help_text = f"{help_text}  [default: {shown}]".strip()
    repeatable = bool(getattr(param, "multiple", False)) or bool(getattr(param, "count", False))
    if not is_option and param.nargs == -1:
        repeatable = True
    envvar = getattr(param, "envvar", None) or ""
    if isinstance(envvar, (list, tuple)):
        envvar = " ".join(envvar)
    return Param(tuple(names), metavar if takes_value else "", help_text, takes_value, repeatable,
                 kind, choices, bool(param.required), envvar)


def _command(cmd: ClickCommand, ctx: Context, name: str) -> Command:
    params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)]
    options = tuple(_param(p) for p in params if getattr(p, "param_type_name", "") == "option")
    arguments = tuple(_param(p) for p in params if getattr(p, "param_type_name", "") == "argument")
    help_text = _unescape(cmd.help)
    summary = _unescape(cmd.short_help) or help_text.split("\n\n")[0].replace("\n", " ")
    summary = re.split(r"(?<=\.)\s", summary, maxsplit=1)[0]
    usage = tuple(cmd.collect_usage_pieces(ctx)) if name else ()
    return Command(name, summary, help_text, usage, options, arguments)


def load() -> tuple[Command, list[Command]]:
    """The root and its commands (in the order they were registered), hidden ones left out."""
    from zcrelay.cli import load

    # Every command: a TyperGroup, typer's for an app of several (get_command is typed Command).
    group = typing.cast("TyperGroup", typer.main.get_command(load()))
    ctx = group.context_class(group, info_name=PROG, **(group.context_settings or {}))
    root = _command(group, ctx, "")
    commands = []
    for name, cmd in group.commands.items():  # registration order, as --help lists them
        if cmd.hidden:
            continue
        sub = cmd.context_class(cmd, info_name=name, parent=ctx, **(cmd.context_settings or {}))
        commands.append(_command(cmd, sub, name))
    return root, commands


def first_sentence(text: str) -> str:
    text = re.sub(r"\s*\[default: [^\]]*\]", "", text).replace("\n", " ").strip()
    return re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")


# --------------------------------------------------------------------------------------------
# The man page.

def roff(text: str, wrap: bool = True) -> str:
    """Escape plain text for roff: backslashes, option dashes, and a leading '.' or "'".

    Light markup is then applied: **bold** and __italic__. With `wrap`, each sentence starts a
    new line and lines stay within 80 bytes (man-pages(7), mandoc -Tlint)."""
    text = text.replace("\\", "\\e")
    text = re.sub(r"(?<![\w/.])-[-\w]*", lambda m: m.group().replace("-", "\\-"), text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", text)
    text = re.sub(r"__(.+?)__", r"\\fI\1\\fR", text)
    if wrap:
        text = "\n".join(
            "\n".join(textwrap.wrap(sentence, 79, break_long_words=False, break_on_hyphens=False))
            for sentence in re.split(r"(?<=[.:;?!])\s+(?=[A-Z*_(])", text))
    lines = []
    for line in text.split("\n"):
        line = line.strip() if wrap else line
        if line[:1] in (".", "'"):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def paragraphs(text: str) -> list[str]:
    """Split help text or prose on blank lines and join each paragraph's lines."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        block = " ".join(line.strip() for line in block.splitlines() if line.strip())
        if block:
            out.append(block)
    return out


def _prose(text: str) -> list[str]:
    lines: list[str] = []
    for i, block in enumerate(paragraphs(text)):
        if i:
            lines.append(".PP")
        lines.append(roff(block))
    return lines


def _usage_roff(name: str, pieces: tuple[str, ...]) -> str:
    words = []
    for piece in pieces:
        inner = piece.strip("[]{}.")  # {NAME}: a required argument, as plain typer writes it
        rendered = f"\\fI{roff(inner)}\\fR"
        if piece.startswith("["):
            rendered = f"[{rendered}]"
        if piece.rstrip("]").endswith("..."):
            rendered += "\\&..."
        words.append(rendered)
    return f".B {PROG} {name}\n" + " ".join(words) if words else f".B {PROG} {name}"


def _option_tag(opt: Param) -> str:
    names = ", ".join(f"\\fB{roff(n)}\\fR" for n in sorted(opt.names, key=len))
    if opt.takes_value:
        names += f" \\fI{roff(opt.metavar)}\\fR"
    return names


def _option_help(opt: Param) -> str:
    text = opt.help or "(no description)"
    if opt.required and opt.is_option:
        text += " Required."
    if opt.choices:
        text += " One of: " + ", ".join(f"**{c}**" for c in opt.choices) + "."
    if opt.repeatable and opt.takes_value and "repeat" not in text.lower():
        text += " May be given more than once."
    if opt.envvar:
        text += f" Also read from the environment variable **{opt.envvar}**."
    return roff(text)


def _options_block(options: tuple[Param, ...]) -> list[str]:
    lines = []
    for opt in options:
        lines += [".TP", _option_tag(opt), _option_help(opt)]
    return lines


def render_man(root: Command, commands: list[Command]) -> str:
    from zcrelay import __version__
    from zcrelay.exitcodes import DESCRIPTIONS, ExitCode

    out = [
        '.\\" Generated by "python -m zcrelay.cli.docs" from the typer app. Do not edit:',
        '.\\" change the help texts or zcrelay/cli/docs.py and run it again.',
        f'.TH ZCRELAY 1 {MANUAL_DATE} "{PROG} {__version__}" "User Commands"',
        ".\\\" Option names and addresses read better unhyphenated and ragged right.",
        ".nh",
        ".ad l",
        ".SH NAME",
        f"{PROG} \\- zero\\-copy socket relay, stream capture and netcat for Linux",
        ".SH SYNOPSIS",
        f".B {PROG}",
        "[\\fB\\-\\-version\\fR] [\\fB\\-h\\fR | \\fB\\-\\-help\\fR]",
    ]
    for cmd in commands:
        out += [".br", _usage_roff(cmd.name, cmd.usage)]
    out += [".SH DESCRIPTION"] + _prose(DESCRIPTION)
    out += [".PP", "The commands are:"]
    for cmd in commands:
        out += [".TP", f"\\fB{cmd.name}\\fR", roff(cmd.summary)]
    out += [".SH COMMANDS"]
    for cmd in commands:
        out += [f'.SS "{PROG} {cmd.name}"', _usage_roff(cmd.name, cmd.usage), ".PP"]
        out += _prose(cmd.help or cmd.summary)
        if cmd.name in COMMAND_NOTES:
            out += [".PP"] + _prose(COMMAND_NOTES[cmd.name])
        if cmd.arguments:
            out += [".PP", "Arguments:"]
            for arg in cmd.arguments:
                out += [".TP", f"\\fI{roff(arg.metavar)}\\fR", _option_help(arg)]
        out += [".PP", f"Options: see \\fB{cmd.name}\\fR under \\fBOPTIONS\\fR."]
    out += [".SH OPTIONS", ".SS Global options",
            f"These come before the command, as in \\fB{PROG} \\-\\-version\\fR."]
    out += _options_block(root.options)
    for cmd in commands:
        out += [f'.SS "{cmd.name}"']
        out += _options_block(cmd.options)
    out += [".SH ADDRESSES"] + _prose(ADDRESSES_INTRO)
    for form, text in ADDRESS_FORMS:
        out += [".TP", f"\\fB{roff(form)}\\fR", roff(text)]
    out += [".PP"] + _prose(ADDRESSES_OUTRO)
    out += [".SH EXIT STATUS", f"{PROG} exits with one of these codes:"]
    for code in ExitCode:
        out += [".TP", f"\\fB{int(code)}\\fR ({code.name})", roff(DESCRIPTIONS.get(code, ""))]
    out += [".SH ENVIRONMENT"] + _prose(ENVIRONMENT)
    envs = [(opt, cmd.name) for cmd in [root, *commands] for opt in cmd.options if opt.envvar]
    for opt, where in envs:
        out += [".TP", f"\\fB{roff(opt.envvar)}\\fR",
                roff(f"Same as {opt.long_first[0]}" + (f" of {where}." if where else "."))]
    out += [".SH FILES"]
    for path, text in FILES:
        out += [".TP", f"\\fI{roff(path)}\\fR", roff(text)]
    out += [".SH SIGNALS"] + _prose(SIGNALS)
    out += [".SH EXAMPLES"]
    for i, (text, example) in enumerate(EXAMPLES):
        if i:
            out.append(".PP")
        out += [roff(text), ".PP", ".in +4n", ".EX"] + [roff(line, wrap=False) for line in example.splitlines()]
        out += [".EE", ".in"]
    out += [".SH SEE ALSO"]
    out += [",\n".join(f".BR {page} ({section})" for page, section in SEE_ALSO)]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Prose. Everything a parser can know comes from the app; this is what it cannot know.

DESCRIPTION = """
**zcrelay** moves bytes between TCP sockets, Unix sockets, pipes and files without copying them
through user space. The kernel's splice(2) moves the data from a socket into a pipe and from the
pipe into the other socket; only page references pass through the pipe, so the payload never
enters the zcrelay process and costs no CPU copy. tee(2) duplicates what a pipe holds into a
second pipe without consuming it, which is how **tee** captures a stream while it is relayed, and
sendfile(2) sends a file's pages straight to a socket for **send** and **serve**. Those two take
regular files only (a FIFO is refused at once, exit status 8); a file that reports size 0 but
has content, as files in /proc do, is sent to its end, and **--offset** or **--length** on it is
refused, since its size is unknown.

Each stream in flight uses one pipe per direction; empty pipes are kept in a small pool and
reused, and a pipe that still holds bytes is never reused. Each connection is relayed in both
directions at once, and an end-of-file in one direction is passed on as a half-close (shutdown of
the write side), so protocols that half-close keep working; **--linger** ends a half-closed connection once no
byte has moved for that many seconds, so a reply that keeps flowing is never cut short. A side's
end-of-file counts from its arrival, even while zcrelay still holds bytes before it that the
other side does not take (a target that stopped reading an upload): such a connection ends
after the linger too, instead of waiting for **--idle-timeout**, and for ever without one. zcrelay
looks for such end-of-files every quarter of the linger (at most 5 s), on TCP and Unix sockets alike. A byte counts as moving, for
**--linger** and **--idle-timeout**, when a peer takes it from zcrelay's send queue too (looked for
as often): a client reading a download slower than half a socket buffer per timeout is not idle.

**Fallback.** When a file descriptor cannot be spliced (a terminal, a file opened with O_APPEND,
an old or unusual kernel or file system), the first splice fails with EINVAL, ENOSYS or EBADF
before any byte has moved, and zcrelay falls back to an ordinary read and write copy for that
stream only. It never falls back after the first byte, so no data is lost or duplicated. Every
fallback is counted with its reason and reported in the summary printed at exit, together with
the share of bytes that were spliced. **--no-splice** forces the copy path, for comparison.
One exception moves mid-stream: a TCP urgent byte (MSG_OOB), which splice cannot pass. It is
read inline and relayed in its place in the stream as one copied byte, counted as a fallback
("urgent byte copied"); its out-of-band flag is not passed on. The sockets zcrelay opens and
accepts keep urgent bytes inline from the start (SO_OOBINLINE), so two urgent bytes in a row
both arrive. On a socket it is handed instead (stdin, stdout), TCP's single urgent mark
applies: a second urgent byte that arrives while the relay stands at the first one's mark
makes the kernel drop the first, as for any reader without SO_OOBINLINE.

Pipes are grown to **--pipe-size** (1 MiB by default) with F_SETPIPE_SZ; the kernel caps
this at /proc/sys/fs/pipe-max-size and rations the pages an unprivileged user may use in grown
pipes, and zcrelay then uses the largest size it is allowed and says so once.

**forward** is the port forwarder; **connect** and **listen** are netcat-style: they relay a
socket to standard input and output, so they fit in shell pipelines; **send** sends a file to a
socket, and **serve** offers a file to every client that connects; **tee** is tee(1) for
pipelines (tee(2) duplicates the pipe's pages) and, with **--listen** and **--target**, relays like
**forward** while capturing both directions of every connection into files; **demo** runs a
self-contained relay on the loopback interface and shows what was spliced (exit status 0 when
every echo matched, 1 when one did not, 7 when the relay dropped connections for lack of file
descriptors or memory, which its table names); **bench** measures
the copy methods (read+write, mmap+write, sendfile, splice) on this machine. Run
**zcrelay** __COMMAND__ **--help** for a command's options.

Logs, readiness lines ("listening on ...") and the summary go to standard error; standard output
carries only data.
"""

# Extra text for a command, printed after its own help text in COMMANDS.
COMMAND_NOTES = {
    "forward": """
With LISTEN and TARGET, forwards one listener; **--rule** adds more LISTEN=TARGET pairs, each
with its own listener, and **--config** reads options and rules from a TOML file. The keys of
the file are the long option names without the leading dashes (pipe-size, max-conns,
max-idle-pipes, connect-timeout, idle-timeout, linger, resolve-ttl, backlog, workers), the
booleans splice and nodelay, and [[rule]] tables with listen and target strings. An unknown key is an error. Options
on the command line win over the file; **--splice** and **--nodelay** undo a file's
splice = false and nodelay = false; --capture-dir, --verbose and --quiet are command-line only.
Rules from every source are served together, numbered in the logs (rule=N) in this order:
LISTEN TARGET, the file's [[rule]] tables, then each **--rule**. A relative unix: path, on the
command line or in the file, is relative to zcrelay's working directory, not to the file's. A
config file that cannot be read exits with status 8; an error in one names the file and, where
it can be told, the line.

A Unix path may contain '=': a rule is split at the '=' that leaves an address on each side,
and one that can be split at more than one is a usage error (status 2); give it as a [[rule]]
table in the config file instead.

Rules that share a listen address, and rules whose targets lead back to their own listeners (a
rule that forwards to itself, or rules that forward to each other in a loop, as told from the
addresses as written, without DNS: 127.1 is 127.0.0.1, as getaddrinfo reads it, but a name such
as localhost is left to the system, where a shared port fails to bind, status 3), are usage
errors (status 2), refused before anything is bound.

For each listener zcrelay prints "listening on ADDRESS -> TARGET" on standard error once it
accepts connections; port 0 picks a free port and the line shows which.

Each connection is logged in one line on standard error when it ends (not with **--quiet**;
**--verbose** adds a line when it is accepted): conn=N rule=R peer=ADDRESS target=TARGET
up=BYTES down=BYTES spliced=BYTES copied=BYTES duration=SECONDSs close=REASON, and
fallback="WHY" when a direction was copied through user space. up counts the bytes from the
client to the target, down those back; spliced and copied split both ways' bytes by how they
moved. REASON is eof (both sides closed), reset by client or reset by target (passed on to the
other side as a reset), lost on client or lost on target (its connection timed out or its
host became unreachable; also passed on as a reset), idle (**--idle-timeout**), linger (**--linger**), timeout
(**--connect-timeout**), refused, unreachable, no-socket (no socket at a unix: target),
resolve (the name does not resolve), out-of-fds, out-of-memory, shutdown (SIGINT or SIGTERM),
or an error with its cause in parentheses: error (...) for a connect, and for a relay the
errno's name and the side, as in eio on target (...).

A reset or a lost peer ends the connection, but what zcrelay already took from that side (a
reply the target sent before it reset, which without a relay would have been in the client's
own receive queue) still reaches the other side, which is reset only once it has acknowledged
every byte, or once no byte has moved for **--linger** seconds. A side that zcrelay still holds
bytes for when **--idle-timeout**, **--linger** or a shutdown ends the connection is reset too,
rather than closed, so that it cannot take a stream cut short for a whole one, and so is the side
those bytes came from, so that it cannot take them for delivered (as a kernel that closes a
socket with bytes unread resets its peer). Whenever a reset
throws away bytes zcrelay had queued for a side, up and down leave out the ones never sent.

With **--max-conns**, accepting stops at the limit and further clients wait in the listen
backlog (**--backlog**) until a connection ends; the first time the limit is reached, zcrelay
says so in one warning.

A TARGET given by name is resolved when a connection needs it, and the addresses found serve
the connections of the next **--resolve-ttl** seconds (5 by default; 0 resolves for every
connection). Such a connection costs a quarter to a third of the CPU of one that resolves. A connection
that is refused, times out or finds no route drops the addresses, so the next one resolves
again. Each address is tried in turn, IPv4 and IPv6 alike; each but the last gets an equal
share of the **--connect-timeout** left, and at least 2 seconds, so an address that drops SYNs
does not use up the time of the others.

**--workers** N serves with N processes, for loads one CPU cannot carry (many small
requests). The first process binds every listener (a TCP listener N times with SO_REUSEPORT,
so the kernel spreads new connections over the workers; a Unix listener once, shared), forks
the workers and then only waits. The first of the N binds without SO_REUSEPORT, so a port that
another process holds, with SO_REUSEPORT or not, is "address already in use" (exit status 3) as
with one process. Worker K numbers its connections K, K+N, K+2N..., so numbers
and capture file names stay unique. Limits such as **--max-conns** apply to each worker. A
SIGINT or SIGTERM to the first process stops every worker, and it prints one summary for all of
them; a second SIGINT kills the workers at once and exits with status 130 (a second SIGTERM is
ignored, see SIGNALS). The workers ignore
those signals themselves and also stop if the first process dies. A
worker that ends unasked (killed, or failed) stops the others, and zcrelay exits with that
worker's status, or 1 if it was killed by a signal. If the workers had started serving, the
summary still comes, counting what the others relayed and marked "(counted by the workers that
reported; a worker ended without)".
""",
    "connect": """
When the connection is lost (the peer resets it, or it times out), every byte already received
is written to standard output first, in order, whether zcrelay held it or the kernel still did
(Linux keeps what arrived before a reset readable). Then zcrelay prints one line, "connection
lost while ...: sent N bytes, received M bytes", where M counts the bytes written to standard
output, and exits with status 1. A target that accepts, sends and resets at once is such a
lost connection too, not a refused one: what it sent is written out.

TCP_NODELAY is set, as **forward** does: a request written in two pieces is not held back
waiting for the ACK of the first (nc and socat leave Nagle on, 40 ms an exchange here). A TCP
socket given as standard input (inetd, systemd's Accept=yes) keeps its urgent bytes in their
place from zcrelay's first read.
""",
    "listen": """
A lost connection ends as with **connect**: the bytes already received reach standard output
first. With **--keep-open** the line is a warning and the next connection is accepted. A
connection ends when both directions are done: unlike nc -l, a peer's half-close does not cut
off what zcrelay is still sending it, and so, unlike nc -lk, **--keep-open** moves on to the
next client only once standard input has ended too, the peer resets, or, with **--linger**
SECONDS, no byte has moved for that long since the client's end of stream (a standard input
that is open and idle, as `tail -f log | zcrelay listen -k 9000`, never ends by itself). A
connection ended so logs "ended: linger" at **-v**; for **connect** as for **listen**,
**--linger** also bounds how long the peer may stay silent after standard input's end.
""",
    "send": """
A transfer that fails or is stopped (SIGINT, SIGTERM, SIGHUP) before its last byte ends with a
TCP reset, not a FIN, so that the receiver cannot take a truncated file for the whole one. A file whose size
says nothing, as procfs's 0 and sysfs's page, is sent to its end of file; a file that grows
during the transfer is sent up to its size at the start. **--idle-timeout** gives up on a
receiver that lets no byte move for that long before the last one (the rate limit's own pauses
do not count): it is reset, and zcrelay exits 1, as for a connection lost mid-transfer. The byte
count in such an error is what was sent; the receiver may have read fewer. A Unix socket has
no reset: a receiver on one that is cut short sees an ordinary end of stream, and the error
says so.
""",
    "serve": """
A client whose transfer fails on zcrelay's side (the file cannot be opened or shrinks, no fd is
left) or is cut short by the server stopping gets a TCP reset, never a clean end of a
truncated file. Each client holds four file descriptors (its socket, the file, a pipe) until its
transfer ends: **--idle-timeout** resets one that lets no byte move for that long, so that
clients that stop reading cannot run serve out of them.
""",
    "bench": """
The splice row moves the file through a 64 KiB pipe unless **--pipe-size** says otherwise:
the kernel's default pipe, and the size of the pipe sendfile(2) uses inside. On the 2-core VMs
this project is measured on, with the sender and the sink on one CPU, a 1 MiB pipe cost that
row about 40% more CPU per GB, sender and sink alike.

With **--json**, the results are one JSON object on standard output. GB is 1,000,000,000
bytes, and every per-method figure is the median over its runs. The object's keys: file (the path moved),
temporary (true when the file was created for the run and is removed), bytes (its size),
repeat (runs per method), statistic ("median"), cache ("warm"), cpu_measured and sink (how the
CPU was measured and what the sink is, in words), cpu (the CPU the sender and the sink were
pinned to, or null with **--spread**), pipe_size (the splice pipe's bytes, as the kernel
granted them), notes (the table's notes, a list of strings) and methods, a list with one object
per method. Each has method (read+write, mmap+write, sendfile or splice),
throughput_bytes_per_s, throughput_gbit_per_s, cpu_seconds_per_gb (the sending thread's user
plus system time), cpu_user_seconds_per_gb, cpu_system_seconds_per_gb,
sink_cpu_seconds_per_gb (the receiving thread's), syscalls, voluntary_context_switches and
involuntary_context_switches (the sender's, per run of the whole file), cpu_copies (an integer: CPU copies with this bench's loopback sink, a scatter-gather device, so 0 for sendfile as for splice),
cpu_copies_articles and context_switches_articles (the counts the articles give per chunk, as
strings, not measured), chunk_bytes (bytes asked for per call; 0: the rest of the file) and
runs, one object per run: seconds, cpu_user, cpu_system, sink_cpu (CPU seconds), syscalls,
voluntary_context_switches and involuntary_context_switches.
""",
}

ADDRESSES_INTRO = """
LISTEN addresses say where zcrelay accepts connections, TARGET addresses where it connects to.
Both take these forms:
"""

ADDRESS_FORMS = [
    ("PORT", "A bare port. As a listen address it binds the loopback address 127.0.0.1 only, like "
             "ssh -L, so nothing is exposed to the network by accident; as a target it connects "
             "to 127.0.0.1:PORT."),
    (":PORT", "Every interface (0.0.0.0, and :: where the kernel maps IPv4 into IPv6). Listen "
              "addresses only."),
    ("HOST:PORT", "A host name or an IPv4 address. Names are resolved; a target's addresses are "
                  "tried in turn, IPv4 and IPv6."),
    ("[IPV6]:PORT", "An IPv6 address in brackets, e.g. [::1]:8080 or [fe80::1%eth0]:22."),
    ("unix:PATH", "A Unix stream socket at PATH (at most 107 bytes). To listen, a socket file "
                  "left at PATH by a process that died is replaced; one that a process listens on "
                  "is 'address already in use' (exit status 3). That is read from /proc/net/unix "
                  "without connecting to it, or, for a socket not listed there (bound in another "
                  "network namespace or under another spelling of the path), by a non-blocking "
                  "connect. The socket file is removed at exit, unless another one has taken "
                  "its place."),
    ("unix:@NAME", "A Unix socket in Linux's abstract namespace: no file is created."),
]

ADDRESSES_OUTRO = """
A PORT after a colon may also be a TCP service name from /etc/services, as in ssh, socat and
nc: host:http is host:80. Port 0 asks the kernel for a free port (listen addresses only); the "listening on" line tells
which port was chosen. A malformed address is a usage error (exit status 2) and the message says
which forms are accepted.
"""

ENVIRONMENT = """
zcrelay reads one environment variable of its own, ZCRELAY_LOOP. By default forward (without
--capture-dir) runs trio as the guest of its own epoll loop, so that a wake-up for bytes costs
no trip through trio's scheduler; ZCRELAY_LOOP=trio runs it under trio.run instead, as the
library does (for comparison and for tests). Logs are plain text, whatever TERM says.
"""

FILES = [
    ("FILE given to forward --config", "A TOML file with options and [[rule]] tables; see "
                                          "forward under COMMANDS."),
    ("DIR given to forward or tee --capture-dir",
     "Captured streams: per connection, {time}-{conn}-{peer}-up.bin and -down.bin, each the "
     "bytes of one direction in order as zcrelay read them from their sender, and a "
     "{time}-{conn}-{peer}.json sidecar (written at the start, rewritten at the end; one that "
     "cannot be written whole, on a full disk, is removed rather than left empty): "
     "conn, peer, target, start, end, close, complete (both directions), and per direction "
     "file, relayed_bytes, captured_bytes, error and "
     "complete. A direction is complete when its capture never failed and holds every byte "
     "relayed; captured_bytes can exceed relayed_bytes when the connection ended (a reset, "
     "the other direction failing) before bytes already read could be delivered. A capture "
     "that fails (a full disk) never stops the relay: its connection logs one warning line "
     "as it ends, naming each part lost and why; -v logs each failure as it happens. So that a "
     "long connection's loss is not known only when it ends, the first failure of a kind in "
     "the directory is also a warning at once (\"capture into DIR failing: ...\"), repeated at "
     "most once a minute while it goes on."),
    ("/proc/sys/fs/pipe-max-size", "The largest pipe an unprivileged process may ask for; "
                                   "--pipe-size is clamped to it."),
    ("/proc/sys/fs/pipe-user-pages-soft", "Pages one user may hold in grown pipes; past it new "
                                          "pipes stay small: forward warns once; tee copies the outputs "
                                          "it cannot give a pipe, noted with -v (so it does past "
                                          "RLIMIT_NOFILE: each output's pipe takes two fds)."),
]

SIGNALS = """
**SIGINT** and **SIGTERM** stop a running relay cleanly: zcrelay stops accepting new connections,
closes the open ones (serve resets the clients whose file was not sent whole), prints a summary on standard error and exits with status 0. The summary
gives the connections, the bytes each way, the share spliced and the fallbacks with their
reasons; serve's gives the connections, the bytes sent and the clients that failed, among them
the clients the stop cut short mid-file, named in parentheses: "2 failed (1 cut short)". A SIGINT
that arrives before the command is running exits with status 130 (one during Python's own
start-up, the first few milliseconds, may end it as Python does, with a traceback). While a server stops, a
second SIGTERM is ignored (timeout(1) sends one to zcrelay and one to its process group, and
a service manager may repeat it), and a second SIGINT ends it at once (status 130).

That is for the servers: forward, serve, listen --keep-open and tee --listen. The pipeline
commands (connect, listen, send, and tee on standard input) behave as netcat and GNU tee do:
SIGINT ends them with status 130 and prints nothing, and SIGTERM ends them by its default
action (status 143 in a shell).

**SIGHUP** ends every command by its default action (status 129 in a shell), unless it was
ignored when zcrelay started (as under nohup). Ended by SIGINT, SIGTERM or SIGHUP, zcrelay first
removes the unix:PATH socket files it bound (SIGKILL leaves them, to be replaced at the next start).
zcrelay bench removes its temporary file whatever ends it: SIGINT and SIGTERM end it with status
130, SIGHUP by its default action (129 in a shell).

A write to a peer that has gone away ends that direction of that connection (EPIPE is handled, not
fatal); the other connections go on.
"""

EXAMPLES = [
    ("Forward local port 8080 to a web server, on the loopback interface only:",
     "zcrelay forward 8080 www.example.org:80"),
    ("Forward on every interface, and a second rule to a Unix socket:",
     "zcrelay forward :2222 gateway.example.net:22 --rule :5433=unix:/run/postgresql/.s.PGSQL.5432"),
    ("Relay port 9000 to a backend and capture both directions of every connection:",
     "mkdir -p /var/tmp/capture   # the directory must exist\n"
     "zcrelay tee --listen :9000 --target backend:9000 --capture-dir /var/tmp/capture"),
    ("Copy a stream to two files on its way through a pipeline, without copying it through user space:",
     "producer | zcrelay tee a.bin b.bin | consumer"),
    ("Send a directory as a tar stream to a listener on another host (netcat-style pipeline):",
     "# on the receiving host\nzcrelay listen :9000 | tar x\n# on the sending host\n"
     "tar c dir | zcrelay connect host:9000"),
    ("Send a file (file, pipe, socket with splice(2); --method sendfile for sendfile(2)):",
     "zcrelay send FILE host:9000"),
    ("Serve a file to every client that connects, concurrently:",
     "zcrelay serve image.iso --listen :8000"),
    ("Measure read+write, mmap+write, sendfile and splice on this machine:",
     "zcrelay bench"),
    ("See splice at work on this machine:",
     "zcrelay demo"),
]

SEE_ALSO = [("splice", 2), ("tee", 2), ("sendfile", 2), ("pipe", 7), ("socat", 1), ("nc", 1),
            ("tee", 1)]


# --------------------------------------------------------------------------------------------
# bash

def _sh_words(words: list[str]) -> str:
    return " ".join(words)


def _bash_value_case(options: tuple[Param, ...], indent: str) -> list[str]:
    if not any(opt.takes_value for opt in options):
        return []
    lines = [f'{indent}case "$prev" in']
    for opt in options:
        if not opt.takes_value:
            continue
        pattern = "|".join(opt.names)
        if opt.complete == "choice":
            action = f'COMPREPLY=($(compgen -W "{_sh_words(list(opt.choices))}" -- "$cur")); return'
        elif opt.complete in ("file", "dir"):
            action = f"_zcrelay_paths {opt.complete}; return"
        else:
            action = "return"  # a value nobody can guess: offer nothing
        lines.append(f"{indent}    {pattern}) {action} ;;")
    lines.append(f"{indent}esac")
    return lines


def render_bash(root: Command, commands: list[Command]) -> str:
    names = [c.name for c in commands]
    root_opts = [n for o in root.options for n in o.long_first]
    out = [
        "# bash completion for zcrelay. Generated by \"python -m zcrelay.cli.docs\"; do not edit.",
        "",
        "_zcrelay_paths() {",
        "    # $1: file or dir. Uses bash-completion's _filedir when it is loaded.",
        "    if declare -F _filedir >/dev/null; then",
        '        if [[ $1 == dir ]]; then _filedir -d; else _filedir; fi',
        "    else",
        "        compopt -o filenames 2>/dev/null",
        '        if [[ $1 == dir ]]; then COMPREPLY=($(compgen -d -- "$cur"))',
        '        else COMPREPLY=($(compgen -f -- "$cur")); fi',
        "    fi",
        "}",
        "",
        "_zcrelay() {",
        "    local cur prev cmd=\"\" cmd_index=0 i word npos kind",
        "    COMPREPLY=()",
        '    cur="${COMP_WORDS[COMP_CWORD]}"',
        '    prev=""',
        '    (( COMP_CWORD > 0 )) && prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        word="${COMP_WORDS[i]}"',
        '        case "$word" in',
    ]
    root_value = [n for o in root.options if o.takes_value for n in o.names]
    if root_value:
        out.append(f"            {'|'.join(root_value)}) ((i++)) ;;")
    out += [
        "            -*) ;;",
        '            *) cmd="$word"; cmd_index=$i; break ;;',
        "        esac",
        "    done",
        '    if [[ -z $cmd ]]; then',
    ]
    out += _bash_value_case(root.options, "        ")
    out += [
        '        if [[ $cur == -* ]]; then',
        f'            COMPREPLY=($(compgen -W "{_sh_words(root_opts)}" -- "$cur"))',
        "        else",
        f'            COMPREPLY=($(compgen -W "{_sh_words(names)}" -- "$cur"))',
        "        fi",
        "        return",
        "    fi",
        '    case "$cmd" in',
    ]
    for cmd in commands:
        opts = [n for o in cmd.options for n in o.long_first]
        value_opts = [n for o in cmd.options if o.takes_value for n in o.names]
        kinds = [a.complete or "none" for a in cmd.arguments]
        rest = next((a.complete or "none" for a in cmd.arguments if a.repeatable), "none")
        out.append(f"        {cmd.name})")
        out += _bash_value_case(cmd.options, "            ")
        out += [
            '            if [[ $cur == -* ]]; then',
            f'                COMPREPLY=($(compgen -W "{_sh_words(opts)}" -- "$cur"))',
            "                return",
            "            fi",
            "            # Which positional argument is being completed?",
            "            npos=0",
            "            for ((i = cmd_index + 1; i < COMP_CWORD; i++)); do",
            '                case "${COMP_WORDS[i]}" in',
        ]
        if value_opts:
            out.append(f"                    {'|'.join(value_opts)}) ((i++)) ;;")
        out += [
            "                    -*) ;;",
            "                    *) ((npos++)) ;;",
            "                esac",
            "            done",
            f"            local -a kinds=({' '.join(kinds)})",
            f'            kind="${{kinds[npos]:-{rest}}}"',
            '            case "$kind" in',
            "                file|dir) _zcrelay_paths \"$kind\" ;;",
            "            esac",
            "            ;;",
        ]
    out += [
        "    esac",
        "}",
        "",
        "complete -F _zcrelay zcrelay",
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# zsh

def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_describe(text: str) -> str:
    """Text inside an _arguments [description]: brackets, colons and backslashes escaped."""
    return re.sub(r"([\\\[\]:])", r"\\\1", first_sentence(text))


def _zsh_action(param: Param) -> str:
    if param.complete == "file":
        return "_files"
    if param.complete == "dir":
        return "_files -/"
    if param.complete == "choice":
        return "(" + " ".join(param.choices) + ")"
    return " "


def _zsh_option(opt: Param) -> str:
    desc = _zsh_describe(opt.help)
    value = ""
    if opt.takes_value:
        value = ":" + opt.metavar.replace(":", "\\:") + ":" + _zsh_action(opt)
    names = opt.long_first
    if "--help" in names or "--version" in names:
        prefix = "(- *)"
    elif opt.repeatable:
        prefix = "*"
    else:
        prefix = "(" + " ".join(names) + ")" if len(names) > 1 else ""
    if len(names) == 1:
        return _zsh_quote(f"{prefix}{names[0]}[{desc}]{value}")
    return _zsh_quote(prefix) + "{" + ",".join(names) + "}" + _zsh_quote(f"[{desc}]{value}")


def _zsh_argument(arg: Param, position: int) -> str:
    message = arg.metavar.replace(":", "\\:")
    where = "*" if arg.repeatable else str(position)
    optional = ":" if not arg.required and not arg.repeatable else ""
    return _zsh_quote(f"{where}:{optional}{message}:{_zsh_action(arg)}")


def render_zsh(root: Command, commands: list[Command]) -> str:
    out = [
        "#compdef zcrelay",
        "# zsh completion for zcrelay. Generated by \"python -m zcrelay.cli.docs\"; do not edit.",
        "",
    ]
    for cmd in commands:
        specs = [_zsh_option(o) for o in cmd.options]
        specs += [_zsh_argument(a, i) for i, a in enumerate(cmd.arguments, 1)]
        out.append(f"_zcrelay_{cmd.name.replace('-', '_')}() {{")
        out.append("    _arguments -s -S \\")
        out += [f"        {spec} \\" for spec in specs[:-1]] + [f"        {specs[-1]}"] if specs else []
        out += ["}", ""]
    out += [
        "_zcrelay() {",
        '    local curcontext="$curcontext" state line',
        "    typeset -A opt_args",
        "    local -a commands",
        "    commands=(",
    ]
    for cmd in commands:
        out.append(f"        {_zsh_quote(cmd.name + ':' + first_sentence(cmd.summary))}")
    out += [
        "    )",
        "    _arguments -C \\",
    ]
    out += [f"        {_zsh_option(o)} \\" for o in root.options]
    out += [
        "        '1: :->command' \\",
        "        '*:: :->args' && return",
        "    case $state in",
        "        command) _describe -t commands 'zcrelay command' commands ;;",
        "        args)",
        '            curcontext="${curcontext%:*:*}:zcrelay-$words[1]:"',
        "            case $words[1] in",
    ]
    for cmd in commands:
        out.append(f"                {cmd.name}) _zcrelay_{cmd.name.replace('-', '_')} ;;")
    out += [
        "            esac",
        "            ;;",
        "    esac",
        "}",
        "",
        '# Autoloaded from fpath, this file is the body of _zcrelay; sourced, it registers itself.',
        'if [[ $zsh_eval_context[-1] == loadautofunc ]]; then',
        '    _zcrelay "$@"',
        "else",
        "    compdef _zcrelay zcrelay",
        "fi",
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# fish

def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_names(names: tuple[str, ...]) -> str:
    parts = []
    for name in names:
        if name.startswith("--"):
            parts.append(f"-l {name[2:]}")
        elif len(name) == 2:
            parts.append(f"-s {name[1:]}")
        else:
            parts.append(f"-o {name[1:]}")
    return " ".join(parts)


def _fish_value(param: Param) -> str:
    if param.complete == "file":
        return " -r -F"
    if param.complete == "dir":
        return " -x -a '(__fish_complete_directories)'"
    if param.complete == "choice":
        return " -x -a " + _fish_quote(" ".join(param.choices))
    return " -x" if param.takes_value else ""


def render_fish(root: Command, commands: list[Command]) -> str:
    names = " ".join(c.name for c in commands)
    out = [
        "# fish completion for zcrelay. Generated by \"python -m zcrelay.cli.docs\"; do not edit.",
        "",
        "# No file names unless an option or argument takes a path.",
        "complete -c zcrelay -f",
        "",
        f"set -l __zcrelay_commands {names}",
    ]
    top = "-n \"not __fish_seen_subcommand_from $__zcrelay_commands\""
    for opt in root.options:
        out.append(f"complete -c zcrelay {top} {_fish_names(opt.names)}{_fish_value(opt)} "
                   f"-d {_fish_quote(first_sentence(opt.help))}")
    for cmd in commands:
        out.append(f"complete -c zcrelay {top} -a {cmd.name} -d {_fish_quote(first_sentence(cmd.summary))}")
    for cmd in commands:
        out += ["", f"# {cmd.name}"]
        seen = f"-n '__fish_seen_subcommand_from {cmd.name}'"
        for opt in cmd.options:
            out.append(f"complete -c zcrelay {seen} {_fish_names(opt.names)}{_fish_value(opt)} "
                       f"-d {_fish_quote(first_sentence(opt.help))}")
        kinds = {a.complete for a in cmd.arguments}
        if "file" in kinds:
            out.append(f"complete -c zcrelay {seen} -F")
        elif "dir" in kinds:
            out.append(f"complete -c zcrelay {seen} -a '(__fish_complete_directories)'")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------

RENDERERS = {"man": render_man, "bash": render_bash, "zsh": render_zsh, "fish": render_fish}


def generate() -> dict[Path, str]:
    """Every output file (relative to the repository root) and its content."""
    root, commands = load()
    return {OUTPUTS[key]: render(root, commands) for key, render in RENDERERS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zcrelay.cli.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if any file differs from what would be written")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the repository root the files go under (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.root == ROOT and not (ROOT / "pyproject.toml").exists():
        parser.error(f"{ROOT} is not a source checkout; give --root")
    stale = []
    for rel, text in generate().items():
        path = args.root / rel
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}", file=sys.stderr)
    if args.check and stale:
        for rel in stale:
            print(f"{rel} is out of date", file=sys.stderr)
        print("run: python -m zcrelay.cli.docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
