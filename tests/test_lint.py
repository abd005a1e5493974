"""`make lint` stays clean: pyflakes and pycodestyle over every package (ruff, a dev dependency)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_passes_the_linter():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "common", "ps", "worker", "tools", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
