"""The package type-checks: mypy, in its default mode, with pyproject.toml's [tool.mypy]
(Python 3.10, the oldest the package supports), reports nothing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_reports_no_error():
    proc = subprocess.run([sys.executable, "-m", "mypy", "zcrelay"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"mypy exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def test_every_module_is_python_3_10():
    """requires-python says 3.10: an `except*` (3.11) in zcrelay.demo was a SyntaxError there,
    for `zcrelay demo` and for `zcrelay --help`, which loads every command. The tests too, so
    that the suite runs on 3.10 (run there by hand: not every 3.11 change is syntax)."""
    for path in sorted([*(ROOT / "zcrelay").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        ast.parse(path.read_text(), str(path), feature_version=(3, 10))
