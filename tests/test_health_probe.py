"""ps-ctl health is a container probe: its whole process must not import torch, numpy or safetensors.

Importing them made the probe take over 4 s (10 s median on a loaded 2-core machine) against a
5 s healthcheck timeout. The tests assert on what the real command imports (``-X importtime``,
nothing installed into the interpreter), not on seconds, which a noisy machine would make flaky.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

HEAVY = {"torch", "numpy", "safetensors", "torchvision"}


def ctl_imports(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Runs ``python -m paramhub.tools.ctl ARGS``; returns the result and the top-level packages it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "paramhub.tools.ctl", *args],
                            capture_output=True, text=True, timeout=60)
    # Lines look like "import time:  self [us] |  cumulative | name"; the first one is the header.
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in result.stderr.splitlines()
               if line.startswith("import time:") and "imported package" not in line}
    return result, modules


def test_a_serving_server_is_checked_without_heavy_imports(start_server):
    server = start_server()
    result, modules = ctl_imports("health", f"127.0.0.1:{server.port}")
    assert result.returncode == 0 and "SERVING" in result.stdout, result.stderr[-2000:]
    assert "grpc" in modules and "click" in modules  # the parse sees imports at all
    assert not modules & HEAVY, sorted(modules & HEAVY)


def test_failures_exit_non_zero_without_heavy_imports(start_server):
    server = start_server()
    result, modules = ctl_imports("health", f"127.0.0.1:{server.port}", "--service", "no.such.Service")
    assert result.returncode == 1 and "does not know the service 'no.such.Service'" in result.stderr
    assert not modules & HEAVY, sorted(modules & HEAVY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result, modules = ctl_imports("health", f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 2 and "unreachable" in result.stderr
    assert "grpc" in modules and not modules & HEAVY, sorted(modules & HEAVY)


def test_the_check_sees_torch_where_ps_ctl_needs_it(tmp_path):
    # Negative control: export's path (here failing early, on a directory without checkpoints)
    # imports the checkpoint code and with it torch; the same parse must report it.
    (tmp_path / "empty").mkdir()
    result, modules = ctl_imports("export", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt"))
    assert result.returncode != 0 and "no checkpoints" in result.stderr
    assert {"torch", "safetensors"} <= modules
