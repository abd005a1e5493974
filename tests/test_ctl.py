"""ps-ctl health and status against a live server."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from paramhub.common.pb import paramhub_pb2 as pb

pytestmark = pytest.mark.timeout(120)


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paramhub.tools.ctl", *args], capture_output=True, text=True,
                          timeout=60)


def test_health_is_zero_only_while_serving(start_server):
    server = start_server()
    assert ctl("health", f"127.0.0.1:{server.port}").returncode == 0
    server._set_serving(False)  # what draining looks like from outside
    result = ctl("health", f"127.0.0.1:{server.port}")
    assert result.returncode == 1 and "NOT_SERVING" in result.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = ctl("health", f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 2 and "unreachable" in result.stderr


def test_status_shows_the_run_and_its_workers(start_server, connect):
    server = start_server(workers=1)
    client = connect(server.port)
    client.join("alpha")
    client.push(pb.PUSH_KIND_GRADIENT, 0, [torch.zeros(client.info.layout.regions[0].numel)], num_samples=4,
                loss=0.25)
    table = ctl("status", f"127.0.0.1:{server.port}")
    assert table.returncode == 0, table.stderr
    assert "version 1  mode sync/grad" in table.stdout and "alpha" in table.stdout and "0.2500" in table.stdout
    as_json = ctl("status", f"127.0.0.1:{server.port}", "--json")
    assert '"version": "1"' in as_json.stdout and '"workerName": "alpha"' in as_json.stdout
