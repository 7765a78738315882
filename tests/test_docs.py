"""The man page and the shell completions cannot drift from the CLI.

Commands and options are collected by walking the click command tree of the live typer app (not
through the generator's own model), then looked for in the committed files and asked of real
bash, zsh and fish. A program these tests need may be missing only outside CI: with CI set, a
missing program fails the test instead of skipping it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer

from zcrelay import addresses
from zcrelay.cli import load
from zcrelay.cli import docs
from zcrelay.exitcodes import DESCRIPTIONS, ExitCode
from tests import traffic
from tests.conftest import zcrelay_argv, zcrelay_env

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man" / "zcrelay.1"
BASH = ROOT / "completions" / "zcrelay.bash"
ZSH = ROOT / "completions" / "_zcrelay"
FISH = ROOT / "completions" / "zcrelay.fish"
ZSH_CAPTURE = Path(__file__).resolve().parent / "zsh_complete.zsh"
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


def need(program: str) -> str:
    """The program's path; skip without it, unless in CI, where everything must run."""
    path = shutil.which(program)
    if path:
        return path
    message = f"{program} is not installed (apt-get install {program})"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must run every docs test")
    pytest.skip(message)


def _tree() -> tuple[list[str], dict[str, list[str]]]:
    """Root option strings, and each visible command's option strings, from the click tree."""
    group = typer.main.get_command(load())
    ctx = group.context_class(group, info_name="zcrelay", **(group.context_settings or {}))

    def options(cmd, cmd_ctx) -> list[str]:
        return [name for p in cmd.get_params(cmd_ctx)
                if getattr(p, "param_type_name", "") == "option" and not getattr(p, "hidden", False)
                for name in [*p.opts, *p.secondary_opts]]

    commands = {}
    for name, cmd in group.commands.items():
        if not cmd.hidden:
            sub = cmd.context_class(cmd, info_name=name, parent=ctx, **(cmd.context_settings or {}))
            commands[name] = options(cmd, sub)
    return options(group, ctx), commands


ROOT_OPTIONS, COMMANDS = _tree()
ALL = [("", o) for o in ROOT_OPTIONS] + [(c, o) for c, opts in COMMANDS.items() for o in opts]


def man_section(title: str, level: str = "SH") -> str:
    """The roff text of a section (.SH) or subsection (.SS) of the committed page."""
    text = MAN.read_text()
    match = re.search(rf'^\.{level} "?{re.escape(title)}"?\n(.*?)(?=^\.S[HS] |\Z)', text, re.M | re.S)
    assert match, f"no {level} {title} in {MAN}"
    return match.group(1)


def roff_name(option: str) -> str:
    return option.replace("-", "\\-")


def token(word: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])")


# --- (a) every command, option and exit code is in every file ---------------------------------

def test_the_app_has_commands_and_options():
    assert "forward" in COMMANDS and "--pipe-size" in COMMANDS["forward"]
    assert "--version" in ROOT_OPTIONS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_man_page_documents_every_command(command):
    assert f"\\fB{command}\\fR" in man_section("DESCRIPTION")  # in the list of commands
    assert man_section(f"zcrelay {command}", "SS").strip()
    assert re.search(rf"^\.B zcrelay {command}\b", man_section("SYNOPSIS"), re.M)


@pytest.mark.parametrize("command,option", ALL)
def test_man_page_documents_every_option(command, option):
    section = man_section(command, "SS") if command else man_section("Global options", "SS")
    assert f"\\fB{roff_name(option)}\\fR" in section


def _written_defaults(command: str) -> list[str]:
    """The "[default: ...]" each option of `command` writes into its own help text."""
    group = typer.main.get_command(load())
    return [m.group() for p in group.commands[command].params
            for m in re.finditer(r"\[default: [^\]]*\]", docs._unescape(getattr(p, "help", "")))]


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if _written_defaults(c)))
def test_help_shows_the_defaults_written_into_help_texts(command):
    """--help renders help texts as rich markup, where an unescaped "[default: 1M]" is a style
    tag and vanishes: the man page would say the default and --help would not."""
    out = subprocess.run(zcrelay_argv(command, "--help"), capture_output=True, text=True,
                         env=zcrelay_env(COLUMNS="1000"), timeout=30).stdout
    shown = " ".join(out.split())
    missing = [d for d in _written_defaults(command) if d not in shown]
    assert not missing, f"zcrelay {command} --help drops {missing}"


# --- (a2) --help shows metavars, and each address lists the forms the parser takes -------------

@functools.cache
def help_output(command: str, columns: int) -> str:
    argv = zcrelay_argv(*([command] if command else []), "--help")
    proc = subprocess.run(argv, capture_output=True, text=True, env=zcrelay_env(COLUMNS=str(columns)),
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _params(command: str) -> list:
    group = typer.main.get_command(load())
    return [p for p in group.commands[command].params if not getattr(p, "hidden", False)]


@pytest.mark.parametrize("command", ["", *sorted(COMMANDS)], ids=lambda c: c or "root")
def test_help_shows_metavars_not_types_ranges_or_braces(command):
    """typer 0.28 wrote "{ADDR}" for a required argument in the usage line, "<str>" beside every
    argument, "<int>" for -v (a flag that counts) and "SECONDS [x>=0]" for a number
    (zcrelay.cli.app.Command undoes each); at 80 columns a word too long for the help column
    ended in "…"."""
    out = help_output(command, 1000)
    assert not re.findall(r"<[a-z ]+>", out), out
    assert not re.findall(r"\[-?[\d.]+<=?x|\[x[<>]=?", out), out
    for text in (out, help_output(command, 80)):
        assert "…" not in text, text
    if not command:
        return
    usage = next(line for line in out.splitlines() if "Usage:" in line).split()
    arguments = [p.metavar if p.required or p.metavar.startswith("[") else f"[{p.metavar}]"
                 for p in _params(command) if p.param_type_name == "argument"]
    assert usage[1:] == ["zcrelay", command, "[OPTIONS]", *arguments]
    for param in _params(command):
        if param.param_type_name != "option" or param.is_flag:
            continue
        long = next(n for n in param.opts if n.startswith("--"))
        row = next(line for line in out.splitlines() if f" {long} " in line)
        if param.count:  # the row goes from the option's names straight to its help
            short = next(n for n in param.opts if not n.startswith("--"))
            first_words = " ".join(param.help.split()[:3])
            assert re.search(rf"{long}\s+{short}\s+{re.escape(first_words)}", row), row
            assert "[default:" not in row, row
        else:  # a metavar of its own, not one made from the type
            assert param.metavar and param.metavar in row.split(), row


# Every address a command takes, and whether it is a listen address (zcrelay.addresses.parse's
# `listen`): the call in the command's body decides it, so a new one must be added here.
ADDRESSES = {
    ("forward", "LISTEN"): True, ("forward", "TARGET"): False, ("connect", "ADDR"): False,
    ("listen", "ADDR"): True, ("send", "ADDR"): False, ("serve", "--listen"): True,
    ("tee", "--listen"): True, ("tee", "--target"): False,
}
FORM_EXAMPLES = {"PORT": "8080", ":PORT": ":8080", "HOST:PORT": "example.org:8080",
                 "[IPV6]:PORT": "[::1]:8080", "unix:PATH": "unix:/run/x.sock", "unix:@NAME": "unix:@x"}


def _address_params() -> list[tuple[str, str, object]]:
    found = []
    for command in COMMANDS:
        for param in _params(command):
            names = param.opts if param.param_type_name == "option" else [param.metavar]
            found += [(command, name, param) for name in names if (command, name) in ADDRESSES]
    return found


def test_every_address_parameter_is_known():
    """A parameter with an address metavar is in ADDRESSES, so the next test checks its help."""
    found = _address_params()
    assert {(command, name) for command, name, _ in found} == set(ADDRESSES)
    for command in COMMANDS:
        for param in _params(command):
            if param.metavar in ("LISTEN", "TARGET", "ADDR"):
                assert any((c, p.name) == (command, param.name) for c, _, p in found), (command, param.name)


def _accepted(example: str, listen: bool) -> bool:
    try:
        addresses.parse(example, listen=listen)
    except addresses.AddressError:
        return False
    return True


@pytest.mark.parametrize("command,name", list(ADDRESSES))
def test_address_help_lists_exactly_the_forms_the_parser_takes(command, name):
    """connect and send took a bare PORT that their help did not list, and listen [IPV6]:PORT
    and unix:@NAME; a target's help must not offer :PORT or port 0, which it refuses."""
    listen = ADDRESSES[command, name]
    param = next(p for c, n, p in _address_params() if (c, n) == (command, name))
    words = {word.rstrip(".") for word in re.split(r"[\s,;()]+", docs._unescape(param.help))}
    listed = {form for form in FORM_EXAMPLES if form in words}
    assert listed == {form for form, example in FORM_EXAMPLES.items() if _accepted(example, listen)}
    assert ("port 0" in param.help) == _accepted("0", listen)
    assert " ".join(param.help.split()) in " ".join(help_output(command, 1000).split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_numbers_bounds_are_in_its_help_when_not_obvious(command):
    """--help no longer prints "[1<=x<=256]" after N: a bound other than "0 or more" must be
    in the help text itself."""
    for param in _params(command):
        low, high = getattr(param.type, "min", None), getattr(param.type, "max", None)
        if high is not None:
            assert str(high) in param.help, param.name
        if low not in (None, 0):
            assert str(low) in param.help, param.name


@pytest.mark.parametrize("path", [BASH, ZSH, FISH], ids=lambda p: p.name)
def test_completions_name_every_command_and_option(path):
    text = path.read_text()
    for command, options in COMMANDS.items():
        assert token(command).search(text), f"{command} missing from {path.name}"
        for option in options:
            if path == FISH:  # fish spells them -l pipe-size and -s c
                flag = f"-l {option[2:]}" if option.startswith("--") else f"-s {option[1:]}"
                assert re.search(rf"__fish_seen_subcommand_from {command}'.* {re.escape(flag)}\b", text), \
                    f"{command} {option} missing from {path.name}"
            else:
                assert token(option).search(text), f"{command} {option} missing from {path.name}"


def test_exit_status_lists_every_exit_code():
    section = man_section("EXIT STATUS")
    for code in ExitCode:
        assert f"\\fB{int(code)}\\fR ({code.name})" in section
        first_words = " ".join(DESCRIPTIONS[code].split()[:3])
        assert first_words in " ".join(section.split()), f"description of {code.name}"


def test_every_exit_code_has_a_description():
    assert set(DESCRIPTIONS) == set(ExitCode)


def test_addresses_section_lists_every_accepted_form():
    section = " ".join(man_section("ADDRESSES").split())
    forms = re.findall(r"^    (\S+)\s{2,}", addresses.__doc__, re.M)
    assert forms, "the addresses module docstring lists the forms"
    for form in forms + ["unix:@NAME"]:
        assert f"\\fB{form}\\fR" in section, form
    assert "127.0.0.1" in section and "loopback" in section  # a bare port binds loopback


def test_man_page_has_the_conventional_sections():
    text = MAN.read_text()
    titles = re.findall(r"^\.SH (.+)$", text, re.M)
    assert titles == ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "ADDRESSES",
                      "EXIT STATUS", "ENVIRONMENT", "FILES", "SIGNALS", "EXAMPLES", '"SEE ALSO"'] \
        or titles == ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "ADDRESSES",
                      "EXIT STATUS", "ENVIRONMENT", "FILES", "SIGNALS", "EXAMPLES", "SEE ALSO"]
    examples = man_section("EXAMPLES")
    for wanted in ("zcrelay forward", "zcrelay tee \\-\\-listen", "\\-\\-capture\\-dir",
                   "tar c dir | zcrelay connect host:9000", "zcrelay send FILE host:9000"):
        assert wanted in examples
    for planned in ("forward", "connect", "listen", "send", "serve", "tee", "demo"):
        assert f"\\fB{planned}\\fR" in man_section("DESCRIPTION")
    for page in ("splice (2)", "tee (2)", "sendfile (2)", "pipe (7)", "socat (1)", "nc (1)",
                 "tee (1)"):
        assert f".BR {page}" in text
    signals = man_section("SIGNALS")
    assert "SIGINT" in signals and "SIGTERM" in signals and "status 0" in signals


# --- (b) the committed files are what the generator writes -----------------------------------

@pytest.mark.parametrize("hash_seed", ["0", "4242"])  # output must not depend on set order
def test_generator_check_passes_on_the_committed_files(hash_seed):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run([sys.executable, "-m", "zcrelay.cli.docs", "--check"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + "\nregenerate with: python -m zcrelay.cli.docs"


def test_generator_check_fails_on_a_stale_file(tmp_path, capsys):
    assert docs.main(["--root", str(tmp_path)]) == 0
    assert docs.main(["--root", str(tmp_path), "--check"]) == 0
    stale = tmp_path / "completions" / "zcrelay.fish"
    stale.write_text(stale.read_text().replace("pipe-size", "pipe-sighs"))
    assert docs.main(["--root", str(tmp_path), "--check"]) == 1
    assert "completions/zcrelay.fish is out of date" in capsys.readouterr().err


# --- (c) the page is valid roff and man renders it ---------------------------------------------

def test_mandoc_lint_is_clean():
    proc = subprocess.run([need("mandoc"), "-Tlint", str(MAN)], capture_output=True, text=True)
    assert proc.stdout + proc.stderr == "" and proc.returncode == 0


def test_groff_warns_about_nothing():
    proc = subprocess.run([need("groff"), "-ww", "-z", "-man", str(MAN)], capture_output=True, text=True)
    assert proc.stderr == "" and proc.returncode == 0


def test_man_renders_the_page():
    proc = subprocess.run([need("man"), "-l", str(MAN)], capture_output=True, text=True,
                          env={**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"})
    assert proc.returncode == 0, proc.stderr
    assert "EXIT STATUS" in proc.stdout and "--pipe-size" in proc.stdout


# --- (d) real shells complete commands, options and file names ---------------------------------

def bash_complete(*lines: str) -> list[list[str]]:
    """COMPREPLY for each command line (words split on spaces; a trailing space completes an
    empty word), from one bash that sourced bash-completion and the script."""
    need("bash")
    script = [f"source {BASH_COMPLETION}" if BASH_COMPLETION.exists() else ":", f"source {BASH}"]
    for line in lines:
        words = line.split(" ")
        quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
        script += [f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; COMPREPLY=()",
                   # One word: unquoted, `COMP_LINE='zcrelay' 'tee' '-'` ran `tee -`, which
                   # wrote an empty file named "-" in the repository.
                   f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}",
                   "_zcrelay zcrelay \"${COMP_WORDS[COMP_CWORD]}\" \"${COMP_WORDS[COMP_CWORD-1]}\"",
                   "printf '%s\\n' \"${COMPREPLY[*]}\""]
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", "\n".join(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [out.split() for out in proc.stdout.split("\n")[:len(lines)]]


def fish_complete(*lines: str) -> list[list[str]]:
    need("fish")
    script = [f"source {FISH}"]
    for line in lines:
        script += [f"complete -C {docs._fish_quote(line)}", "echo '<<END>>'"]
    proc = subprocess.run(["fish", "--no-config", "-c", "\n".join(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    chunks = proc.stdout.split("<<END>>\n")[:len(lines)]
    return [[row.split("\t")[0] for row in chunk.splitlines()] for chunk in chunks]


def zsh_complete(line: str) -> list[str]:
    need("zsh")
    proc = subprocess.run(["zsh", "-f", str(ZSH_CAPTURE), str(ZSH.parent), line], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completes_commands_and_options():
    assert bash_complete("zcrelay fo", "zcrelay forward --pi", "zcrelay --ver") == \
        [["forward"], ["--pipe-size"], ["--version"]]


def test_bash_knows_every_command_and_option():
    lines = ["zcrelay ", "zcrelay -"] + [f"zcrelay {c} -" for c in COMMANDS]
    commands, root, *per_command = bash_complete(*lines)
    assert set(COMMANDS) <= set(commands)
    assert set(ROOT_OPTIONS) <= set(root)
    for (command, options), offered in zip(COMMANDS.items(), per_command):
        assert set(options) <= set(offered), command


def _path_options() -> list[tuple[str, str, str]]:
    """(command, option, 'file'|'dir') for every option the generator completes as a path."""
    _, commands = docs.load()
    return [(c.name, o.long_first[0], o.complete) for c in commands for o in c.options
            if o.complete in ("file", "dir")]


def test_bash_completes_file_names_where_a_path_is_taken():
    cases = _path_options()
    assert ("forward", "--config", "file") in cases
    lines = [f"zcrelay {c} {o} zcrelay/cli/do" if kind == "file" else f"zcrelay {c} {o} zcrelay/cl"
             for c, o, kind in cases]
    for (command, option, kind), offered in zip(cases, bash_complete(*lines)):
        assert offered == (["zcrelay/cli/docs.py"] if kind == "file" else ["zcrelay/cli"]), (command, option)
    # A value that is not a path gets no file names.
    assert bash_complete("zcrelay forward --pipe-size pyp") == [[]]


def test_fish_completes_commands_options_and_file_names():
    got = fish_complete("zcrelay fo", "zcrelay forward --pi", "zcrelay forward --config pyp",
                        "zcrelay forward --pipe-size pyp")
    assert got == [["forward"], ["--pipe-size"], ["pyproject.toml"], []]


def test_fish_knows_every_command_and_option():
    lines = ["zcrelay ", "zcrelay -"] + [f"zcrelay {c} -" for c in COMMANDS]
    commands, root, *per_command = fish_complete(*lines)
    assert set(COMMANDS) <= set(commands)
    assert set(ROOT_OPTIONS) <= set(root)
    for (command, options), offered in zip(COMMANDS.items(), per_command):
        assert set(options) <= set(offered), command


def test_zsh_completes_commands_options_and_file_names():
    assert zsh_complete("zcrelay fo") == ["forward"]
    assert zsh_complete("zcrelay forward --pi") == ["--pipe-size"]
    assert zsh_complete("zcrelay forward --config pyp") == ["pyproject.toml"]


def test_zsh_knows_every_command_and_option():
    assert set(COMMANDS) <= set(zsh_complete("zcrelay "))
    for command, options in COMMANDS.items():
        assert set(options) <= set(zsh_complete(f"zcrelay {command} -")), command


# --- (e) the wheel installs the page and the completions ---------------------------------------

INSTALLED = {
    "share/man/man1/zcrelay.1": MAN,
    "share/bash-completion/completions/zcrelay": BASH,
    "share/zsh/site-functions/_zcrelay": ZSH,
    "share/fish/vendor_completions.d/zcrelay.fish": FISH,
}


def test_wheel_installs_man_page_and_completions(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("zcrelay-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        data = {name.split(".data/data/", 1)[1] for name in archive.namelist() if ".data/data/" in name}
    assert set(INSTALLED) <= data

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    installed = subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    for rel, source in INSTALLED.items():
        assert (venv / rel).read_text() == source.read_text(), rel

    # The console script runs from the venv (its dependencies borrowed from this interpreter).
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "trio").is_dir())
    version = subprocess.run([str(venv / "bin" / "zcrelay"), "--version"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": deps}, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("zcrelay "), version.stderr

    shown = subprocess.run([need("man"), "zcrelay"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "MANPATH": str(venv / "share" / "man"),
                                "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"})
    assert shown.returncode == 0, shown.stderr
    assert "zero-copy socket relay" in shown.stdout and "EXIT STATUS" in shown.stdout


async def _echoed_intact(port: int, payload: bytes) -> None:
    """Send `payload` to 127.0.0.1:`port`, shut down, read to EOF: the same bytes came back."""
    import hashlib

    import trio

    async with await trio.open_tcp_stream("127.0.0.1", port) as client:
        async def send() -> None:
            await client.send_all(payload)
            await client.send_eof()

        received = bytearray()
        async with trio.open_nursery() as pair:
            pair.start_soon(send)
            while data := await client.receive_some(1 << 16):
                received += data
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"## From Python\n(.*?)\n## ", text, re.S).group(1)
    return [block.split("```")[0] for block in section.split("```python\n")[1:]]


async def test_the_readmes_python_example_relays_every_byte_spliced():
    """The README's "From Python" example, run as written against a local echo target: 4 MiB
    each way (more than a pipe and a socket buffer), SHA-256 both ways, nothing copied."""
    from functools import partial

    import trio

    example: dict = {}
    exec(compile(_readme_python_blocks()[0], "README.md", "exec"), example)
    payload = os.urandom(4 << 20)
    async with trio.open_nursery() as nursery:
        [target] = await nursery.start(partial(trio.serve_tcp, traffic.echo, 0, host="127.0.0.1"))
        said: list[str] = []
        done = trio.Event()

        async def forward(client: trio.SocketStream) -> None:
            said.append(await example["forward_one"](client, "127.0.0.1", target.socket.getsockname()[1]))
            done.set()

        [listener] = await nursery.start(partial(trio.serve_tcp, forward, 0, host="127.0.0.1"))
        await _echoed_intact(listener.socket.getsockname()[1], payload)
        with trio.fail_after(10):
            await done.wait()  # forward_one returns once both sides are closed
        n = len(payload)
        assert said == [f"eof: up {n} bytes, down {n}, copied 0"], said
        nursery.cancel_scope.cancel()
    example["engine"].close()


async def test_the_readmes_forwarder_example_reports_its_port_and_counts(capsys):
    """The README's second Python example, as written: a Forwarder on port 0 says the port it
    got, moves 3 MiB each way to an echo target, spliced and intact, and stops when told."""
    from functools import partial

    import trio
    import trio.testing

    example: dict = {}
    exec(compile(_readme_python_blocks()[1], "README.md", "exec"), example)
    payload = os.urandom(3 << 20)
    async with trio.open_nursery() as nursery:
        [target] = await nursery.start(partial(trio.serve_tcp, traffic.echo, 0, host="127.0.0.1"))
        stop, result = trio.Event(), []

        async def run_it() -> None:
            result.append(await example["forward_until"](f"127.0.0.1:{target.socket.getsockname()[1]}", stop))

        nursery.start_soon(run_it)
        await trio.testing.wait_all_tasks_blocked()  # bound, said so, waiting for clients
        said = capsys.readouterr().out
        port = int(re.fullmatch(r"forwarding 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:\d+\n", said).group(1))
        await _echoed_intact(port, payload)
        stop.set()
        with trio.fail_after(5):
            while not result:
                await trio.testing.wait_all_tasks_blocked()
        totals = result[0].totals
        assert (totals.connections, totals.up, totals.down) == (1, len(payload), len(payload))
        assert (totals.spliced, totals.copied) == (2 * len(payload), 0)
        nursery.cancel_scope.cancel()
