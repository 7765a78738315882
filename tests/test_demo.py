"""`zcrelay demo` as users run it: a subprocess, small sizes (the default moves 512 MiB)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import run_zcrelay, zcrelay_argv, zcrelay_env


def test_demo_checks_every_byte_and_says_so():
    done = run_zcrelay("demo", "--size", "1M", "--connections", "2")
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "listening on 127.0.0.1:" in err and "(echo)" in err, err
    assert "2/2 intact" in err and "Traceback" not in err, err


def test_demo_warnings_are_zcrelays_lines():
    """A pipe size above the kernel's limit is a warning, given as every command gives them
    ("zcrelay: ..."): the demo had not set logging up, so it came out bare."""
    limit = int(open("/proc/sys/fs/pipe-max-size").read())
    if limit >= 1 << 30:
        pytest.skip("pipe-max-size is too large to ask for more")
    argv = zcrelay_argv("demo", "--size", "1M", "--connections", "1", "--pipe-size", str(2 * limit))
    if os.geteuid() == 0:  # root may grow pipes past the limit: drop those capabilities for the child
        argv = ["setpriv", "--bounding-set", "-sys_resource,-sys_admin", "--", *argv]
    done = subprocess.run(argv, capture_output=True, env=zcrelay_env(), timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    [line] = [line for line in err.splitlines() if "pipe-max-size" in line]
    assert line.startswith(f"zcrelay: pipe size {2 * limit} is above the kernel's limit"), err
