"""Start-up: a command imports its own modules only (issue #3, #4: start-up was most of the CPU
of a 1 GiB send or tee). Checked in a subprocess with `python -X importtime`."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import zcrelay_argv, zcrelay_env


def imported(*args: str) -> set[str]:
    argv = zcrelay_argv(*args)
    argv[1:1] = ["-X", "importtime"]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=zcrelay_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
            and "|" in line}


@pytest.mark.parametrize("args,unwanted", [
    (("tee", "/dev/null"), {"zcrelay.forward", "zcrelay.bench", "zcrelay.files", "zcrelay.demo", "rich", "pydantic"}),
    (("--version",), {"zcrelay.tee", "zcrelay.forward", "zcrelay.files", "rich", "pydantic"}),
])
def test_a_command_imports_only_what_it_uses(args, unwanted):
    modules = imported(*args)
    assert "zcrelay.cli" in modules  # the probe works
    assert not modules & unwanted, sorted(modules & unwanted)


def test_help_still_lists_every_command():
    from zcrelay.cli import COMMANDS
    out = subprocess.run(zcrelay_argv("--help"), capture_output=True, text=True, env=zcrelay_env(),
                         timeout=60).stdout
    for name in COMMANDS:
        assert f" {name} " in out, name
