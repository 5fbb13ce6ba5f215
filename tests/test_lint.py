"""mypy (strict, with mypy-zope) and ruff are part of the test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import REPO

BIN = Path(sys.executable).parent


def run(*args: str) -> None:
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    run(str(BIN / "mypy"))


def test_ruff_check() -> None:
    run(str(BIN / "ruff"), "check", "aoaiproxy", "tests", "twisted", "bench")


def test_ruff_format() -> None:
    run(str(BIN / "ruff"), "format", "--check", "aoaiproxy", "tests", "twisted", "bench")


def test_readme_is_valid_restructuredtext() -> None:
    import docutils.core

    docutils.core.publish_doctree(
        (REPO / "README.rst").read_text(),
        settings_overrides={"report_level": 2, "halt_level": 2},
    )
