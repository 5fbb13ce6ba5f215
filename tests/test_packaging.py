"""What an installation needs: the daemon imports nothing that is only a test dependency."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

IMPORT_ALL = """
import importlib, pkgutil, sys
for test_only in ("treq", "pytest", "hypothesis", "openai", "httpx"):
    sys.modules[test_only] = None  # importing it now fails
import aoaiproxy
for module in pkgutil.walk_packages(aoaiproxy.__path__, "aoaiproxy."):
    if not module.name.endswith(".__main__"):  # a program, not a module: it would run
        importlib.import_module(module.name)
"""


def test_package_imports_no_test_dependency() -> None:
    """treq is in setup.py's test extra only (README: the relay uses Agent, not treq)."""
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
